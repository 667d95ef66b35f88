"""Recovery distillation on the embedded TRAINED teacher: it helps, it resumes exactly, NaN stops it."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from plan_ref import embedded_dit_plan

from tmp_jax import arch
from tmp_jax import data as fm
from tmp_jax.distill import DistillConfig, NonFiniteLoss, build_pair, run
from tmp_jax.problem import EMBEDDED

TEACHER = EMBEDDED["zimage-fmnist"]
H = arch.get("zimage")


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    """A real plan: drop main block 3, halve every other main block's FFN, keep 4 of 6 heads in block 0."""
    return embedded_dit_plan(tmp_path_factory.mktemp("plan") / "plan.json", heads0=3)


@partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    return H.forward_train(nnx.merge(graphdef, state), x, False)[0]


def _heldout_inputs(config) -> dict:
    """64 TEST images at fixed sigmas and noise, prepared (arrays only) for ``_forward``."""
    test = fm.load_subset("test")
    rng = np.random.default_rng(123)
    x0 = fm.to_latents(test.images[:64])[:, :, None]
    sigma = np.linspace(0.1, 0.9, 64).astype(np.float32)
    s = sigma[:, None, None, None, None]
    xt = ((1 - s) * x0 + s * rng.standard_normal(x0.shape)).astype(np.float32)
    cap = fm.caption_features(test.labels[:64], config.cap_feat_dim)
    batch = {"latents": xt, "cap_feats": cap, "cap_lens": np.full(64, cap.shape[1], np.int32), "t": 1 - sigma}
    return {k: v for k, v in H.prepare_batch(config, batch).items() if not isinstance(v, str)}


def _predict(model, x) -> np.ndarray:
    """One compiled whole-model program per model graph (the blockwise runner compiles per sub-layer). The
    state is committed to the device first, as a distilled student's already is: an uncommitted state lowers
    to another program, so the student before and after distillation would compile twice."""
    gd, st = nnx.split(model)
    return np.asarray(_forward(gd, jax.device_put(st, jax.devices()[0]), x))


def _heldout_gap(student, teacher_out: np.ndarray, x: dict) -> float:
    """Normalised student-teacher output MSE on the held-out inputs ``x`` (teacher outputs ``teacher_out``)."""
    ys, m = _predict(student, x), x["mask"][..., None]
    return float(np.sum((ys - teacher_out) ** 2 * m) / np.sum(teacher_out**2 * m))


def _cfg(plan: Path, out: Path, **kw) -> DistillConfig:
    base = dict(
        plan=plan, model=str(TEACHER), out=out, steps=6, batch_size=8, save_every=3, progress=False, lr=1e-3, warmup=2
    )
    return DistillConfig(**{**base, **kw})


def test_distillation_lowers_heldout_gap(plan, tmp_path):
    teacher, student0, _, _ = build_pair(_cfg(plan, tmp_path / "x"))
    x = _heldout_inputs(teacher.config)
    teacher_out = _predict(teacher, x)  # once: the teacher is not trained
    before = _heldout_gap(student0, teacher_out, x)
    res = run(_cfg(plan, tmp_path / "d", steps=24, save_every=24, lr=2e-3))
    after = _heldout_gap(res["student"], teacher_out, x)
    # measured here (CPU): 0.141 -> 0.079 after 24 steps (16 steps: 0.100, 40 steps: 0.061)
    assert after < 0.7 * before, (before, after)
    assert (tmp_path / "d" / "loss.png").is_file()
    # the recovered weights load back as a diffusers-layout folder with the pruned config
    back = H.load(str(tmp_path / "d" / "weights"))
    assert back.config.layers_kept == (0, 1, 2, 4, 5)


@pytest.fixture(scope="module")
def full_history(plan, tmp_path_factory) -> np.ndarray:
    """The loss curve of one uninterrupted single-device 6-step run (the reference of the resume and the sharded
    tests)."""
    return np.asarray(run(_cfg(plan, tmp_path_factory.mktemp("full") / "a"))["history"])


def test_resume_gives_the_same_loss_curve(plan, full_history, tmp_path):
    run(_cfg(plan, tmp_path / "b", steps=3))
    resumed = run(_cfg(plan, tmp_path / "b", resume=True))
    np.testing.assert_allclose(np.asarray(resumed["history"]), full_history, rtol=1e-5)
    with pytest.raises(ValueError, match="pass --resume"):
        run(_cfg(plan, tmp_path / "b"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(plan, tmp_path):
    with pytest.raises(NonFiniteLoss, match="Last good checkpoint"):
        run(_cfg(plan, tmp_path / "n", steps=40, save_every=1, lr=1e12, clip_norm=1e12, warmup=1))
    ckpts = sorted(int(p.name) for p in (tmp_path / "n" / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts, "a good checkpoint was kept"


def test_sharded_distillation_matches_single_device(plan, full_history, tmp_path):
    """Data-parallel + model-sharded on 8 fake devices: the same loss curve as one device.

    3 steps: the losses of steps 0-2 depend on the updates of steps 0 and 1 only, whose learning rates (warm-up:
    0, then lr / 2) do not depend on the run's length, so the sharded 3-step curve must equal the first 3 points
    of the single-device 6-step one. Step 0's rate is 0, so the third point is the first after a parameter
    update (a 2-step run compares the initial parameters' losses on two batches only)."""
    sharded = run(_cfg(plan, tmp_path / "s8", steps=3, save_every=3, mesh="data:2,model:4"))
    np.testing.assert_allclose(np.asarray(sharded["history"]), full_history[:3], rtol=2e-4)


def test_fused_step_equals_gradients_then_apply(plan, tmp_path):
    """The one-program step (gradient + AdamW, losses left on the device) is the two-program step."""
    import jax.numpy as jnp

    from tmp_jax.distill import make_trainer, training_batches

    cfg = _cfg(plan, tmp_path / "f")
    teacher, student, _, _ = build_pair(cfg)
    trainer, p0, o0 = make_trainer(cfg, teacher, student)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731 (the steps donate their inputs)
    batch_at = training_batches(cfg, teacher.config, teacher.ARCH)
    pf, of, pu, ou = copy(p0), copy(o0), copy(p0), copy(o0)
    for step in range(2):
        x = batch_at(step)
        pf, of, loss_f, _ = trainer.step(pf, of, x)
        loss_u, _, g, n = trainer.gradients(pu, x)
        pu, ou = trainer.apply(pu, ou, g, n)
        np.testing.assert_allclose(float(loss_f), loss_u, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(pu)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(p0)))


def test_checkpoints_by_wall_time_as_well_as_by_step(plan, tmp_path):
    def steps(out: Path) -> list[int]:
        return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())

    # 3 steps: the schedule (compiled into the step program) of the resume test's first run, so this test compiles
    # no step program of its own when it runs after that one (the persistent compilation cache)
    run(_cfg(plan, tmp_path / "t", steps=3, save_every=1000, save_every_s=1e-9))  # time is always due
    assert steps(tmp_path / "t") == [2, 3]  # every step saved; the manager keeps the last two
    run(_cfg(plan, tmp_path / "s", steps=3, save_every=1000, save_every_s=0))  # by steps only: the final one
    assert steps(tmp_path / "s") == [3]


def test_init_starts_from_a_checkpoint_of_the_same_student(plan, tmp_path):
    """``--init DIR``: the student starts from DIR's parameters (e.g. tmp_jax.reconstruct's OUT/weights), each in
    its own dtype; a checkpoint of another plan or a folder without a model is a one-line error naming it."""
    from flax import traverse_util

    from tmp_jax.distill import init_student

    base = DistillConfig(plan=plan, model=str(TEACHER), dtype="fp32", progress=False)
    _, student, _, _ = build_pair(base)
    flat = traverse_util.flatten_dict(nnx.state(student, nnx.Param).to_pure_dict())
    rng = np.random.default_rng(0)
    moved = {k: np.asarray(v) + rng.normal(0, 0.01, v.shape).astype(np.asarray(v).dtype) for k, v in flat.items()}
    nnx.update(student, nnx.State(traverse_util.unflatten_dict(moved)))
    H.save(student, tmp_path / "w", overwrite=True)
    _, started, _, _ = build_pair(DistillConfig(plan=plan, model=str(TEACHER), dtype="fp32", init=tmp_path / "w"))
    got = traverse_util.flatten_dict(nnx.state(started, nnx.Param).to_pure_dict())
    assert got.keys() == moved.keys()
    for k, v in moved.items():
        assert got[k].dtype == flat[k].dtype
        np.testing.assert_allclose(np.asarray(got[k]), v, rtol=0, atol=1e-6, err_msg=str(k))
    # another plan's student (block 0 at 2 heads, not 3): its checkpoint does not fit this plan
    other = embedded_dit_plan(tmp_path / "other.json", heads0=2)
    _, s2, _, _ = build_pair(DistillConfig(plan=other, model=str(TEACHER), dtype="fp32"))
    H.save(s2, tmp_path / "w2", overwrite=True)
    with pytest.raises(ValueError, match=r"--init .*w2: parameter \S+ is shape .* the plan's student has shape"):
        init_student(student, tmp_path / "w2")
    with pytest.raises(ValueError, match="not a model folder"):
        build_pair(DistillConfig(plan=plan, model=str(TEACHER), init=tmp_path))
