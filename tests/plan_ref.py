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


def embedded_dit_plan(path: Path, heads0: int | None = None) -> Path:
    """The plan of the embedded trained DiT (``zimage-fmnist``) with main block 3 dropped, every main block's FFN at
    half its levels and, with ``heads0``, block 0's attention at that head level."""
    from tmp_jax import arch
    from tmp_jax.problem import EMBEDDED
    from tmp_jax.tree import Tree

    folder, h = EMBEDDED["zimage-fmnist"], arch.get("zimage")
    teacher = h.load(str(folder))
    tree = Tree(h.build_spec(teacher.config))
    g = tree.full_genome()
    names = [x.name for x in tree.genes]
    g[names.index("layers.3:keep")] = 0
    for i, gene in enumerate(tree.genes):
        if gene.kind == "ffn" and gene.node.startswith("layers."):
            g[i] = gene.n_levels // 2
    if heads0 is not None:
        g[names.index("layers.0.attention:heads")] = heads0
    return write_plan(path, "zimage", folder, teacher, tree, g, None)
