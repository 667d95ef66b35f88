"""A cold masked search's compiles (issue 19, the embedded DiT's cold start):

* the masked program compiled on a background thread BEFORE calibration (:class:`tmp_jax.masked_eval.Precompile`,
  started by ``build_problem``) is the program the evaluator runs: its layout is predicted from the tree
  (:func:`tmp_jax.problem.refit_levels` equals the re-fits compensation computes), the warm-up then compiles
  nothing and candidates compile nothing, with the teacher's arrays committed to a device (a loaded
  checkpoint) or not (a random init), and the fitness is the one of an evaluator compiled the usual way;
* Z-Image stacks of identical blocks, run as one ``lax.scan`` in the masked program (``TMP_JAX_MASKED_SCAN=1``:
  one block body to compile), give the unrolled loop's numbers;
* a small checkpoint loads with no compile (its tensors are transposed / cast on the host) and the same values
  as the device path.

Tiny configs, CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_candidate_eval import H_CFG, LEVELS, _genomes
from test_compile_law import compile_log

from tmp_jax import arch
from tmp_jax.calibration import calibrate
from tmp_jax.compensate import CompensationConfig
from tmp_jax.masked_eval import MaskedEvaluator, MaskLayout
from tmp_jax.models.z_image import TINY as Z_TINY
from tmp_jax.problem import PruningProblem, refit_levels, start_precompile

CFGS = {"zimage": Z_TINY, "hunyuan": H_CFG}
COMP = CompensationConfig(damp=1e-6)


def _model(name: str, committed: bool):
    hooks = arch.get(name)
    model = hooks.init_random(CFGS[name], jnp.float32, 0)
    if committed:  # as a loaded checkpoint's: placed on the device explicitly
        nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
        assert all(x._committed for x in jax.tree.leaves(nnx.state(model)))
    return model, hooks.synthetic_calib(CFGS[name], 4, 2, 0)


def _problem(name: str, model, batches, precompiled=None, levels=LEVELS) -> PruningProblem:
    cal = calibrate(model, batches, grams=True)
    src = {"path": None, "fingerprint": name, "config": {}}
    return PruningProblem(
        model, cal, source=src, levels=levels, compensation=COMP, eval_mode="masked", precompiled=precompiled
    )


@pytest.mark.parametrize("name", ["zimage", "hunyuan"])
def test_refit_levels_are_the_refits_compensation_computes(name):
    model, batches = _model(name, False)
    prob = _problem(name, model, batches)
    got: dict[tuple, list[int]] = {}
    for path, k in prob.refits:
        got.setdefault(path, []).append(int(k))
    assert got and {p: sorted(v) for p, v in got.items()} == refit_levels(prob.tree, COMP)
    assert MaskLayout.from_levels(prob.tree, refit_levels(prob.tree, COMP)) == prob.masked.layout
    assert refit_levels(prob.tree, None) == {}


@pytest.mark.parametrize(("name", "committed"), [("zimage", False), ("zimage", True), ("hunyuan", True)])
def test_precompiled_program_is_the_one_the_search_runs(name, committed):
    model, batches = _model(name, committed)
    with compile_log() as names:
        pre = start_precompile(model, batches, None, COMP, "masked", levels=LEVELS)
        assert pre is not None
        prob = _problem(name, model, batches, pre)
        assert prob.masked.precompiled is pre  # same graph, state structure, layout and batch: its program
        assert pre.wait(), pre.future.exception()
    assert names.count("jit(masked_program)") == 1, names  # compiled once, in the background
    with compile_log() as warm:
        prob.warmup(workers=2)
    assert warm == [], warm  # nothing left for the warm-up
    gs = _genomes(prob.tree, 6, 3)
    with compile_log() as after:
        f = prob.fitness(gs)
    assert after == [] and np.all(np.isfinite(f)) and np.all(f > 0)
    plain = MaskedEvaluator(prob.model, prob.tree, prob.refits)  # its own program, compiled at first use
    assert plain.precompiled is None and plain.program is not pre.program
    twin = object.__new__(PruningProblem)
    twin.__dict__.update({**prob.__dict__, "masked": plain})
    np.testing.assert_allclose(twin.fitness(gs), f, rtol=1e-6, atol=1e-12)


def test_no_precompile_for_sliced_problems_or_when_switched_off(monkeypatch):
    model, batches = _model("zimage", False)
    assert start_precompile(model, batches, None, COMP, "sliced", levels=LEVELS) is None
    monkeypatch.setenv("TMP_JAX_PRECOMPILE", "0")
    assert start_precompile(model, batches, None, COMP, "masked", levels=LEVELS) is None


def test_a_mismatched_precompile_is_not_used():
    model, batches = _model("zimage", False)
    pre = start_precompile(model, batches, None, None, "masked", levels=LEVELS)  # no re-fit tables: another layout
    prob = _problem("zimage", model, batches, pre)
    assert pre.wait() and prob.masked.precompiled is None and prob.masked.program is not pre.program
    # same layout, but the arrays placed otherwise (committed to the device): the compiled program would not fit
    pre = start_precompile(model, batches, None, COMP, "masked", levels=LEVELS)
    placed, _ = _model("zimage", True)
    prob = _problem("zimage", placed, batches, pre)
    assert pre.wait() and prob.masked.precompiled is None and prob.masked.program is not pre.program


def test_scanned_stacks_equal_the_unrolled_blocks(monkeypatch):
    from tmp_jax.models.z_image import runner

    assert Z_TINY.n_layers >= 2  # the main stack is scanned
    model, batches = _model("zimage", False)
    prob = _problem("zimage", model, batches)
    scans = []
    real_scan = jax.lax.scan

    def counting_scan(*a, **k):
        scans.append(1)
        return real_scan(*a, **k)

    gs = _genomes(prob.tree, 6, 4)
    monkeypatch.setattr(jax.lax, "scan", counting_scan)
    monkeypatch.setattr(runner, "SCAN_STACKS", True)
    prob.masked = MaskedEvaluator(prob.model, prob.tree, prob.refits)  # traced afresh, scanned
    scanned = prob.fitness(gs)
    assert scans  # the masked program traced a scan over the main blocks
    monkeypatch.setattr(runner, "SCAN_STACKS", False)
    scans.clear()
    prob.masked = MaskedEvaluator(prob.model, prob.tree, prob.refits)  # traced afresh, unrolled
    unrolled = prob.fitness(gs)
    assert not scans
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-9)
    # re-solved re-fits: 1.6e-3 relative on an AMD EPYC (AVX2) CPU, 1e-5 on an Intel Xeon (see test_masked_eval)
    np.testing.assert_allclose(scanned, prob.fitness_materialized(gs), rtol=3e-3, atol=1e-9)


def test_small_checkpoint_loads_without_compiles(tmp_path, monkeypatch):
    from converters import engine
    from converters.zimage import load_zimage

    model, _ = _model("zimage", False)
    model.save_pretrained(str(tmp_path / "ckpt"), dtype=jnp.bfloat16)  # bf16 on disk: a cast on loading
    with compile_log() as names:
        auto = load_zimage(tmp_path / "ckpt", dtype=jnp.float32)
    assert not any(n == "jit(f)" for n in names), names  # no per-shape transpose / cast program
    monkeypatch.setattr(engine, "HOST_PLACE_BYTES", -1)  # every cast through its device program, as before
    dev = load_zimage(tmp_path / "ckpt", dtype=jnp.float32)
    a, b = nnx.to_flat_state(nnx.state(auto)), nnx.to_flat_state(nnx.state(dev))
    for (pa, va), (pb, vb) in zip(a, b):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()))
        assert va.get_value().dtype == jnp.float32


def test_refit_tables_on_the_host_give_the_same_sliced_fitness(monkeypatch):
    """Re-fit tables too large for the device stay on the host (numpy; each sub-layer call copies its own
    consumer in): same fitness as device tables, and after the warm-up no candidate compiles anything."""
    import tmp_jax.problem as pm

    model, batches = _model("zimage", False)
    cal = calibrate(model, batches, grams=True)
    src = {"path": None, "fingerprint": "host", "config": {}}

    def make() -> PruningProblem:
        return PruningProblem(model, cal, source=src, levels=LEVELS, compensation=COMP, eval_mode="sliced")

    dev = make()
    # the size estimate the decision uses is exact: the tables refit_levels predicts, at the model's dtype
    need = sum(int(np.prod(dev.tree.spec.shapes[p])) * len(ks) for p, ks in refit_levels(dev.tree, COMP).items())
    assert need * 4 == sum(int(np.asarray(v).nbytes) for v in dev.refits.values())
    assert not pm.refits_on_host(dev.tree, COMP, jnp.float32)  # a CPU backend: its arrays are host memory anyway
    monkeypatch.setattr(pm, "refits_on_host", lambda *a: True)
    host = make()
    assert all(isinstance(v, np.ndarray) for v in host.refits.values())
    host.warmup(workers=2)
    gs = _genomes(host.tree, 6, 5)
    with compile_log() as after:
        f = host.fitness(gs)
    assert after == [], after
    np.testing.assert_allclose(f, dev.fitness(gs), rtol=1e-6, atol=1e-12)
