"""Importance statistics sown by modules (``collect_stats`` flags + ``nnx.sow``), shared by every runner."""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx


def split_collecting(model: nnx.Module) -> tuple[Any, Any]:
    """``nnx.split`` of ``model`` with every ``collect_stats`` flag on (the model itself is left off)."""
    nodes = [n for _, n in nnx.iter_graph(model) if hasattr(n, "collect_stats")]
    for n in nodes:
        n.collect_stats = True
    try:
        return nnx.split(model)
    finally:
        for n in nodes:
            n.collect_stats = False


def flatten_intermediates(inter: nnx.State) -> dict[tuple, np.ndarray]:
    """Sown intermediates -> {module path + stat name: summed host array} (sow keeps tuples of calls)."""
    stats = {}
    for path, v in nnx.to_flat_state(inter):
        val = v.get_value() if hasattr(v, "get_value") else v
        arrs = val if isinstance(val, tuple) else (val,)
        stats[tuple(path)] = np.asarray(sum(np.asarray(x) for x in arrs))
    return stats
