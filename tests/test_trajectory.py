"""The fitness on the teacher's own sampling trajectory (:mod:`tmp_jax.trajectory`, issue 17 item 1).

* The recorded states are the sampler's: the first is the initial noise (sigma = 1), recording changes no
  sample, and each micro-batch is P class-prompted states then the same P with the null prompt.
* The fitness of a guided micro-batch is the weighted error of ``u + w (c - u)``, computed here by hand from
  the materialised candidate's outputs, in the sliced and the masked evaluation, on both embedded teachers.
* The embedded teachers calibrate on their trajectory by default; ``calib_source="noised"`` keeps the old set.
"""

from __future__ import annotations

import numpy as np
import pytest

from tmp_jax import arch
from tmp_jax.calibration import calibrate
from tmp_jax.problem import PruningProblem, _load_model
from tmp_jax.sampling import sample_latents, sigma_schedule
from tmp_jax.trajectory import step_weights, trajectory_calib

LEVELS = {"fractions": [0.5, 1.0]}


@pytest.fixture(scope="module", params=["zimage-fmnist", "hunyuan-fmnist"])
def teacher(request):
    model, _, _ = _load_model(request.param, "fp32")
    return model


def test_states_are_the_samplers(teacher):
    if teacher.ARCH == "hunyuan":
        pytest.skip("HunyuanImage's states: through test_guided_fitness_by_hand (saves a sampler compile in CI)")
    labels = np.array([0, 1])  # what trajectory_calib draws for n_labels=2
    final, states = sample_latents(teacher, labels, seed=5, steps=3, guidance=2.0, record=True)
    assert states.shape == (2, 3, 4, 14, 14) and final.shape == (2, 4, 14, 14)
    assert not np.allclose(states[:, 1], states[:, 0])  # the sampler moved
    batches = trajectory_calib(teacher, n_labels=2, steps=3, pairs_per_batch=4, guidance=2.0, seed=5)
    assert [len(b["sample_weight"]) for b in batches] == [4, 2]
    hooks = arch.get(teacher.ARCH)
    sig = np.tile(sigma_schedule(3)[:3], 2)
    # every micro-batch: P prompted states, then the same states with the null prompt
    lat = np.concatenate([np.asarray(b["latents"]).reshape(-1, 4, 14, 14)[: len(b["sample_weight"])] for b in batches])
    np.testing.assert_allclose(lat, states.reshape(6, 4, 14, 14))
    for b in batches:
        p = len(b["sample_weight"])
        lt = np.asarray(b["latents"])
        np.testing.assert_array_equal(lt[:p], lt[p:])
        assert float(b["cfg_guidance"][0]) == 2.0
        assert hooks.batch_task(b) == hooks.default_task
    np.testing.assert_allclose(np.concatenate([b["sample_weight"] for b in batches]), step_weights("sigma", sig))
    assert sig[0] == 1.0 and step_weights("sigma", sig)[0] > step_weights("sigma", sig)[2]


@pytest.mark.parametrize("mode", ["sliced", "masked"])
def test_guided_fitness_by_hand(teacher, mode):
    if mode == "sliced" and teacher.ARCH == "hunyuan":
        pytest.skip("sliced == masked on any batch: tests/test_masked_eval.py (saves compiles in CI)")
    batches = trajectory_calib(teacher, n_labels=2, steps=3, pairs_per_batch=3, seed=5)
    cal = calibrate(teacher, batches)
    prob = PruningProblem(
        teacher, cal, source={"path": None, "fingerprint": "t", "config": {}}, levels=LEVELS, eval_mode=mode
    )
    hooks = arch.get(teacher.ARCH)
    g = prob.tree.full_genome()
    g[::2] = 0  # every other gene at its smallest level
    if mode == "sliced":  # one width per kind: few sub-layer programs to compile
        g[:] = 0
    cand = prob.candidate(g)
    num = den = 0.0
    for inputs, yt in zip(cal.inputs, cal.teacher):
        y = np.asarray(hooks.forward(cand, inputs), np.float64)
        yt = np.asarray(yt, np.float64)
        p = y.shape[0] // 2
        w = float(inputs["cfg_guidance"][0])
        gy, gt = y[p:] + w * (y[:p] - y[p:]), yt[p:] + w * (yt[:p] - yt[p:])
        m = np.asarray(inputs["mask"])[:p, ..., None] * np.asarray(inputs["sample_weight"]).reshape(
            -1, *[1] * (y.ndim - 1)
        )
        num += float(np.sum(np.square(gy - gt) * m))
        den += float(np.sum(np.square(gt) * m))
    got = prob.fitness(g[None])[0]
    np.testing.assert_allclose(got, num / den, rtol=2e-4)
    assert got > 1e-4
    if mode == "masked":
        assert prob.fitness(prob.tree.full_genome()[None])[0] < 1e-9


def test_embedded_default_is_the_trajectory(monkeypatch):
    import tmp_jax.problem as pm

    seen = {}

    def fake(model, **kw):
        seen["called"] = True
        return trajectory_calib(model, n_labels=2, steps=3, pairs_per_batch=3, seed=5)  # shapes compiled above

    monkeypatch.setattr("tmp_jax.trajectory.trajectory_calib", fake)
    model, path, _ = _load_model("zimage-fmnist", "fp32")
    traj = pm._embedded_calib(model, path)
    assert seen and all("cfg_guidance" in b for b in traj)
    noised = pm._embedded_calib(model, path, "noised")
    assert len(noised) == 4 and not any("cfg_guidance" in b for b in noised)
    with pytest.raises(ValueError, match="--calib-source must be one of trajectory, noised"):
        pm._teacher_and_set("zimage-fmnist", None, "fp32", None, 8, 0, "bogus")


def test_shipped_states_belong_to_the_embedded_teachers(tmp_path):
    """The embedded teachers ship their sampler states (no sampler compile on a first run); they are used only
    for the checkpoint and settings they were made with."""
    import json

    from tmp_jax.fileio import fingerprint
    from tmp_jax.trajectory import GUIDANCE, STEPS, default_states_file, sampled_states, write_states

    for name in ("zimage-fmnist", "hunyuan-fmnist"):
        model, path, _ = _load_model(name, "fp32")
        key = fingerprint(path, model.config.to_hf_config())
        with np.load(default_states_file(name), allow_pickle=False) as z:
            meta, states = json.loads(str(z["meta"])), z["states"]
        assert meta == {
            "n_labels": 10,
            "steps": STEPS,
            "guidance": GUIDANCE,
            "shift": 1.0,
            "seed": 1234,
            "teacher": key,
        }
        assert states.shape == (10, STEPS, 4, 14, 14)
        assert abs(float(states[:, 0].std()) - 1.0) < 0.05  # sigma = 1: the initial Gaussian noise
    # another teacher's key (or other settings): the stored states are not used
    fake = tmp_path / "s.npz"
    write_states(
        fake,
        np.zeros((2, 3, 4, 14, 14)),
        {"n_labels": 2, "steps": 3, "guidance": 2.0, "shift": 1.0, "seed": 5, "teacher": "other"},
    )
    got = sampled_states(model, n_labels=2, steps=3, guidance=2.0, shift=1.0, seed=5, teacher_key="mine", cache=fake)
    assert np.abs(got).sum() > 0


def test_dump_script_marks_the_real_pipelines_trajectory(tmp_path):
    """scripts/dump_calibration.py's T2I recorder (the real ZImagePipeline's transformer calls, faked here by a
    pipe that calls its transformer the way diffusers does: conditional rows first, t = 1 - sigma) gives its
    micro-batches the trajectory fitness keys: cfg_guidance = 1 + guidance_scale on CFG calls, sample_weight by
    sigma with mean 1 over the set; a call without CFG gets a weight and no guidance."""
    import importlib.util
    from pathlib import Path

    import torch

    from tmp_jax.calibration import load_calib, write_calib
    from tmp_jax.trajectory import fitness_entries

    spec = importlib.util.spec_from_file_location("dump", Path(__file__).parents[1] / "scripts/dump_calibration.py")
    dump = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dump)

    class Transformer:
        def forward(self, x, t, cap_feats, *a, **kw):
            return [v * 0 for v in x]

    class Pipe:
        guidance_scale = 3.0

        def __init__(self):
            self.transformer = Transformer()

        def __call__(self, prompt, height, width, num_inference_steps, generator, **kw):
            for i, sigma in enumerate(np.linspace(1.0, 0.25, num_inference_steps)):
                rows = 2 if i < num_inference_steps - 1 else 1  # the last step without CFG (cfg truncation)
                x = [torch.randn(4, 1, 2, 2) for _ in range(rows)]
                cap = [torch.randn(3, 8) for _ in range(rows)]
                self.transformer.forward(x, torch.full((rows,), 1.0 - sigma), cap)

    batches = dump.record_t2i(Pipe(), ["a", "b"], height=16, width=16, steps=4, every=1, seed=0)
    assert len(batches) == 8
    w = np.concatenate([b["sample_weight"] for b in batches])
    sig = np.tile(np.linspace(1.0, 0.25, 4), 2)
    np.testing.assert_allclose(w, sig / sig.mean(), rtol=1e-6)
    assert [float(b["cfg_guidance"][0]) if "cfg_guidance" in b else None for b in batches[:4]] == [4.0] * 3 + [None]
    back = load_calib(write_calib(tmp_path / "c", batches, "zimage"), "zimage")
    assert set(fitness_entries(back[0])) == {"cfg_guidance", "sample_weight"}
    assert set(fitness_entries(back[3])) == {"sample_weight"}
