"""Budgets and exact, vectorised cost accounting of genomes.

A budget caps one cost of the pruned transformer (``kind``):

* ``params`` — every parameter of the prunable model class as :meth:`tmp_jax.tree.Tree.count` counts
  it (embedders and final layer included; the text encoder and VAE are not part of the tree);
* ``active`` — parameters used per token (MoE: top-k experts only);
* ``memory`` — weight bytes at the spec dtype;
* ``flops`` — matmul FLOPs of one forward at the problem's token counts (:meth:`Tree.flops`); without
  them, at the architecture's own (:func:`tmp_jax.arch.default_tokens`: e.g. Z-Image's image / caption
  streams, HunyuanImage's one joint sequence).

:class:`CostModel` computes the same numbers as ``Tree.count`` / ``Tree.flops`` but for a whole
population of genomes at once with numpy (``Tree.count`` walks the spec in Python: ~30 ms per genome
on Z-Image-Turbo, too slow for repair loops that price every single-level move). It is exact — the
tests compare it with the tree on random genomes — so "within budget" is never an approximation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from tmp_jax import arch
from tmp_jax.tree import Tree, parse_count

KINDS = ("params", "active", "flops", "memory")


class SearchError(ValueError):
    """A user-facing configuration error; the CLI prints its message as one line (exit code 2)."""


class BudgetError(SearchError):
    """A budget that cannot be parsed or met (e.g. below the floor)."""


@dataclass(frozen=True)
class Budget:
    """One budget: the user's text, the cost kind, and the absolute value it resolves to."""

    text: str
    kind: str
    value: int

    def to_json(self) -> dict[str, object]:
        return {"text": self.text, "kind": self.kind, "value": int(self.value)}


class CostModel:
    """Exact cost of genomes for one budget kind; ``cm(genomes)`` -> int64 costs, shape ``(P,)``.

    The tree's accounting is a sum over parameters of kept nodes of products of kept-unit counts,
    so it is precompiled into monomials ``alive(node) * const * prod_k K[slot_k]`` evaluated on arrays.
    """

    def __init__(self, tree: Tree, kind: str = "params", tokens: dict[str, int] | None = None):
        if kind not in KINDS:
            raise BudgetError(f"budget kind {kind!r}: expected one of {', '.join(KINDS)}")
        self.tree, self.kind = tree, kind
        self.tokens = dict(tokens) if tokens else self._default_tokens(tree.spec.arch, kind)
        nodes = list(tree.spec.nodes())
        idx = {n.name: i for i, n in enumerate(nodes)}
        n_nodes = len(nodes)
        parent = np.full(n_nodes, -1)
        for n in nodes:
            for c in n.children:
                parent[idx[c.name]] = idx[n.name]
        # anc[i, j]: j is i or an ancestor of i (a node is closed when any such j is dropped)
        anc = np.zeros((n_nodes, n_nodes), np.int32)
        for i in range(n_nodes):
            j = i
            while j >= 0:
                anc[i, j] = 1
                j = parent[j]
        self._anc_t = anc.T.copy()
        self._strict_t = (anc - np.eye(n_nodes, dtype=np.int32)).T.copy()

        genes = tree.genes
        self.n_genes = len(genes)
        self.max_levels = tree.max_levels().astype(np.int64)
        width = int(self.max_levels.max()) + 1 if genes else 1
        counts = np.zeros((len(genes), width), np.int64)
        for g, gene in enumerate(genes):
            c = list(gene.counts)
            counts[g] = c + [c[-1]] * (width - len(c))
        self._counts = counts

        # unit slots: one per (node, kind) group; each is driven by exactly one gene
        slot_of: dict[tuple[str, str], int] = {}
        slot_gene: list[int] = []
        slot_active: list[int] = []
        gene_nodes = np.zeros((len(genes), n_nodes), np.int32)  # nodes a gene decides for
        drop_gene, drop_node = [], []
        for g, gene in enumerate(genes):
            for m in gene.members or (gene.node,):
                gene_nodes[g, idx[m]] = 1
                drop_gene.append(g)
                drop_node.append(idx[m])
                if gene.kind != "keep":
                    u = tree._units[(m, gene.kind)]
                    slot_of[(m, gene.kind)] = len(slot_gene)
                    slot_gene.append(g)
                    slot_active.append(u.active if u.active is not None else np.iinfo(np.int64).max)
        # slices every token uses (Slice.always_active, e.g. router columns) follow the same gene through
        # a second slot that top-k never clamps
        full_slot: dict[tuple[str, str], int] = {}
        for (m, kind_), s_idx in list(slot_of.items()):
            if any(s.always_active for s in tree._units[(m, kind_)].slices):
                full_slot[(m, kind_)] = len(slot_gene)
                slot_gene.append(slot_gene[s_idx])
                slot_active.append(np.iinfo(np.int64).max)
        # a units gene at count 0 drops its node(s), a keep gene at 0 drops its node (as Tree.decode)
        self._drop_gene = np.array(drop_gene, np.int64)
        self._drop_onehot = np.zeros((len(drop_gene), n_nodes), np.int32)
        self._drop_onehot[np.arange(len(drop_gene)), drop_node] = 1
        self._gene_nodes_t = gene_nodes.T.copy()
        self._gene_n_nodes = gene_nodes.sum(1)
        self._slot_gene = np.array(slot_gene, np.int64)
        self._slot_active = np.array(slot_active, np.int64)
        n_slots = len(slot_gene)

        # monomials: (node, sorted slots) -> summed constant
        terms: dict[tuple[int, tuple[int, ...], bool], int] = {}
        for n in nodes:
            stream_t = self._tokens_of(n.name) if kind == "flops" else 0
            for p in n.params:
                shape = list(tree.spec.shapes[p])
                repl: dict[int, tuple[int, int]] = {}
                for u in n.units:
                    for s in u.slices:
                        if s.path == p:
                            slots_of = full_slot if s.always_active else slot_of
                            repl[s.axis] = (slots_of[(n.name, u.kind)], s.group)  # last wins, as the tree
                const = 1
                for ax, d in enumerate(shape):
                    const *= repl[ax][1] if ax in repl else int(d)
                slots = tuple(sorted(r[0] for r in repl.values()))
                if kind == "flops":
                    if len(shape) < 2:
                        continue
                    const *= 2 * stream_t
                key = (idx[n.name], slots, kind in ("active", "flops"))
                terms[key] = terms.get(key, 0) + const
            if kind == "flops" and n.kind == "attn":
                for u in n.units:
                    if u.kind in ("heads", "kv_groups"):  # as Tree.flops: kept units x query-slice group
                        t = self._tokens_of(n.name)
                        # attention scores/values use the kept head count, never clamped by top-k
                        key = (idx[n.name], (slot_of[(n.name, u.kind)],), False)
                        terms[key] = terms.get(key, 0) + 4 * t * t * u.slices[0].group
        deg = max((len(k[1]) for k in terms), default=0)
        self._term_node = np.array([k[0] for k in terms], np.int64)
        self._term_const = np.array(list(terms.values()), np.int64)
        self._term_active = np.array([k[2] for k in terms], bool)
        # slot index n_slots is a constant 1 column: pads monomials of lower degree
        sl = np.full((len(terms), max(deg, 1)), n_slots, np.int64)
        for t, k in enumerate(terms):
            sl[t, : len(k[1])] = k[1]
        self._term_slots = sl
        self._scale = tree.spec.dtype_bytes if kind == "memory" else 1

        self.full = int(self(tree.full_genome())[0])
        self.floor = int(self(np.zeros(self.n_genes, np.int64))[0])

    @staticmethod
    def _default_tokens(name: str, kind: str) -> dict[str, int]:
        """The architecture's token counts (each arch has its own sequence); an arch without any is an error
        only for a FLOP budget (other kinds do not use them)."""
        try:
            return arch.default_tokens(name)
        except KeyError as e:
            if kind == "flops":
                raise BudgetError(f"--budget-kind flops: {e.args[0]}") from None
            return {}

    def _tokens_of(self, name: str) -> int:
        cur: str | None = name
        while cur is not None:
            node = self.tree.spec.node(cur)
            if node.tokens:
                return int(self.tokens.get(node.tokens, self.tokens.get("all", 0)))
            cur = self.tree.parent[cur]
        return int(self.tokens.get("all", 0))

    # -- evaluation ------------------------------------------------------------------------------
    def _levels(self, genomes: np.ndarray) -> np.ndarray:
        g = np.atleast_2d(np.asarray(genomes)).astype(np.int64)
        if g.shape[1] != self.n_genes:
            raise ValueError(f"genomes have {g.shape[1]} genes, the tree has {self.n_genes}")
        return np.clip(g, 0, self.max_levels[None, :])

    def _dropped(self, counts: np.ndarray) -> np.ndarray:
        hit = (counts[:, self._drop_gene] == 0).astype(np.int32)  # [P, D]
        return hit @ self._drop_onehot  # [P, nodes] > 0 where dropped by a decision

    def __call__(self, genomes: np.ndarray) -> np.ndarray:
        counts = np.take_along_axis(self._counts[None], self._levels(genomes)[:, :, None], 2)[..., 0]  # [P, G]
        alive = (self._dropped(counts) @ self._anc_t) == 0  # [P, nodes]
        k = counts[:, self._slot_gene]  # [P, S]
        k_act = np.minimum(k, self._slot_active[None])
        ones = np.ones((k.shape[0], 1), np.int64)
        kk = np.concatenate([k, ones], 1)[:, self._term_slots].prod(-1)  # [P, T]
        ka = np.concatenate([k_act, ones], 1)[:, self._term_slots].prod(-1)
        vals = np.where(self._term_active[None], ka, kk) * self._term_const[None]
        return (vals * alive[:, self._term_node]).sum(-1) * self._scale

    def inert(self, genomes: np.ndarray) -> np.ndarray:
        """``[P, G]`` bool: genes whose every node lies under a node dropped by ANOTHER decision."""
        counts = np.take_along_axis(self._counts[None], self._levels(genomes)[:, :, None], 2)[..., 0]
        under = (self._dropped(counts) @ self._strict_t) > 0  # [P, nodes]: a strict ancestor dropped
        return (under.astype(np.int32) @ self._gene_nodes_t) == self._gene_n_nodes[None]

    def canonical(self, genomes: np.ndarray) -> np.ndarray:
        """Inert genes set to 0: genomes decoding to the same assignment get the same key."""
        g = self._levels(genomes)
        return np.where(self.inert(g), 0, g)


# --------------------------------------------------------------------------------------------------
# Parsing

_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _normalise_memory(text: str) -> str:
    """Memory budgets may say 24GB / 24GiB; parse_count knows 24G. Binary suffixes become numbers."""
    s = text.strip()
    m = re.fullmatch(r"([0-9.eE+-]+)\s*([KMGT])iB", s)
    if m:
        return str(int(float(m.group(1)) * _BINARY[m.group(2)]))
    m = re.fullmatch(r"([0-9.eE+-]+)\s*([KMGT])B", s, flags=re.IGNORECASE)
    if m:
        return m.group(1) + m.group(2).upper()
    return s


def _percent(text: str) -> float:
    """The value of a percentage budget ('150%' -> 150.0); -1 for any other form."""
    s = text.strip().replace("_", "")
    try:
        return float(s[:-1]) if s.endswith("%") else -1.0
    except ValueError:
        return -1.0


def fmt_count(v: float, kind: str = "params") -> str:
    """Human count: 6.15B params, 12.3 GB, 63.8 TFLOP."""
    unit = {"params": " params", "active": " active params", "memory": "B", "flops": "FLOP"}[kind]
    for div, suf in ((1e12, "T"), (1e9, "B" if kind in ("params", "active") else "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:.4g}{suf}{unit}"
    return f"{v:.4g}{unit if kind != 'memory' else ' B'}"


def parse_budgets(texts: str | list[str], cost: CostModel) -> list[Budget]:
    """Parse comma-separated budgets against ``cost``; raises :class:`BudgetError` (one line, naming the
    offending budget) when a budget is malformed, below the floor (every gene at its smallest level), or at
    least the full model (nothing to prune: a search would only return the model itself)."""
    items = texts.split(",") if isinstance(texts, str) else list(texts)
    items = [t.strip() for t in items if t.strip()]
    if not items:
        raise BudgetError("no budget given (e.g. --budget 20B or --budget 25%)")
    out: list[Budget] = []
    for t in items:
        src = _normalise_memory(t) if cost.kind == "memory" else t
        try:
            v = cost.full if _percent(t) >= 100 else parse_count(src, cost.full)  # 150% parses as no budget
        except ValueError as e:
            raise BudgetError(str(e)) from None
        if v >= cost.full:
            raise BudgetError(
                f"--budget {t} is at least the model's {fmt_count(cost.full, cost.kind)} "
                f"({cost.full:,} {cost.kind}): nothing to prune"
            )
        if v < cost.floor:
            raise BudgetError(
                f"budget {t} = {v:,} {cost.kind} is below the floor of {cost.floor:,} {cost.kind} "
                f"({fmt_count(cost.floor, cost.kind)}: every decision at its smallest level; "
                f"full model {fmt_count(cost.full, cost.kind)})"
            )
        out.append(Budget(t, cost.kind, int(v)))
    if len({b.value for b in out}) != len(out):
        raise BudgetError(f"budgets {', '.join(items)} resolve to duplicate values")
    return out
