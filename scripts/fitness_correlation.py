"""How well does the search's fitness predict samples? Spearman correlations over many candidates (issue 17).

    python scripts/fitness_correlation.py                              # zimage-fmnist at 50%, 32 candidates
    python scripts/fitness_correlation.py --model hunyuan-fmnist --budget 25%

One teacher, one budget, ``--candidates`` subnetworks (half level switches around the uniform cut, half random
genomes, all at the budget; decoded alternately with each calibration's importance order), each scored by
two fitness functions on the SAME subnetwork (its kept units, original numbering:
``PruningProblem.plan_fitness``; plain slices, no compensation, so both see identical weights):

* ``noised``: the old calibration set (noised training images at random sigma, the plain denoiser output);
* ``trajectory``: the teacher's own CFG sampler states with the guided output ``u + w (c - u)``, early steps
  weighted more (:mod:`tmp_jax.trajectory`, the default now);

and by what users see (``tmp_jax.evaluate``: class accuracy, FID_cls and paired sample MSE of ``--samples``
samples, 6 Euler steps, CFG 2). The table in docs/quality.md (``<!-- section: fitness-correlation -->``) gives
Spearman's rho of each fitness against each metric (class accuracy: the more negative the better; FID_cls and
paired MSE: the more positive the better) with a bootstrap 95% interval over the candidates.

Each scored candidate is written at once to ``--work DIR`` (``cand-<i>.json``, atomically); the same command
with the same ``--work`` skips the candidates already there, so a run cut by ``--time-limit`` (or a crash, or a
device call's limit) resumes where it stopped. With fewer rows than ``--candidates`` the section says it is
partial.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tmp_jax.fileio import atomic_write  # noqa: E402  (after the path fix: run as a script)

SECTION = "fitness-correlation"
START = time.time()
METRICS = ("class_acc", "fid_cls", "paired_mse")


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties averaged."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt(np.sum(ra * ra) * np.sum(rb * rb)))
    return float(np.sum(ra * rb) / den) if den > 0 else 0.0


def bootstrap_ci(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (n, len(a)))
    vals = np.array([spearman(a[i], b[i]) for i in idx])
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def candidates(
    probs: dict[str, Any], budget: str, n: int, seed: int, around: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """``n`` plans at ``budget`` (local and random, see the comment below), decoded with each problem's order in
    turn, pair by pair (local, random with the first order; local, random with the second; ...), so both kinds of
    candidate see both orders (alternating one by one gave every local candidate the first problem's order)."""
    from search.budget import CostModel
    from search.genome import fill, level_switch, random_genome, repair, uniform_genome
    from tmp_jax.materialize import kept_units
    from tmp_jax.tree import parse_count

    names = list(probs)
    tree = probs[names[0]].tree
    cost = CostModel(tree, "params")
    cap = parse_count(budget, tree.full["params"])
    rng = np.random.default_rng(seed)
    # half "local": what selection compares, level switches around the uniform cut (fitted to the budget);
    # half "random": random genomes repaired to the budget (a wide quality spread)
    # (--around PLAN: the local ones switch levels around a search's winner instead: the plans a final selection
    # stage actually compares)
    start = uniform_genome(tree, cap / tree.full["params"]) if around is None else np.asarray(around, np.int64)
    base = fill(repair(start, cost, cap, rng), cost, cap, rng)
    genomes, kinds = [], []
    while len(genomes) < n:
        if len(genomes) % 2 == 0:
            genomes.append(level_switch(base, cost, cap, rng, n_switch=int(rng.integers(1, 7))))
            kinds.append("local")
        else:
            genomes.append(random_genome(cost, cap, rng))
            kinds.append("random")
    out = []
    for i, g in enumerate(genomes):
        prob = probs[names[(i // 2) % len(names)]]
        a = tree.decode(g)
        kept = kept_units(tree, a, prob.order)
        out.append(
            {
                "policy": {
                    "dropped": sorted(a.dropped),
                    "keep": {f"{k}/{u}": int(v) for (k, u), v in a.keep.items()},
                    "kept_units": {f"{k}/{u}": np.asarray(v).tolist() for (k, u), v in kept.items()},
                },
                "params": int(tree.count(a)["params"]),
                "order_of": names[(i // 2) % len(names)],
                "kind": kinds[i],
            }
        )
    return out


def run(args: argparse.Namespace, shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Score candidates ``i`` with ``i % n == k`` for ``shard = (k, n)`` (every worker builds the same candidate
    list: same seed, same tree; the kept units follow each problem's importance order)."""
    from tmp_jax import evaluate as ev
    from tmp_jax.compensate import CompensationConfig
    from tmp_jax.materialize import kept_first_order, materialize
    from tmp_jax.plan import plan_assignment
    from tmp_jax.problem import build_problem

    # with --compensate the trajectory problem (the search's default) re-fits; both fitness functions and the
    # samples then see the SAME re-fitted student: the one a compensated search would export
    comp = {"noised": None, "trajectory": CompensationConfig() if args.compensate else None}
    probs = {src: build_problem(args.model, seed=args.seed, calib_source=src, compensation=comp[src]) for src in comp}
    grams = probs["trajectory"].compensation if args.compensate else None
    teacher = probs["noised"].teacher_model
    setting = ev.Setting("corr", fm_images=256, samples=args.samples, steps=6)
    t0 = time.time()
    k, n = shard
    around = None
    if args.around is not None:
        pj = json.loads(Path(args.around).read_text())
        if pj.get("genome", {}).get("genes") != [g.name for g in probs["noised"].tree.genes]:
            raise SystemExit(f"--around {args.around}: its genome's genes are not this model's")
        around = np.asarray(pj["genome"]["levels"], np.int64)
    work = work_dir(args)
    last = 0.0  # seconds the previous candidate took: the next one is not started if it would overrun
    for i, plan in enumerate(candidates(probs, args.budget, args.candidates, args.seed, around)):
        if i % n != k or (work / f"cand-{i}.json").is_file():
            continue
        if args.time_limit is not None and time.time() - START + last > args.time_limit:
            print(f"[{i + 1}/{args.candidates}] not started: --time-limit {args.time_limit:.0f} s", flush=True)
            break
        t1 = time.time()
        fit = {src: float(p.plan_fitness(plan, compensation=grams)) for src, p in probs.items()}
        tree = probs["noised"].tree
        order = kept_first_order(tree, plan["policy"]["kept_units"])
        m = materialize(teacher, tree, plan_assignment(plan), order, comp=grams)
        met = ev.evaluate(m, teacher, setting=setting, seed=args.seed, reference_cache=args.reference_cache)
        row = {
            "index": i,
            "kind": plan["kind"],
            "params": plan["params"],
            **{f"fit_{src}": v for src, v in fit.items()},
            **{k2: met[k2] for k2 in METRICS},
        }
        atomic_write(work / f"cand-{i}.json", json.dumps(row))  # the rows live in --work, not in memory
        if not (work / "teacher.json").is_file():
            atomic_write(work / "teacher.json", json.dumps({k2: met["teacher"][k2] for k2 in METRICS}))
        last = time.time() - t1
        print(f"[{i + 1}/{args.candidates}] {json.dumps(row)} ({time.time() - t0:.0f} s)", flush=True)
    return collect(work)


def run_jobs(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """``--jobs N`` worker processes, each scoring every N-th candidate (the per-candidate cost is mostly compiling
    its shapes, which runs side by side); their rows merged in candidate order. The teacher's samples are
    computed once, by the first worker to need them, through a shared reference cache."""
    import subprocess

    from scripts.quality_table import strip_options

    work = work_dir(args)
    base = strip_options(argv, {"--jobs", "--json", "--work", "--time-limit"})
    if args.time_limit is not None:  # the workers' clocks start later than ours
        base += ["--time-limit", str(max(1.0, args.time_limit - (time.time() - START)))]
    procs = []
    for k in range(args.jobs):
        cmd = [sys.executable, __file__, *base, "--shard", f"{k}/{args.jobs}", "--work", str(work)]
        if args.reference_cache is None:
            cmd += ["--reference-cache", str(work / "reference")]
        # several processes share one GPU: none may take 75% of its memory up front (JAX's default)
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env))
    bad = [k for k, p in enumerate(procs) if p.wait() != 0]
    if bad:
        raise SystemExit(f"fitness_correlation: worker(s) {bad} failed (output above; rows so far kept in {work})")
    return collect(work)


def work_dir(args: argparse.Namespace) -> Path:
    """The run's folder of per-candidate rows (``--work``), created on first use. A folder holding rows of other
    settings is refused: its rows would be merged with this run's."""
    if args.work is None:
        import tempfile

        args.work = Path(tempfile.mkdtemp(prefix="fitcorr-"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    around = None if args.around is None else json.loads(Path(args.around).read_text()).get("genome", {}).get("levels")
    key = {
        "model": args.model,
        "budget": args.budget,
        "candidates": args.candidates,
        "samples": args.samples,
        "seed": args.seed,
        "compensate": bool(args.compensate),
        "around": around,
    }
    f = work / "settings.json"
    if f.is_file():
        had = json.loads(f.read_text())
        if had != key:
            diff = sorted(k for k in key if had.get(k) != key[k])
            raise SystemExit(f"--work {work}: holds rows of other settings ({', '.join(diff)} differ): use a new one")
    else:
        atomic_write(f, json.dumps(key))
    return work


def collect(work: Path) -> dict[str, Any]:
    """Every row written to ``work`` so far, in candidate order, and the teacher's metrics."""
    rows = sorted((json.loads(p.read_text()) for p in work.glob("cand-*.json")), key=lambda r: r["index"])
    t = work / "teacher.json"
    return {"rows": rows, "teacher": json.loads(t.read_text()) if t.is_file() else {}}


def section(res: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    from scripts.quality_table import _machine

    rows = res["rows"]
    lines = [
        f"<!-- section: {args.section} -->",
        f"## Does the fitness predict samples? {args.model} at {args.budget}"
        + (", compensated" if args.compensate else "")
        + " (Spearman over candidates)",
        "",
        f"{dt.date.today().isoformat()}, `{command}`, {_machine()}.",
        "",
        f"**{args.model}** at {args.budget}: {len(rows)} candidates"
        + ("" if len(rows) >= args.candidates else f" (**partial**: {len(rows)} of {args.candidates} scored)")
        + " (*local*: 1-6 level switches around "
        + ("the uniform cut" if args.around is None else f"the search winner `{args.around.name}`")
        + " fitted to the budget, what selection compares; *random*: random genomes repaired to the budget; "
        f"params {min(r['params'] for r in rows):,} to {max(r['params'] for r in rows):,}), "
        + (
            "compensated (re-fitted on the trajectory set, as a default search exports them; both fitness "
            "functions score that same student)"
            if args.compensate
            else "plain slices"
        )
        + f". Each is scored by both fitness functions on the same subnetwork and sampled ({args.samples} "
        "samples, 6 Euler steps, CFG 2, fixed noise). Spearman's rho with a bootstrap 95% interval over the "
        "candidates: class accuracy should fall as the error grows (rho < 0), FID_cls and paired MSE rise (rho > 0).",
        "",
        "| fitness | rho vs class acc. | rho vs FID_cls | rho vs paired MSE |",
        "|---|---|---|---|",
    ]
    names = {"noised": "noised images, denoiser output (old)", "trajectory": "sampler trajectory, guided output (new)"}
    for subset in ("all", "local"):
        sub = [r for r in rows if subset == "all" or r["kind"] == subset]
        if len(sub) < 3:
            continue
        for src, name in names.items():
            f = np.array([r[f"fit_{src}"] for r in sub])
            cells = []
            for m in METRICS:
                v = np.array([r[m] for r in sub])
                lo, hi = bootstrap_ci(f, v)
                cells.append(f"{spearman(f, v):+.2f} [{lo:+.2f}, {hi:+.2f}]")
            lines.append(f"| {name}, {subset} ({len(sub)}) | " + " | ".join(cells) + " |")
    t = res["teacher"]
    lines += [
        "",
        f"Teacher: class acc. {t['class_acc']:.3f}, FID_cls {t['fid_cls']:.2f}. Candidates: class acc. "
        f"{min(r['class_acc'] for r in rows):.3f} to {max(r['class_acc'] for r in rows):.3f}.",
    ]
    return "\n".join(lines) + f"\n<!-- end section: {args.section} -->"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="zimage-fmnist", help="an embedded teacher (zimage-fmnist, hunyuan-fmnist)")
    p.add_argument("--budget", default="50%", help="the candidates' parameter budget (default 50%%)")
    p.add_argument("--candidates", type=int, default=32, help="subnetworks scored (>= 30 for the issue's table)")
    p.add_argument("--samples", type=int, default=500, help="samples per candidate for the metrics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.md")
    p.add_argument("--json", type=Path, default=None, help="also write the per-candidate rows here")
    p.add_argument(
        "--compensate",
        action="store_true",
        help="candidates re-fitted (compensated pruning, the search's default) instead of plain slices",
    )
    p.add_argument("--jobs", type=int, default=1, help="worker processes side by side (GPU: 4-6)")
    p.add_argument(
        "--around",
        type=Path,
        default=None,
        help="a plan.json of this model (a search's winner): the local candidates are level switches around its "
        "genome instead of around the uniform cut",
    )
    p.add_argument("--reference-cache", type=Path, default=None, help="teacher samples cache (tmp_jax.evaluate)")
    p.add_argument(
        "--section", default=SECTION, help=f"docs section name to write (default {SECTION}; one per model/budget)"
    )
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder of per-candidate rows (default: a new temp folder); the same command with the same --work "
        "resumes, skipping the candidates already scored",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds: start no candidate that would end past this (the rows so far are written; rerun with the "
        "same --work to finish)",
    )
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # K/N: a --jobs worker
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    if a.candidates < 3:
        p.error("--candidates must be >= 3")
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    from tmp_jax.compile_cache import enable_default

    enable_default()
    if a.shard is not None:  # a worker: its rows (in --work) only, no docs
        k, n = (int(x) for x in a.shard.split("/"))
        run(a, (k, n))
        return 0
    res = run_jobs(a, argv) if a.jobs > 1 else run(a)
    if a.json is not None:
        atomic_write(a.json, json.dumps(res, indent=1))
    if len(res["rows"]) < 3:
        print(f"fitness_correlation: {len(res['rows'])} rows in {a.work}, too few for a table: rerun with --work")
        return 1
    command = "python scripts/fitness_correlation.py" + "".join(f" {shlex.quote(x)}" for x in argv)
    from scripts.quality_table import write

    text = section(res, a, command)
    write(a.out, {a.section: text})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
