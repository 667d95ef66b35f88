"""bf16 vs fp32 evaluation on the embedded teachers: how much the searched plan changes with ``--dtype``.

    python scripts/dtype_table.py                                  # both teachers, default search length
    python scripts/dtype_table.py --model zimage-fmnist --generations 10
    python scripts/dtype_table.py --render /tmp/tmp-jax-dtype/results.json   # the section again, no search

For each teacher (zimage-fmnist at 50% of its parameters, hunyuan-fmnist at 25%) the default search (compensated
levelswitch, seed 0) runs twice: with the teacher loaded in bf16 and in fp32 (``--dtype``). Each winner is then
re-scored in the OTHER dtype's problem: its plan (kept units in the original numbering) materialised from that
problem's teacher, consumers re-fitted with the Grams of the search that made it (as export does), and its
normalised teacher-output error measured on that problem's calibration outputs
(:meth:`tmp_jax.problem.PruningProblem.plan_fitness`). Both winners are scored the same way in both problems, so
each column compares the two plans under one evaluation. The section it writes into ``docs/quality.md``
(``<!-- section: dtype -->``) states the date, machine and command; the numbers are also kept in
``WORK/results.json``, from which ``--render`` writes the section again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

MODELS = {"zimage-fmnist": "50%", "hunyuan-fmnist": "25%"}
DTYPES = ("bfloat16", "float32")
SHORT = {"bfloat16": "bf16", "float32": "fp32"}
SECTION = "dtype"


def _units(kept: dict[str, Any]) -> set[tuple]:
    """Every kept unit as (group, id), or (group, expert, id) for a per-expert group (one list per expert)."""
    out: set[tuple] = set()
    for g, ids in kept.items():
        if ids and isinstance(ids[0], list):
            out.update((g, r, int(i)) for r, row in enumerate(ids) for i in row)
        else:
            out.update((g, int(i)) for i in ids)
    return out


def kept_overlap(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Share of the kept units (all groups of the nodes both plans keep) the two plans have in common: |A & B| /
    |A | B| over (group, unit) pairs (1.0 = the same subnetwork)."""
    ka, kb = a["policy"]["kept_units"], b["policy"]["kept_units"]
    # a unit is (group, its index path): per-expert groups list one row per expert
    sa, sb = _units(ka), _units(kb)
    da, db = set(a["policy"]["dropped"]), set(b["policy"]["dropped"])
    sa |= {("dropped", n) for n in da}
    sb |= {("dropped", n) for n in db}
    return len(sa & sb) / max(len(sa | sb), 1)


def run(model: str, budget: str, args: argparse.Namespace) -> dict[str, Any]:
    """Search in each dtype, then score each winner in each dtype's problem."""
    from search.engine import SearchConfig
    from search.engine import run as search_run
    from tmp_jax.compensate import CompensationConfig
    from tmp_jax.problem import build_problem

    probs, res, secs = {}, {}, {}
    for d in DTYPES:
        t = time.time()
        probs[d] = build_problem(model, seed=args.seed, compensation=CompensationConfig(), dtype=d)
        cfg = SearchConfig(
            budget=budget,
            model=model,
            out=str(Path(args.work) / model / SHORT[d]),
            seed=args.seed,
            generations=args.generations,
            population=args.population,
            progress=False,
            summary=False,
            phases=False,
            dtype=d,
        )
        res[d] = search_run(cfg, problem=probs[d])
        secs[d] = time.time() - t
        print(f"{model} {budget} {d}: fitness {res[d].plans[0]['fitness']['value']:.5f}, {secs[d]:.0f} s", flush=True)
    rows = []
    for w in DTYPES:  # the winner searched in w, scored in each problem
        plan = res[w].plans[0]
        scores = {p: probs[p].plan_fitness(plan, probs[w].compensation) for p in DTYPES}
        rows.append(
            {
                "searched": w,
                "params": plan["counts"]["after"]["params"],
                "search_fitness": plan["fitness"]["value"],
                "scores": scores,
                "evals": res[w].evals,
                "generations": res[w].generations,
                "seconds": secs[w],
            }
        )
        print(f"  winner of {w}: {scores}", flush=True)
    overlap = kept_overlap(res["bfloat16"].plans[0], res["float32"].plans[0])
    return {"budget": budget, "rows": rows, "overlap": overlap}


def section(results: dict[str, dict[str, Any]], when: str, command: str, machine: str, note: str) -> str:
    lines = [
        f"<!-- section: {SECTION} -->",
        "## bf16 vs fp32 evaluation (CPU)",
        "",
        f"{when}, `{command}`, {machine}.{note}",
        "",
        "The same search (compensated levelswitch, seed 0) with the teacher loaded in bf16 and in fp32 "
        "(`--dtype`). Each winner is re-scored in both dtypes' problems: its plan materialised from that "
        "problem's teacher (consumers re-fitted with the Grams of its own search) and its normalised "
        "teacher-output error measured against that problem's cached teacher outputs; *change* = how much "
        "worse the other dtype's winner scores than the problem's own winner there (negative: better). "
        "*kept-unit overlap* = shared kept units / all kept units of the two plans (1 = the same subnetwork).",
        "",
        "| teacher | budget | winner searched in | params | fitness (search) | scored in bf16 | scored in fp32 "
        "| search evals | s (load to plan) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, r in results.items():
        for row in r["rows"]:
            s = row["scores"]
            lines.append(
                f"| {model} | {r['budget']} | {SHORT[row['searched']]} | {row['params']:,} | "
                f"{row['search_fitness']:.5f} | {s['bfloat16']:.5f} | {s['float32']:.5f} | {row['evals']} | "
                f"{row['seconds']:.0f} |"
            )
    lines += [
        "",
        "| teacher | fp32 winner in the bf16 problem: change | bf16 winner in the fp32 problem: change "
        "| bf16 winner: fp32 score vs bf16 score | fp32 winner: bf16 score vs fp32 score | kept-unit overlap |",
        "|---|---|---|---|---|---|",
    ]
    for model, r in results.items():
        by = {row["searched"]: row["scores"] for row in r["rows"]}
        c16 = by["float32"]["bfloat16"] / by["bfloat16"]["bfloat16"] - 1
        c32 = by["bfloat16"]["float32"] / by["float32"]["float32"] - 1
        s16 = by["bfloat16"]["float32"] / by["bfloat16"]["bfloat16"] - 1
        s32 = by["float32"]["bfloat16"] / by["float32"]["float32"] - 1
        lines.append(f"| {model} | {c16:+.2%} | {c32:+.2%} | {s16:+.2%} | {s32:+.2%} | {r['overlap']:.1%} |")
    lines += [
        "",
        "Reading: the two score-vs-score columns are the evaluation error of bf16 itself (one plan, two "
        "dtypes); the *change* columns add the search's: the two searches follow different trajectories once "
        "fitness values differ in the third digit, and end at different plans (the overlap), of which either "
        "may be the better one. *s (load to plan)*: loading, calibration, the warm-up compiles and the search, "
        "on a CPU where bf16 is emulated (no faster than fp32; the speed case for bf16 is the GPU).",
    ]
    return "\n".join(lines).rstrip() + f"\n<!-- end section: {SECTION} -->"


def _without_note(argv: list[str]) -> list[str]:
    """The command line as the section states it: ``--note`` is the section's prose, not part of the command."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--note":
            skip = True
        elif not x.startswith("--note="):
            out.append(x)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.md")
    p.add_argument("--model", default=",".join(MODELS), help=f"embedded teachers (default: {', '.join(MODELS)})")
    p.add_argument("--generations", type=int, default=None, help="levelswitch generations (default: its own)")
    p.add_argument("--population", type=int, default=None, help="levelswitch offspring (default: its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="a sentence appended to the date/machine line")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "tmp-jax-dtype"))
    p.add_argument("--render", type=Path, default=None, help="write the section from a results.json, no search")
    a = p.parse_args(argv)
    from scripts.quality_table import write

    if a.render is not None:
        saved = json.loads(a.render.read_text())
        text = section(saved["results"], saved["when"], saved["command"], saved["machine"], saved["note"])
        write(a.out, {SECTION: text})
        print(text)
        return 0
    models = [m.strip() for m in a.model.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            p.error(f"--model {m}: choose from {', '.join(MODELS)}")
    from tmp_jax.compile_cache import enable_default

    enable_default()
    results = {m: run(m, MODELS[m], a) for m in models}
    from scripts.quality_table import _machine

    saved = {
        "results": results,
        "when": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "python scripts/dtype_table.py" + "".join(f" {shlex.quote(x)}" for x in _without_note(argv or [])),
        "machine": _machine(),
        "note": f" {a.note}" if a.note else "",
    }
    Path(a.work).mkdir(parents=True, exist_ok=True)
    (Path(a.work) / "results.json").write_text(json.dumps(saved, indent=2) + "\n")
    text = section(saved["results"], saved["when"], saved["command"], saved["machine"], saved["note"])
    write(a.out, {SECTION: text})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
