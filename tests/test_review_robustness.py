"""Bad-input paths found in review (run_torch / memory_plan / HunyuanImage training data / CLIs): each must end in
a one-line error naming the file or field, never a traceback or a silent wrong result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]


def _qexport(folder: Path, tensors: dict, quant: str | None) -> Path:
    """A minimal Z-Image-like export folder: config.json (+ an optional quantization_config) and one shard."""
    from converters import quantize as qz

    folder.mkdir(parents=True, exist_ok=True)
    conf = {"_class_name": "ZImageTransformer2DModel", "dim": 64}
    if quant is not None:
        conf["quantization_config"] = qz.quantization_config(quant, "zimage", [])
    (folder / "config.json").write_text(json.dumps(conf))
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def test_run_torch_quantised_weight_without_scale(tmp_path):
    from converters import run_torch as rt
    from converters.engine import CheckpointError

    w = np.zeros((4, 8), np.int8)
    f = _qexport(tmp_path / "e", {"layers.0.attention.to_q.weight": w}, "int8")
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.to_q\.weight.*weight_scale"):
        rt.Export.open(f)


def test_run_torch_scales_without_quantization_config(tmp_path):
    from converters import run_torch as rt
    from converters.engine import CheckpointError

    t = {"a.weight": np.zeros((4, 8), np.int8), "a.weight_scale": np.ones(4, np.float32)}
    f = _qexport(tmp_path / "e", t, None)
    with pytest.raises(CheckpointError, match="no quantization_config"):
        rt.Export.open(f)


def test_run_torch_extra_key_is_one_line_error(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(ROOT / "tests"))
    from safetensors.numpy import load_file
    from zimage_ref import save_diffusers, tiny_diffusers

    from converters import run_torch as rt

    folder = save_diffusers(tiny_diffusers(0), tmp_path / "z")
    shard = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(shard))
    sd["layers.0.bogus.weight"] = np.zeros((2, 2), np.float32)
    save_file(sd, str(shard))
    rc = rt.main(["--model", str(folder), "--steps", "1", "--resolution", "32", "--device", "cpu", "--dtype", "fp32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "layers.0.bogus.weight" in err[0] and str(folder) in err[0], err


def test_run_torch_plan_for_other_export():
    from converters import run_torch as rt

    conf = {"num_hidden_layers": 2, "num_experts": [4, 2]}
    rt.check_plan({"offloaded_experts": {"0": [3], "1": [1]}, "cpu_resident": []}, conf, "p.json")
    with pytest.raises(ValueError, match=r"p\.json: offloaded expert 2 of layer 1.*2 experts"):
        rt.check_plan({"offloaded_experts": {"1": [2]}, "cpu_resident": []}, conf, "p.json")
    with pytest.raises(ValueError, match=r"p\.json: offloaded experts of layer 2.*2 layers"):
        rt.check_plan({"offloaded_experts": {"2": [0]}, "cpu_resident": []}, conf, "p.json")


def test_memory_plan_config_missing_field(tmp_path, capsys):
    from converters import memory_plan as mp

    f = tmp_path / "e"
    f.mkdir()
    (f / "config.json").write_text(json.dumps({"_class_name": "ZImageTransformer2DModel"}))  # no "dim"
    save_file({"x": np.zeros(4, np.float32)}, str(f / "diffusion_pytorch_model.safetensors"))
    rc = mp.main(["--model", str(f), "--target-memory", "24GB"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'dim'" in err[0] and "config.json" in err[0], err


def test_hunyuan_training_data_bad_files(tmp_path):
    from tmp_jax.models.hunyuan_image3 import train

    cfg = train.FMNIST_CONFIG
    with pytest.raises(ValueError, match=r"missing\.npz"):
        train.training_batch(cfg, str(tmp_path / "missing.npz"), 2, 0, 0)
    bad = tmp_path / "bad.npz"
    np.savez(bad, latents=np.zeros((3, 4, 16, 16), np.float32), labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"bad\.npz: latents.*\(N, 4, 14, 14\)"):
        train.training_batch(cfg, str(bad), 2, 0, 0)
    n = tmp_path / "n.npz"
    np.savez(n, latents=np.zeros((3, 4, 14, 14), np.float32), labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"n\.npz: labels"):
        train.training_batch(cfg, str(n), 2, 0, 0)
    ok = tmp_path / "ok.npz"
    np.savez(ok, latents=np.ones((3, 4, 14, 14), np.float32), labels=np.arange(3))
    b = train.training_batch(cfg, str(ok), 2, 0, 0)
    assert b["latents"].shape == (2, 4, 14, 14) and b["input_ids"].shape == (2, train.SEQ_LEN)
    # read once per file version: later steps reuse the arrays; rewriting the file is seen
    calls = {"n": 0}
    real_load = np.load

    def counting_load(*a, **k):
        calls["n"] += 1
        return real_load(*a, **k)

    np.load = counting_load
    try:
        for step in range(1, 4):
            train.training_batch(cfg, str(ok), 2, 0, step)
        assert calls["n"] == 0
        np.savez(ok, latents=np.full((5, 4, 14, 14), 2.0, np.float32), labels=np.arange(5))
        b2 = train.training_batch(cfg, str(ok), 5, 0, 9)
        assert calls["n"] == 1 and b2["latents"].shape[0] == 5
    finally:
        np.load = real_load


def test_zimage_training_data_bad_files(tmp_path):
    from tmp_jax.models.z_image import TINY
    from tmp_jax.models.z_image.runner import training_batch

    with pytest.raises(ValueError, match=r"missing\.npz: cannot read"):
        training_batch(TINY, str(tmp_path / "missing.npz"), 2, 0, 0)
    no_lens = tmp_path / "no_lens.npz"
    np.savez(no_lens, latents=np.zeros((3, 16, 1, 8, 8), np.float32), cap_feats=np.zeros((3, 4, TINY.cap_feat_dim)))
    with pytest.raises(ValueError, match=r"no_lens\.npz: missing array 'cap_lens'"):
        training_batch(TINY, str(no_lens), 2, 0, 0)
    short = tmp_path / "short.npz"
    np.savez(
        short,
        latents=np.zeros((3, 16, 1, 8, 8), np.float32),
        cap_feats=np.zeros((2, 4, TINY.cap_feat_dim), np.float32),
        cap_lens=np.full(3, 4),
    )
    with pytest.raises(ValueError, match=r"short\.npz: arrays .*same N"):
        training_batch(TINY, str(short), 2, 0, 0)
    ok = tmp_path / "ok.npz"
    lat = np.random.default_rng(0).standard_normal((3, TINY.in_channels, 1, 8, 8)).astype(np.float32)
    np.savez(ok, latents=lat, cap_feats=np.ones((3, 4, TINY.cap_feat_dim), np.float32), cap_lens=np.full(3, 4))
    b = training_batch(TINY, str(ok), 2, 0, 1)
    assert b["latents"].shape == (2, TINY.in_channels, 1, 8, 8) and b["cap_lens"].tolist() == [4, 4]
    assert 0 < b["t"].min() and b["t"].max() < 1


def test_search_mesh_help_example_is_a_valid_spec(capsys):
    import re

    from tmp_jax import search
    from tmp_jax.sharding import make_mesh

    with pytest.raises(SystemExit):
        search.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    m = re.search(r"--mesh MESH (.*?)--", text)
    example = re.search(r"e\.g\. (\S+?)\)?(?:\s|$)", m.group(1)).group(1)
    make_mesh(example)  # the documented example is accepted (8 fake CPU devices)


def test_dump_calibration_rejects_nonpositive_counts(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import dump_calibration as dump

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    base = ["--pipeline", str(tmp_path / "no-such-pipeline"), "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    for flag in ("--every", "--steps"):
        with pytest.raises(SystemExit, match=flag):  # before any model is loaded
            dump.main([*base, flag, "0"])
    assert not (tmp_path / "o").exists()


def test_calibration_resume_state_of_another_set(tmp_path):
    """A calib_state.npz (in-memory) or calib_stream/ state (streamed) left by another calibration set in the
    same folder was resumed silently: teacher outputs of the other set, misaligned with the inputs."""
    import jax
    import jax.numpy as jnp

    from tmp_jax import arch
    from tmp_jax import streamed_calibration as sc
    from tmp_jax.calibration import calibrate
    from tmp_jax.models.z_image import TINY

    h = arch.get("zimage")
    model = h.init_random(TINY, jnp.float32, 0)
    a, b = h.synthetic_calib(TINY, 8, 4, 0), h.synthetic_calib(TINY, 4, 4, 1)
    calibrate(model, a, out=tmp_path / "m")
    with pytest.raises(ValueError, match=r"calib_state\.npz: resume state of another calibration set"):
        calibrate(model, b, out=tmp_path / "m")  # fewer micro-batches
    b2 = h.synthetic_calib(TINY, 8, 4, 1)  # as many micro-batches, other data
    with pytest.raises(ValueError, match="another calibration set"):
        calibrate(model, b2, out=tmp_path / "m")
    again = calibrate(model, a, out=tmp_path / "m")  # the same set still resumes
    assert len(again.teacher) == len(again.inputs) == 2
    other = h.init_random(TINY, jnp.float32, 1)  # the same set through another teacher: refused too
    with pytest.raises(ValueError, match="another teacher"):
        calibrate(other, a, out=tmp_path / "m")
    from tmp_jax.calibration import teacher_signature
    from tmp_jax.sharding import make_mesh, shard_module

    mesh = make_mesh("data:2,model:4", jax.devices()[:8])  # the same weights on a mesh: the same teacher
    assert teacher_signature(shard_module(h.init_random(TINY, jnp.float32, 0), mesh)) == teacher_signature(model)
    nudged = h.init_random(TINY, jnp.float32, 0)  # one weight of one parameter changed
    blk = nudged.layers[0].attention.to_q.kernel
    blk[...] = blk[...].at[0, 0].add(1e-3)
    with pytest.raises(ValueError, match="another teacher"):
        calibrate(nudged, a, out=tmp_path / "m")
    # streamed: an interrupted run's per-micro-batch state of another set of the same size
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(str(ckpt))
    root = tmp_path / "s" / sc.STREAM_DIR
    n_steps = len(sc.get_hooks("zimage").schedule(TINY))
    sc._write_mb(root, 0, 1, 2, n_steps, {"x": np.zeros(1)}, {}, sc.batches_signature(a))
    with pytest.raises(ValueError, match="another calibration set"):
        sc.calibrate_streamed(ckpt, b2, out=tmp_path / "s")
    # streamed, finished state of one checkpoint, then another checkpoint with the same set: refused
    sc.calibrate_streamed(ckpt, a, out=tmp_path / "s2")
    ckpt2 = tmp_path / "ckpt2"
    other.save_pretrained(str(ckpt2))
    with pytest.raises(ValueError, match="another teacher"):
        sc.calibrate_streamed(ckpt2, a, out=tmp_path / "s2")


def test_export_bad_plan_resolution_fails_before_any_work(tmp_path):
    from converters.export import ExportConfig, export

    cfg = ExportConfig(
        plan=tmp_path / "no-plan.json", model=tmp_path / "no-model", out=tmp_path / "o", progress=False,
        target_memory="24GB", resolution=1000,
    )  # fmt: skip
    with pytest.raises(ValueError, match="--resolution 1000"):  # not after streaming every tensor
        export(cfg)


def test_run_torch_bad_resolution_and_steps(tmp_path, capsys):
    from converters import run_torch as rt

    for args, what in ((["--resolution", "1000"], "--resolution 1000"), (["--steps", "0"], "--steps 0")):
        rc = rt.main(["--model", str(tmp_path / "none"), "--device", "cpu", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and what in err[0], err  # before the export is opened


def test_dump_scripts_missing_prompt_files(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import dump_calibration as dump
    import dump_calibration_hunyuan as dump_h

    missing = str(tmp_path / "missing.txt")
    with pytest.raises(SystemExit, match=r"missing\.txt"):
        dump.main(["--pipeline", "x", "--prompts", missing, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"missing\.txt"):
        dump.main(["--omni-pipeline", "x", "--edits", missing, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"missing\.txt"):
        dump_h.main(["--model", str(tmp_path), "--prompts", missing, "--out", str(tmp_path / "o")])


def test_run_torch_refuses_resolution_above_the_plan_and_missing_out_folder(tmp_path, capsys):
    pytest.importorskip("torch")
    from converters import memory_plan as mp
    from converters import run_torch as rt

    plan = {
        "format_version": mp.FORMAT_VERSION,
        "arch": "zimage",
        "resolution": 512,
        "offloaded_experts": {},
        "cpu_resident": [],
        "compute_dtype": "float32",
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    base = ["--model", str(tmp_path / "none"), "--steps", "1", "--device", "cpu"]
    rc = rt.main([*base, "--resolution", "1024", "--memory-plan", str(tmp_path / "plan.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "512px" in err[0], err
    rc = rt.main([*base, "--resolution", "512", "--out", str(tmp_path / "no" / "x.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "does not exist" in err[0], err
