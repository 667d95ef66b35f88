"""The contract every registered architecture meets, end to end, on a tiny random model of each:

load (from a checkpoint folder our ``save`` wrote) -> pruning tree -> calibrate -> a short search -> export
(``converters.export``) -> reload the export with our loader (``ArchHooks.load``, ``from_pretrained``,
``tmp_jax.evaluate.load``, ``arch.detect``) AND with the arch's PyTorch reference (``converters/<arch>_torch.py``
through ``converters.run_torch.load``) -> the same outputs as the pruned model materialised in JAX from the plan.

Everything generic goes through the registry; the per-architecture part is only :data:`CASES`: a tiny config and
how one raw calibration micro-batch is fed to the JAX model and to the PyTorch reference. A newly registered
architecture without a case fails :func:`test_every_registered_architecture_has_a_case`.

Every parameter is random (norm weights around 1, biases and zero-initialised layers included), so a wrong
slice, a transposed layout or a forgotten tensor shows in the outputs. Tolerances: the materialised model, its
export reloaded by our loader, and the teacher reloaded from its checkpoint are bit-identical (fp32, no
compensation: the export only slices); JAX vs PyTorch within ``TOL`` relative (max-abs over max-abs).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmp_jax import arch

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.torch,
    # nemo's config hands the release's rope_scaling (type "custom") to transformers, which only warns
    pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning"),
]
TOL = 1e-5  # JAX vs the PyTorch reference, fp32 on the CPU (measured: ~1e-7 / ~1e-6)


# ----------------------------------------------------------------------------------------------------------
# The per-architecture part
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    config: Callable[[], Any]  # () -> a tiny config
    torch_needs: tuple[str, ...]  # packages the PyTorch reference imports
    jax_call: Callable[[Any, dict], list[np.ndarray]]  # (model, raw micro-batch) -> outputs
    torch_call: Callable[[Any, dict], list[np.ndarray]]  # (reference module, raw micro-batch) -> the same outputs


def _zimage_config() -> Any:
    from tmp_jax.models.z_image import TINY

    return TINY.replace(n_layers=3)  # 3 main blocks, 1 noise / 1 context refiner, 2 heads


def _zimage_args(b: dict) -> tuple[list, np.ndarray, list]:
    x = list(b["latents"])
    cap = [c[:n] for c, n in zip(b["cap_feats"], b["cap_lens"])]
    return x, b["t"], cap


def _zimage_jax(model: Any, b: dict) -> list[np.ndarray]:
    return [np.asarray(y) for y in model(*_zimage_args(b))]


def _zimage_torch(module: Any, b: dict) -> list[np.ndarray]:
    x, t, cap = _zimage_args(b)
    with torch.no_grad():
        out = module([torch.from_numpy(v) for v in x], torch.from_numpy(t), [torch.from_numpy(c) for c in cap])
    return [o.numpy() for o in out.sample]


def _hunyuan_config() -> Any:
    from tmp_jax.models.hunyuan_image3 import TINY

    # 2 layers; 2 KV groups of 2 query heads; 4 experts of width 32, top-2, one shared expert; 4 latent channels
    return TINY.replace(num_experts=4, moe_topk=2, moe_intermediate_size=32, vae={"latent_channels": 4})


@partial(jax.jit, static_argnums=0)
def _hunyuan_forward(graphdef: Any, state: Any, ids: Any, lat: Any, t: Any, vl: Any) -> Any:
    return nnx.merge(graphdef, state)(ids, lat, t, vl)


def _hunyuan_jax(model: Any, b: dict) -> list[np.ndarray]:
    model.set_moe_impl("dense")  # the reference MoE path: the same function, compiles in half the time on CPU
    graphdef, state = nnx.split(model)
    args = (b["input_ids"], b["latents"], b["timestep"], b["valid_lengths"])
    return [np.asarray(_hunyuan_forward(graphdef, state, *args))]


def _hunyuan_torch(module: Any, b: dict) -> list[np.ndarray]:
    rows = []  # the reference attends over the whole row: one row at a time, without its right padding
    with torch.no_grad():
        for i, n in enumerate(b["valid_lengths"]):
            ids = torch.from_numpy(b["input_ids"][i : i + 1, :n].astype(np.int64))
            lat, t = torch.from_numpy(b["latents"][i : i + 1]), torch.from_numpy(b["timestep"][i : i + 1])
            rows.append(module(ids, lat, t).numpy())
    return [np.concatenate(rows)]


CASES = {
    "zimage": Case(_zimage_config, ("diffusers",), _zimage_jax, _zimage_torch),
    "hunyuan": Case(_hunyuan_config, ("nemo_automodel",), _hunyuan_jax, _hunyuan_torch),
}


# ----------------------------------------------------------------------------------------------------------
# The generic pipeline (one per architecture, shared by the tests below)
# ----------------------------------------------------------------------------------------------------------
def random_model(hooks: arch.ArchHooks, cfg: Any, seed: int) -> Any:
    """Every parameter random, filled from numpy into an abstract model (no eager jax init): 1-D ``weight`` s
    (norms) around 1, other 1-D parameters (biases) around 0, matrices scaled by their fan-in."""
    m = hooks.init_abstract(cfg, jnp.float32)
    rng = np.random.default_rng(seed)
    state = nnx.state(m, nnx.Param)
    for path, v in nnx.to_flat_state(state):
        shape = v.get_value().shape
        r = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 1:
            val = 1.0 + 0.2 * r if path[-1] == "weight" else 0.5 * r
        else:
            fan_in = int(np.prod(shape[:-1])) if path[-1] == "kernel" else shape[-2]
            val = r / np.sqrt(fan_in)
        v.set_value(jnp.asarray(val))
    nnx.update(m, state)
    return m


def params(model: Any) -> dict[tuple, np.ndarray]:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(got: Any, want: Any) -> None:
    g, w = params(got), params(want)
    assert set(g) == set(w)
    for p, v in g.items():
        assert v.dtype == w[p].dtype and v.tobytes() == w[p].tobytes(), p


def rel(got: Any, want: Any) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@dataclass
class Exported:
    plan_path: Path
    plan: dict
    small: Any  # the plan materialised in JAX from the teacher
    result: dict  # converters.export's result
    out: Path  # the export folder
    log: str  # what the export wrote to a non-terminal stderr


@dataclass
class Run:
    name: str
    hooks: arch.ArchHooks
    case: Case
    model: Any  # the random teacher as built
    folder: Path  # its checkpoint, written by our save
    teacher: Any  # loaded back from that folder
    tree: Any
    cal: Any
    budget: int
    searched: Exported  # the search's plan
    dropped: Exported  # the same plan with one more block dropped (blocks renumbered in the export)
    batch: dict  # a raw micro-batch the outputs are compared on

    @property
    def exports(self) -> list[Exported]:
        return [self.searched, self.dropped]


def heterogeneous(tree: Any, genome: np.ndarray, dropped: str) -> None:
    """Give the last two width genes of each kind (outside ``dropped`` and tied genes) different levels."""
    top = tree.max_levels()
    by_kind: dict[str, list[int]] = {}
    for i, g in enumerate(tree.genes):
        if not (g.name.endswith(":keep") or g.name.startswith(("tie:", dropped + "."))):
            by_kind.setdefault(g.name.split(":")[-1], []).append(i)
    for idx in by_kind.values():
        if len(idx) >= 2 and top[idx[-1]] >= 2:
            genome[idx[-1]] = top[idx[-1]] if genome[idx[-2]] != top[idx[-1]] else 1


def _export(plan_path: Path, folder: Path, model: Any, tree: Any, out: Path) -> Exported:
    from converters.export import ExportConfig, export
    from tmp_jax.materialize import kept_first_order, materialize
    from tmp_jax.plan import load_plan, plan_assignment

    plan = load_plan(plan_path)
    order = kept_first_order(tree, plan["policy"]["kept_units"])
    small = materialize(model, tree, plan_assignment(plan), order)
    log = io.StringIO()
    with contextlib.redirect_stderr(log):  # the export's progress bar, written to a log (not a terminal)
        res = export(ExportConfig(plan=plan_path, model=folder, out=out, progress=True))
    return Exported(plan_path, plan, small, res, out, log.getvalue())


@pytest.fixture(scope="module", params=sorted(CASES))
def run(request, tmp_path_factory) -> Run:
    from plan_ref import write_plan

    from search.engine import SearchConfig
    from search.engine import run as search
    from tmp_jax.calibration import calibrate, load_calib, write_calib
    from tmp_jax.fileio import fingerprint
    from tmp_jax.materialize import kept_first_order
    from tmp_jax.problem import PruningProblem
    from tmp_jax.tree import Tree

    name = request.param
    if name not in arch.names():
        pytest.skip(f"{name} is not registered")
    hooks, case = arch.get(name), CASES[name]
    tmp = tmp_path_factory.mktemp(f"contract-{name}")
    cfg = case.config()
    model = random_model(hooks, cfg, seed=3)
    folder = tmp / "src"
    hooks.save(model, str(folder))
    teacher = hooks.load(str(folder), dtype=jnp.float32)
    tree = Tree(hooks.build_spec(teacher.config))
    # 2 micro-batches of 2 samples, one shape: every forward below shares its compiled programs
    batches = load_calib(write_calib(tmp / "calib", hooks.synthetic_calib(cfg, 4, 2, 0), name), name)
    cal = calibrate(teacher, batches)
    cfg_dict = teacher.config.to_hf_config()
    source = {"path": str(folder), "fingerprint": fingerprint(folder, cfg_dict), "config": cfg_dict}
    problem = PruningProblem(teacher, cal, source=source)
    budget = (tree.floor()["params"] + tree.full["params"]) // 2  # halfway between the floor and the full model
    sc = SearchConfig(
        budget=str(budget),
        out=str(tmp / "search"),
        generations=2,
        population=4,
        progress=False,
        summary=False,
        phases=False,
        compensate=False,
    )
    plan_path = search(sc, problem=problem).plan_paths[0]
    searched = _export(plan_path, folder, model, tree, tmp / "export")
    # the same plan with the first kept block of the stack with the most kept blocks dropped as well (the export
    # renumbers the blocks after it) and the last two kept blocks at different widths (a heterogeneous export,
    # whatever the search found)
    genome = np.asarray(searched.plan["genome"]["levels"])
    stacks: dict[str, list[int]] = {}
    for i, g in enumerate(tree.genes):
        if g.name.endswith(":keep") and genome[i] > 0:
            stacks.setdefault(g.name.rsplit(".", 1)[0], []).append(i)
    kept = max(stacks.values(), key=len)
    assert len(kept) >= 2, f"the search kept too few blocks to drop one more: {searched.plan['policy']['dropped']}"
    drop = kept[0]
    genome[drop] = 0
    heterogeneous(tree, genome, tree.genes[drop].name.split(":")[0])
    order = kept_first_order(tree, searched.plan["policy"]["kept_units"])
    drop_plan = write_plan(tmp / "plan-drop.json", name, folder, model, tree, genome, order)
    dropped = _export(drop_plan, folder, model, tree, tmp / "export-drop")
    return Run(name, hooks, case, model, folder, teacher, tree, cal, budget, searched, dropped, batches[0])


# ----------------------------------------------------------------------------------------------------------
# The contract
# ----------------------------------------------------------------------------------------------------------
def test_every_registered_architecture_has_a_case():
    missing = sorted(set(arch.names()) - set(CASES))
    assert not missing, f"add a contract case (tiny config, JAX and PyTorch calls) for {missing}"


def test_checkpoint_round_trip(run: Run):
    """save -> load is bit-identical, through the hook and the model class's from_pretrained (the two public
    APIs are symmetric); save refuses an existing folder unless told to overwrite; config.json is detected."""
    from converters.engine import CheckpointError

    assert_same_params(run.teacher, run.model)
    assert run.teacher.config == run.model.config
    again = run.folder.parent / "saved-again"
    run.model.save_pretrained(str(again))
    with pytest.raises(CheckpointError, match="exists"):
        run.model.save_pretrained(str(again))
    run.model.save_pretrained(str(again), overwrite=True)
    assert_same_params(type(run.teacher).from_pretrained(str(again)), run.model)
    assert arch.detect(json.loads((run.folder / "config.json").read_text())).name == run.name
    # the loaded teacher computes what the built one does
    for g, w in zip(run.case.jax_call(run.teacher, run.batch), run.case.jax_call(run.model, run.batch)):
        assert g.tobytes() == w.tobytes()


def test_tree_calibration_and_plan(run: Run):
    """The tree counts the model exactly; calibration scored every unit group; the search's plan meets the
    budget and materialises to the counted size."""
    from tmp_jax.calibration import importance
    from tmp_jax.materialize import count_params

    assert run.tree.full["params"] == count_params(run.teacher)
    units, _ = importance(run.tree, run.cal.stats)
    assert set(units) == {(n.name, u.kind) for n in run.tree.spec.nodes() for u in n.units}
    assert all(np.isfinite(y).all() for y in run.cal.teacher)
    assert run.searched.plan["arch"] == run.name
    after = run.searched.plan["counts"]["after"]["params"]
    assert after <= run.budget < run.tree.full["params"]
    assert run.dropped.plan["counts"]["after"]["params"] < after
    for e in run.exports:
        assert count_params(e.small) == e.plan["counts"]["after"]["params"] == e.result["params_after"]


def test_export_reloads_with_our_loader(run: Run):
    """The export loads back (hook, from_pretrained, tmp_jax.evaluate's loader, detected by its config.json)
    into the pruned config, bit-identical to the materialised model, with the same outputs."""
    from tmp_jax.evaluate import load as evaluate_load

    for e in run.exports:
        conf = json.loads((e.out / "config.json").read_text())
        assert arch.detect(conf).name == run.name
        back = run.hooks.load(str(e.out), dtype=jnp.float32)
        assert back.config == e.small.config
        assert_same_params(back, e.small)
        assert type(back).from_pretrained(str(e.out)).config == e.small.config
        assert evaluate_load(e.out).config == e.small.config
        for g, w in zip(run.case.jax_call(back, run.batch), run.case.jax_call(e.small, run.batch)):
            assert g.tobytes() == w.tobytes()


def test_export_matches_pytorch_reference(run: Run):
    """The arch's PyTorch reference loads the export strictly and computes the materialised model's outputs."""
    for mod in run.case.torch_needs:
        pytest.importorskip(mod)
    from converters import run_torch as rt

    for e in run.exports:
        _, ref = rt.load(e.out)  # strict: every tensor it holds has the export's name and shape, none missing
        assert 0 < sum(p.numel() for p in ref.parameters()) <= e.result["params_after"]
        want = run.case.jax_call(e.small, run.batch)
        got = run.case.torch_call(ref, run.batch)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert rel(g, w) <= TOL, rel(g, w)


def test_export_progress_in_a_log_is_plain_lines(run: Run):
    """Written to a log, the export's progress bar is a few plain lines (no carriage returns), ending at 100%."""
    log = run.searched.log
    lines = [ln for ln in log.splitlines() if ln.startswith("export")]
    assert "\r" not in log and 2 <= len(lines) <= 4 and lines[-1].count("100%") == 1


def test_permutation_is_function_preserving(run: Run):
    """Reordering the units by any order computes the same function; after it, kept sets are prefixes:
    materialising the permuted model without an order == the original with the order."""
    from tmp_jax.materialize import materialize, permute
    from tmp_jax.plan import plan_assignment

    rng = np.random.default_rng(7)
    tree = run.tree
    order = {  # one order per expert for a per-expert group (Units.batch)
        (n.name, u.kind): rng.permutation(u.n)
        if u.batch is None
        else np.stack([rng.permutation(u.n) for _ in range(tree.units(n.name, u.batch).n)])
        for n in tree.spec.nodes()
        for u in n.units
    }
    pm = permute(nnx.clone(run.model), tree, order)
    for g, w in zip(run.case.jax_call(pm, run.batch), run.case.jax_call(run.model, run.batch)):
        assert rel(g, w) <= 1e-5
    a = plan_assignment(run.searched.plan)  # its pruned shapes are compiled already
    s1, s2 = materialize(run.model, tree, a, order), materialize(pm, tree, a, None)
    for g, w in zip(run.case.jax_call(s2, run.batch), run.case.jax_call(s1, run.batch)):
        assert rel(g, w) <= 1e-6
