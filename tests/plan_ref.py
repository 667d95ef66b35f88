"""Shared test helper: write a minimal, valid plan.json for a genome (what export / distill read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tmp_jax.fileio import fingerprint
from tmp_jax.materialize import kept_units
from tmp_jax.plan import FORMAT_VERSION


def write_plan(path: Path, arch: str, folder: Path, model: Any, tree: Any, genome: Any, order: Any) -> Path:
    """The plan of ``genome`` for the checkpoint ``folder`` (fingerprinted as build_problem does)."""
    a = tree.decode(genome)
    kept = kept_units(tree, a, order)
    plan = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "source": {"fingerprint": fingerprint(folder, model.config.to_hf_config())},
        "budget": {"text": "test"},
        "policy": {
            "dropped": sorted(a.dropped),
            "keep": {f"{n}/{k}": v for (n, k), v in a.keep.items()},
            "kept_units": {f"{n}/{k}": ids.tolist() for (n, k), ids in kept.items()},
        },
        "genome": {"levels": [int(x) for x in genome]},
        "counts": {"after": {"params": tree.count(a)["params"]}},
        "fitness": {"value": 0.0},
    }
    path.write_text(json.dumps(plan))
    return path
