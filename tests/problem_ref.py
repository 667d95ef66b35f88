"""A real :class:`PruningProblem` on a tiny model without running calibration (shared by the evaluation tests).

Calibration would compile the statistics forward (tens of seconds on CI); these tests need a non-trivial
importance order, so the unit and block statistics are random, while the teacher outputs are the model's own.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from tmp_jax import arch
from tmp_jax.calibration import Calibration
from tmp_jax.problem import PruningProblem
from tmp_jax.tree import Tree, node_path


def random_stats(tree: Tree, rng: np.random.Generator) -> dict[tuple, np.ndarray]:
    """Random ``unit_stat_<kind>`` per unit group and ``block_stat`` per droppable node (importance inputs)."""
    stats = {}
    for n in tree.spec.nodes():
        for u in n.units:
            rows = () if u.batch is None else (tree.units(n.name, u.batch).n,)  # per-expert groups: one row each
            stats[(*node_path(n.name), f"unit_stat_{u.kind}")] = rng.uniform(size=(*rows, u.n))
        if n.droppable:
            stats[(*node_path(n.name), "block_stat")] = np.array([rng.uniform(), 1.0])
    return stats


def random_problem(
    arch_name: str,
    cfg: Any,
    levels: dict[str, Any],
    *,
    seed: int = 0,
    n: int = 4,
    batch: int = 2,
    model: Any = None,
    fingerprint: str = "tiny",
    **kw: Any,
) -> PruningProblem:
    """A problem on ``cfg`` (random weights unless ``model``), ``n`` synthetic calibration samples in
    micro-batches of ``batch``, random importance statistics; ``kw`` goes to :class:`PruningProblem`."""
    hooks = arch.get(arch_name)
    model = hooks.init_random(cfg, jnp.float32, seed) if model is None else model
    tree = Tree(hooks.build_spec(cfg), levels)
    stats = random_stats(tree, np.random.default_rng(seed))
    inputs = [hooks.prepare_batch(cfg, b) for b in hooks.synthetic_calib(cfg, n, batch, seed)]
    teacher = [np.asarray(hooks.forward(model, x)) for x in inputs]
    source = {"path": None, "fingerprint": fingerprint, "config": {}}
    return PruningProblem(model, Calibration(inputs, teacher, stats), source=source, levels=levels, **kw)
