"""HunyuanImage-3.0-Instruct TI2I micro-batches in calibration, fitness and distillation (mixed with T2I).

Tiny Instruct-Distil config (condition VAE + ViT tokens, guidance and timestep_r slots), every parameter
random. No PyTorch reference covers this path (see ``instruct.py``): the TI2I hooks are checked against
``instruct.ti2i_forward`` called directly on the builder's rows, the weighted fitness against numpy on the
materialised candidate (TI2I candidates are evaluated by materialising: no prefix-sliced TI2I runner for
HunyuanImage), and distillation on the mixed set lowers both tasks' output errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from plan_ref import write_plan

from tmp_jax import arch
from tmp_jax.calibration import calibrate, load_calib, prepare, write_calib
from tmp_jax.models.hunyuan_image3 import TINY
from tmp_jax.models.hunyuan_image3 import instruct as ins
from tmp_jax.problem import PruningProblem

H = arch.get("hunyuan")
ALIGNER = {"projector_type": "mlp_gelu", "input_dim": 24, "n_embed": 64, "depth": 2}
CFG = TINY.replace(vae={"latent_channels": 4}).replace(
    cfg_distilled=True,
    use_meanflow=True,
    ti2i=True,
    cond_image_type="vae_vit",
    cond_token_attn_type="joint_full",
    vit_aligner=ALIGNER,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hy_mixed")
    model = H.init_random(CFG, jnp.float32, 1)
    t2i = H.synthetic_calib(CFG, 4, 2, 0)
    ed = H.for_task("ti2i").synthetic_calib(CFG, 4, 2, 1)
    calib = write_calib(root / "calib", [t2i[0], ed[0], t2i[1], ed[1]], "hunyuan")
    cal = calibrate(model, load_calib(calib, "hunyuan"), weights={"t2i": 0.6, "ti2i": 0.4})
    from tmp_jax.models.hunyuan_image3.train import save

    save(model, root / "teacher")  # official layout: what --model reads
    return root, model, calib, cal


def test_ti2i_hooks_equal_ti2i_forward(setup):
    _, model, calib, cal = setup
    b = load_calib(calib)[1]
    assert b["task"] == "ti2i" and cal.tasks == ["t2i", "ti2i", "t2i", "ti2i"]
    layout = ins.TI2ILayout(target_hw=(2, 2), cond_vae_hw=((2, 3),), cond_vit_hw=((2, 2),))
    want = ins.ti2i_forward(
        model,
        jnp.asarray(b["input_ids"]),
        jnp.asarray(b["latents"]),
        jnp.asarray(b["timestep"]),
        layout=layout,
        target_start=jnp.asarray(b["target_start"]),
        cond_start=jnp.asarray(b["cond_start"]),
        cond_latents=(jnp.asarray(b["cond_latents_0"]),),
        vit_features=(jnp.asarray(b["vit_features_0"]).reshape(2, 4, 24),),
        guidance=jnp.asarray(b["guidance"]),
        timestep_r=jnp.asarray(b["timestep_r"]),
        valid_lengths=jnp.asarray(b["valid_lengths"]),
    )
    inputs = prepare(H, CFG, b)
    h = H.for_task("ti2i")
    np.testing.assert_allclose(np.asarray(h.forward(model, inputs)), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cal.teacher[1], np.asarray(want), rtol=1e-6, atol=1e-6)
    out, _ = h.forward_train(model, {k: v for k, v in inputs.items() if k != "task"}, False)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-6)
    # the conditions reach the output, and the statistics are summed per task
    moved = {**inputs, "vit_features": (inputs["vit_features"][0] + 1.0,)}
    assert np.abs(np.asarray(h.forward(model, moved)) - np.asarray(want)).max() > 1e-4
    assert set(cal.stats_by_task) == {"t2i", "ti2i"} and cal.stats_by_task["ti2i"].keys() == cal.stats.keys()
    with pytest.raises(ValueError, match="'guidance'"):
        H.for_task("ti2i").prepare_batch(CFG, {k: v for k, v in b.items() if k != "guidance"})
    with pytest.raises(ValueError, match="'vit_features_0' is missing"):
        H.for_task("ti2i").prepare_batch(CFG, {k: v for k, v in b.items() if k != "vit_features_0"})
    n = b["timestep"].shape[0]
    for key in ("timestep", "target_start", "guidance"):  # a per-row array of the wrong size names itself
        with pytest.raises(ValueError, match=rf"'{key}' must hold one value per row \(B={n},\)"):
            H.for_task("ti2i").prepare_batch(CFG, {**b, key: np.concatenate([b[key], b[key]])})


def _error(model, cal, task: str) -> float:
    # every array uncommitted, as the in-memory teacher's and so the problem's materialised candidates' are:
    # a candidate, the student sliced from the loaded checkpoint and the distilled student (whose arrays a
    # jitted step committed) then share the fitness's compiled programs (a committed state lowers to others)
    gd, st = nnx.split(model)
    model = nnx.merge(gd, jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), st))
    num = den = 0.0
    for inp, yt in zip(cal.inputs, cal.teacher):
        if inp["task"] == task:
            y = np.asarray(H.for_task(task).forward(model, inp), np.float64)
            num += float(np.sum((y - yt) ** 2))
            den += float(np.sum(yt.astype(np.float64) ** 2))
    return num / den


def test_weighted_fitness_and_mixed_distillation(setup, tmp_path):
    from tmp_jax.distill import DistillConfig, build_pair
    from tmp_jax.distill import run as distill

    root, model, calib, cal = setup
    p = PruningProblem(model, cal, source={}, task_weights={"t2i": 0.6, "ti2i": 0.4})
    rng = np.random.default_rng(2)
    g = rng.integers(1, p.tree.max_levels() + 1)
    cand = p.candidate(g)
    e1, e2 = _error(cand, cal, "t2i"), _error(cand, cal, "ti2i")
    assert e1 > 1e-4 and e2 > 1e-4 and abs(e1 - e2) > 1e-3 * e1
    assert p.fitness(g[None])[0] == pytest.approx(0.6 * e1 + 0.4 * e2, rel=1e-6)
    np.testing.assert_allclose(p.fitness(g[None]), p.fitness_materialized(g[None]), rtol=1e-6)

    folder = root / "teacher"
    tree = p.tree
    plan = write_plan(tmp_path / "plan.json", "hunyuan", folder, model, tree, g, None)
    dc = DistillConfig(
        plan=plan,
        model=str(folder),
        calib=str(calib),
        task="t2i,ti2i",
        out=tmp_path / "d",
        steps=8,
        save_every=8,
        lr=3e-4,
        warmup=1,
        progress=False,
    )
    _, student0, _, _ = build_pair(dc)
    # the teacher outputs of the setup's calibration: the checkpoint build_pair loads is that model, saved
    before = {t: _error(student0, cal, t) for t in ("t2i", "ti2i")}
    after_model = distill(dc)["student"]
    after = {t: _error(after_model, cal, t) for t in ("t2i", "ti2i")}
    assert all(after[t] < 0.85 * before[t] for t in before), (before, after)  # measured 0.21->0.10, 0.24->0.18


def test_mixed_search_end_to_end(setup, tmp_path, monkeypatch):
    """The CLI path on the Instruct checkpoint and the mixed set: 1 generation, a plan within budget. The warm-up
    (T2I masked, TI2I materialised) runs the TI2I candidate of one genome only: a materialised candidate's
    whole-model program is compiled per candidate shape, so more warm-up genomes would compile for nothing."""
    import json

    from tmp_jax.search import main

    warm_tasks: list[list] = []
    warmup = PruningProblem.warmup

    def counting_warmup(self, progress=False, workers=None):
        run, seen = self._run, []
        self._run = lambda a, inputs, built: (seen.append(inputs.get("task")), run(a, inputs, built))[1]
        try:
            return warmup(self, progress, workers)
        finally:
            del self._run
            warm_tasks.append(seen)

    monkeypatch.setattr(PruningProblem, "warmup", counting_warmup)
    root, _, calib, _ = setup
    out = tmp_path / "s"
    argv = ["--model", str(root / "teacher"), "--calib", str(calib), "--budget", "80%", "--out", str(out)]
    rc = main([*argv, "--task", "t2i:0.6,ti2i:0.4", "--generations", "1", "--population", "2", "--no-progress"])
    assert rc == 0
    assert warm_tasks == [["ti2i"]]  # one TI2I input shape in the set, one genome; the T2I program is masked
    plan = json.loads((out / "plan.json").read_text())
    assert plan["search"]["task_weights"] == pytest.approx({"t2i": 0.6, "ti2i": 0.4})
    assert plan["counts"]["after"]["params"] <= 0.8 * plan["counts"]["before"]["params"]
    assert main([*argv, "--task", "t2i,edit"]) == 2  # an unknown task: one-line error, exit code 2
