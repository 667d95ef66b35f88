"""The pruning tree: a declarative structure spec per architecture, and generic code over it.

A model declares (next to its config) a :class:`Spec`: a tree of :class:`Node` s — model → stages →
blocks → sub-layers (attention, FFN, MoE) — where each node owns parameters and may hold prunable
:class:`Units` (heads, FFN channels, experts, expert channels). Each unit group lists the coupled
parameter :class:`Slice` s that move together (which tensor, which axis, how many indices per unit).

Everything else is generic and never branches on the model type:

* :class:`Tree` turns the spec and a level ladder into decision genes (block keep/drop, width levels),
  decodes a genome into an :class:`Assignment` that respects the tree (children of a dropped node are
  inert), and counts parameters exactly (total, active per token, weight bytes, matmul FLOPs).
* :mod:`tmp_jax.materialize` slices a model by an assignment; :mod:`tmp_jax.importance` orders units.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PathT = tuple[str | int, ...]
LEVELS_PATH = Path(__file__).resolve().parents[1] / "configs" / "levels.json"


@dataclass(frozen=True)
class Slice:
    """Unit ``u`` of a group owns indices ``[u*group, (u+1)*group)`` of ``axis`` of parameter ``path``.

    ``always_active``: every token uses this slice of every kept unit, even where the group's ``active``
    (top-k) limits which units a token is routed to -- e.g. an expert's router column, since the router
    scores all experts for every token. Such slices are never clamped to ``Units.active``.

    ``consumer``: this slice holds the input rows of the projection that consumes the units (``to_out``,
    ``w2``, an expert's ``down_proj``): compensated pruning re-fits it (:mod:`tmp_jax.compensate`).
    """

    path: PathT
    axis: int
    group: int = 1
    always_active: bool = False
    consumer: bool = False


@dataclass(frozen=True)
class Units:
    """A group of interchangeable prunable units inside one node (e.g. the 30 heads of one attention)."""

    kind: str  # 'heads' | 'kv_groups' | 'ffn' | 'experts' | 'expert_ffn'
    n: int
    slices: tuple[Slice, ...]
    min_keep: int = 1  # fewest units kept while the node is kept (e.g. moe_topk for experts)
    multiple: int = 1  # hardware-friendly rounding of kept counts
    active: int | None = None  # units used per token (top-k); None = all
    tie: str | None = None  # groups with the same tie share ONE decision (e.g. global head count)
    levels: tuple[int, ...] | None = None  # explicit allowed kept counts (overrides the ladder)
    # ``batch``: the kind of a sibling group (e.g. 'experts') each of whose units keeps ITS OWN subset of this
    # group (one channel order per expert: channel c of one expert means nothing in another). Every slice of
    # this group then lies in a tensor whose axis 0 is the batch group's axis. The kept COUNT is still one
    # decision for the whole group; orders and scores are (batch units, n) arrays instead of (n,).
    batch: str | None = None


@dataclass(frozen=True)
class Node:
    name: str
    kind: str  # 'model' | 'stage' | 'block' | 'attn' | 'ffn' | 'moe'
    params: tuple[PathT, ...] = ()  # parameters owned by this node (not by a child)
    units: tuple[Units, ...] = ()
    children: tuple[Node, ...] = ()
    droppable: bool = False  # may be removed as a whole (block drop, sub-layer skip)
    tokens: str | None = None  # which token stream it runs over (for FLOPs): e.g. 'image', 'caption', 'all'


@dataclass(frozen=True)
class Spec:
    """The prunable structure of one model instance (full, unpruned shapes)."""

    arch: str
    root: Node
    shapes: dict[PathT, tuple[int, ...]]
    dtype_bytes: int = 2
    constraints: dict[str, Any] = field(default_factory=dict)

    def nodes(self) -> Iterator[Node]:
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(reversed(n.children))

    def node(self, name: str) -> Node:
        for n in self.nodes():
            if n.name == name:
                return n
        raise KeyError(name)

    def validate(self) -> None:
        """Every parameter is owned by exactly one node; every slice lies inside its owner's params."""
        owned: dict[PathT, str] = {}
        for n in self.nodes():
            for p in n.params:
                if p in owned:
                    raise ValueError(f"parameter {p} owned by both {owned[p]} and {n.name}")
                if p not in self.shapes:
                    raise ValueError(f"node {n.name} owns unknown parameter {p}")
                owned[p] = n.name
            for u in n.units:
                if u.batch is not None:
                    b = next((x for x in n.units if x.kind == u.batch), None)
                    if b is None or u.batch == u.kind:
                        raise ValueError(f"{n.name}/{u.kind}: batch group {u.batch!r} is no other group of the node")
                    for s in u.slices:
                        if self.shapes[s.path][0] != b.n or s.axis == 0:
                            raise ValueError(
                                f"{n.name}/{u.kind}: {s.path} must have the {b.n} {u.batch} on axis 0 and "
                                f"the units on another axis"
                            )
                for s in u.slices:
                    if s.path not in n.params:
                        raise ValueError(f"{n.name}/{u.kind}: slice of {s.path} not owned by the node")
                    if self.shapes[s.path][s.axis] != u.n * s.group:
                        raise ValueError(
                            f"{n.name}/{u.kind}: {s.path} axis {s.axis} has {self.shapes[s.path][s.axis]}, "
                            f"expected {u.n} units x {s.group}"
                        )
        missing = set(self.shapes) - set(owned)
        if missing:
            raise ValueError(f"parameters not owned by any node: {sorted(missing, key=str)[:3]}")


# --------------------------------------------------------------------------------------------------
# Level ladders


def load_levels(path: str | Path | None = None) -> dict[str, Any]:
    p = Path(path) if path else LEVELS_PATH
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read level ladders ({e})") from e


def ladder_counts(u: Units, fractions: Sequence[float], multiple: int | None = None) -> list[int]:
    """Kept-unit counts for a unit group: fractions of n rounded to the group's multiple, >= min_keep."""
    if u.levels is not None:  # the spec knows better (e.g. widths that must divide another width)
        return sorted({min(u.n, max(int(k), u.min_keep)) for k in u.levels} | {u.n})
    m = multiple or u.multiple
    # hardware rounding (e.g. channels to multiples of 64) only applies where a group has at least
    # 8 such multiples; tiny test models use exact counts.
    m = m if u.n >= 8 * m else 1
    out = set()
    for f in fractions:
        k = int(round(f * u.n / m)) * m
        k = min(u.n, max(k, u.min_keep))
        out.add(k)
    out.add(u.n)
    return sorted(out)


# --------------------------------------------------------------------------------------------------
# Genes, assignments, accounting


@dataclass(frozen=True)
class Gene:
    """One decision. ``counts[level]`` = kept units (or 1/0 for keep/drop); level 0 is the smallest."""

    name: str
    node: str  # node the decision lives on (first node for tied genes)
    kind: str  # 'keep' or the units kind
    counts: tuple[int, ...]
    members: tuple[str, ...] = ()  # nodes sharing a tied decision

    @property
    def n_levels(self) -> int:
        return len(self.counts)


@dataclass
class Assignment:
    """Decoded decisions: dropped nodes and kept-unit counts per (node, units kind)."""

    dropped: set[str]
    keep: dict[tuple[str, str], int]

    def to_json(self) -> dict[str, Any]:
        return {
            "dropped": sorted(self.dropped),
            "keep": {f"{n}/{k}": v for (n, k), v in sorted(self.keep.items())},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Assignment:
        keep = {}
        for key, v in d["keep"].items():
            n, k = key.rsplit("/", 1)
            keep[(n, k)] = int(v)
        return cls(set(d["dropped"]), keep)


class Tree:
    """Genes over a :class:`Spec` plus exact accounting for any assignment."""

    def __init__(self, spec: Spec, levels: dict[str, Any] | None = None):
        spec.validate()
        self.spec = spec
        self.levels = levels if levels is not None else load_levels()
        fracs = self.levels["fractions"]
        mult = self.levels.get("multiples", {})
        self.parent: dict[str, str | None] = {}
        for n in spec.nodes():
            for c in n.children:
                self.parent[c.name] = n.name
        self.parent[spec.root.name] = None
        genes: list[Gene] = []
        tied: dict[str, list[tuple[Node, Units]]] = {}
        for n in spec.nodes():
            if n.droppable and not n.units:
                genes.append(Gene(f"{n.name}:keep", n.name, "keep", (0, 1)))
            for u in n.units:
                if u.tie is not None:
                    tied.setdefault(u.tie, []).append((n, u))
                    continue
                counts = ladder_counts(u, fracs, mult.get(u.kind))
                if n.droppable and len(n.units) == 1:
                    counts = [0, *counts]  # level 0 = skip the whole sub-layer
                genes.append(Gene(f"{n.name}:{u.kind}", n.name, u.kind, tuple(counts)))
            if n.droppable and len(n.units) > 1:
                genes.append(Gene(f"{n.name}:keep", n.name, "keep", (0, 1)))
        for tie, members in tied.items():
            n0, u0 = members[0]
            if len({u.n for _, u in members}) != 1:
                raise ValueError(f"tied units {tie!r} differ in size")
            counts = ladder_counts(u0, fracs, mult.get(u0.kind))
            genes.append(Gene(f"tie:{tie}", n0.name, u0.kind, tuple(counts), tuple(n.name for n, _ in members)))
        self.genes = genes
        self._units = {(n.name, u.kind): u for n in spec.nodes() for u in n.units}
        self.full = self.count(self.full_assignment())

    # -- genomes -------------------------------------------------------------------------------
    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def max_levels(self) -> np.ndarray:
        return np.array([g.n_levels - 1 for g in self.genes], np.int32)

    def full_genome(self) -> np.ndarray:
        return self.max_levels().copy()

    def full_assignment(self) -> Assignment:
        return self.decode(self.full_genome())

    def decode(self, genome: Sequence[int] | np.ndarray) -> Assignment:
        """Genome (one level index per gene) -> assignment; subtrees of dropped nodes are inert."""
        g = np.asarray(genome).astype(int)
        if g.shape != (self.n_genes,):
            raise ValueError(f"genome has shape {g.shape}, expected ({self.n_genes},)")
        dropped: set[str] = set()
        keep: dict[tuple[str, str], int] = {}
        for gene, lvl in zip(self.genes, g):
            lvl = int(np.clip(lvl, 0, gene.n_levels - 1))
            c = gene.counts[lvl]
            if gene.kind == "keep":
                if c == 0:
                    dropped.add(gene.node)
                continue
            for node in gene.members or (gene.node,):
                if c == 0:
                    dropped.add(node)
                else:
                    keep[(node, gene.kind)] = c
        # drop is inherited: anything under a dropped node is gone (and its decisions ignored)
        closed = {n for n in self._all_names() if self._under_dropped(n, dropped)}
        keep = {k: v for k, v in keep.items() if k[0] not in closed}
        return Assignment(closed, keep)

    def _all_names(self) -> list[str]:
        return [n.name for n in self.spec.nodes()]

    def _under_dropped(self, name: str, dropped: set[str]) -> bool:
        cur: str | None = name
        while cur is not None:
            if cur in dropped:
                return True
            cur = self.parent[cur]
        return False

    def units(self, node: str, kind: str) -> Units:
        """The unit group ``kind`` of ``node``."""
        return self._units[(node, kind)]

    def kept_count(self, a: Assignment, node: str, kind: str) -> int:
        return a.keep.get((node, kind), self._units[(node, kind)].n)

    # -- accounting ----------------------------------------------------------------------------
    def _param_sizes(self, a: Assignment, active: bool) -> Iterator[tuple[Node, PathT, int]]:
        for n in self.spec.nodes():
            if n.name in a.dropped:
                continue
            for p in n.params:
                shape = list(self.spec.shapes[p])
                for u in n.units:
                    k = self.kept_count(a, n.name, u.kind)
                    for s in u.slices:
                        if s.path == p:
                            clamp = active and u.active is not None and not s.always_active
                            shape[s.axis] = (min(k, u.active) if clamp else k) * s.group
                yield n, p, int(np.prod(shape, dtype=np.int64))

    def count(self, a: Assignment) -> dict[str, int]:
        """Exact parameter counts: total, active per token, and weight bytes at the spec dtype."""
        total = sum(s for _, _, s in self._param_sizes(a, active=False))
        act = sum(s for _, _, s in self._param_sizes(a, active=True))
        return {"params": total, "active": act, "bytes": total * self.spec.dtype_bytes}

    def flops(self, a: Assignment, tokens: dict[str, int]) -> int:
        """Matmul FLOPs of one forward: 2 * T * (active 2D+ weights) + attention scores/values.

        ``tokens`` maps a node's token stream ('image', 'caption', 'all') to its length.
        """
        total = 0
        for n, p, size in self._param_sizes(a, active=True):
            if len(self.spec.shapes[p]) < 2:
                continue
            total += 2 * tokens.get(self._stream(n), tokens.get("all", 0)) * size
        for n in self.spec.nodes():
            if n.kind == "attn" and n.name not in a.dropped:
                for u in n.units:
                    if u.kind in ("heads", "kv_groups"):
                        # the first slice is the query projection: kept units x its group = query width
                        q_width = self.kept_count(a, n.name, u.kind) * u.slices[0].group
                        t = tokens.get(self._stream(n), tokens.get("all", 0))
                        total += 4 * t * t * q_width  # QK^T and PV
        return total

    def _stream(self, n: Node) -> str:
        cur: str | None = n.name
        while cur is not None:
            node = self.spec.node(cur)
            if node.tokens:
                return node.tokens
            cur = self.parent[cur]
        return "all"

    def floor(self) -> dict[str, int]:
        """The unprunable floor: every gene at its smallest level."""
        return self.count(self.decode(np.zeros(self.n_genes, np.int32)))


def node_path(name: str) -> PathT:
    """A node name (``layers.3.attention``) -> the module path its statistics are sown under."""
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def parse_count(text: str, full: int) -> int:
    """Parse a budget: '20B', '4B', '350M', '1.5e6', '25%', '0.25' (a fraction of ``full``)."""
    s = text.strip().replace("_", "")
    try:
        if s.endswith("%"):
            v = float(s[:-1]) / 100.0
            if not 0 < v <= 1:
                raise ValueError
            return int(math.floor(v * full))
        mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
        if s[-1:].upper() in mult:
            return int(float(s[:-1]) * mult[s[-1:].upper()])
        v = float(s)
        if 0 < v <= 1:
            return int(math.floor(v * full))
        if v > 1:
            return int(v)
    except (ValueError, IndexError):
        pass
    raise ValueError(f"budget {text!r}: expected e.g. 20B, 350M, 1.5e6, 25% or 0.25")
