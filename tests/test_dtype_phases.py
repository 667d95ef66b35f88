"""``--dtype bf16|fp32`` (issue 19) and the search's phase lines.

1. bf16/fp32 plan agreement: the same tiny random Z-Image, searched (compensated, a short levelswitch run) with the
   teacher in bf16 and in fp32: each winner re-scored in the other dtype's problem is within :data:`RTOL` (+ the
   bf16 noise floor :data:`ATOL`) of that problem's own winner, and the same subnetwork scores alike in both;
2. the plan records the dtype; the search checkpoint and the calibration resume state of one dtype are refused
   by a run in the other; distillation keeps fp32 master weights and optimiser state beside a bf16 teacher;
3. ``--dtype fp16`` is a one-line error on search, distill and evaluate;
4. ``python -m tmp_jax.search`` names its phases on stderr (not a terminal, ``--no-progress``): loading,
   calibration, compiling, searching, each with a ``done in`` line.

Tiny models on the CPU; the two searches are shared by the tests of this file.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_search import fast_random_model

from search.budget import SearchError
from search.engine import SearchConfig, run
from tmp_jax import arch
from tmp_jax.calibration import calibrate
from tmp_jax.compensate import CompensationConfig
from tmp_jax.fileio import fingerprint
from tmp_jax.models.z_image import TINY
from tmp_jax.problem import PruningProblem, _load_model

pytestmark = pytest.mark.filterwarnings("ignore:no --calib given")

H = arch.get("zimage")
ZCFG = TINY  # 2 main blocks of 2 heads, 1 refiner block per stream
LEVELS = {"fractions": [0.5, 1.0]}  # two widths per group: few programs to compile for the two searches
# bf16 keeps 8 mantissa bits: the teacher's own outputs move by ~2^-9 relative, so a normalised squared error
# has a floor of ~1e-4 in bf16 (the unpruned candidate scores ~1e-4, not 0); above it, 2% (the bound)
RTOL, ATOL = 0.02, 5e-4


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> dict:
    """One tiny teacher saved as a checkpoint, loaded in fp32 and in bf16, calibrated (with Grams) and searched
    with the same budget, seed and settings: {dtype: (problem, search result)} + the folder."""
    root = tmp_path_factory.mktemp("dtype")
    folder = root / "model"
    fast_random_model(ZCFG).save_pretrained(str(folder))
    batches = [{**b, "task": "t2i"} for b in H.synthetic_calib(ZCFG, 2, 4, 0)]
    out: dict = {"folder": folder, "root": root}
    for dt in ("fp32", "bf16"):
        model, path, _ = _load_model(str(folder), dt)
        cal = calibrate(model, batches, grams=True, out=root / f"calib-{dt}")
        source = {"path": str(path), "fingerprint": fingerprint(path, model.config.to_hf_config()), "config": {}}
        prob = PruningProblem(model, cal, source=source, levels=LEVELS, compensation=CompensationConfig())
        cfg = SearchConfig(
            budget="60%", out=str(root / f"run-{dt}"), population=4, generations=2, progress=False, summary=False
        )
        out[dt] = (prob, run(cfg, prob))
    return out


def _tol(ref: float) -> float:
    return RTOL * abs(ref) + ATOL


def test_winners_rescored_in_the_other_dtype_agree(searched):
    """The fp32 winner re-scored in the bf16 problem is within tolerance of the bf16 winner there, and the
    reverse (both plans evaluated the same way: materialised from the problem's teacher, re-fitted with the
    Grams of the search that made them, as export does)."""
    (p32, r32), (p16, r16) = searched["fp32"], searched["bf16"]
    assert p32.dtype == "float32" and p16.dtype == "bfloat16"
    plan32, plan16 = r32.plans[0], r16.plans[0]
    for prob, own, own_comp, other, other_comp in (
        (p16, plan16, p16.compensation, plan32, p32.compensation),
        (p32, plan32, p32.compensation, plan16, p16.compensation),
    ):
        f_own, f_other = prob.plan_fitness(own, own_comp), prob.plan_fitness(other, other_comp)
        assert abs(f_other - f_own) <= _tol(f_own), (prob.dtype, f_own, f_other)
        # the plan's recorded fitness (fast prefix path) is its materialised score, to the bf16 floor
        assert abs(own["fitness"]["value"] - f_own) <= _tol(f_own)


def _subnetwork(prob: PruningProblem, genome: np.ndarray) -> dict:
    """The plan ``policy`` of ``genome`` decoded with ``prob``'s unit order (kept units in original numbering)."""
    from tmp_jax.materialize import kept_units

    a = prob.tree.decode(genome)
    kept = kept_units(prob.tree, a, prob.order)
    return {
        "policy": {
            "dropped": sorted(a.dropped),
            "keep": {f"{n}/{k}": int(v) for (n, k), v in a.keep.items()},
            "kept_units": {f"{n}/{k}": [int(i) for i in ids] for (n, k), ids in kept.items()},
        }
    }


def test_same_genome_scores_alike_in_both_dtypes(searched):
    """The same genome, decoded with the fp32 search's unit order (so the same subnetwork: through each problem's
    own order a genome can name other units, as bf16 statistics reorder near-tied units, which is what the winner
    re-scoring above measures), scores alike with the teacher in bf16 and in fp32."""
    (p32, r32), (p16, _) = searched["fp32"], searched["bf16"]
    rng = np.random.default_rng(0)
    mx = p32.tree.max_levels()
    genomes = [np.asarray(r32.plans[0]["genome"]["levels"])] + [rng.integers(0, mx + 1) for _ in range(3)]
    for g in genomes:
        plan = _subnetwork(p32, g)
        f32, f16 = p32.plan_fitness(plan, p32.compensation), p16.plan_fitness(plan, p32.compensation)
        assert abs(f16 - f32) <= _tol(f32), (g, f32, f16)
    # the unpruned candidate: exact in fp32, the bf16 floor in bf16
    full = p32.tree.full_genome()[None]
    assert p32.fitness(full)[0] < 1e-9 and p16.fitness(full)[0] < ATOL


def test_plan_and_resume_states_record_the_dtype(searched):
    (p32, r32), (p16, r16) = searched["fp32"], searched["bf16"]
    assert r32.plans[0]["search"]["dtype"] == "float32" and r16.plans[0]["search"]["dtype"] == "bfloat16"
    root = searched["root"]
    # a search checkpoint written in bf16 is not resumed by an fp32 problem
    cfg = SearchConfig(
        budget="60%", out=str(root / "run-bf16"), population=4, generations=3, resume=True, progress=False
    )
    with pytest.raises(SearchError, match="dtype"):
        run(cfg, p32)
    # nor is a calibration state: the fp32 one is refused for the bf16 teacher, by name of the dtypes
    batches = [{**b, "task": "t2i"} for b in H.synthetic_calib(ZCFG, 2, 4, 0)]
    with pytest.raises(ValueError, match="teacher in float32, this run has it in bfloat16"):
        calibrate(p16.teacher_model, batches, grams=True, out=root / "calib-fp32")


def test_distill_bf16_teacher_keeps_fp32_master_and_optimiser(searched):
    from tmp_jax.distill import DistillConfig, build_pair, make_trainer

    plan = searched["root"] / "run-bf16" / "plan.json"
    cfg = DistillConfig(plan=plan, model=str(searched["folder"]), dtype="bf16", progress=False)
    teacher, student, _, _ = build_pair(cfg)
    trainer, params, opt_state = make_trainer(cfg, teacher, student)
    floats = lambda t: [x.dtype for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.floating)]  # noqa: E731
    assert set(floats(trainer.t_state)) == {jnp.dtype(jnp.bfloat16)}  # the frozen teacher in bf16
    assert set(floats(params)) == set(floats(opt_state)) == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("cli", ["search", "distill", "evaluate"])
def test_bad_dtype_is_a_one_line_error(cli, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"tmp_jax.{cli}").main
    args = {
        "search": ["--budget", "50%", "--out", str(tmp_path)],
        "distill": ["--plan", str(tmp_path / "plan.json")],
        "evaluate": ["--model", "zimage-fmnist"],
    }[cli]
    with pytest.raises(SystemExit) as e:
        main([*args, "--dtype", "fp16"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "--dtype fp16: expected one of auto, bf16, fp32" in err and "Traceback" not in err


def test_dtype_auto_is_bf16_on_accelerators_only():
    from tmp_jax.dtypes import canonical, resolve

    assert resolve("auto", "gpu") == resolve("auto", "tpu") == resolve("bf16") == "bfloat16"
    assert resolve("auto", "cpu") == resolve("fp32", "gpu") == resolve("float32") == "float32"
    assert resolve(None, "cpu") == "float32" and canonical("AUTO") == "auto"
    with pytest.raises(ValueError, match="one of auto, bf16, fp32"):
        resolve("fp16")


def test_search_cli_names_its_phases(tmp_path, capsys):
    """Cold-start output of ``python -m tmp_jax.search`` with progress bars off and stderr not a terminal:
    one line at the start and one at the end of each phase, in order."""
    from tmp_jax.models.z_image import TINY
    from tmp_jax.search import main

    folder = tmp_path / "model"
    fast_random_model(TINY).save_pretrained(str(folder))
    argv = ["--model", str(folder), "--budget", "80%", "--out", str(tmp_path / "run"), "--no-progress"]
    rc = main([*argv, "--generations", "1", "--population", "2", "--no-compensate", "--dtype", "fp32"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("[phase]")]
    names = ["loading", "calibration", "compiling", "searching"]
    want = [p for n in names for p in (rf"\[phase\] {n} \.\.\.$", rf"\[phase\] {n} done in \d+\.\d s$")]
    assert len(lines) == len(want) and all(re.match(w, ln) for w, ln in zip(want, lines)), lines
    assert Path(tmp_path / "run" / "plan.json").is_file()
