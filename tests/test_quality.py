"""Our default search beats random search with the same number of evaluations, on HELD-OUT data.

The search scores candidates on calibration samples from the train split; here the winners are compared
on the teacher-student velocity MSE on test images at fixed sigmas and noise (``tmp_jax.evaluate``). The
same comparison on the MoE teacher is in tests/test_hunyuan_fmnist.py, whose end-to-end distillation test
distils the winner of that search (one calibrated problem and one levelswitch search for both).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from search.engine import SearchConfig, run
from tmp_jax import evaluate as ev
from tmp_jax.problem import build_problem

BUDGET = "67%"


def _quality_table():
    """scripts/quality_table.py as a module (a script, not a package module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "quality_table", Path(__file__).parents[1] / "scripts/quality_table.py"
    )
    qt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qt)
    return qt


# The calibration set: noised train images (4 micro-batches of 8), not the default trajectory
# set (10 sampler runs x 6 steps x cond/uncond = 120 samples): these tests compare the search STRATEGIES on
# held-out data, whichever fitness they optimise, and every candidate evaluation costs 4x less (the trajectory
# fitness has its own tests in tests/test_trajectory.py).
CALIB_SOURCE = "noised"


@pytest.fixture(scope="module")
def problem():
    # one calibration for both searches; masked evaluation: a few evaluations per search, so one compiled program
    # beats the per-width ones even on the CPU (measured: this file 120 s -> 70 s with a cold compilation cache)
    return build_problem("zimage-fmnist", eval_mode="masked", calib_source=CALIB_SOURCE)


def _winner_gap(problem, strategy: str, tmp_path, inputs) -> tuple[float, float, int]:
    res = run(
        SearchConfig(
            budget=BUDGET,
            model="zimage-fmnist",
            out=str(tmp_path / strategy),
            strategy=strategy,
            generations=1,
            population=4,
            progress=False,
            summary=False,
            calib_source=CALIB_SOURCE,  # as the problem's (recorded in the plan)
        ),
        problem=problem,
    )
    student = problem.candidate(np.asarray(res.plans[0]["genome"]["levels"]))
    mse, rel = ev.velocity_gap(student, problem.teacher_model, inputs)
    return mse, rel, res.evals


def test_levelswitch_beats_random_on_heldout_velocity_mse(problem, tmp_path):
    inputs = ev.heldout_inputs(problem.teacher_model.config, 128, seed=0)
    ours, ours_rel, n_ours = _winner_gap(problem, "levelswitch", tmp_path, inputs)
    rand, rand_rel, n_rand = _winner_gap(problem, "random", tmp_path, inputs)
    # same settings -> comparable evaluation counts (random: all on every calibration sample)
    assert n_rand >= n_ours, (n_ours, n_rand)
    # measured (CPU, seed 0, 128 test images): levelswitch 0.1278 (normalised 0.0853, 8 evals) vs
    # random 0.2966 (normalised 0.1981, 8 evals); search seeds 1 and 2: 0.120 vs 0.180, 0.131 vs 0.254
    assert ours < rand, (ours, rand, ours_rel, rand_rel, n_ours, n_rand)


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert ev.main(["--model", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert ev.main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert ev.main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "belongs to none of the architectures zimage, hunyuan" in err and len(err.strip().splitlines()) == 1
    assert ev.main(["--model", "hunyuan-fmnist", "--teacher", "zimage-fmnist"]) == 2
    err = capsys.readouterr().err
    assert "hunyuan model but --teacher is a zimage model" in err and len(err.strip().splitlines()) == 1


def test_quality_doc_sections_merge(tmp_path):
    """A run for one model rewrites only that model's section of docs/quality.md."""
    qt = _quality_table()
    doc = tmp_path / "quality.md"
    z = "<!-- section: zimage-fmnist -->\nold DiT\n<!-- end section: zimage-fmnist -->"
    qt.write(doc, {"zimage-fmnist": z})
    h = "<!-- section: hunyuan-fmnist -->\nMoE rows\n<!-- end section: hunyuan-fmnist -->"
    qt.write(doc, {"hunyuan-fmnist": h})
    text = doc.read_text()
    assert text.startswith(qt.TITLE) and "old DiT" in text and "MoE rows" in text
    assert text.index("old DiT") < text.index("MoE rows")
    qt.write(doc, {"zimage-fmnist": z.replace("old DiT", "new DiT")})
    text = doc.read_text()
    assert "new DiT" in text and "old DiT" not in text and "MoE rows" in text


def test_teacher_reference_cache(tmp_path, monkeypatch):
    """``evaluate(..., reference_cache=DIR)`` samples the teacher once per (weights, setting, seed) and reads it back
    in another process (here: with the in-process cache cleared); another seed or other weights sample again."""
    from flax import nnx

    import tmp_jax.sampling as sampling

    tiny = ev.Setting("tiny", fm_images=8, samples=4, steps=1)
    teacher = ev.load("zimage-fmnist")
    calls = []
    real = sampling.sample_images
    monkeypatch.setattr(sampling, "sample_images", lambda *a, **k: calls.append(k.get("seed")) or real(*a, **k))
    first = ev.evaluate(teacher, teacher, tiny, seed=0, reference_cache=tmp_path)
    files = list(tmp_path.glob("reference-*-tiny-0.npz"))
    assert calls == [0] and len(files) == 1
    ev._TEACHER_CACHE.clear()  # what a fresh process has
    again = ev.evaluate(teacher, teacher, tiny, seed=0, reference_cache=tmp_path)
    assert calls == [0], "the cached teacher reference was not used"
    assert again["class_acc"] == first["class_acc"] and again["fid_cls"] == first["fid_cls"]
    ev._TEACHER_CACHE.clear()
    changed = ev.load("zimage-fmnist")
    leaf = next(v for _, v in nnx.iter_graph(changed) if isinstance(v, nnx.Param))
    leaf.value = leaf.value + 1.0  # other weights: another digest, never the cached file
    ev.evaluate(changed, changed, tiny, seed=0, reference_cache=tmp_path)
    assert calls == [0, 0] and len(list(tmp_path.glob("reference-*-tiny-0.npz"))) == 2
    ev._TEACHER_CACHE.clear()


def test_reconstructed_rows_are_their_own_group():
    """``--reconstruct-steps``: a cell's ``0 + reconstruct N`` row is compared only with the other strategies'
    reconstructed rows, never with the pruned (0-step) ones."""
    qt = _quality_table()
    rec = "0 + reconstruct 300"

    def row(strategy: str, steps, vel: float) -> dict:
        return {"strategy": strategy, "budget": "50%", "steps": steps, "vel_rel": vel, "params": 1}

    rows = [row(qt.OURS, 0, 0.10), row("uniform", 0, 0.12), row(qt.OURS, rec, 0.08), row("uniform", rec, 0.07)]
    assert [r["strategy"] for r in qt._group(rows, "50%", rec)] == [qt.OURS, "uniform"]
    losses = qt._losses(rows, ["50%"], [0, rec])
    assert len(losses) == 1 and losses[0].startswith(f"50%, {rec}, pruned output error"), losses
    assert "uniform 0.0700" in losses[0]
    # the must-show list compares the reconstructed rows too: ours vs the best baseline there
    for r, acc in zip(rows, (0.5, 0.4, 0.8, 0.9)):
        r["class_acc"] = acc
    got = qt.checks({"budgets": ["50%"], "rows": rows}, 0, rec)
    assert got[0].startswith("50%, pruned output error: ours 0.1000, best baseline uniform 0.1200: ours 17% lower")
    assert got[1] == (
        f"50%, {rec}: output error ours 0.0800, best baseline uniform 0.0700 (ours 14% higher); "
        "class accuracy ours 0.800, best baseline uniform 0.900"
    ), got
    assert len(qt.checks({"budgets": ["50%"], "rows": rows}, 0)) == 1  # no reconstructed rows asked for


def test_reconstructed_rows_fit_float32_master_parameters(tmp_path):
    """A row's student is sliced from the teacher in the row's dtype (bf16 on a GPU); its reconstruction must fit
    float32 master parameters, as ``tmp_jax.reconstruct`` does (Adam on bf16 parameters loses late updates)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from plan_ref import embedded_dit_plan

    from tmp_jax.distill import plan_student
    from tmp_jax.problem import EMBEDDED
    from tmp_jax.teachers import load_model

    qt = _quality_table()
    plan = embedded_dit_plan(tmp_path / "plan.json")
    teacher, path, _ = load_model(str(EMBEDDED["zimage-fmnist"]), "bf16")
    student, _, _ = plan_student(plan, teacher, path, str(EMBEDDED["zimage-fmnist"]))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(student, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    fitted, _ = qt._reconstructed("zimage-fmnist", str(plan), student, 0)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(fitted, nnx.Param))} == {jnp.dtype(jnp.float32)}
