"""Genomes over the pruning tree, and the budget-keeping operators every strategy shares.

A genome is one integer level per decision gene of :class:`tmp_jax.tree.Tree` (``tree.genes``;
level ``l`` of gene ``g`` keeps ``g.counts[l]`` units, level 0 is the smallest), decoded by
``Tree.decode`` so the tree is respected: the decisions under a dropped node are *inert*.

Every operator here keeps candidates within a budget with exact costs (:class:`search.budget.CostModel`):

* :func:`repair` lowers genes one level at a time until the cost fits — at random, or greedily by
  importance lost per unit of cost saved (:class:`GeneLoss`, the one-shot ranking);
* :func:`fill` raises random genes while they still fit, so candidates use their budget;
* :func:`level_switch` is EvoPress's budget-preserving mutation: one gene up a level, another down,
  then repair/fill;
* :func:`from_unit` / :func:`to_unit` map continuous strategy coordinates in ``[0, 1]`` to levels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from search.budget import CostModel
from tmp_jax.tree import Tree


def _movable(g: np.ndarray, cost: CostModel, up: bool) -> np.ndarray:
    """Indices of genes that can move one level (up or down) and are not inert."""
    ok = g < cost.max_levels if up else g > 0
    return np.flatnonzero(ok & ~cost.inert(g)[0])


def _neighbours(g: np.ndarray, idx: np.ndarray, step: int) -> np.ndarray:
    cand = np.repeat(g[None], len(idx), 0)
    cand[np.arange(len(idx)), idx] += step
    return cand


def repair(
    genome: np.ndarray,
    cost: CostModel,
    budget: int,
    rng: np.random.Generator | None = None,
    loss: GeneLoss | None = None,
    protect: tuple[int, ...] = (),
) -> np.ndarray:
    """Lower genes one level at a time until ``cost(genome) <= budget``.

    With ``loss``, each step takes the move losing the least importance per unit of cost saved
    (deterministic); otherwise a uniformly random move that saves cost. ``protect`` genes are only
    lowered when nothing else can be.
    """
    g = np.asarray(genome, np.int64).copy()
    c = int(cost(g)[0])
    while c > budget:
        idx = _movable(g, cost, up=False)
        if len(idx) == 0:
            raise ValueError(f"cannot repair to {budget:,}: floor is {cost.floor:,}")
        cand = _neighbours(g, idx, -1)
        saved = c - cost(cand)
        keep = saved > 0  # lowering an inert-in-effect gene (e.g. a level with the same count) is no move
        pref = keep & ~np.isin(idx, protect)
        sel = pref if pref.any() else keep
        if not sel.any():
            raise ValueError(f"cannot repair to {budget:,}: no move saves cost")
        idx, cand, saved = idx[sel], cand[sel], saved[sel]
        if loss is not None:
            lost = loss(cand) - loss(g[None])[0]
            # lexicographic: least loss per unit saved, then most saved, then gene order (determinism)
            j = int(np.lexsort((idx, -saved, lost / saved))[0])
        else:
            j = int((rng or np.random.default_rng(0)).integers(len(idx)))
        g = cand[j]
        c -= int(saved[j])
    return g


def fill(
    genome: np.ndarray, cost: CostModel, budget: int, rng: np.random.Generator, max_moves: int | None = None
) -> np.ndarray:
    """Raise random genes one level while the result still fits (at most ``max_moves`` raises)."""
    g = np.asarray(genome, np.int64).copy()
    moves = 0
    while max_moves is None or moves < max_moves:
        idx = _movable(g, cost, up=True)
        if len(idx) == 0:
            break
        cand = _neighbours(g, idx, +1)
        fit = np.flatnonzero(cost(cand) <= budget)
        if len(fit) == 0:
            break
        j = int(fit[rng.integers(len(fit))])
        g = cand[j]
        moves += 1
    return g


def level_switch(
    parent: np.ndarray, cost: CostModel, budget: int, rng: np.random.Generator, n_switch: int = 1
) -> np.ndarray:
    """EvoPress mutation: ``n_switch`` times move one gene up a level and a different one down; then
    repair (never undoing the up-moves first) and fill, so the child sits at the budget."""
    g = np.asarray(parent, np.int64).copy()
    ups: list[int] = []
    for _ in range(n_switch):
        up = _movable(g, cost, up=True)
        if len(up) == 0:
            break
        i = int(up[rng.integers(len(up))])
        g[i] += 1
        ups.append(i)
        down = _movable(g, cost, up=False)
        down = down[down != i]
        if len(down):
            g[int(down[rng.integers(len(down))])] -= 1
    g = repair(g, cost, budget, rng, protect=tuple(ups))
    return fill(g, cost, budget, rng)


def random_genome(cost: CostModel, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random levels, randomly repaired into the budget and filled up to it."""
    g = rng.integers(0, cost.max_levels + 1)
    return fill(repair(g, cost, budget, rng), cost, budget, rng)


def uniform_genome(tree: Tree, fraction: float) -> np.ndarray:
    """Every width gene at the level whose kept fraction is nearest ``fraction`` (never a skip level);
    every block kept."""
    g = np.zeros(tree.n_genes, np.int64)
    for i, gene in enumerate(tree.genes):
        c = np.asarray(gene.counts, np.float64)
        if gene.kind == "keep":
            g[i] = gene.n_levels - 1
            continue
        frac = c / c.max()
        err = np.where(c > 0, np.abs(frac - fraction), np.inf)
        g[i] = int(np.argmin(err))  # ties -> the smaller level, so budgets are approached from below
    return g


def to_unit(genomes: np.ndarray, cost: CostModel) -> np.ndarray:
    """Levels -> continuous coordinates in [0, 1] (level / max level)."""
    return np.asarray(genomes, np.float64) / np.maximum(cost.max_levels, 1)


def from_unit(x: np.ndarray, cost: CostModel) -> np.ndarray:
    """Continuous coordinates -> levels: clip to [0, 1], scale by each gene's max level, round."""
    x = np.clip(np.nan_to_num(np.asarray(x, np.float64), nan=1.0), 0.0, 1.0)
    return np.rint(x * cost.max_levels).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Importance


def split_importance(problem: Any) -> tuple[dict[tuple[str, str], np.ndarray], dict[str, float]] | None:
    """(unit scores per (node, kind), block scores per node) from a problem, or None.

    Accepts ``problem.unit_scores`` / ``problem.block_scores`` attributes, or ``problem.importance``
    as a pair, or as a dict with those two entries.
    """
    units = getattr(problem, "unit_scores", None)
    blocks = getattr(problem, "block_scores", None)
    imp = getattr(problem, "importance", None)
    if units is None and imp is not None:
        if isinstance(imp, tuple | list) and len(imp) == 2:
            units, blocks = imp
        elif isinstance(imp, Mapping) and ("unit_scores" in imp or "units" in imp):
            units = imp.get("unit_scores", imp.get("units"))
            blocks = imp.get("block_scores", imp.get("blocks"))
        elif isinstance(imp, Mapping):
            units = imp
    if units is None and blocks is None:
        return None
    return dict(units or {}), {k: float(v) for k, v in (blocks or {}).items()}


class GeneLoss:
    """Importance lost by a genome relative to the full model, summed over its live genes.

    Level ``l`` of a width gene loses the scores of the units it no longer keeps (importance order:
    the kept ones are the first ``counts[l]`` of ``order``); skipping a sub-layer or dropping a block
    loses at least its block score. Decisions under a dropped node add nothing: the node's own loss
    covers them. The scale across unit kinds is whatever the problem's importance uses.
    """

    def __init__(
        self,
        tree: Tree,
        cost: CostModel,
        unit_scores: Mapping[tuple[str, str], np.ndarray],
        block_scores: Mapping[str, float],
        order: Mapping[tuple[str, str], np.ndarray] | None = None,
    ):
        self.cost = cost
        width = int(cost.max_levels.max()) + 1
        table = np.zeros((tree.n_genes, width))
        full_loss: dict[str, float] = {}  # node -> loss of losing everything its width genes decide
        for gi, gene in enumerate(tree.genes):
            if gene.kind == "keep":
                continue
            for m in gene.members or (gene.node,):
                u = tree._units[(m, gene.kind)]
                # 2-D scores / orders (a batched group: one row per expert, each keeping its own first k)
                s = np.atleast_2d(np.asarray(unit_scores.get((m, gene.kind), np.ones(u.n)), np.float64))
                o = np.asarray(order[(m, gene.kind)]) if order and (m, gene.kind) in order else np.arange(u.n)
                o = np.broadcast_to(o, (max(s.shape[0], np.atleast_2d(o).shape[0]), u.n))
                ranked = np.take_along_axis(np.broadcast_to(s, o.shape), o, axis=1).sum(0)  # most important first
                tail = np.concatenate([np.cumsum(ranked[::-1])[::-1], [0.0]])  # tail[k] = loss keeping k
                for lvl, c in enumerate(gene.counts):
                    lost = tail[c]
                    if c == 0 and m in block_scores:
                        lost = max(lost, block_scores[m])
                    table[gi, lvl] += lost
                full_loss[m] = full_loss.get(m, 0.0) + max(tail[0], block_scores.get(m, 0.0))
        for gi, gene in enumerate(tree.genes):
            if gene.kind == "keep":
                sub = sum(v for n, v in full_loss.items() if _under(tree, n, gene.node))
                table[gi, 0] = max(block_scores.get(gene.node, 0.0), sub)
        for gi, gene in enumerate(tree.genes):
            table[gi, gene.n_levels :] = table[gi, gene.n_levels - 1]
        self.table = table

    def __call__(self, genomes: np.ndarray) -> np.ndarray:
        g = self.cost._levels(genomes)
        lost = np.take_along_axis(self.table[None], g[:, :, None], 2)[..., 0]  # [P, G]
        return np.where(self.cost.inert(g), 0.0, lost).sum(-1)


def _under(tree: Tree, name: str, ancestor: str) -> bool:
    cur: str | None = name
    while cur is not None:
        if cur == ancestor:
            return True
        cur = tree.parent[cur]
    return False
