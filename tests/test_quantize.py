"""Weight-only quantised exports (``--quantize int8|fp8``) and the memory plan (``--target-memory``).

Every quantised tensor, dequantised, equals the unquantised export's tensor within the per-element bound of
the format (asserted per output channel); scales are fp32 ``[out]``; everything that is not a block Linear
weight is byte-identical to the unquantised export; config.json carries ``quantization_config``; re-running
is byte-identical; bad ``--quantize`` / ``--target-memory`` values and a plan that cannot fit fail clearly
and leave no output folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from test_export import _genome, _plan, src  # noqa: E402,F401  (src: the tiny Z-Image source fixture)

from converters import quantize as qz  # noqa: E402
from converters.engine import CheckpointError, SafetensorsReader  # noqa: E402
from converters.export import ExportConfig, export, main  # noqa: E402
from converters.memory_plan import make_plan, parse_bytes  # noqa: E402

pytestmark = pytest.mark.torch


def _matrix(seed: int = 0) -> np.ndarray:
    """Rows of very different magnitudes, one all-zero row, one row with a single large outlier."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((9, 37)).astype(np.float32) * np.logspace(-4, 2, 9, dtype=np.float32)[:, None]
    w[3] = 0.0
    w[5, 7] = 1e3
    return w


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantize_per_channel_bound_and_torch_twin(method):
    w = _matrix()
    q, scale = qz.quantize(w, method)
    assert q.dtype == qz.NP_DTYPES[method] and q.shape == w.shape
    assert scale.dtype == np.float32 and scale.shape == (w.shape[0],)
    assert scale[3] == 1.0 and not np.any(q[3].astype(np.float32))  # zero row: scale 1, values 0
    np.testing.assert_allclose(scale[np.arange(9) != 3], np.abs(w).max(1)[np.arange(9) != 3] / qz.QMAX[method])
    err = np.abs(qz.dequantize(q, scale) - w)
    bound = qz.error_bound(w, scale, method)
    for o in range(w.shape[0]):  # per output channel
        assert np.all(err[o] <= bound[o]), (o, err[o].max(), bound[o].max())
    # the bound is not vacuous: int8 error reaches a good part of half a step somewhere
    assert err.max() > 0
    if method == "int8":
        assert np.abs(q.astype(np.int32)).max() == 127
    # the torch twin (used on the device) gives the same bytes
    tq, ts = qz.quantize_torch(torch.from_numpy(w), method)
    view = np.uint8 if method == "fp8" else np.int8
    got = tq.view(torch.uint8).numpy() if method == "fp8" else tq.numpy()
    np.testing.assert_array_equal(got, q.view(view))
    np.testing.assert_array_equal(ts.numpy(), scale)


def test_full_size_coverage():
    """At full size the rules quantise >= 99.5% of Z-Image-Turbo and every block Linear of HunyuanImage-3.0."""
    from converters.hunyuan import hunyuan_key_table
    from converters.zimage import zimage_key_table
    from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config
    from tmp_jax.models.z_image.config import TURBO

    shapes = [(k, s) for e in zimage_key_table(TURBO).entries for k, s in zip(e.torch_keys, e.torch_shapes)]
    total = sum(int(np.prod(s)) for _, s in shapes)
    assert sum(int(np.prod(s)) for k, s in shapes if qz.quantizable("zimage", k, s)) >= 0.995 * total
    cfg = HunyuanImage3Config(num_hidden_layers=2, num_experts=4, moe_topk=2)
    shapes = [(k, s) for e in hunyuan_key_table(cfg).entries for k, s in zip(e.torch_keys, e.torch_shapes)]
    quant = {k for k, s in shapes if qz.quantizable("hunyuan", k, s)}
    assert len(quant) == 2 * (2 + 2 + 2 * 4)  # per layer: qkv, o, shared up/gate + down, 4 experts x 2
    assert not any(".gate.wg." in k or "norm" in k or k.startswith(("lm_head", "model.wte")) for k in quant)


def test_bad_method_and_sizes():
    with pytest.raises(ValueError, match=r"--quantize 'int4' is not supported; expected one of none, int8, fp8"):
        qz.check_method("int4")
    assert parse_bytes("24GB") == 24 * 10**9 and parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("1.5e9") == 1.5e9
    with pytest.raises(ValueError, match="expected a size like 24GB"):
        parse_bytes("lots")


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantized_export(tmp_path, src, method):  # noqa: F811
    folder, model, tree = src
    plan = _plan(tmp_path, folder, model, tree, _genome(tree, "hetero"), None)
    kw = dict(plan=plan, model=folder, progress=False, max_shard_bytes=40_000)
    export(ExportConfig(out=tmp_path / "plain", **kw))
    res = export(ExportConfig(out=tmp_path / "q", quantize=method, target_memory="24GB", resolution=256, **kw))
    plain, quant = SafetensorsReader(tmp_path / "plain"), SafetensorsReader(tmp_path / "q")
    qkeys = [k for k in plain.keys() if qz.quantizable("zimage", k, plain.infos[k].shape)]
    assert res["quantized"] == len(qkeys) > 0
    assert set(quant.keys()) == set(plain.keys()) | {qz.scale_key(k) for k in qkeys}
    for k in plain.keys():
        if k in qkeys:
            assert quant.infos[k].dtype == qz.TAGS[method] and quant.infos[k].shape == plain.infos[k].shape
            scale = quant.read(qz.scale_key(k))
            assert scale.dtype == np.float32 and scale.shape == (plain.infos[k].shape[0],)
            w = plain.read(k).astype(np.float32)
            err = np.abs(qz.dequantize(quant.read(k), scale) - w)
            bound = qz.error_bound(w, scale, method)
            assert all(np.all(err[o] <= bound[o]) for o in range(w.shape[0])), k
        else:  # norms, pad tokens, biases, embedders, final layer: untouched
            assert quant.read(k).tobytes() == plain.read(k).tobytes(), k
    conf = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = conf["quantization_config"]
    assert qc["quant_method"] == qz.QUANT_METHOD and qc["num_quantized_tensors"] == len(qkeys)
    assert qc["weight_dtype"] == {"int8": "int8", "fp8": "float8_e4m3fn"}[method]
    assert qz.read_quantization(conf, "config.json") == method
    plain_conf = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert {k: v for k, v in conf.items() if k != "quantization_config"} == plain_conf
    # the memory plan travels with the export and is what make_plan computes
    mp = json.loads((tmp_path / "q" / "memory_plan.json").read_text())
    assert mp == res["memory_plan"] == make_plan(tmp_path / "q", 24 * 10**9, resolution=256)
    assert mp["estimate"]["peak_bytes"] <= 24 * 10**9 and mp["summary"] == "all weights resident"
    assert mp["estimate"]["resident_weight_bytes"] == sum(
        i.end - i.start for i in quant.infos.values()
    )  # Z-Image: every stored byte is resident
    # re-running gives byte-identical files
    export(ExportConfig(out=tmp_path / "q2", quantize=method, target_memory="24GB", resolution=256, **kw))
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "q2").iterdir())
    for f in files:
        assert (tmp_path / "q" / f).read_bytes() == (tmp_path / "q2" / f).read_bytes(), f


def test_bad_quantize_and_no_fit(tmp_path, src, capsys):  # noqa: F811
    folder, model, tree = src
    plan = _plan(tmp_path, folder, model, tree, _genome(tree, "depth"), None)
    base = ["--plan", str(plan), "--model", str(folder)]
    assert main([*base, "--out", str(tmp_path / "o1"), "--quantize", "int4"]) == 2
    assert "--quantize 'int4' is not supported; expected one of none, int8, fp8" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()
    assert main([*base, "--out", str(tmp_path / "o2"), "--target-memory", "tiny"]) == 2
    assert "expected a size like 24GB" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "o3"), "--quantize", "int8", "--target-memory", "100MB"]) == 2
    err = capsys.readouterr().err
    assert "cannot fit in 0.09 GiB at 1024px" in err and "(try a lower --resolution" in err
    assert not (tmp_path / "o3").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o3")]
    with pytest.raises(CheckpointError, match=r"cannot fit .*\(try --quantize int8, a lower"):
        export(ExportConfig(plan=plan, model=folder, out=tmp_path / "o4", progress=False, target_memory="1MB"))
