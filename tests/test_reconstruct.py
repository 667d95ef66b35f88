"""Block-by-block reconstruction (tmp_jax.reconstruct) on the embedded TRAINED DiT: it lowers every fitted block's
calibration error and the student's held-out output error, writes a loadable student, and resumes after a crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from plan_ref import embedded_dit_plan

from tmp_jax import arch
from tmp_jax.distill import plan_student
from tmp_jax.problem import EMBEDDED
from tmp_jax.reconstruct import ReconstructConfig, main

TEACHER = EMBEDDED["zimage-fmnist"]
H = arch.get("zimage")
STEPS = 12


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    """Drop main block 3 and halve every main block's FFN: block 4 must stand in for block 3."""
    return embedded_dit_plan(tmp_path_factory.mktemp("plan") / "plan.json")


COMPILED: dict[str, int] = {}  # the run fixture's training-step compiles, per fitted block


@pytest.fixture(scope="module")
def run(plan, tmp_path_factory) -> Path:
    from tmp_jax import reconstruct as rc

    def counted(name, *args, _fit=rc._fit_block):
        n0 = rc._train_step._cache_size()
        out = _fit(name, *args)
        COMPILED[name] = rc._train_step._cache_size() - n0
        return out

    out = tmp_path_factory.mktemp("rec") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rc, "_fit_block", counted)
        args = ["--plan", str(plan), "--model", str(TEACHER), "--steps", str(STEPS), "--out", str(out), "--no-progress"]
        assert main(args) == 0
    return out


def _gap(student, teacher, inputs) -> float:
    """Normalised student-teacher output error over prepared inputs (valid tokens only)."""
    num = den = 0.0
    for inp in inputs:
        yt, ys = np.asarray(H.forward(teacher, inp)), np.asarray(H.forward(student, inp))
        num, den = num + float(np.sum((ys - yt) ** 2)), den + float(np.sum(yt**2))
    return num / den


def test_reconstruction_lowers_block_and_output_error(plan, run):
    from tmp_jax.calibration import prepare
    from tmp_jax.problem import _teacher_and_set

    rec = json.loads((run / "reconstruct.json").read_text())
    assert rec["finished"] and rec["settings"]["steps"] == STEPS
    blocks = [b["block"] for b in rec["blocks"]]
    assert "layers/3" not in blocks and "layers/4" in blocks  # the dropped block has no student block
    assert all(b["after"] <= b["before"] for b in rec["blocks"])
    assert sum(b["kept"] for b in rec["blocks"]) >= len(blocks) // 2
    lay4 = next(b for b in rec["blocks"] if b["block"] == "layers/4")
    assert lay4["after"] < 0.8 * lay4["before"]  # standing in for the dropped block is most of its error
    teacher, path, _, batches, _ = _teacher_and_set(str(TEACHER), None, "fp32", None, 8, 0)
    sliced, _, _ = plan_student(plan, teacher, path, str(TEACHER), False)
    fitted = H.load(str(run / "weights"))
    inputs = [prepare(H, teacher.config, b) for b in batches[:2]]
    assert _gap(fitted, teacher, inputs) < 0.8 * _gap(sliced, teacher, inputs)


def test_resume_refits_only_the_blocks_after_the_crash(plan, run, tmp_path, capsys):
    rec = json.loads((run / "reconstruct.json").read_text())
    out = tmp_path / "out"
    shutil.copytree(run / "weights", out / "weights")
    # as if the run died before its last block (the weights are saved with the record, after each block);
    # a resumed run needs the same settings, re-fits only what is not recorded and keeps the rest
    cut = {**rec, "blocks": rec["blocks"][:-1], "finished": False}
    (out / "reconstruct.json").write_text(json.dumps(cut))
    args = ["--plan", str(plan), "--model", str(TEACHER), "--steps", str(STEPS), "--out", str(out), "--no-progress"]
    assert main(args) == 2  # without --resume: refused, nothing overwritten
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--steps", "3", "--resume"]) == 2  # other settings: refused
    assert "other settings" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "reconstruct.json").read_text())
    assert again["finished"] and [b["block"] for b in again["blocks"]] == [b["block"] for b in rec["blocks"]]
    assert again["blocks"][:-1] == rec["blocks"][:-1]


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="steps"):
        ReconstructConfig(steps=-1)
    assert main(["--plan", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.json" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["--plan", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.json: cannot read plan" in capsys.readouterr().err


def test_streamed_equals_in_memory_holds_one_block_and_resumes(plan, run, tmp_path, monkeypatch):
    """``--streamed on`` (the 80B path: shape-only models, each block read from the checkpoint when its turn comes,
    the student's as ``converters.export`` slices it) fits the same blocks to the same errors as the in-memory run,
    never holds more than the stem and one block of either model, and resumes after a crash."""
    from converters.engine import SafetensorsReader
    from tmp_jax import reconstruct as rc
    from tmp_jax.streamed_calibration import ParamStreamer

    resident: list[int] = []  # student + teacher parameters on the devices at every block load

    def count(streamer) -> int:
        return sum(v.get_value() is not streamer.placeholder[p] for p, v in streamer.var.items())

    streamers: list = []
    for cls in (rc.StudentStreamer, ParamStreamer):
        orig = cls.load

        def load(self, module, _orig=orig):
            if self not in streamers:
                streamers.append(self)
            _orig(self, module)
            resident.append(sum(count(s) for s in streamers))

        monkeypatch.setattr(cls, "load", load)
    out = tmp_path / "s"
    args = ["--plan", str(plan), "--model", str(TEACHER), "--steps", str(STEPS), "--out", str(out), "--no-progress"]
    assert main([*args, "--streamed", "on"]) == 0
    ref = json.loads((run / "reconstruct.json").read_text())
    got = json.loads((out / "reconstruct.json").read_text())
    assert got["settings"]["streamed"] and not ref["settings"]["streamed"]
    assert [b["block"] for b in got["blocks"]] == [b["block"] for b in ref["blocks"]]
    for g, r in zip(got["blocks"], ref["blocks"]):
        np.testing.assert_allclose([g["before"], g["after"]], [r["before"], r["after"]], rtol=2e-3, err_msg=g["block"])
    # the stems (embedders, final layer) stay; blocks come and go: one block of each model at most on top
    n_total = sum(len(s.var) for s in streamers)
    assert max(resident) < n_total // 3, (max(resident), n_total)
    a, b = SafetensorsReader(out / "weights"), SafetensorsReader(run / "weights")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        np.testing.assert_allclose(a.read(k), b.read(k), rtol=2e-3, atol=2e-4, err_msg=k)
    # a crash after the last block's file was written but before its record: resuming discards that file and
    # re-fits that block only, from its sliced start, to the same result
    last = got["blocks"][-1]["block"]
    assert (out / "blocks" / f"{last.replace('/', '.')}.safetensors").is_file()
    (out / "reconstruct.json").write_text(json.dumps({**got, "blocks": got["blocks"][:-1], "finished": False}))
    shutil.rmtree(out / "weights")
    assert main([*args, "--streamed", "on", "--resume"]) == 0
    again = json.loads((out / "reconstruct.json").read_text())
    assert again["finished"] and again["blocks"][:-1] == got["blocks"][:-1]
    for k in ("before", "after"):  # "before" would be the stale fit's error had the file been read
        np.testing.assert_allclose(again["blocks"][-1][k], got["blocks"][-1][k], rtol=1e-5)
    c = SafetensorsReader(out / "weights")
    for k in a.keys():
        np.testing.assert_allclose(c.read(k), a.read(k), rtol=1e-5, atol=1e-7, err_msg=k)


def test_micro_batch_split_and_dtype_checks():
    from tmp_jax.reconstruct import split_rows

    b = {
        "latents": np.arange(10).reshape(5, 2),
        "t": np.arange(5.0),
        "patch_key": "p",
        "cfg_guidance": np.ones(1),  # fitness-only keys: dropped from the pieces
        "sample_weight": np.ones(2),
    }
    pieces = split_rows([b], 2)
    assert [p["latents"].shape[0] for p in pieces] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([p["t"] for p in pieces]), b["t"])
    assert all(p["patch_key"] == "p" and "cfg_guidance" not in p and "sample_weight" not in p for p in pieces)
    assert split_rows([b], None) == [b]
    with pytest.raises(ValueError, match="different leading sizes"):
        split_rows([{"a": np.zeros(3), "b": np.zeros(4)}], 2)
    with pytest.raises(ValueError, match="dtype"):
        ReconstructConfig(dtype="float16")


def test_learning_rate_follows_the_weight_scale_and_blocks_share_one_step(run):
    """The default peak rate is AUTO_LR x the block's weight RMS (Adam's step size does not scale with the weights:
    1e-3, tuned on the embedded teachers, did not fit a full-width HunyuanImage block at all), an explicit --lr
    wins, and every block of one structure reuses one compiled training step."""
    import jax.numpy as jnp

    from tmp_jax.reconstruct import AUTO_LR, block_lr

    rng = np.random.default_rng(0)
    block = {"w": jnp.asarray(rng.normal(0, 0.08, (64, 32)), jnp.float32), "scale": jnp.full((32,), 5.0)}
    lr = block_lr(block, ReconstructConfig())
    np.testing.assert_allclose(lr, AUTO_LR * 0.08, rtol=0.05)  # the norm scale (RMS 5) does not count
    small = {**block, "w": block["w"] * 0.2}  # a wider model's smaller weights: a proportionally smaller step
    np.testing.assert_allclose(block_lr(small, ReconstructConfig()), 0.2 * lr, rtol=1e-5)
    assert block_lr(block, ReconstructConfig(lr=3e-4)) == 3e-4
    with pytest.raises(ValueError, match="lr must be > 0"):
        ReconstructConfig(lr=0.0)
    rec = json.loads((run / "reconstruct.json").read_text())
    lrs = [b["lr"] for b in rec["blocks"]]
    assert all(5e-4 < x < 2e-3 for x in lrs), lrs  # the embedded DiT's blocks: RMS 0.07-0.08, about 1e-3
    assert len(set(lrs)) > 1  # per block, from its own weights
    # the main blocks share one structure (each has its FFN halved): once two of them have run, the others
    # compile nothing (a new optimiser per block, a static argument, compiled every block's step again)
    assert set(COMPILED) == {b["block"] for b in rec["blocks"]}
    assert COMPILED["layers/0"] > 0 and [COMPILED[f"layers/{i}"] for i in (2, 4, 5)] == [0, 0, 0], COMPILED
