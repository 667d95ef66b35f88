"""Shared driver pieces of the bench scripts: one part per subprocess, results as JSON + a markdown table.

A bench script re-runs itself with ``--part NAME`` in a fresh process (per-framework allocators, per-process
XLA flags), the child prints ``RESULT <json>`` last, and the parent streams the rest of its output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_part(script: str, part: str, flags: str = "", timeout_s: float | None = None) -> dict:
    """Run ``script`` with this process's arguments plus ``--part part`` (``flags`` added to XLA_FLAGS)."""
    env = dict(os.environ)
    if flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    cmd = [sys.executable, script, *sys.argv[1:], "--part", part]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    print("".join(ln + "\n" for ln in p.stdout.splitlines() if not ln.startswith("RESULT ")), end="", flush=True)
    got = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if not got:
        print(f"[{part}] rc={p.returncode}: {p.stderr[-1500:]}", flush=True)
        return {"error": p.stderr[-1500:], "runs": []}
    return json.loads(got[-1][7:])


def write_outputs(out: Path | None, stem: str, results: dict, table: str) -> None:
    """Print ``table``; with ``out``, write ``stem.json`` (every number) and ``stem.md`` (the table) there."""
    print(table)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
        (out / f"{stem}.md").write_text(table + "\n")
