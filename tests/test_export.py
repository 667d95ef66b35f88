"""Export: plan -> PyTorch safetensors that diffusers loads; forward == JAX materialised model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from plan_ref import write_plan  # noqa: E402
from zimage_ref import inputs, rel_err, save_diffusers, tiny_diffusers, torch_forward  # noqa: E402

from converters import engine  # noqa: E402
from converters.engine import CheckpointError, SafetensorsReader  # noqa: E402
from converters.export import ExportConfig, export, main  # noqa: E402
from converters.zimage import load_zimage  # noqa: E402
from tmp_jax import arch  # noqa: E402
from tmp_jax.materialize import count_params, materialize  # noqa: E402
from tmp_jax.tree import Tree  # noqa: E402

pytestmark = pytest.mark.torch
H = arch.get("zimage")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    ref = tiny_diffusers(seed=11, n_layers=3, n_heads=4, axes_dims=[4, 6, 6], n_refiner_layers=2)
    folder = save_diffusers(ref, tmp_path_factory.mktemp("src") / "transformer", max_shard_size="60KB")
    model = load_zimage(folder)
    tree = Tree(H.build_spec(model.config))
    return folder, model, tree


def _plan(tmp: Path, folder: Path, model, tree, genome, order) -> Path:
    return write_plan(tmp / "plan.json", "zimage", folder, model, tree, genome, order)


def _genome(tree, kind: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = tree.full_genome()
    names = [x.name for x in tree.genes]
    if kind == "depth":
        g[names.index("layers.1:keep")] = 0
        g[names.index("noise_refiner.1:keep")] = 0
        g[names.index("context_refiner.0:keep")] = 0
    else:
        g = rng.integers(1, tree.max_levels() + 1)
        g[names.index("layers.2:keep")] = 0
        g[names.index("context_refiner.1.attention:heads")] = 0  # a skipped sub-layer
    return g


@pytest.mark.parametrize("kind", ["depth", "hetero"])
def test_export_loads_in_diffusers_and_matches_jax(tmp_path, src, kind):
    folder, model, tree = src
    rng = np.random.default_rng(1)
    order = {(n.name, u.kind): rng.permutation(u.n) for n in tree.spec.nodes() for u in n.units}
    g = _genome(tree, kind)
    plan = _plan(tmp_path, folder, model, tree, g, order)
    out = tmp_path / "pruned"
    res = export(ExportConfig(plan=plan, model=folder, out=out, progress=False, max_shard_bytes=40_000))
    a = tree.decode(g)
    small = materialize(model, tree, a, order)
    assert res["params_after"] == count_params(small) == tree.count(a)["params"]
    conf = json.loads((out / "config.json").read_text())
    if kind == "depth":
        from diffusers import ZImageTransformer2DModel

        assert conf["_class_name"] == "ZImageTransformer2DModel" and "auto_map" not in conf
        pt = ZImageTransformer2DModel.from_pretrained(str(out)).eval()
    else:
        from diffusers import AutoModel

        assert conf["auto_map"]["AutoModel"].endswith("ZImagePrunedTransformer2DModel")
        pt = AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    assert sum(p.numel() for p in pt.parameters()) == res["params_after"]
    x, t, cap = inputs(seed=3)
    for g_pt, g_jax in zip(torch_forward(pt, x, t, cap), small(x, t, cap)):
        assert rel_err(g_pt, g_jax) <= 1e-5
    # a kept tensor equals the right slice of the source (spot check by index)
    srd, ord_ = SafetensorsReader(folder), SafetensorsReader(out)
    keep_ffn = np.asarray(json.loads(plan.read_text())["policy"]["kept_units"]["layers.0.feed_forward/ffn"])
    np.testing.assert_array_equal(
        ord_.read("layers.0.feed_forward.w1.weight"), srd.read("layers.0.feed_forward.w1.weight")[keep_ffn]
    )
    # re-running gives byte-identical files
    out2 = tmp_path / "again"
    export(ExportConfig(plan=plan, model=folder, out=out2, progress=False, max_shard_bytes=40_000))
    for f in out.glob("*.safetensors"):
        assert f.read_bytes() == (out2 / f.name).read_bytes()


def test_export_bad_inputs(tmp_path, src, monkeypatch, capsys):
    folder, model, tree = src
    plan = _plan(tmp_path, folder, model, tree, _genome(tree, "depth"), None)
    other = save_diffusers(
        tiny_diffusers(seed=99, n_layers=3, n_heads=4, axes_dims=[4, 6, 6], n_refiner_layers=2), tmp_path / "other"
    )
    assert main(["--plan", str(plan), "--model", str(other), "--out", str(tmp_path / "o1")]) == 2
    assert "does not match the plan's source" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()
    bad = json.loads(plan.read_text())
    bad["format_version"] = 999
    (tmp_path / "v.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="format_version 999 is not supported"):
        export(ExportConfig(plan=tmp_path / "v.json", model=folder, out=tmp_path / "o2", progress=False))
    (tmp_path / "exists").mkdir()
    with pytest.raises(CheckpointError, match="output folder exists"):
        export(ExportConfig(plan=plan, model=folder, out=tmp_path / "exists", progress=False))
    calls = {"n": 0}
    real = engine.StreamingWriter.write

    def full_disk(self, k, arr):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(self, k, arr)

    monkeypatch.setattr(engine.StreamingWriter, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        export(ExportConfig(plan=plan, model=folder, out=tmp_path / "o3", progress=False))
    monkeypatch.undo()
    assert not (tmp_path / "o3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o3")]
    # a source shard missing
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(folder, broken)
    next(broken.glob("*-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard named in"):
        export(ExportConfig(plan=plan, model=broken, out=tmp_path / "o4", progress=False))
    assert not (tmp_path / "o4").exists()
