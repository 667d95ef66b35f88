"""The hierarchical start: per-gene, per-level error tables and a dynamic program over the pruning tree.

:func:`error_table_genomes` lists, for every gene and every level below its full one, the full model with
only that gene at that level; the problem's fitness of each (measured once, through the engine's cache) is
the gene-level's error measured alone. :func:`tree_dp` assumes these errors add up and solves the budget
allocation exactly under that model (up to a cost binning of 1/``bins`` of the model), bottom-up over the
tree, the way the tree nests its decisions:

* inside a sub-layer node, every combination of its own width genes (e.g. an MoE's expert count x expert
  width, an attention's head count incl. its skip level): the experts / widths curve of that node;
* inside a block, the sub-layers' curves merged (a knapsack over widths), plus the block's drop option;
* at the root, the blocks' curves merged: how much depth versus width the budget buys.

Each curve is the Pareto set of (cost, error) options of a subtree; a merge keeps, per cost bin, the option
with the least error. Genes tied across nodes (e.g. a global KV-group count) are enumerated outside the DP.
Costs are exact (:class:`search.budget.CostModel`; a subtree's cost depends only on its own genes), so the
chosen genome fits the budget; it is then filled up to the budget.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from search.budget import CostModel
from tmp_jax.tree import Tree

MAX_GLOBAL_COMBOS = 256  # level combinations of tied genes enumerated outside the DP (beyond: kept full)


def error_table_genomes(tree: Tree) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(genomes [K, G], their (gene, level) pairs): the full genome with one gene at one lower level."""
    full = tree.full_genome().astype(np.int64)
    rows, pairs = [], []
    for gi, gene in enumerate(tree.genes):
        for lvl in range(gene.n_levels - 1):
            g = full.copy()
            g[gi] = lvl
            rows.append(g)
            pairs.append((gi, lvl))
    return (np.stack(rows) if rows else np.zeros((0, tree.n_genes), np.int64)), pairs


def error_table(tree: Tree, pairs: list[tuple[int, int]], fitness: np.ndarray, full_fitness: float) -> np.ndarray:
    """``err[g, l]``: fitness of gene ``g`` alone at level ``l`` minus the full model's (0 at the full level;
    negative differences, i.e. noise, clipped to 0)."""
    width = max((gene.n_levels for gene in tree.genes), default=1)
    err = np.zeros((tree.n_genes, width))
    for (gi, lvl), f in zip(pairs, np.asarray(fitness, np.float64)):
        err[gi, lvl] = max(float(f) - float(full_fitness), 0.0) if np.isfinite(f) else 1e30
    return err


@dataclass
class _Curve:
    """Pareto options of a subtree: cost change vs the base genome, error, and how to rebuild each."""

    dcost: np.ndarray  # [K] int64
    err: np.ndarray  # [K]
    build: Callable[[int], dict[int, int]]  # option index -> {gene: level}


def _prune(dcost: np.ndarray, err: np.ndarray, width: float) -> np.ndarray:
    """Indices of the Pareto options (cost up, error strictly down), at most one per cost bin of ``width``."""
    order = np.lexsort((err, dcost))
    e = err[order]
    prev = np.r_[np.inf, np.minimum.accumulate(e)[:-1]]
    keep_a = order[e < prev]
    if width > 1 and len(keep_a) > 1:
        # per bin, the option with the least error (the last of the bin on a Pareto front)
        b = np.floor((dcost[keep_a] - dcost[keep_a].min()) / width).astype(np.int64)
        last = np.r_[b[1:] != b[:-1], True]
        keep_a = keep_a[last]
    return keep_a


def _merge(a: _Curve, b: _Curve, width: float) -> _Curve:
    dc = (a.dcost[:, None] + b.dcost[None, :]).reshape(-1)
    er = (a.err[:, None] + b.err[None, :]).reshape(-1)
    keep = _prune(dc, er, width)
    ia, ib = np.divmod(keep, len(b.dcost))

    def build(k: int) -> dict[int, int]:
        return {**a.build(int(ia[k])), **b.build(int(ib[k]))}

    return _Curve(dc[keep], er[keep], build)


def tree_dp(
    tree: Tree, cost: CostModel, err: np.ndarray, budget: int, bins: int = 4096
) -> tuple[np.ndarray, float] | None:
    """The genome minimising the summed single-gene errors ``err`` within ``budget`` (exact costs), and that
    predicted error; None if no option fits. Genes under a dropped node keep their full level (raw genome)."""
    full = tree.full_genome().astype(np.int64)
    width = max(cost.full - cost.floor, 1) / max(bins, 1)
    nodes = {n.name: n for n in tree.spec.nodes()}
    own: dict[str, list[int]] = {}
    keep_gene: dict[str, int] = {}
    glob: list[int] = []
    for gi, gene in enumerate(tree.genes):
        if gene.members and len(set(gene.members)) > 1:
            glob.append(gi)
        elif gene.kind == "keep":
            keep_gene[gene.node] = gi
        else:
            own.setdefault(gene.node, []).append(gi)
    combos = list(itertools.product(*[range(tree.genes[gi].n_levels) for gi in glob]))
    if len(combos) > MAX_GLOBAL_COMBOS:
        combos = [tuple(tree.genes[gi].n_levels - 1 for gi in glob)]
    best: tuple[float, np.ndarray] | None = None
    for combo in combos:
        base = full.copy()
        for gi, lvl in zip(glob, combo):
            base[gi] = lvl
        c_base = int(cost(base[None])[0])
        e_base = float(sum(err[gi, lvl] for gi, lvl in zip(glob, combo)))

        def curve(name: str, base: np.ndarray = base, c_base: int = c_base) -> _Curve:
            node = nodes[name]
            genes = own.get(name, [])
            if genes:
                levels = list(itertools.product(*[range(tree.genes[gi].n_levels) for gi in genes]))
                gs = np.repeat(base[None], len(levels), 0)
                gs[:, genes] = np.array(levels, np.int64)
                dc = cost(gs) - c_base
                er = np.array([sum(err[gi, lv] for gi, lv in zip(genes, row)) for row in levels])
                # a width level of 0 units drops the node: its children are gone with it
                dead = np.array(
                    [any(tree.genes[gi].counts[lv] == 0 for gi, lv in zip(genes, row)) for row in levels], bool
                )
            else:
                levels, dc, er, dead = [()], np.zeros(1, np.int64), np.zeros(1), np.zeros(1, bool)
            alive = np.flatnonzero(~dead)
            cur = _Curve(
                dc[alive],
                er[alive],
                lambda opt, alive=alive, levels=levels, genes=genes: dict(zip(genes, levels[alive[opt]])),
            )
            for child in node.children:
                cur = _merge(cur, curve(child.name), width)
            opts_dc, opts_er = [cur.dcost], [cur.err]
            n_alive = len(cur.dcost)
            dead_idx = np.flatnonzero(dead)
            if len(dead_idx):
                opts_dc.append(dc[dead_idx])
                opts_er.append(er[dead_idx])
            if name in keep_gene:
                kg = keep_gene[name]
                g0 = base.copy()
                g0[kg] = 0
                opts_dc.append(np.array([int(cost(g0[None])[0]) - c_base], np.int64))
                opts_er.append(np.array([err[kg, 0]]))
            dcs, ers = np.concatenate(opts_dc), np.concatenate(opts_er)
            keep = _prune(dcs, ers, width)

            def build(opt: int, keep: np.ndarray = keep) -> dict[int, int]:
                j = int(keep[opt])
                if j < n_alive:
                    return cur.build(j)
                j -= n_alive
                if j < len(dead_idx):
                    return dict(zip(genes, levels[int(dead_idx[j])]))
                return {keep_gene[name]: 0}

            return _Curve(dcs[keep], ers[keep], build)

        root = curve(tree.spec.root.name)
        ok = np.flatnonzero(c_base + root.dcost <= budget)
        if len(ok) == 0:
            continue
        k = int(ok[np.argmin(root.err[ok])])
        total = e_base + float(root.err[k])
        if best is None or total < best[0]:
            g = base.copy()
            for gi, lvl in root.build(k).items():
                g[gi] = lvl
            best = (total, g)
    if best is None:
        return None
    return best[1], best[0]
