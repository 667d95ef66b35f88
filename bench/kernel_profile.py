"""Per-kernel GPU time of a jitted function, from a ``jax.profiler`` trace (bench helper).

``kernel_table(f, *args, reps=5)`` runs ``f`` (already warm) ``reps`` times under ``jax.profiler.trace``,
reads the Perfetto trace it writes, and sums the duration of every event on the GPU's device timelines by
kernel name (with the HLO op the profiler attaches, when it does). Returns rows sorted by total time, each
with the time per call, so "where do the 3.2 ms of this block go" is answered on the card itself without
Nsight. On a backend with no device timeline (CPU) the table is empty.
"""

from __future__ import annotations

import glob
import gzip
import json
import tempfile
from collections import defaultdict
from collections.abc import Callable


def kernel_table(f: Callable, *args: object, reps: int = 5) -> list[dict]:
    """[{line, kernel, hlo_op, count_per_call, us_per_call}] for ``reps`` calls of ``f(*args)``, largest first."""
    import jax

    jax.block_until_ready(f(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(reps):
                y = f(*args)
            jax.block_until_ready(y)
        paths = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        if not paths:
            return []
        with gzip.open(paths[0], "rt") as fh:
            trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name" and "GPU" in str(e.get("args", {}).get("name", ""))
    }
    threads = {  # (pid, tid) -> timeline name: "Stream #N(...)" kernels, "XLA Ops" HLO ops, "XLA Modules", ...
        (e["pid"], e.get("tid")): str(e.get("args", {}).get("name", ""))
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu_pids
    }
    tot: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in gpu_pids:
            continue
        line = threads.get((e["pid"], e.get("tid")), "")
        line = "stream" if line.startswith("Stream") else line
        a = e.get("args") or {}
        key = (line, str(e.get("name")), str(a.get("hlo_op", "")))
        tot[key][0] += 1
        tot[key][1] += float(e.get("dur", 0.0))
    rows = [
        {"line": k[0], "kernel": k[1][:90], "hlo_op": k[2][:60], "count_per_call": c / reps, "us_per_call": us / reps}
        for k, (c, us) in tot.items()
    ]
    return sorted(rows, key=lambda r: -r["us_per_call"])


def format_table(rows: list[dict], top: int = 30, line: str = "stream") -> str:
    """Markdown table of one timeline (``"stream"``: kernels; ``"XLA Ops"``: HLO ops), largest first."""
    rows = [r for r in rows if r["line"] == line]
    total = sum(r["us_per_call"] for r in rows)
    lines = [
        f"{line}: {total:.1f} us per call in {len(rows)} distinct entries",
        "| us/call | n/call | kernel | hlo op |",
        "|---|---|---|---|",
    ]
    for r in rows[:top]:
        lines.append(f"| {r['us_per_call']:.1f} | {r['count_per_call']:.0f} | {r['kernel']} | {r['hlo_op']} |")
    return "\n".join(lines)
