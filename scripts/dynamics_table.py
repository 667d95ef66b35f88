"""Search dynamics on the embedded teachers: convergence (best fitness vs evaluations) and offspring locality.

Runs the default ``levelswitch`` search (default length and population, compensated, seed 0) on one embedded
teacher at one budget, with the code of ``--code`` (a checkout: e.g. an older commit's worktree, to measure
the dynamics before a change), and writes a JSON record:

* ``curve``: (evaluations, best full-fidelity fitness within the budget) after every generation;
* ``offspring``: over every offspring of every generation, the mean number of genes whose effective (canonical)
  level differs from the parent's, the mean total raw level change ``sum |child - parent|``, and the fraction
  of offspring whose set of dropped blocks differs from the parent's (a block dropped or restored);
* ``starts``: each start's fitness where the strategy reports them (its checkpoint state).

``--table A.json B.json ...`` prints the markdown tables of docs/quality.md's ``dynamics`` section from records.

    python scripts/dynamics_table.py --model zimage-fmnist --budget 50% --out dyn-new-z.json
    python scripts/dynamics_table.py --code OLD_CHECKOUT --label old --model zimage-fmnist --budget 50% --out old-z.json
    python scripts/dynamics_table.py --table dyn-old-z.json dyn-new-z.json ...
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

AT = (50, 100, 200, 300, 500, 750, 1000)


def measure(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(args.code).resolve()))
    import numpy as np

    from search import engine, strategies
    from search.budget import CostModel

    assert Path(engine.__file__).resolve().is_relative_to(Path(args.code).resolve()), engine.__file__
    stats: list[tuple[int, int, bool]] = []
    orig = strategies.LevelSwitch._offspring

    def offspring(self, parent, b, *rest):  # noqa: ANN001 - wraps whichever version the checkout has
        out = orig(self, parent, b, *rest)
        cm: CostModel = self.ctx.cost
        tree = self.ctx.tree
        blocks = {g.node for g in tree.genes if g.kind == "keep" and tree.spec.node(g.node).kind == "block"}
        p_can = cm.canonical(parent)[0]
        p_drop = tree.decode(p_can).dropped & blocks
        for c in out:
            c_can = cm.canonical(c)[0]
            stats.append(
                (
                    int((c_can != p_can).sum()),
                    int(np.abs(np.asarray(c, np.int64) - np.asarray(parent, np.int64)).sum()),
                    (tree.decode(c_can).dropped & blocks) != p_drop,
                )
            )
        return out

    strategies.LevelSwitch._offspring = offspring
    knobs = (("max_changes", args.max_changes), ("cross_kind", args.cross_kind), ("patience", args.patience))
    extra = {k: v for k, v in knobs if v is not None}
    if args.start is not None:
        extra["start"] = args.start
    with tempfile.TemporaryDirectory() as tmp:
        cfg = engine.SearchConfig(
            budget=args.budget,
            model=args.model,
            out=tmp,
            progress=False,
            summary=False,
            seed=args.seed,
            generations=args.generations,
            **extra,
        )
        t0 = time.time()
        problem = engine._build_problem(cfg)
        t_problem = time.time() - t0
        t0 = time.time()
        res = engine.run(cfg, problem)
        t_search = time.time() - t0
        meta = json.loads((Path(tmp) / "checkpoint.json").read_text())
    d, r, b = (np.array(x, np.float64) for x in zip(*stats))
    return {
        "code": str(args.code),
        "label": args.label,
        "model": args.model,
        "budget": args.budget,
        "seed": args.seed,
        "settings": res.plans[0]["search"]["settings"],
        "curve": [(h["evals"], h["best_fitness"]) for h in res.history],
        "evals": res.evals,
        "final_fitness": res.plans[0]["fitness"]["value"],
        "params": res.plans[0]["counts"]["after"]["params"],
        "winner": {"levels": res.plans[0]["genome"]["levels"], "dropped": res.plans[0]["policy"]["dropped"]},
        "offspring": {
            "n": len(d),
            "genes_differing": float(d.mean()),
            "level_changes": float(r.mean()),
            "block_changed": float(b.mean()),
        },
        "starts": meta["strategy"].get("start_fitness"),
        "wall_s": {"problem": round(t_problem, 1), "search": round(t_search, 1)},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
    }


def best_at(curve: list, n: int) -> float | None:
    vals = [f for e, f in curve if e <= n]
    return min(vals) if vals else None


def table(paths: list[str]) -> str:
    recs = [json.loads(Path(p).read_text()) for p in paths]
    at = [a for a in AT if any(r["evals"] >= a for r in recs)]
    lines = [
        "| teacher | budget | dynamics | " + " | ".join(f"{a} evals" for a in at) + " | final (evals) |",
        "|---|---|---|" + "---|" * len(at) + "---|",
    ]
    for r in recs:
        cells = []
        for a in at:
            v = best_at(r["curve"], a)
            cells.append("-" if v is None else f"{v:.4f}")
        lines.append(
            f"| {r['model']} | {r['budget']} | {r['label']} | "
            + " | ".join(cells)
            + f" | {r['final_fitness']:.4f} ({r['evals']}) |"
        )
    lines += [
        "",
        "| teacher | budget | dynamics | genes differing from the parent | level changes | "
        "offspring dropping / restoring a block | starts (fitness) | search s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        o = r["offspring"]
        starts = ", ".join(f"{k} {v:.4f}" for k, v in (r["starts"] or [{}])[0].items()) if r.get("starts") else "-"
        lines.append(
            f"| {r['model']} | {r['budget']} | {r['label']} | {o['genes_differing']:.2f} | {o['level_changes']:.2f} | "
            f"{o['block_changed']:.0%} | {starts} | {r['wall_s']['search']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="checkout whose search runs")
    p.add_argument("--label", default="new", help="the record's name in the tables")
    p.add_argument("--model", default="zimage-fmnist")
    p.add_argument("--budget", default="50%")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generations", type=int, default=None, help="default: the strategy's own")
    p.add_argument("--max-changes", type=int, default=None)
    p.add_argument("--cross-kind", type=float, default=None)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--start", default=None)
    p.add_argument("--out", default=None, help="JSON record (default: print)")
    p.add_argument("--table", nargs="+", default=None, help="print the markdown tables of these records")
    args = p.parse_args()
    if args.table:
        print(table(args.table))
        return
    rec = measure(args)
    text = json.dumps(rec, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps({k: rec[k] for k in ("label", "model", "final_fitness", "evals", "offspring", "starts")}))


if __name__ == "__main__":
    main()
