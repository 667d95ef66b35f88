"""Regenerate docs/quality.md: our search vs the baselines on the embedded Fashion-MNIST teachers.

    python scripts/quality_table.py                            # CPU smoke run, both teachers (~40 min, 2 cores)
    python scripts/quality_table.py --model hunyuan-fmnist     # one teacher: rewrites only its section
    python scripts/quality_table.py --preset gpu --model zimage-fmnist --jobs 8   # the real budgets, on a GPU

Models: ``zimage-fmnist`` (the Z-Image-architecture DiT) and ``hunyuan-fmnist`` (the HunyuanImage-3.0-architecture
MoE). docs/quality.md holds one section per (preset, model) between ``<!-- section: NAME -->`` /
``<!-- end section: NAME -->`` markers; a run replaces the sections it ran and keeps the others (each section
states its own date, machine and command).

For each budget (of the model's parameters) and each strategy (levelswitch = ours; levelswitch-nocomp = ours
without compensated pruning, i.e. ``--no-compensate``; opt-in levelswitch-rollout = ours with ``--rollout-steps 8``,
levelswitch-reconstruct = ours with ``--reconstruct-steps 50``; uniform, oneshot, depth, random, ga, cmaes =
baselines, compensated like ours) it takes the strategy's plan, materialises the student from the teacher, evaluates it
(``tmp_jax.evaluate``), distils it for a fixed number of steps (same data, seed and settings for every row) and
evaluates it again. With ``--reconstruct-steps N`` each cell also gets a row ``0 + reconstruct N``: the pruned
student fitted block by block (``tmp_jax.reconstruct``, N Adam steps per block on the search's calibration set, no
distillation), the cluster-free path, so every strategy's plan is compared after that re-fit too. The iterative
strategies (levelswitch, random, ga, cmaes) run with the same ``--generations`` x ``--population``, so the same
number of candidate evaluations (random, ga and cmaes score every candidate on every calibration sample,
levelswitch most of them on a fraction).

Presets:

* ``cpu`` (default): a smoke run. 2 generations x 8, 40 distillation steps of batch 8, the ``cheap`` evaluation
  (200 samples). Budgets DiT 67%, 50%; MoE 50%, 25%.
* ``gpu``: the real budgets (issue 17). 50 generations x 16 (the strategies' default length), 2000 distillation
  steps of batch 32, the ``full`` evaluation (2048 samples of 20 Euler steps, bootstrap 95% intervals of class
  accuracy and FID_cls). Budgets DiT 67%, 50%, 33%; MoE 50%, 25%.

Work is split into units, run ``--jobs`` at a time in worker processes (on a GPU the small models are
launch-bound, so several processes share it well; on the CPU keep 1), each as soon as what it needs is done:

* ``teacher``: the teacher's metrics; its samples are kept in ``--work`` (``tmp_jax.evaluate``'s reference cache)
  and every row reads them instead of sampling the teacher again;
* ``search:comp`` / ``search:plain``: every strategy's search with / without compensation, one calibrated problem
  shared by all of them (the compensated calibration is the expensive part); one-shot strategies first;
* ``row:STRATEGY:BUDGET``: one cell, the plan evaluated as pruned, distilled, evaluated again; it starts as soon as
  its strategy's plans are written. The preset's headline budget's rows run first.

Units write their results to ``--work`` as they finish, and a re-run with the same ``--work`` skips what is done
(a run cut by ``--time-limit`` resumes; ``--fresh`` starts over). Explicit flags override the preset.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
START = time.time()
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


STRATEGIES = ("levelswitch", "levelswitch-nocomp", "uniform", "oneshot", "depth", "random", "ga", "cmaes")
OURS = "levelswitch"
BASELINES = ("uniform", "oneshot", "depth", "random", "ga", "cmaes")  # what "the best baseline" ranges over
# rows that run another strategy / without compensation / with other search settings:
# name -> (strategy, compensated, SearchConfig overrides)
VARIANTS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "levelswitch-nocomp": ("levelswitch", False, {}),
    # ours with the last selection stage re-ranked by an 8-step sampler rollout (``--rollout-steps 8``)
    "levelswitch-rollout": ("levelswitch", True, {"rollout_steps": 8}),
    # ours with the final candidates re-ranked by their error after a short block-by-block re-fit
    # (``--reconstruct-steps 50 --reconstruct-top 6``): the plan the cluster-free path re-fits best
    "levelswitch-reconstruct": ("levelswitch", True, {"reconstruct_steps": 50, "reconstruct_top": 6}),
}
# opt-in rows (``--strategies``): not in the default table
EXTRA_STRATEGIES = ("levelswitch-rollout", "levelswitch-reconstruct")
MODELS = {
    "zimage-fmnist": ("embedded Z-Image-architecture DiT (zimage-fmnist)", "DiT"),
    "hunyuan-fmnist": ("embedded HunyuanImage-3.0-architecture MoE (hunyuan-fmnist)", "MoE"),
}
PRESETS = {
    "cpu": {
        "generations": 2,
        "population": 8,
        "distill_steps": 40,
        "distill_batch": 8,
        "setting": "cheap",
        "budgets": {"zimage-fmnist": "67%,50%", "hunyuan-fmnist": "50%,25%"},
        "jobs": 1,
    },
    "gpu": {
        "generations": 50,
        "population": 16,
        "distill_steps": 2000,
        "distill_batch": 32,
        "setting": "full",
        "budgets": {"zimage-fmnist": "67%,50%,33%", "hunyuan-fmnist": "50%,25%"},
        # rows of this budget run first: the headline cells come out of a run cut short
        "first": {"zimage-fmnist": "50%", "hunyuan-fmnist": "25%"},
        "jobs": 8,
    },
}
TITLE = "# Quality: our search vs baselines (embedded Fashion-MNIST teachers)"
# (key, header, format, lower is better)
COLS = (
    ("params", "params", "{:,}", None),
    ("vel_rel", "pruned output error (normalised velocity MSE)", "{:.4f}", True),
    ("heldout_fm_mse", "held-out FM MSE", "{:.4f}", True),
    ("class_acc", "class acc.", "{:.3f}", False),
    ("fid_cls", "FID_cls", "{:.2f}", True),
)


def _machine() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()[0]
    return (
        f"{getattr(dev, 'device_kind', dev.platform)} ({len(jax.devices())} device(s), jax {jax.__version__} on "
        f"{jax.default_backend()}); host {cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}"
    )


def _atomic_json(path: Path, obj: Any) -> None:
    from tmp_jax.fileio import atomic_write

    atomic_write(path, json.dumps(obj, indent=1, default=float))


def _unit_path(args: argparse.Namespace, model: str, unit: str) -> Path:
    return Path(args.work) / args.preset / model / f"{unit}.json"


def _ref_cache(args: argparse.Namespace, model: str) -> Path:
    """Where the teacher's samples and metrics are kept for every unit of one model (``--reference-cache``)."""
    return Path(args.work) / args.preset / model / "reference"


def _tag(budget: str) -> str:
    return budget.replace("%", "pct").replace(".", "p")


def _row_path(args: argparse.Namespace, model: str, strat: str, budget: str) -> Path:
    return Path(args.work) / args.preset / model / "rows" / f"{strat}-{_tag(budget)}.json"


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def teacher_unit(args: argparse.Namespace, model: str) -> None:
    """The teacher's own metrics under the evaluation setting (``teacher.json``); its samples are kept in the
    model's reference cache, which every row's evaluation then reads instead of sampling the teacher again."""
    from tmp_jax import evaluate as ev

    t = time.time()
    teacher = ev.load(model)
    res = ev.evaluate(teacher, teacher, args.setting, args.seed, reference_cache=_ref_cache(args, model))
    out = {k: v for k, v in res.items() if k not in ("teacher",)}
    _atomic_json(_unit_path(args, model, "teacher"), {"metrics": out, "seconds": time.time() - t, "complete": True})


def _search_state(args: argparse.Namespace, model: str, strat: str, budgets: list[str]) -> dict[str, Any]:
    """``STRATEGY.json`` when it holds this budget list's plans (all still on disk), else {}."""
    st = _load(_unit_path(args, model, strat))
    if st.get("budgets") != budgets or not (st.get("plans") or "error" in st):
        return {}
    if any(not Path(q).is_file() for q in st.get("plans", [])):  # results copied without the plans
        return {}
    return st


def _variant(strat: str) -> tuple[str, bool, dict[str, Any]]:
    """(strategy run, compensated, SearchConfig overrides) of a row name."""
    return VARIANTS.get(strat, (strat, True, {}))


def _variant_notes(strategies: list[str]) -> str:
    """The setup sentences of the opt-in levelswitch rows in ``strategies``, from their settings (``VARIANTS``,
    SearchConfig's defaults)."""
    from search.engine import SearchConfig

    out = ""
    if "levelswitch-rollout" in strategies:
        steps = VARIANTS["levelswitch-rollout"][2]["rollout_steps"]
        top = SearchConfig.__dataclass_fields__["rollout_top"].default
        out += (
            f"levelswitch-rollout: ours with each budget's {top} best final candidates re-ranked by the final-latent "
            f"error of a CFG sampler rollout of {steps} steps from the teacher's noise (`--rollout-steps {steps}`). "
        )
    if "levelswitch-reconstruct" in strategies:
        o = VARIANTS["levelswitch-reconstruct"][2]
        out += (
            f"levelswitch-reconstruct: ours with {o['reconstruct_top']} final candidates per budget (the best of each "
            f"structure first) re-ranked by their fitness after a block-by-block re-fit of {o['reconstruct_steps']} "
            f"Adam steps per block (`--reconstruct-steps {o['reconstruct_steps']} "
            f"--reconstruct-top {o['reconstruct_top']}`). "
        )
    return out


def _compensated(strat: str) -> bool:
    return _variant(strat)[1]


def _search_order(strategies: list[str]) -> list[str]:
    """One-shot strategies first (their rows can start within seconds), then ours, then the other iterative ones."""
    rank = {"uniform": 0, "oneshot": 0, "depth": 0, OURS: 1}
    return sorted(strategies, key=lambda s: rank.get(_variant(s)[0], 2))


def search_unit(args: argparse.Namespace, model: str, budgets: list[str], compensated: bool) -> None:
    """The searches of every strategy with (or without) compensation on one model, sharing one calibrated
    problem (the compensated calibration with its re-fits is the expensive part: it runs once, not once per
    strategy). Writes ``STRATEGY.json`` (plans, evaluation counts, timings) per strategy as each finishes (a
    row starts on it at once); done ones are skipped."""
    from search.budget import SearchError
    from search.engine import SearchConfig
    from search.engine import run as search_run
    from tmp_jax.compensate import CompensationConfig
    from tmp_jax.problem import build_problem

    problems: dict[bool, Any] = {}
    for strat in _search_order([x for x in args.strategies if _compensated(x) == compensated]):
        if _search_state(args, model, strat, budgets):
            continue
        base_strat, comp, overrides = _variant(strat)
        timings: dict[str, float] = {}
        if comp not in problems:
            t = time.time()
            problems[comp] = build_problem(model, seed=args.seed, compensation=CompensationConfig() if comp else None)
            print(f"{model}: calibration ({'compensated' if comp else 'plain'}) {time.time() - t:.0f} s", flush=True)
            timings["calibration (shared)"] = time.time() - t
        state: dict[str, Any] = {"budgets": budgets, "timings": timings}
        t = time.time()
        try:
            sres = search_run(
                SearchConfig(
                    budget=",".join(budgets),
                    model=model,
                    out=str(_unit_path(args, model, strat).parent / strat / "search"),
                    strategy=base_strat,
                    generations=args.generations,
                    population=args.population,
                    seed=args.seed,
                    progress=False,
                    summary=False,
                    compensate=comp,
                    **overrides,
                ),
                problem=problems[comp],
            )
        except SearchError as e:
            state["error"] = str(e)
            _atomic_json(_unit_path(args, model, strat), state)
            print(f"{model} {strat}: {e}", flush=True)
            continue
        timings["search"] = time.time() - t
        state["search"] = {"evals": sres.evals, "sample_evals": sres.sample_evals, "generations": sres.generations}
        state["plans"] = [str(q) for q in sres.plan_paths]
        _atomic_json(_unit_path(args, model, strat), state)
        print(f"{model} {strat}: search {sres.evals} evaluations, {timings['search']:.0f} s", flush=True)


def row_unit(args: argparse.Namespace, model: str, strat: str, budget: str, budgets: list[str]) -> None:
    """One (strategy, budget) cell: the plan's student evaluated as pruned, distilled, evaluated again
    (``rows/STRATEGY-BUDGET.json``; the distillation resumes from its checkpoint after a cut)."""
    from tmp_jax import evaluate as ev
    from tmp_jax.distill import DistillConfig, build_pair
    from tmp_jax.distill import run as distill_run
    from tmp_jax.plan import load_plan

    path = _row_path(args, model, strat, budget)
    if _load(path).get("complete"):
        return
    st = _search_state(args, model, strat, budgets)
    if not st or "error" in st:
        return  # no plan (the search failed: its error is reported per budget)
    plan_path = st["plans"][budgets.index(budget)]
    work = _unit_path(args, model, strat).parent / strat / f"distill-{_tag(budget)}"
    timings: dict[str, float] = {}
    t = time.time()
    teacher = ev.load(model)
    plan = load_plan(plan_path)
    dcfg = DistillConfig(
        plan=Path(plan_path),
        model=model,
        out=work,
        steps=args.distill_steps,
        batch_size=args.distill_batch,
        lr=args.distill_lr,
        warmup=max(1, args.distill_steps // 10),
        save_every=max(1, args.distill_steps),
        seed=args.seed,
        remat=False,
        progress=False,
        resume=(work / "checkpoints").is_dir(),
    )
    cache = _ref_cache(args, model)
    _, student0, _, _ = build_pair(dcfg)
    m0 = ev.evaluate(student0, teacher, args.setting, args.seed, reference_cache=cache)
    timings["pruned evaluation"] = time.time() - t
    print(f"{model} {strat} {budget}: pruned evaluation {time.time() - t:.0f} s", flush=True)
    row = {
        "strategy": strat,
        "budget": budget,
        **st["search"],
        "fitness": plan["fitness"]["value"],
        "dropped": len(plan["policy"]["dropped"]),
    }
    rows = [{**row, "steps": 0, **_plain(m0)}]
    _atomic_json(path, {"rows": rows, "timings": timings})
    if args.reconstruct_steps > 0:  # the cluster-free re-fit of the same student, before any distillation
        t1 = time.time()
        fitted, rec_s = _reconstructed(model, plan_path, student0, args.reconstruct_steps)
        timings["reconstruction"] = time.time() - t1
        m_rec = ev.evaluate(fitted, teacher, args.setting, args.seed, reference_cache=cache)
        rows.append({**row, "steps": _rec_label(args), **_plain(m_rec), "reconstruct_s": rec_s})
        _atomic_json(path, {"rows": rows, "timings": timings})
        print(f"{model} {strat} {budget}: reconstruction + evaluation {time.time() - t1:.0f} s", flush=True)
        if args.distill_init == "reconstructed":  # distillation starts from the re-fitted student (distill --init)
            from dataclasses import replace

            from tmp_jax import arch

            init = work.parent / f"reconstructed-{_tag(budget)}"
            arch.get(fitted.ARCH).save(fitted, init, overwrite=True)
            dcfg = replace(dcfg, init=init)
    if args.distill_steps > 0:
        t1 = time.time()
        dres = distill_run(dcfg)
        timings["distillation"] = time.time() - t1
        print(f"{model} {strat} {budget}: distillation {time.time() - t1:.0f} s", flush=True)
        t1 = time.time()
        m1 = ev.evaluate(dres["student"], teacher, args.setting, args.seed, reference_cache=cache)
        timings["recovered evaluation"] = time.time() - t1
        extra = {"distill_s": dres["seconds"], "step_ms": dres["step_ms"]}
        rows.append({**row, "steps": args.distill_steps, **_plain(m1), **extra})
    timings["row"] = time.time() - t
    _atomic_json(path, {"rows": rows, "timings": timings, "complete": True})
    print(f"{model} {strat} {budget}: {time.time() - t:.0f} s", flush=True)


def _rec_label(args: argparse.Namespace) -> str:
    """The "distill steps" cell of a reconstructed row: no distillation, reconstructed block by block."""
    return f"0 + reconstruct {args.reconstruct_steps}"


def _reconstructed(model: str, plan_path: str, student: Any, steps: int) -> tuple[Any, float]:
    """``student`` fitted block by block (``tmp_jax.reconstruct``, ``steps`` Adam steps per block) on the teacher's
    calibration set of the plan's search; returns it (fitted in place) and the fit's seconds."""
    from tmp_jax import arch
    from tmp_jax.calibration import prepare
    from tmp_jax.problem import _teacher_and_set
    from tmp_jax.reconstruct import ReconstructConfig, _calib_source, float32_master, reconstruct

    teacher, _, _, batches, _ = _teacher_and_set(model, None, "fp32", None, 8, 0, _calib_source(Path(plan_path)))
    inputs = [prepare(arch.get(teacher.ARCH), teacher.config, b) for b in batches]
    # float32 master parameters, as the CLI fits them: on a GPU the row's student is sliced from the bf16 teacher,
    # and Adam on bf16 parameters loses most late updates to rounding (the first GPU run of these rows did that)
    float32_master(student)
    t = time.time()
    reconstruct(teacher, student, inputs, ReconstructConfig(steps))
    return student, round(time.time() - t, 1)


def _plain(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k not in ("teacher", "setting")}


def _units(args: argparse.Namespace, model: str, budgets: list[str]) -> list[tuple[str, list[str]]]:
    """(unit, the units it needs) of one model: the teacher, the searches, one row per (strategy, budget)."""
    kinds = [k for k in ("comp", "plain") if any(_compensated(s) == (k == "comp") for s in args.strategies)]
    out: list[tuple[str, list[str]]] = [("teacher", []), *[(f"search:{k}", []) for k in kinds]]
    first = PRESETS[args.preset].get("first", {}).get(model)
    for b in sorted(budgets, key=lambda b: b != first):  # stable: the headline budget first, then in order
        for s in args.strategies:
            out.append((f"row:{s}:{b}", ["teacher", f"search:{'comp' if _compensated(s) else 'plain'}"]))
    return out


def _done(args: argparse.Namespace, model: str, unit: str, budgets: list[str]) -> bool:
    if unit == "teacher":
        return bool(_load(_unit_path(args, model, "teacher")).get("complete"))
    if unit.startswith("search:"):
        comp = unit == "search:comp"
        return all(_search_state(args, model, s, budgets) for s in args.strategies if _compensated(s) == comp)
    _, strat, b = unit.split(":", 2)
    st = _search_state(args, model, strat, budgets)
    return bool(st and "error" in st) or bool(_load(_row_path(args, model, strat, b)).get("complete"))


def run_all(args: argparse.Namespace, budgets_of: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Run every model's pending units (``--jobs`` at a time in worker processes, each when the units it needs
    are done; rows of the first budget of every model first), then collect each model's results."""
    t0 = time.time()
    for m in budgets_of:
        folder = Path(args.work) / args.preset / m
        if args.fresh:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    # interleave the models: every model's teacher and searches, then rows budget group by budget group
    per = {m: _units(args, m, b) for m, b in budgets_of.items()}
    queue: list[tuple[str, str, list[str]]] = []
    for i in range(max(len(v) for v in per.values())):
        queue += [(m, *per[m][i]) for m in per if i < len(per[m])]
    queue.sort(key=lambda x: x[1].startswith("row:"))  # stable: teachers and searches first, rows in order
    pending = [(m, u, d) for m, u, d in queue if not _done(args, m, u, budgets_of[m])]
    reused = {m: [u for mm, u, _ in queue if mm == m and (mm, u) not in {(a, b) for a, b, _ in pending}] for m in per}
    if args.jobs <= 1:
        for m, u, _ in pending:
            _run_unit(args, m, u, budgets_of[m])
    else:
        _run_workers(args, pending, budgets_of)
    wall = time.time() - t0
    return {m: _collect(args, m, budgets_of[m], reused[m], wall) for m in budgets_of}


def _collect(args: argparse.Namespace, model: str, budgets: list[str], reused: list[str], wall: float) -> dict:
    res: dict[str, Any] = {"rows": [], "budgets": budgets, "timings": {}, "missing": []}
    res["reused"] = f"{len(reused)} of {len(_units(args, model, budgets))} units" if reused else ""
    tj = _load(_unit_path(args, model, "teacher"))
    res["teacher"] = tj.get("metrics", {})
    if "seconds" in tj:
        res["timings"]["teacher evaluation"] = tj["seconds"]
    for s in args.strategies:
        st = _search_state(args, model, s, budgets)
        if not st:
            res["missing"].append(f"{s} (search)")
            continue
        for k, v in st.get("timings", {}).items():
            res["timings"][f"{s}: {k}"] = v
        if "error" in st:
            res["rows"] += [{"strategy": s, "budget": b, "error": st["error"]} for b in budgets]
            continue
        for b in budgets:
            rj = _load(_row_path(args, model, s, b))
            if not rj.get("complete"):
                res["missing"].append(f"{s} at {b}")
            res["rows"] += rj.get("rows", [])
            for k, v in rj.get("timings", {}).items():
                res["timings"][f"{s} {b}: {k}"] = v
    res["timings"]["this run (wall, all models)"] = wall
    return res


def _run_unit(args: argparse.Namespace, model: str, unit: str, budgets: list[str]) -> None:
    if unit == "teacher":
        teacher_unit(args, model)
    elif unit.startswith("search:"):
        search_unit(args, model, budgets, unit == "search:comp")
    else:
        _, strat, b = unit.split(":", 2)
        row_unit(args, model, strat, b, budgets)


def _run_workers(args: argparse.Namespace, pending: list[tuple[str, str, list[str]]], budgets_of: dict) -> None:
    """Each unit in its own process (``--worker MODEL:UNIT``), ``--jobs`` at once, each started once the units
    it needs have finished; logs in the work folder. The workers share the GPU: none preallocates memory."""
    import subprocess

    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    cores = os.cpu_count() or 1
    queue, running, finished = list(pending), [], set()
    waiting_on = {(m, u) for m, u, _ in pending}

    def ready(m: str, u: str, deps: list[str]) -> bool:
        """A unit whose needs are done; a row also as soon as its own strategy's plans are written (the search
        unit goes on with the next strategy meanwhile)."""
        blocked = [d for d in deps if (m, d) in waiting_on and (m, d) not in finished]
        if u.startswith("row:") and blocked and all(d.startswith("search:") for d in blocked):
            return bool(_search_state(args, m, u.split(":")[1], budgets_of[m]))
        return not blocked

    while queue or running:
        if args.time_limit and time.time() - START > args.time_limit:  # stop: what finished is kept
            for (m, u), proc, log, _ in running:
                proc.kill()
                proc.wait()
                log.close()
                print(f"[{m}] {u} stopped at --time-limit {args.time_limit:g} s", flush=True)
            return
        for item in list(queue):
            if len(running) >= args.jobs:
                break
            m, u, deps = item
            if not ready(m, u, deps):
                continue
            queue.remove(item)
            folder = Path(args.work) / args.preset / m
            log = open(folder / f"{u.replace(':', '-').replace('%', 'pct')}.log", "a")
            # host linear algebra (Gram re-fits, OBS orders, FID): without a cap every worker's BLAS starts one
            # thread per core (on a 16-core host, 9 workers made a 30 s calibration take 220 s); a search unit
            # (the compensated calibration) gets a larger share, it runs beside few others
            share = max(1, cores // (2 * len(budgets_of)) if u == "search:comp" else cores // args.jobs)
            wenv = dict(env, **{k: str(share) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
            cmd = [
                sys.executable,
                __file__,
                *args.argv,
                "--worker",
                f"{m}:{u}",
                "--budgets",
                ",".join(budgets_of[m]),
            ]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=wenv)
            running.append(((m, u), proc, log, time.time()))
            print(f"[{m}] started {u}", flush=True)
        time.sleep(0.5)
        for item in list(running):
            (m, u), proc, log, t = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                finished.add((m, u))
                tail = Path(log.name).read_text().splitlines()[-2:]
                print(f"[{m}] {u} finished rc={proc.returncode} in {time.time() - t:.0f} s: {' | '.join(tail)}")
        if not running and queue and not any(ready(m, u, deps) for m, u, deps in queue):
            raise RuntimeError("quality_table: units wait on units that never ran")  # a scheduling bug


def _fmt(row: dict[str, Any], key: str, fmt: str) -> str:
    if key not in row:
        return "n/a"
    ci = row.get(f"{key}_ci")
    return fmt.format(row[key]) + (f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else "")


def _group(rows: list[dict[str, Any]], b: str, steps: int | str) -> list[dict[str, Any]]:
    return [r for r in rows if r["budget"] == b and r.get("steps") == steps and "error" not in r]


def _losses(rows: list[dict[str, Any]], budgets: list[str], steps: list[int | str]) -> list[str]:
    """Every (budget, distillation steps, metric) where a baseline beats levelswitch, as sentences."""
    out = []
    for b in budgets:
        for s in steps:
            grp = _group(rows, b, s)
            ours = next((r for r in grp if r["strategy"] == OURS), None)
            if ours is None:
                continue
            for key, head, fmt, lower in COLS:
                if lower is None or key not in ours:
                    continue
                better = [
                    r
                    for r in grp
                    if r is not ours and key in r and (r[key] < ours[key] if lower else r[key] > ours[key])
                ]
                if better:
                    best = min(better, key=lambda r: r[key] if lower else -r[key])
                    out.append(
                        f"{b}, {s if isinstance(s, str) else f'{s} distillation steps'}, {head}: "
                        f"{best['strategy']} {fmt.format(best[key])} vs ours "
                        f"{fmt.format(ours[key])}"
                        + (
                            f" (also {', '.join(r['strategy'] for r in better if r is not best)})"
                            if len(better) > 1
                            else ""
                        )
                    )
    return out


def _than(ours: float, best: float) -> str:
    """How far ``ours`` lies below (or above) ``best``, in words: "12% lower", "14% higher", "equal"."""
    red = 1 - ours / best
    return "equal" if round(100 * red) == 0 else f"{abs(100 * red):.0f}% {'lower' if red > 0 else 'higher'}"


def checks(r: dict[str, Any], distill_steps: int, rec_label: str | None = None) -> list[str]:
    """The issue's must-show comparisons, computed from the rows (one sentence each). ``rec_label``: the steps cell
    of the reconstructed rows (``--reconstruct-steps``): the output error and class accuracy compared there too."""
    out, tm = [], r.get("teacher", {})
    for b in r["budgets"]:
        g0 = _group(r["rows"], b, 0)
        ours0 = next((x for x in g0 if x["strategy"] == OURS), None)
        base0 = [x for x in g0 if x["strategy"] in BASELINES]
        if ours0 and base0:
            best = min(base0, key=lambda x: x["vel_rel"])
            red = 1 - ours0["vel_rel"] / best["vel_rel"]
            out.append(
                f"{b}, pruned output error: ours {ours0['vel_rel']:.4f}, best baseline {best['strategy']} "
                f"{best['vel_rel']:.4f}: ours {_than(ours0['vel_rel'], best['vel_rel'])} "
                f"({'meets' if red >= 0.2 else 'misses'} the 20%)"
            )
        g_rec = _group(r["rows"], b, rec_label) if rec_label else []
        ours_r = next((x for x in g_rec if x["strategy"] == OURS), None)
        base_r = [x for x in g_rec if x["strategy"] in BASELINES]
        if ours_r and base_r:  # the cluster-free path: does the search's lead survive every plan's re-fit?
            best = min(base_r, key=lambda x: x["vel_rel"])
            acc = max(base_r, key=lambda x: x["class_acc"])
            ci = acc.get("class_acc_ci")
            out.append(
                f"{b}, {rec_label}: output error ours {ours_r['vel_rel']:.4f}, best baseline {best['strategy']} "
                f"{best['vel_rel']:.4f} (ours {_than(ours_r['vel_rel'], best['vel_rel'])}); class accuracy ours "
                f"{ours_r['class_acc']:.3f}, "
                f"best baseline {acc['strategy']} {acc['class_acc']:.3f}"
                + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            )
        if not distill_steps:
            continue
        g1 = _group(r["rows"], b, distill_steps)
        ours1 = next((x for x in g1 if x["strategy"] == OURS), None)
        base1 = [x for x in g1 if x["strategy"] in BASELINES]
        if ours1 and base1:
            best = min(base1, key=lambda x: x["fid_cls"])
            ci = best.get("fid_cls_ci")
            where = (
                "below its interval"
                if ci and ours1["fid_cls"] < ci[0]
                else "inside or above its interval"
                if ci
                else ""
            )
            out.append(
                f"{b}, FID_cls after {distill_steps} steps: ours {ours1['fid_cls']:.2f}, best baseline "
                f"{best['strategy']} {best['fid_cls']:.2f}"
                + (f" [{ci[0]:.2f}, {ci[1]:.2f}]: ours {where}" if ci else "")
            )
        if ours1 and "class_acc" in tm:
            gap = (tm["class_acc"] - ours1["class_acc"]) / tm["class_acc"]
            ratio = ours1["fid_cls"] / tm["fid_cls"] if tm.get("fid_cls") else float("nan")
            out.append(
                f"{b}, ours recovered vs the teacher: class accuracy {ours1['class_acc']:.3f} vs "
                f"{tm['class_acc']:.3f} ({100 * gap:.1f}% below), FID_cls {ratio:.2f}x the teacher's"
            )
        if ours0 and "class_acc" in tm:
            gap = (tm["class_acc"] - ours0["class_acc"]) / tm["class_acc"]
            out.append(
                f"{b}, ours without distillation: class accuracy {ours0['class_acc']:.3f} ({100 * gap:.1f}% below)"
            )
    return out


def section_name(preset: str, model: str) -> str:
    return model if preset == "cpu" else f"{preset}-{model}"


def section(model: str, r: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    """The markdown section of one model's run (between its markers)."""
    from tmp_jax.evaluate import SETTINGS

    st = SETTINGS[args.setting]
    tm = r["teacher"]
    budgets = r["budgets"]
    title, kind = MODELS[model]
    steps: list[int | str] = [0] + ([_rec_label(args)] if args.reconstruct_steps > 0 else [])
    steps += [args.distill_steps] if args.distill_steps > 0 else []
    name = section_name(args.preset, model)
    head = "| budget | strategy | distill steps | " + " | ".join(h for _, h, _, _ in COLS) + " | search evals |"
    gens = f"{args.generations} generations x population {args.population}"
    ci = (
        f", with bias-corrected bootstrap 95% intervals ({st.bootstrap} replicates over the samples) in brackets"
        if st.bootstrap
        else ""
    )
    lines = [
        f"<!-- section: {name} -->",
        f"## {title}{'' if args.preset == 'cpu' else f' — {args.preset} preset (real budgets)'}",
        "",
        f"**Date:** {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}. **Machine:** {_machine()}.",
        "",
        f"**Command:** `{command}` (this run: {r['timings']['this run (wall, all models)'] / 60:.1f} min"
        + (f"; re-used from earlier runs of the same command: {r['reused']}" if r.get("reused") else "")
        + ").",
        "",
        f"**Setup.** Budgets {', '.join(budgets)} of the {kind}'s parameters. The iterative strategies "
        f"(levelswitch = ours, random, ga, cmaes) run {gens} (the same number of candidate evaluations); "
        "uniform, oneshot and depth are one-shot; all but levelswitch-nocomp are compensated (re-fitted). "
        + _variant_notes(args.strategies)
        + "Each plan is evaluated as pruned (0 steps)"
        + (
            f", after block-by-block reconstruction without distillation (`tmp_jax.reconstruct`, "
            f"{args.reconstruct_steps} Adam steps per block on the calibration set: `{_rec_label(args)}`)"
            if args.reconstruct_steps > 0
            else ""
        )
        + (
            f" and after {args.distill_steps} recovery-distillation steps "
            + ("from the reconstructed student " if args.distill_init == "reconstructed" else "")
            + f"(batch {args.distill_batch}, lr {args.distill_lr:g}, same data and seed for every row). "
            if args.distill_steps > 0
            else " (no distillation in this run). "
        )
        + "Metrics "
        f"(`python -m tmp_jax.evaluate`, setting `{st.name}`): the normalised teacher-student velocity MSE (the "
        f"pruned output error) and held-out flow-matching MSE on {st.fm_images} TEST images at fixed sigmas and "
        f"noise; class accuracy of samples (evaluator CNN, against the conditioned class) and FID_cls (evaluator "
        f"features, samples vs the 2048-image test subset) from {st.samples} samples of {st.steps} Euler steps "
        f"with CFG {st.guidance:g}, the same noise for every model{ci}. Lower is better except class accuracy.",
        "",
        head,
        "|" + "---|" * (3 + len(COLS) + 1),
        "| 100% | teacher | - | " + " | ".join(_fmt(tm, k, f) for k, _, f, _ in COLS) + " | - |",
    ]
    for b in budgets:
        for row in r["rows"]:
            if row["budget"] != b:
                continue
            label = f"**{row['strategy']}** (ours)" if row["strategy"] == OURS else row["strategy"]
            if "error" in row:
                lines.append(f"| {b} | {label} | - | " + " | ".join("n/a" for _ in COLS) + f" | {row['error']} |")
                continue
            cells = " | ".join(_fmt(row, k, f) for k, _, f, _ in COLS)
            lines.append(f"| {b} | {label} | {row['steps']} | {cells} | {row['evals']} |")
    if r.get("missing"):
        lines += ["", f"**Not finished in this run:** {', '.join(r['missing'])} (re-run the command to complete)."]
    lines += ["", "### Against the issue's must-show list", ""]
    rec = _rec_label(args) if args.reconstruct_steps > 0 else None
    lines += [f"- {c}" for c in checks(r, args.distill_steps, rec)] or ["- (no complete rows)"]
    losses = _losses(r["rows"], budgets, steps)
    lines += ["", "### Where our search does not win", ""]
    if losses:
        lines.append("In this run a baseline beats levelswitch on: " + "; ".join(losses) + ".")
    elif not any(row["strategy"] == OURS and "error" not in row for row in r["rows"]):
        lines.append(f"{OURS} (ours) was not run (or failed) in this run: nothing to compare.")
    else:
        lines.append("In this run levelswitch is best on every metric at every budget and distillation length.")
    ms = [x["step_ms"] for x in r["rows"] if x.get("step_ms")]
    if ms:
        lines += [
            "",
            f"Distillation steady-state step time in this run: median {float(np.median(ms)):.1f} ms/step "
            f"(range {min(ms):.1f}-{max(ms):.1f}; {args.jobs} workers sharing the device).",
        ]
    lines += ["", "### Timings", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in r["timings"].items()]
    lines.append(f"<!-- end section: {name} -->")
    return "\n".join(lines)


def _sections(text: str) -> dict[str, str]:
    """The model sections of an existing docs/quality.md (empty for a missing / marker-less file)."""
    out = {}
    for m in re.finditer(r"<!-- section: (\S+) -->.*?<!-- end section: \1 -->", text, re.S):
        out[m.group(1)] = m.group(0)
    return out


def write(path: Path, new: dict[str, str]) -> None:
    """Write docs/quality.md: the new sections replace those of the same model, the others are kept."""
    old = _sections(path.read_text()) if path.is_file() else {}
    merged = {**old, **new}
    intro = (
        "Each section is regenerated by the command it states (`python scripts/quality_table.py --model NAME` "
        "rewrites only that model's section); sections from different runs may differ in date and machine."
    )
    body = [merged[m] for m in MODELS if m in merged] + [v for k, v in merged.items() if k not in MODELS]
    text = "\n\n".join([TITLE, intro, *body]) + "\n"
    from tmp_jax.fileio import atomic_write

    atomic_write(path, text)


def strip_options(argv: list[str], valued: set[str], flags: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """``argv`` without the options in ``valued`` (each with its value: ``--opt V`` or ``--opt=V``) and the flags in
    ``flags``: what a worker process is started with."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        name = x.split("=")[0]
        if name in valued:
            skip = "=" not in x
        elif name not in flags:
            out.append(x)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="cpu (smoke run, default) or gpu")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.md")
    p.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "tmp-jax-quality"),
        help="folder for plans, distillation runs and per-unit results (kept: a re-run resumes; default: in the "
        "temp folder)",
    )
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --work for these models")
    p.add_argument(
        "--model",
        default=",".join(MODELS),
        help=f"comma-separated embedded teachers (default: all: {', '.join(MODELS)})",
    )
    p.add_argument("--budgets", default=None, help="budgets for every model (default: the preset's per model)")
    p.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help=f"comma-separated rows (default: {','.join(STRATEGIES)}; also: {', '.join(EXTRA_STRATEGIES)})",
    )
    p.add_argument("--generations", type=int, default=None, help="default: the preset's")
    p.add_argument("--population", type=int, default=None, help="default: the preset's")
    p.add_argument("--distill-steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--distill-batch", type=int, default=None, help="default: the preset's")
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument(
        "--reconstruct-steps",
        type=int,
        default=0,
        help="also evaluate each plan after block-by-block reconstruction with this many Adam steps per block, "
        "before distillation (tmp_jax.reconstruct; 0: no such row, the default)",
    )
    p.add_argument(
        "--distill-init",
        default="sliced",
        choices=("sliced", "reconstructed"),
        help="what distillation starts from: the plan's sliced (compensated) student (default) or, with "
        "--reconstruct-steps, the reconstructed one (tmp_jax.distill --init)",
    )
    p.add_argument("--setting", default=None, choices=("cheap", "full"), help="default: the preset's")
    p.add_argument("--jobs", type=int, default=None, help="units run at once in worker processes (default: preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--time-limit",
        type=float,
        default=0,
        help="seconds after which running units are stopped and the sections written with what finished (0: none)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)  # MODEL:UNIT, run by --jobs
    a = p.parse_args(argv)
    if a.distill_init == "reconstructed" and a.reconstruct_steps <= 0:
        p.error("--distill-init reconstructed needs --reconstruct-steps N > 0 (the re-fit it starts from)")
    preset = PRESETS[a.preset]
    for k in ("generations", "population", "distill_steps", "distill_batch", "setting", "jobs"):
        if getattr(a, k) is None:
            setattr(a, k, preset[k])
    models = [m.strip() for m in a.model.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            p.error(f"--model {m}: choose from {', '.join(MODELS)}")
    a.strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    for s_ in a.strategies:
        if s_ not in STRATEGIES + EXTRA_STRATEGIES:
            p.error(f"--strategies {s_}: choose from {', '.join(STRATEGIES + EXTRA_STRATEGIES)}")
    # what a worker is started with: this run's arguments minus the ones it gets per unit
    a.argv = strip_options(argv, {"--worker", "--budgets", "--time-limit"}, {"--fresh"})
    if a.preset == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported
    from tmp_jax.compile_cache import enable_default

    enable_default()
    if a.worker:
        model, unit = a.worker.split(":", 1)
        _run_unit(a, model, unit, [b.strip() for b in a.budgets.split(",")])
        return 0
    command = "python scripts/quality_table.py" + "".join(f" {shlex.quote(x)}" for x in argv)
    budgets_of = {m: [b.strip() for b in (a.budgets or preset["budgets"][m]).split(",") if b.strip()] for m in models}
    results = run_all(a, budgets_of)
    new = {section_name(a.preset, m): section(m, results[m], a, command) for m in models}
    write(a.out, new)
    for text in new.values():
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
