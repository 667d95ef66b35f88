"""Compensated plans end to end: search (``compensate=True``, the default) -> plan.json + Gram file ->
export -> the PyTorch reference (diffusers for Z-Image, nemo-automodel for HunyuanImage) computes what the
JAX re-fitted model computes (fp32, 1e-5); ``--no-compensate`` exports plain slices; the Gram file is
checked against the plan."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from zimage_ref import inputs, rel_err, save_diffusers, tiny_diffusers, torch_forward  # noqa: E402

from converters.engine import CheckpointError, SafetensorsReader  # noqa: E402
from converters.export import ExportConfig, export  # noqa: E402
from converters.zimage import load_zimage  # noqa: E402
from search.engine import SearchConfig, load_plan, plan_assignment  # noqa: E402
from search.engine import run as search  # noqa: E402
from tmp_jax.compensate import STATS_FILE, from_plan  # noqa: E402
from tmp_jax.materialize import kept_first_order, materialize  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    pytest.mark.filterwarnings("ignore:no --calib given"),
    pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning"),
]


def _order(plan: dict, tree) -> dict:
    return kept_first_order(tree, plan["policy"]["kept_units"])


def _search(folder, out, strategy: str = "oneshot", budget: str = "75%"):
    """The search engine on a compensated problem (the CLI's default), without the all-levels warm-up (the
    one-shot strategies evaluate a candidate or two: only their shapes compile)."""
    from tmp_jax.compensate import CompensationConfig
    from tmp_jax.problem import build_problem

    problem = build_problem(str(folder), compensation=CompensationConfig())
    problem.warmup = None
    cfg = SearchConfig(budget=budget, model=str(folder), strategy=strategy, out=str(out), progress=False, summary=False)
    res = search(cfg, problem=problem)
    return res.plan_paths[0]


def test_zimage_compensated_export_matches_diffusers(tmp_path):
    ref = tiny_diffusers(seed=5, n_layers=2, n_heads=4, axes_dims=[4, 6, 6], n_refiner_layers=1)
    folder = save_diffusers(ref, tmp_path / "src" / "transformer")
    plan_path = _search(folder, tmp_path / "run")
    plan = load_plan(plan_path)
    rec = plan["compensation"]
    assert rec["method"] == "obs-lsq" and rec["stats"] == STATS_FILE and (tmp_path / "run" / STATS_FILE).is_file()
    assert rec["calibration"].startswith("sha256:")

    model = load_zimage(folder)
    from tmp_jax import arch
    from tmp_jax.tree import Tree

    tree = Tree(arch.get("zimage").build_spec(model.config))
    a = plan_assignment(plan)
    assert a.keep and any(tree.kept_count(a, n, k) < tree.units(n, k).n for n, k in a.keep)  # real width cuts
    comp = from_plan(plan, plan_path)
    small = materialize(model, tree, a, _order(plan, tree), comp=comp)
    plain = materialize(model, tree, a, _order(plan, tree))

    out = tmp_path / "pruned"
    res = export(ExportConfig(plan=plan_path, model=folder, out=out, progress=False))
    assert res["compensated"]
    from diffusers import AutoModel

    conf = json.loads((out / "config.json").read_text())
    if "auto_map" in conf:
        pt = AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    else:
        from diffusers import ZImageTransformer2DModel

        pt = ZImageTransformer2DModel.from_pretrained(str(out)).eval()
    x, t, cap = inputs(seed=3)
    for g_pt, g_jax, g_plain in zip(torch_forward(pt, x, t, cap), small(x, t, cap), plain(x, t, cap)):
        assert rel_err(g_pt, g_jax) <= 1e-5
        assert rel_err(g_pt, g_plain) > 1e-4  # the re-fit changed the function (not a plain slice)

    # distillation starts from the same re-fitted student (and from plain slices with --no-compensate)
    from tmp_jax.distill import DistillConfig, build_pair

    dcfg = DistillConfig(plan=plan_path, model=str(folder), out=tmp_path / "d", progress=False)
    for comp_on, want in ((True, small), (False, plain)):
        _, student, _, _ = build_pair(dataclasses.replace(dcfg, compensate=comp_on))
        for g_s, g_w in zip(student(x, t, cap), want(x, t, cap)):
            assert rel_err(g_s, g_w) <= 1e-6

    # --no-compensate: plain slices of the source
    out2 = tmp_path / "plain"
    res2 = export(ExportConfig(plan=plan_path, model=folder, out=out2, progress=False, compensate=False))
    assert not res2["compensated"]
    src, got = SafetensorsReader(folder), SafetensorsReader(out2)
    keep = np.asarray(plan["policy"]["kept_units"]["layers.0.feed_forward/ffn"])
    if "layers.0.feed_forward.w2.weight" in got:
        np.testing.assert_array_equal(
            got.read("layers.0.feed_forward.w2.weight"), src.read("layers.0.feed_forward.w2.weight")[:, keep]
        )

    # the Gram file must be the plan's
    (tmp_path / "run" / STATS_FILE).write_bytes((tmp_path / "run" / STATS_FILE).read_bytes() + b" ")
    with pytest.raises(CheckpointError, match="sha256"):
        export(ExportConfig(plan=plan_path, model=folder, out=tmp_path / "x", progress=False))


def test_hunyuan_compensated_export_matches_nemo(tmp_path):
    pytest.importorskip("nemo_automodel")
    from test_export_hunyuan import CONFIG_EXTRA, KW, TOL, build_reference, forward_fn, nemo_from_folder, write_official
    from test_hunyuan_parity import rel_errs, t2i_inputs

    from converters.hunyuan import load_hunyuan
    from tmp_jax import arch
    from tmp_jax.tree import Tree

    _, official = build_reference(KW, seed=3)
    folder = write_official(tmp_path / "src" / "HunyuanImage-3.0", official, {**CONFIG_EXTRA, **KW})
    plan_path = _search(folder, tmp_path / "run", strategy="uniform", budget="60%")
    plan = load_plan(plan_path)
    model = load_hunyuan(folder)
    tree = Tree(arch.get("hunyuan").build_spec(model.config))
    a = plan_assignment(plan)
    comp = from_plan(plan, plan_path)
    assert comp is not None and any(k[1] == "kv_groups" for k in comp.grams)
    small = materialize(model, tree, a, _order(plan, tree), comp=comp)
    plain = materialize(model, tree, a, _order(plan, tree))

    out = tmp_path / "pruned"
    export(ExportConfig(plan=plan_path, model=folder, out=out, progress=False))
    ids, lat, t, vl = t2i_inputs(np.random.default_rng(7), (4, 8), (3, 2), 4, extra_pad=1)
    _, fwd = forward_fn(small)
    y_jax = fwd(small, ids, lat, t, vl)
    y_ours = fwd(load_hunyuan(out), ids, lat, t, vl)
    assert max(rel_errs(y_ours, y_jax)) <= TOL
    ref = nemo_from_folder(out)
    with torch.no_grad():
        y_ref = ref(*(torch.from_numpy(v) for v in (ids, lat, t, vl)))[0].numpy()
    assert max(rel_errs(y_ref, y_jax)) <= TOL, rel_errs(y_ref, y_jax)
    assert max(rel_errs(y_ref, fwd(plain, ids, lat, t, vl))) > 1e-4  # the re-fit changed the function
