"""Regenerate docs/quality.md: our search vs the baselines on the embedded Fashion-MNIST teachers.

    python scripts/quality_table.py                            # CPU smoke run, both teachers (~40 min, 2 cores)
    python scripts/quality_table.py --model hunyuan-fmnist     # one teacher: rewrites only its section
    python scripts/quality_table.py --preset gpu --model zimage-fmnist --jobs 8   # the real budgets, on a GPU

Models: ``zimage-fmnist`` (the Z-Image-architecture DiT) and ``hunyuan-fmnist`` (the HunyuanImage-3.0-architecture
MoE). docs/quality.md holds one section per (preset, model) between ``<!-- section: NAME -->`` /
``<!-- end section: NAME -->`` markers; a run replaces the sections it ran and keeps the others (each section
states its own date, machine and command).

For each budget (of the model's parameters) and each strategy (levelswitch = ours; levelswitch-nocomp = ours
without compensated pruning, i.e. ``--no-compensate``; uniform, oneshot, depth, random, ga, cmaes = baselines,
compensated like ours) it takes the strategy's plan, materialises the student from the teacher, evaluates it
(``tmp_jax.evaluate``), distils it for a fixed number of steps (same data, seed and settings for every row) and
evaluates it again. The iterative strategies (levelswitch, random, ga, cmaes) run with the same
``--generations`` x ``--population``, so the same number of candidate evaluations (random, ga and cmaes score
every candidate on every calibration sample, levelswitch most of them on a fraction).

Presets:

* ``cpu`` (default): a smoke run. 2 generations x 8, 40 distillation steps of batch 8, the ``cheap`` evaluation
  (200 samples). Budgets DiT 67%, 50%; MoE 50%, 25%.
* ``gpu``: the real budgets (issue 17). 50 generations x 16 (the strategies' default length), 2000 distillation
  steps of batch 32, the ``full`` evaluation (2048 samples of 20 Euler steps, bootstrap 95% intervals of class
  accuracy and FID_cls). Budgets DiT 67%, 50%, 33%; MoE 50%, 25%.

Every (model, strategy) pair is one unit of work; ``--jobs N`` runs N units at once in worker processes (on a
GPU the small models are launch-bound, so N processes share it well; on the CPU keep 1). Units write their rows
to ``--work`` as they finish each budget, and a re-run with the same ``--work`` skips what is done (a run cut by a
time limit resumes; ``--fresh`` starts over). Explicit flags override the preset.
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
# rows that run another strategy / without compensation: name -> (strategy, compensated)
VARIANTS = {"levelswitch-nocomp": ("levelswitch", False)}
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


def teacher_unit(args: argparse.Namespace, model: str) -> None:
    """The teacher's own metrics under the evaluation setting (a unit: ``teacher.json``)."""
    from tmp_jax import evaluate as ev

    t = time.time()
    teacher = ev.load(model)
    res = ev.evaluate(teacher, teacher, args.setting, args.seed)
    out = {k: v for k, v in res.items() if k not in ("teacher",)}
    _atomic_json(_unit_path(args, model, "teacher"), {"metrics": out, "seconds": time.time() - t, "complete": True})


def strategy_unit(args: argparse.Namespace, model: str, strat: str, budgets: list[str]) -> None:
    """One strategy on one model: its search over every budget, then per budget the pruned and the distilled
    student's metrics. Writes ``STRATEGY.json`` after the search and after every budget; a re-run skips the
    search when its plans exist and the budgets already measured."""
    from search.budget import SearchError
    from search.engine import SearchConfig, load_plan
    from search.engine import run as search_run
    from tmp_jax import evaluate as ev
    from tmp_jax.compensate import CompensationConfig
    from tmp_jax.distill import DistillConfig, build_pair
    from tmp_jax.distill import run as distill_run
    from tmp_jax.problem import build_problem

    path = _unit_path(args, model, strat)
    work = path.parent / strat
    state = json.loads(path.read_text()) if path.is_file() else {}
    if state.get("complete"):
        return
    lost = any(not Path(q).is_file() for q in state.get("plans", []))  # results copied without the plans
    if state.get("budgets") != budgets or lost:  # another budget list, or no plans to go on from: start over
        state = {"budgets": budgets, "rows": [], "timings": {}}
    timings = state["timings"]
    base_strat, comp = VARIANTS.get(strat, (strat, True))
    if "plans" not in state:
        t = time.time()
        problem = build_problem(model, seed=args.seed, compensation=CompensationConfig() if comp else None)
        timings["calibration"] = time.time() - t
        t = time.time()
        try:
            sres = search_run(
                SearchConfig(
                    budget=",".join(budgets),
                    model=model,
                    out=str(work / "search"),
                    strategy=base_strat,
                    generations=args.generations,
                    population=args.population,
                    seed=args.seed,
                    progress=False,
                    summary=False,
                    compensate=comp,
                ),
                problem=problem,
            )
        except SearchError as e:
            state.update(error=str(e), complete=True)
            _atomic_json(path, state)
            print(f"{model} {strat}: {e}", flush=True)
            return
        timings["search"] = time.time() - t
        state["search"] = {"evals": sres.evals, "sample_evals": sres.sample_evals, "generations": sres.generations}
        state["plans"] = [str(p) for p in sres.plan_paths]
        _atomic_json(path, state)
        del problem
        print(f"{model} {strat}: search {sres.evals} evaluations, {timings['search']:.0f} s", flush=True)
    teacher = ev.load(model)
    done = {r["budget"] for r in state["rows"] if r.get("steps", 0) == args.distill_steps}
    for b, plan_path in zip(budgets, state["plans"]):
        if b in done:
            continue
        t = time.time()
        plan = load_plan(plan_path)
        tag = b.replace("%", "pct")
        dcfg = DistillConfig(
            plan=Path(plan_path),
            model=model,
            out=work / f"distill-{tag}",
            steps=args.distill_steps,
            batch_size=args.distill_batch,
            lr=args.distill_lr,
            warmup=max(1, args.distill_steps // 10),
            save_every=max(1, args.distill_steps),
            seed=args.seed,
            remat=False,
            progress=False,
            resume=(work / f"distill-{tag}" / "checkpoints").is_dir(),
        )
        _, student0, _, _ = build_pair(dcfg)
        m0 = ev.evaluate(student0, teacher, args.setting, args.seed)
        timings[f"budget {b}: pruned evaluation"] = time.time() - t
        print(f"{model} {strat} {b}: pruned evaluation {time.time() - t:.0f} s", flush=True)
        row = {
            "strategy": strat,
            "budget": b,
            **state["search"],
            "fitness": plan["fitness"]["value"],
            "dropped": len(plan["policy"]["dropped"]),
        }
        state["rows"] = [r for r in state["rows"] if r["budget"] != b]
        state["rows"].append({**row, "steps": 0, **_plain(m0)})
        if args.distill_steps > 0:
            t1 = time.time()
            dres = distill_run(dcfg)
            timings[f"budget {b}: distillation"] = time.time() - t1
            print(f"{model} {strat} {b}: distillation {time.time() - t1:.0f} s", flush=True)
            t1 = time.time()
            m1 = ev.evaluate(dres["student"], teacher, args.setting, args.seed)
            timings[f"budget {b}: recovered evaluation"] = time.time() - t1
            extra = {"distill_s": dres["seconds"], "step_ms": dres["step_ms"]}
            state["rows"].append({**row, "steps": args.distill_steps, **_plain(m1), **extra})
        timings[f"budget {b}"] = time.time() - t
        _atomic_json(path, state)
        print(f"{model} {strat} {b}: {time.time() - t:.0f} s", flush=True)
    state["complete"] = True
    _atomic_json(path, state)


def _plain(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k not in ("teacher", "setting")}


def run_units(args: argparse.Namespace, model: str, budgets: list[str]) -> dict[str, Any]:
    """Run the model's pending units (``--jobs`` at a time in worker processes) and collect every unit's result."""
    t0 = time.time()
    folder = Path(args.work) / args.preset / model
    if args.fresh:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    units = ["teacher", *args.strategies]

    def complete(u: str) -> bool:
        p = _unit_path(args, model, u)
        return p.is_file() and json.loads(p.read_text()).get("complete", False)

    pending = [u for u in units if not complete(u)]
    if args.jobs <= 1:
        for u in pending:
            _run_unit(args, model, u, budgets)
    else:
        # the teacher alone first: its sampling and prediction programs, which every worker's evaluation
        # compiles too, are then in the persistent compilation cache instead of compiled N times at once
        first = [u for u in pending if u == "teacher"]
        if first:
            _run_workers(args, model, first, budgets)
        _run_workers(args, model, [u for u in pending if u != "teacher"], budgets)
    res: dict[str, Any] = {"rows": [], "budgets": budgets, "timings": {}, "missing": []}
    res["reused"] = ", ".join(u for u in units if u not in pending)
    for u in units:
        p = _unit_path(args, model, u)
        st = json.loads(p.read_text()) if p.is_file() else {}
        if u == "teacher":
            res["teacher"] = st.get("metrics", {})
            continue
        if not st.get("complete"):
            res["missing"].append(u)
        if "error" in st:
            res["rows"] += [{"strategy": u, "budget": b, "error": st["error"]} for b in budgets]
        res["rows"] += st.get("rows", [])
        for k, v in st.get("timings", {}).items():
            res["timings"][f"{u}: {k}"] = v
    res["timings"]["this run (wall)"] = time.time() - t0
    return res


def _run_unit(args: argparse.Namespace, model: str, unit: str, budgets: list[str]) -> None:
    if unit == "teacher":
        teacher_unit(args, model)
    else:
        strategy_unit(args, model, unit, budgets)


def _run_workers(args: argparse.Namespace, model: str, units: list[str], budgets: list[str]) -> None:
    """Each unit in its own process (``--worker MODEL:UNIT``), ``--jobs`` at once; logs in the work folder.
    The workers share the GPU: none preallocates memory."""
    import subprocess

    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    # the host linear algebra (Gram re-fits, OBS orders, FID) of N workers: without a cap every worker's BLAS
    # starts one thread per core, and on a 16-core GPU host 9 workers made a 30 s calibration take 220 s
    threads = str(max(1, (os.cpu_count() or 1) // max(1, min(args.jobs, len(units)))))
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(k, threads)
    queue, running = list(units), []
    folder = Path(args.work) / args.preset / model
    while queue or running:
        if args.time_limit and time.time() - START > args.time_limit:  # stop: what finished is kept
            for u, proc, log, _ in running:
                proc.kill()
                proc.wait()
                log.close()
                print(f"[{model}] {u} stopped at --time-limit {args.time_limit:g} s", flush=True)
            return
        while queue and len(running) < args.jobs:
            u = queue.pop(0)
            log = open(folder / f"{u}.log", "a")
            cmd = [sys.executable, __file__, *args.argv, "--worker", f"{model}:{u}", "--budgets", ",".join(budgets)]
            running.append((u, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time()))
            print(f"[{model}] started {u}", flush=True)
        time.sleep(1.0)
        for item in list(running):
            u, proc, log, t = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                tail = (folder / f"{u}.log").read_text().splitlines()[-3:]
                print(f"[{model}] {u} finished rc={proc.returncode} in {time.time() - t:.0f} s: {' | '.join(tail)}")


def _fmt(row: dict[str, Any], key: str, fmt: str) -> str:
    if key not in row:
        return "n/a"
    ci = row.get(f"{key}_ci")
    return fmt.format(row[key]) + (f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else "")


def _group(rows: list[dict[str, Any]], b: str, steps: int) -> list[dict[str, Any]]:
    return [r for r in rows if r["budget"] == b and r.get("steps") == steps and "error" not in r]


def _losses(rows: list[dict[str, Any]], budgets: list[str], steps: list[int]) -> list[str]:
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
                        f"{b}, {s} distillation steps, {head}: {best['strategy']} {fmt.format(best[key])} vs ours "
                        f"{fmt.format(ours[key])}"
                        + (
                            f" (also {', '.join(r['strategy'] for r in better if r is not best)})"
                            if len(better) > 1
                            else ""
                        )
                    )
    return out


def checks(r: dict[str, Any], distill_steps: int) -> list[str]:
    """The issue's must-show comparisons, computed from the rows (one sentence each)."""
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
                f"{best['vel_rel']:.4f}: {100 * red:+.0f}% lower ({'meets' if red >= 0.2 else 'misses'} the 20%)"
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
    steps = [0] + ([args.distill_steps] if args.distill_steps > 0 else [])
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
        f"**Command:** `{command}` (this run: {r['timings']['this run (wall)'] / 60:.1f} min"
        + (f"; units re-used from earlier runs of the same command: {r['reused']}" if r.get("reused") else "")
        + ").",
        "",
        f"**Setup.** Budgets {', '.join(budgets)} of the {kind}'s parameters. The iterative strategies "
        f"(levelswitch = ours, random, ga, cmaes) run {gens} (the same number of candidate evaluations); "
        "uniform, oneshot and depth are one-shot; all but levelswitch-nocomp are compensated (re-fitted). "
        f"Each plan is evaluated as pruned (0 steps) and after {args.distill_steps} recovery-distillation steps "
        f"(batch {args.distill_batch}, lr {args.distill_lr:g}, same data and seed for every row). Metrics "
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
    lines += [f"- {c}" for c in checks(r, args.distill_steps)] or ["- (no complete rows)"]
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
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--generations", type=int, default=None, help="default: the preset's")
    p.add_argument("--population", type=int, default=None, help="default: the preset's")
    p.add_argument("--distill-steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--distill-batch", type=int, default=None, help="default: the preset's")
    p.add_argument("--distill-lr", type=float, default=1e-3)
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
        if s_ not in STRATEGIES:
            p.error(f"--strategies {s_}: choose from {', '.join(STRATEGIES)}")
    # what a worker is started with: this run's arguments minus the ones it gets per unit
    drop = {"--worker", "--budgets", "--fresh", "--time-limit"}
    a.argv, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x.split("=")[0] in drop:
            skip = "=" not in x and x != "--fresh"
            continue
        a.argv.append(x)
    if a.preset == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported
    from tmp_jax.compile_cache import enable_default

    enable_default()
    if a.worker:
        model, unit = a.worker.split(":", 1)
        _run_unit(a, model, unit, [b.strip() for b in a.budgets.split(",")])
        return 0
    command = "python scripts/quality_table.py" + "".join(f" {shlex.quote(x)}" for x in argv)
    new = {}
    for m in models:
        budgets = [b.strip() for b in (a.budgets or preset["budgets"][m]).split(",") if b.strip()]
        name = section_name(a.preset, m)
        new[name] = section(m, run_units(a, m, budgets), a, command)
        write(a.out, {name: new[name]})  # after each model: a later failure keeps the finished sections
        print(new[name], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
