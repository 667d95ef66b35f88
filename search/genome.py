"""Genomes over the pruning tree, and the budget-keeping operators every strategy shares.

A genome is one integer level per decision gene of :class:`tmp_jax.tree.Tree` (``tree.genes``;
level ``l`` of gene ``g`` keeps ``g.counts[l]`` units, level 0 is the smallest), decoded by
``Tree.decode`` so the tree is respected: the decisions under a dropped node are *inert*.

Every operator here keeps candidates within a budget with exact costs (:class:`search.budget.CostModel`):

* :func:`repair` lowers genes one level at a time until the cost fits — at random, or greedily by
  importance lost per unit of cost saved (:class:`GeneLoss`, the one-shot ranking);
* :func:`fill` raises genes while they still fit, so candidates use their budget — at random, or greedily
  the raise that restores the most importance per unit of cost added;
* :func:`level_switch` is EvoPress's budget-preserving mutation: one gene up a level and another gene of
  the SAME kind down by at least as much cost (exactly as much where their units are equal; a partner of
  another kind may go down several levels where one does not pay for the up-move), a cap on the
  total level changes, then (importance-guided) repair/fill within that cap;
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
    genome: np.ndarray,
    cost: CostModel,
    budget: int,
    rng: np.random.Generator,
    max_moves: int | None = None,
    loss: GeneLoss | None = None,
) -> np.ndarray:
    """Raise genes one level while the result still fits (at most ``max_moves`` raises).

    With ``loss``, each raise is the one restoring the most importance per unit of cost added (the most
    important units come back first; deterministic); otherwise a uniformly random raise that fits."""
    g = np.asarray(genome, np.int64).copy()
    moves = 0
    while max_moves is None or moves < max_moves:
        idx = _movable(g, cost, up=True)
        if len(idx) == 0:
            break
        cand = _neighbours(g, idx, +1)
        cc = cost(cand)
        fit = np.flatnonzero(cc <= budget)
        if len(fit) == 0:
            break
        if loss is not None:
            gained = loss(g[None])[0] - loss(cand[fit])
            added = np.maximum(cc[fit] - int(cost(g[None])[0]), 1)
            # most importance restored per unit of cost added, then the most restored, then gene order
            j = int(fit[np.lexsort((idx[fit], -gained, -gained / added))[0]])
        else:
            j = int(fit[rng.integers(len(fit))])
        g = cand[j]
        moves += 1
    return g


def gene_kinds(cost: CostModel) -> np.ndarray:
    """An integer per gene naming its kind (``keep``, ``heads``, ``ffn``, ``experts``, ...): the switch classes
    of :func:`level_switch`."""
    names = [gene.kind for gene in cost.tree.genes]
    ids = {k: i for i, k in enumerate(dict.fromkeys(names))}
    return np.array([ids[k] for k in names], np.int64)


def level_changes(a: np.ndarray, b: np.ndarray) -> int:
    """Total level changes between two raw genomes: ``sum |a - b|`` over genes."""
    return int(np.abs(np.asarray(a, np.int64) - np.asarray(b, np.int64)).sum())


def _switch(
    g: np.ndarray,
    cost: CostModel,
    rng: np.random.Generator,
    kinds: np.ndarray,
    same_kind: bool,
    exclude: set[int],
    max_down: int = 1,
) -> tuple[np.ndarray, int, int] | None:
    """One level switch: a random gene up a level, then a partner gene down by the fewest levels (at most
    ``max_down``) that save at least what the up-move added, so the switch never adds cost. The partner is of the
    same kind (``same_kind``), chosen at random: equal-sized units switch at exactly equal cost, and a sub-layer at
    its smallest width may be skipped, the slack left to fill. Else it is of ANOTHER kind: a random kind among
    those with a partner that pays, and in it the partner saving the least cost that is still enough. Several
    levels down (``max_down`` > 1, what :func:`level_switch` allows cross-kind partners) matter where the kinds'
    units differ in size: on the MoE one expert-width level of 8 experts costs more than dropping one expert, so a
    width gained for experts lost takes 2-3 expert levels, which single-level partners never proposed
    (docs/quality.md, "Why levelswitch stalls on the MoE"). Up-genes are tried in random order until one has such
    a partner; None if none has. Returns (genome, up gene, levels the partner went down)."""
    c0 = int(cost(g[None])[0])
    up = _movable(g, cost, up=True)
    for i in rng.permutation(up)[:16].tolist():
        if i in exclude:
            continue
        gu = g.copy()
        gu[i] += 1
        cu = int(cost(gu[None])[0])
        added = cu - c0
        down = _movable(gu, cost, up=False)
        down = down[(down != i) & ~np.isin(down, list(exclude))]
        down = down[(kinds[down] == kinds[i]) == same_kind]
        if len(down) == 0:
            continue
        need = np.zeros(len(down), np.int64)  # levels each partner must go down (0: none suffices)
        saved = np.zeros(len(down), np.int64)
        rows = np.arange(len(down))
        for d in range(1, max_down + 1):
            cand = np.repeat(gu[None], len(down), 0)
            cand[rows, down] = np.maximum(gu[down] - d, 0)
            s = cu - cost(cand)
            new = (need == 0) & (gu[down] >= d) & (s >= added) & (s > 0)
            need[new], saved[new] = d, s[new]
        ok = np.flatnonzero(need > 0)
        if len(ok) == 0:
            continue
        if not same_kind:
            # another kind: a random kind among those that can pay, then its partner wasting the least budget (a
            # block pays for a head only on the block kind's turn). The least waste over ALL kinds would never pick
            # a block once a width a few levels down can pay; single-level partners hid that, by chance, wherever
            # one level of width cost less than the up-move
            kind = rng.choice(np.unique(kinds[down[ok]]))
            ok = ok[kinds[down[ok]] == kind]
            ok = ok[saved[ok] == saved[ok].min()]
        j = int(ok[rng.integers(len(ok))])
        child = gu.copy()
        child[down[j]] -= need[j]
        return child, i, int(need[j])
    return None


def level_switch(
    parent: np.ndarray,
    cost: CostModel,
    budget: int,
    rng: np.random.Generator,
    n_switch: int = 1,
    *,
    max_changes: int | None = None,
    loss: GeneLoss | None = None,
    cross_kind: float = 0.0,
    kinds: np.ndarray | None = None,
) -> np.ndarray:
    """EvoPress mutation: ``n_switch`` level switches (:func:`_switch`: one gene up a level, one gene of the SAME
    kind down a level by at least the cost it added, exactly that where the units are equal; with probability
    ``cross_kind`` the down-gene is of ANOTHER kind, down by as many levels as pay for the up-move within the cap,
    so budget moves between heads and FFN channels, experts and expert width, widths and blocks (a block dropped
    for a width level leaves slack that fill spends within the cap); the same kind where no other kind can pay),
    then repair (a no-op when the parent fits) and fill, so the child sits at the budget.

    ``max_changes`` caps the total level changes ``sum |child - parent|`` (a switch is 1 + the levels its partner
    went down): the switches stop before exceeding it and fill only raises what is left. ``loss`` makes repair and
    fill importance-guided (least important units removed first, most important restored first); otherwise they
    move at random. Works on RAW genomes: an inert gene under a dropped block keeps its level, so a restored block
    comes back with its sub-layers' previous widths."""
    g = np.asarray(parent, np.int64).copy()
    kinds = gene_kinds(cost) if kinds is None else kinds
    changes = 0
    ups: list[int] = []
    for _ in range(n_switch):
        if max_changes is not None and changes + 2 > max_changes:
            break
        same = not (cross_kind > 0 and rng.random() < cross_kind)
        # a cross-kind partner may go down as many levels as the cap leaves after the up-move (3 without a cap);
        # a same-kind one goes one level, as in EvoPress
        max_down = 3 if max_changes is None else max_changes - changes - 1
        moved = _switch(g, cost, rng, kinds, same, set(ups), 1 if same else max_down)
        if moved is None and not same:
            moved = _switch(g, cost, rng, kinds, True, set(ups), 1)
        if moved is None:
            continue
        g, i, d = moved
        ups.append(i)
        changes += 1 + d
    g = repair(g, cost, budget, rng, loss=loss, protect=tuple(ups))
    rest = None if max_changes is None else max(0, max_changes - level_changes(g, parent))
    return fill(g, cost, budget, rng, max_moves=rest, loss=loss)


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
