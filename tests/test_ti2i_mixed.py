"""Mixed T2I + TI2I (Z-Image Omni/Edit) calibration, search, distillation and export, on a tiny REAL
diffusers Omni model with every parameter randomised.

- the calibration format tags every micro-batch with its task (safetensors metadata + ``calib.json``);
- per-task weights: the fitness is the weighted mean of per-task normalised discrepancies (checked
  against numpy on the materialised candidate), statistics are summed per task and combined by weight;
- the TI2I candidate evaluation (prefix slices on the permuted teacher, and the masked full-width program)
  equals the materialised one;
- a search on a mixed set writes a plan; its export (diffusers subclass, trust_remote_code) runs the
  omni editing forward in PyTorch and matches the JAX materialised model; distillation on the mixed set
  samples both tasks and lowers the loss.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safetensors import safe_open  # noqa: E402
from zimage_ref import SIGLIP_DIM, rel_err, save_diffusers, tiny_diffusers, torch_forward_omni  # noqa: E402

from tmp_jax import arch  # noqa: E402
from tmp_jax.calibration import (  # noqa: E402
    calibrate,
    combine_stats,
    load_calib,
    parse_task_weights,
    write_calib,
)
from tmp_jax.compensate import from_plan  # noqa: E402
from tmp_jax.materialize import kept_first_order, materialize  # noqa: E402
from tmp_jax.models.z_image import ti2i  # noqa: E402
from tmp_jax.problem import PruningProblem  # noqa: E402
from tmp_jax.tree import Tree  # noqa: E402

pytestmark = pytest.mark.torch
H = arch.get("zimage")
# two width levels per gene (plus skip / drop) for the fitness test's problems: its sliced warm-up compiles the
# sub-layer programs of 3 warm-up genomes per task instead of 9 (the default ladder's 8 FFN widths)
LEVELS = {"fractions": [0.5, 1.0]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(torch reference, model folder, JAX model, mixed calibration folder, its calibration)."""
    from converters.zimage import load_zimage

    root = tmp_path_factory.mktemp("mixed")
    ref = tiny_diffusers(seed=11, siglip_feat_dim=SIGLIP_DIM)
    folder = save_diffusers(ref, root / "transformer")
    jm = load_zimage(folder)
    t2i = H.synthetic_calib(jm.config, 4, 2, 0)
    ed = ti2i.synthetic_ti2i_calib(jm.config, 4, 2, 1)
    calib = write_calib(root / "calib", [t2i[0], ed[0], t2i[1], ed[1]], "zimage")
    cal = calibrate(jm, load_calib(calib, "zimage"), weights={"t2i": 0.7, "ti2i": 0.3})
    return ref, folder, jm, calib, cal


def test_micro_batches_carry_their_task(setup, tmp_path):
    _, _, jm, calib, cal = setup
    meta = json.loads((calib / "calib.json").read_text())
    assert meta["task"] == "t2i,ti2i" and meta["tasks"] == ["t2i", "ti2i", "t2i", "ti2i"]
    with safe_open(str(calib / meta["batches"][1]), "np") as f:
        assert f.metadata() == {"task": "ti2i"}
    assert [b["task"] for b in load_calib(calib)] == meta["tasks"] == cal.tasks
    # a set written before per-batch tags (no "tasks" list) gets them from the arrays
    old = {k: v for k, v in meta.items() if k != "tasks"}
    (calib.parent / "old").mkdir()
    for name in meta["batches"]:
        (calib.parent / "old" / name).write_bytes((calib / name).read_bytes())
    (calib.parent / "old" / "calib.json").write_text(json.dumps(old))
    assert [b["task"] for b in load_calib(calib.parent / "old")] == meta["tasks"]
    # statistics: summed per task; the SigLIP refiner sows under TI2I only
    assert set(cal.stats_by_task) == {"t2i", "ti2i"}
    assert any("siglip_refiner" in k for k in cal.stats_by_task["ti2i"])
    assert not any("siglip_refiner" in k for k in cal.stats_by_task["t2i"])


def test_task_weight_parsing_and_stat_combination():
    assert parse_task_weights("t2i,ti2i") == {"t2i": 0.5, "ti2i": 0.5}
    w = parse_task_weights("t2i:0.7, ti2i:0.3")
    assert w == pytest.approx({"t2i": 0.7, "ti2i": 0.3})
    assert parse_task_weights("t2i:3,ti2i:1") == pytest.approx({"t2i": 0.75, "ti2i": 0.25})
    assert parse_task_weights(None, ["t2i", "t2i", "ti2i"]) == {"t2i": 0.5, "ti2i": 0.5}
    for bad, msg in (("t2i:0", "must be > 0"), ("t2i:x", "must be a number"), ("t2i,t2i", "duplicate"), (",", "e.g.")):
        with pytest.raises(ValueError, match=msg):
            parse_task_weights(bad)
    # hand-checked: sum_t w_t * S_t * N / N_t, N = 6 samples (t2i 4, ti2i 2)
    by = {"t2i": {("a",): np.array([4.0, 8.0])}, "ti2i": {("a",): np.array([1.0, 1.0]), ("s",): np.array([2.0])}}
    got = combine_stats(by, {"t2i": 4, "ti2i": 2}, {"t2i": 0.75, "ti2i": 0.25})
    np.testing.assert_allclose(got[("a",)], [0.75 * 4 * 6 / 4 + 0.25 * 1 * 6 / 2, 0.75 * 8 * 1.5 + 0.25 * 3])
    np.testing.assert_allclose(got[("s",)], [0.25 * 2 * 3])
    one = {"t2i": {("a",): np.array([4.0, 8.0])}}
    assert combine_stats(one, {"t2i": 4}, None)[("a",)] is one["t2i"][("a",)]  # one task: exactly its sum


def _numpy_error(model, cal, task: str) -> float:
    """sum ||y - y_T||^2 / sum ||y_T||^2 over the target tokens of ``task``'s micro-batches, by hand."""
    num = den = 0.0
    for inp, yt in zip(cal.inputs, cal.teacher):
        if inp["task"] != task:
            continue
        y = np.asarray(H.for_task(task).forward(model, inp), np.float64)
        m = np.asarray(inp["mask"], bool)
        num += float(np.sum((y[m] - yt[m]) ** 2))
        den += float(np.sum(yt[m].astype(np.float64) ** 2))
    return num / den


def test_fitness_is_the_weighted_mean_of_task_errors(setup):
    _, folder, jm, _, cal = setup
    src = {"path": str(folder)}
    p = PruningProblem(jm, cal, source=src, levels=LEVELS, task_weights={"t2i": 0.7, "ti2i": 0.3}, eval_mode="sliced")
    q = PruningProblem(jm, cal, source=src, levels=LEVELS, task_weights={"t2i": 0.2, "ti2i": 0.8})
    rng = np.random.default_rng(3)
    g = rng.integers(1, p.tree.max_levels() + 1)
    cand = p.candidate(g)
    e_t2i, e_ti2i = _numpy_error(cand, cal, "t2i"), _numpy_error(cand, cal, "ti2i")
    assert e_t2i > 1e-4 and e_ti2i > 1e-4 and abs(e_t2i - e_ti2i) > 1e-3 * e_t2i  # weights must matter
    f = p.fitness(g[None])[0]
    assert f == pytest.approx(0.7 * e_t2i + 0.3 * e_ti2i, rel=1e-6)
    assert q.fitness(g[None])[0] == pytest.approx(0.2 * e_t2i + 0.8 * e_ti2i, rel=1e-6)
    # the TI2I fast path (prefix slices in the T2I runner's sub-layer functions) == the materialised one,
    # and after warm-up no candidate of either task compiles anything
    p.warmup()
    n = p.compile_count()
    gs = np.stack([g, rng.integers(0, p.tree.max_levels() + 1)])
    f = p.fitness(gs)
    assert p.compile_count() == n
    np.testing.assert_allclose(f, p.fitness_materialized(gs), rtol=1e-6)
    # the masked evaluation (one full-width program per task and input shape, the omni one for TI2I) agrees,
    # and compiles nothing after its own warm-up either
    pm = PruningProblem(jm, cal, source=src, levels=LEVELS, task_weights={"t2i": 0.7, "ti2i": 0.3}, eval_mode="masked")
    pm.warmup()
    n = pm.compile_count()
    np.testing.assert_allclose(pm.fitness(gs), f, rtol=1e-5)
    assert pm.compile_count() == n
    # multi-fidelity: 2 of 8 samples -> each task's first micro-batch (its share of the prefix)
    errs = p.task_errors(lambda x: H.for_task(x["task"]).forward(cand, x), n_samples=2)
    assert set(errs) == {"t2i", "ti2i"}
    with pytest.raises(ValueError, match="no 'hunyuan' micro-batches"):
        PruningProblem(jm, cal, source={}, task_weights={"t2i": 0.5, "hunyuan": 0.5})


def test_mixed_search_export_edits_in_pytorch_and_distills(setup, tmp_path):
    """Search (1 generation) on the mixed set -> plan; export -> diffusers subclass runs the omni (editing)
    forward == JAX materialised (fp32, <= 1e-5); distillation on the mixed set samples both tasks."""
    from diffusers import AutoModel

    from converters.export import ExportConfig, export
    from search.engine import SearchConfig, load_plan, plan_assignment, run
    from tmp_jax.distill import DistillConfig, build_pair, training_batches
    from tmp_jax.distill import run as distill

    _, folder, jm, calib, cal = setup
    res = run(
        SearchConfig(
            budget="75%",
            model=str(folder),
            calib=str(calib),
            task="t2i:0.7,ti2i:0.3",
            out=str(tmp_path / "search"),
            generations=1,
            population=4,
            progress=False,
            summary=False,
        )
    )
    plan = load_plan(res.plan_paths[0])
    assert plan["search"]["task_weights"] == pytest.approx({"t2i": 0.7, "ti2i": 0.3})
    assert plan["counts"]["after"]["params"] <= 0.75 * plan["counts"]["before"]["params"]

    out = tmp_path / "pruned"
    export(ExportConfig(plan=res.plan_paths[0], model=folder, out=out, progress=False))
    pt = AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    tree = Tree(H.build_spec(jm.config))
    order = kept_first_order(tree, plan["policy"]["kept_units"])
    # the export re-fits the kept consumers as the (compensated) search did
    small = materialize(jm, tree, plan_assignment(plan), order, comp=from_plan(plan, res.plan_paths[0]))
    edit = ti2i.synthetic_ti2i_calib(jm.config, 2, 2, seed=5)[0]
    a = ti2i.model_args(jm.config, edit)
    want = torch_forward_omni(pt, a["x"], a["t"], a["cap_feats"], a["siglip_feats"], a["image_noise_mask"])
    got = small(a["x"], a["t"], a["cap_feats"], siglip_feats=a["siglip_feats"], image_noise_mask=a["image_noise_mask"])
    assert len(got) == len(want) == 2
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape and rel_err(g_, w_) <= 1e-5

    dc = DistillConfig(
        plan=res.plan_paths[0],
        model=str(folder),
        calib=str(calib),
        task="t2i:0.5,ti2i:0.5",
        out=tmp_path / "distill",
        steps=8,
        save_every=8,
        lr=3e-4,
        warmup=1,
        progress=False,
    )
    teacher, student0, _, _ = build_pair(dc)
    at = training_batches(dc, teacher.config, "zimage")
    tasks = [at(s)["task"] for s in range(8)]
    assert set(tasks) == {"t2i", "ti2i"} and tasks == [at(s)["task"] for s in range(8)]  # pure in step
    before = {t: _numpy_error(student0, cal, t) for t in ("t2i", "ti2i")}
    res_d = distill(dc)
    after = {t: _numpy_error(res_d["student"], cal, t) for t in ("t2i", "ti2i")}
    assert all(after[t] < 0.85 * before[t] for t in before), (before, after)  # measured: 0.53->0.37, 0.46->0.28
    assert np.all(np.isfinite(np.asarray(res_d["history"])))
