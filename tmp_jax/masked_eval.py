"""Masked candidate evaluation: one program evaluates ANY candidate of the permuted teacher at full width.

The sliced evaluators (``hooks.forward_pruned``) run each kept sub-layer as its own jitted function, compiled
once per width level, with the weights sliced to the kept prefix: right for full-size models, whose FLOPs
scale with the kept width, but for small teachers the compiles (dozens of programs) and the per-sub-layer
dispatches dominate. Here the pruning decisions are runtime DATA instead of shapes: after
:func:`tmp_jax.materialize.permute` every kept set is a prefix, so a candidate is fully described by

* ``counts``: the kept-unit count of every unit group (``tree.kept_count``; a dropped node keeps its full
  count, its branch being gated off instead, so no mask ever empties a router);
* ``gates``: 0/1 per node that has units or can be dropped (0 iff the node is in ``a.dropped``, which is
  closed over descendants: a dropped block gates its sub-layers);
* ``refit``: per consumer with compensated re-fits (:mod:`tmp_jax.compensate`), the slot of the candidate's
  kept count in a stacked table ``[original, re-fit at level 1, ...]`` (slot 0: no re-fit at that count, the
  teacher's consumer, as :func:`tmp_jax.materialize.with_refits` does). The re-fits have the teacher's full
  shape, so swapping them in changes no shape.

These three int/float vectors (:meth:`MaskLayout.data`) are the only per-candidate inputs of one jitted
program per (task, input shapes): it swaps the consumers for their table rows, merges the FULL permuted
teacher and runs the architecture's ``forward_masked`` hook (``ArchHooks.forward_masked``), which reads the
decisions through a :class:`MaskView` (which module takes which mask is the model package's business: head
masks before ``to_out`` / ``o_proj``, channel masks before ``w2`` / ``down_proj``, a router mask for the
expert count, gates on each branch's residual contribution). Several candidates go through one call with
``jax.vmap`` over their decision vectors (:class:`MaskedEvaluator` ``batch``), so a population costs a few
dispatches, not dozens per candidate. Evaluating a new candidate compiles nothing.

The price is full-width FLOPs per candidate, so only small teachers use it by default
(``PruningProblem(eval_mode="auto")``).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax import aot
from tmp_jax.materialize import Refits
from tmp_jax.trajectory import FITNESS_KEYS
from tmp_jax.tree import Assignment, PathT, Tree

MaskData = dict[str, np.ndarray]  # {"counts": int32 [G], "gates": float32 [N], "refit": int32 [R]} (+ leading axis)


@dataclass(frozen=True)
class MaskLayout:
    """Where each decision of a candidate sits in its data vectors (static: part of the program's key).

    ``groups``: (node, kind, n) of every unit group; ``gates``: node names with a gate; ``consumers``: per
    consumer with re-fits, (parameter path, node, kind, kept counts with a table row; row ``i + 1``)."""

    groups: tuple[tuple[str, str, int], ...]
    gates: tuple[str, ...]
    consumers: tuple[tuple[PathT, str, str, tuple[int, ...]], ...] = ()

    @classmethod
    def build(cls, tree: Tree, refits: Refits | None = None) -> MaskLayout:
        levels: dict[PathT, list[int]] = {}
        for path, k in refits or {}:
            levels.setdefault(path, []).append(int(k))
        return cls.from_levels(tree, levels)

    @classmethod
    def from_levels(cls, tree: Tree, levels: dict[PathT, Sequence[int]]) -> MaskLayout:
        """The layout of re-fits at the kept counts ``levels`` (consumer path -> counts): only the keys of the
        re-fit table matter, so the layout (and the program) is known before the re-fits are computed."""
        groups, gates, consumers = [], [], []
        for n in tree.spec.nodes():
            if n.units or n.droppable:
                gates.append(n.name)
            for u in n.units:
                groups.append((n.name, u.kind, u.n))
                for s in u.slices:
                    if s.consumer and s.path in levels:
                        consumers.append((s.path, n.name, u.kind, tuple(sorted(set(levels[s.path])))))
        return cls(tuple(groups), tuple(gates), tuple(consumers))

    def data(self, tree: Tree, a: Assignment) -> MaskData:
        """Candidate ``a``'s decision vectors (numpy: building them compiles nothing)."""
        counts = np.array([tree.kept_count(a, node, kind) for node, kind, _ in self.groups], np.int32)
        gates = np.array([0.0 if g in a.dropped else 1.0 for g in self.gates], np.float32)
        refit = np.zeros(len(self.consumers), np.int32)
        for i, (_, node, kind, ks) in enumerate(self.consumers):
            k = tree.kept_count(a, node, kind)
            refit[i] = ks.index(k) + 1 if k in ks else 0
        return {"counts": counts, "gates": gates, "refit": refit}

    @cached_property
    def index(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        """Positions of each unit group and each gate in the data vectors (computed once per layout)."""
        return {(n, k): i for i, (n, k, _) in enumerate(self.groups)}, {g: i for i, g in enumerate(self.gates)}


class MaskView:
    """One candidate's decisions inside the traced forward (what ``forward_masked`` reads)."""

    def __init__(self, layout: MaskLayout, data: dict[str, jax.Array]):
        self.layout, self.data = layout, data
        self._groups, self._gates = layout.index

    def count(self, node: str, kind: str) -> jax.Array:
        """Kept units of ``node``'s group ``kind`` (int32 scalar; the full count where the node is dropped)."""
        return self.data["counts"][self._groups[(node, kind)]]

    def keep(self, node: str, kind: str) -> jax.Array:
        """0/1 float32 [n]: the kept prefix of the group (after permutation a kept set is a prefix)."""
        n = self.layout.groups[self._groups[(node, kind)]][2]
        return (jnp.arange(n) < self.count(node, kind)).astype(jnp.float32)

    def gate(self, node: str) -> jax.Array:
        """0/1 float32 scalar: 0 iff ``node`` is dropped (itself or an ancestor)."""
        return self.data["gates"][self._gates[node]]


def refit_tables(model: Any, layout: MaskLayout, refits: Refits | None) -> tuple[jax.Array, ...]:
    """Per consumer of ``layout``: ``[original, re-fit at each listed kept count]`` stacked on a new axis 0."""
    if not layout.consumers:
        return ()
    flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = []
    for path, _, _, ks in layout.consumers:
        orig = flat[path]
        if orig.nbytes * (1 + len(ks)) <= HOST_TABLE_BYTES:
            # stacked on the host and placed once, where the consumer is (committed iff it is, as a device stack
            # would be): the same values without a stack and a convert program to compile per consumer shape
            host = np.stack([np.asarray(orig), *(np.asarray(refits[(path, k)]).astype(orig.dtype) for k in ks)])  # type: ignore[index]
            out.append(jax.device_put(host, orig.sharding if getattr(orig, "_committed", False) else None))
            continue
        rows = [jnp.asarray(refits[(path, k)], orig.dtype) for k in ks]  # type: ignore[index]
        out.append(jnp.stack([orig, *rows]))
    return tuple(out)


HOST_TABLE_BYTES = 64 << 20  # re-fit tables up to this size are built on the host (:func:`refit_tables`)


def _swap_consumers(state: nnx.State, layout: MaskLayout, tables: tuple, slots: jax.Array) -> nnx.State:
    """``state`` with every re-fitted consumer replaced by its table row ``slots[i]`` (same shape: no new
    program per kept count)."""
    if not layout.consumers:
        return state
    where = {path: i for i, (path, *_) in enumerate(layout.consumers)}
    flat = []
    for path, var in nnx.to_flat_state(state):
        i = where.get(tuple(path))
        if i is not None:
            var = var.replace(jnp.take(tables[i], slots[i], axis=0))
        flat.append((path, var))
    return nnx.from_flat_state(flat)


def make_program(gd: Any, treedef: Any, layout: MaskLayout) -> Callable[..., jax.Array]:
    """The jitted masked program of one teacher (graph ``gd``, state structure ``treedef``) and ``layout``.

    ``masked_program(forward, static, vmapped, leaves, tables, data, arrays)`` -> [candidates, *output]: the
    candidates ``data`` (leading axis) on one micro-batch. The graph and layout are closed over rather than
    static arguments (hashing a model's graph costs milliseconds per call) and the state goes in as its flat
    leaves (flattening NNX Variables per call costs more); ``forward`` (the hook), the string inputs and
    ``vmapped`` (``batch > 1``) are static."""

    @partial(jax.jit, static_argnums=(0, 1, 2))
    def masked_program(
        forward: Callable[..., Any],
        static: tuple,
        vmapped: bool,
        leaves: list,
        tables: tuple,
        data: dict[str, jax.Array],
        arrays: dict[str, Any],
    ) -> jax.Array:
        inputs = {**arrays, **dict(static)}

        def one(d: dict[str, jax.Array]) -> jax.Array:
            # fresh Variables in this (vmap) trace: the forward may set per-candidate values on them (NNX refuses
            # to mutate Variables of an enclosing trace)
            state = jax.tree.unflatten(treedef, leaves)
            model = nnx.merge(gd, _swap_consumers(state, layout, tables, d["refit"]))
            return forward(model, MaskView(layout, d), inputs)

        if vmapped:
            return jax.vmap(one)(data)
        return one(jax.tree.map(lambda x: x[0], data))[None]  # one candidate: no batching rule in the way

    return masked_program


def default_batch() -> int:
    """Candidates per masked call: ``TMP_JAX_MASKED_BATCH``, else 1 on CPU (compute-bound: batching only adds
    padding) and 8 on accelerators (small models are launch-bound there: one call runs 8 candidates)."""
    return aot.env_count("TMP_JAX_MASKED_BATCH", 1 if jax.default_backend() == "cpu" else 8)


def split_inputs(inputs: dict[str, Any]) -> tuple[dict[str, Any], tuple]:
    """Prepared inputs -> (array part, traced; static part: the string-valued entries such as a patch key or
    the task tag). The fitness' output ``mask`` and trajectory weights stay out: the forward does not read them."""
    skip = {"mask", *FITNESS_KEYS}  # read by the fitness on the host, never by the forward
    arrays = {k: v for k, v in inputs.items() if k not in skip and not isinstance(v, str) and v is not None}
    static = tuple(sorted((k, v) for k, v in inputs.items() if isinstance(v, str)))
    return arrays, static


def _abstract(x: Any) -> Any:
    """An array ``x`` as the argument a jitted call keys its compile on: shape, dtype, weak type, and its
    sharding only where it is committed (an uncommitted array and an abstract one without a sharding lower
    alike); anything else as is."""
    if not isinstance(x, jax.Array):
        return x
    sharding = x.sharding if getattr(x, "_committed", False) else None
    return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=x.weak_type, sharding=sharding)


def abstract_tables(leaves_by_path: dict[PathT, Any], layout: MaskLayout) -> tuple[jax.ShapeDtypeStruct, ...]:
    """What :func:`refit_tables` will return for ``layout``, abstractly: per consumer ``[1 + levels, *shape]``
    in the consumer's dtype, placed like it (a stack with a committed array is committed to its device)."""
    out = []
    for path, _, _, ks in layout.consumers:
        x = _abstract(leaves_by_path[path])
        out.append(jax.ShapeDtypeStruct((1 + len(ks), *x.shape), x.dtype, sharding=x.sharding))
    return tuple(out)


class Precompile:
    """The masked program of a teacher, compiled ahead of time on a background thread before its evaluator
    exists (:func:`tmp_jax.problem.build_problem` starts it when loading ends, so the compile overlaps the
    calibration, which it does not depend on: the program needs the re-fit tables' SHAPES, known from the tree
    and the width levels, not their values).

    ``levels``: consumer path -> the kept counts it will have re-fits at (:meth:`MaskLayout.from_levels`);
    ``jobs``: (forward hook, prepared inputs) per distinct (task, input shapes). A :class:`MaskedEvaluator` built
    with it runs :attr:`program` when its own graph, state structure and layout are the same (the permuted
    teacher's are the teacher's), and waits for :attr:`future` before compiling or running anything itself, so
    the program is compiled once. A failed background compile (say, out of device memory beside the
    calibration) is not an error: the evaluator then compiles in the warm-up as it would without it."""

    def __init__(
        self,
        model: Any,
        tree: Tree,
        levels: dict[PathT, Sequence[int]],
        jobs: Sequence[tuple[Callable[..., Any], dict[str, Any]]],
        batch: int | None = None,
    ):
        self.layout = MaskLayout.from_levels(tree, levels)
        gd, state = nnx.split(model)  # on the caller's thread: calibration flips module flags while it runs
        leaves, self.treedef = jax.tree.flatten(state)
        self.gd = gd
        self.program = make_program(gd, self.treedef, self.layout)
        self.batch = default_batch() if batch is None else max(1, int(batch))
        flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        self.abstract = abstract = [_abstract(x) for x in leaves]
        self.tables = tables = abstract_tables(flat, self.layout)
        row = self.layout.data(tree, tree.full_assignment())
        data = {k: np.stack([v] * self.batch) for k, v in row.items()}
        args = [(fwd, split_inputs(inputs)) for fwd, inputs in jobs]
        self.future: Future = Future()
        self.seconds = 0.0  # wall time of the background compile (reported by the bench)

        def work() -> None:
            import time

            t0 = time.perf_counter()
            try:
                for fwd, (arrays, static) in args:
                    dev = jax.device_put(arrays)  # as the evaluator will hold them: uncommitted device arrays
                    self.program.lower(fwd, static, self.batch > 1, abstract, tables, data, dev).compile()
            except BaseException as e:  # noqa: BLE001 - reported through the future, never raised on this thread
                self.seconds = time.perf_counter() - t0
                self.future.set_exception(e)
                return
            self.seconds = time.perf_counter() - t0
            self.future.set_result(None)

        threading.Thread(target=work, name="masked-precompile", daemon=True).start()

    def serves(self, gd: Any, treedef: Any, layout: MaskLayout, batch: int, leaves: list, tables: tuple) -> bool:
        """Whether an evaluator of this graph, state structure, layout and batch runs the precompiled program, and
        calls it with arguments of the compiled shapes, dtypes and placements (else its calls would compile
        anew under the same program)."""
        if (batch, layout, treedef) != (self.batch, self.layout, self.treedef) or gd != self.gd:
            return False
        return [_abstract(x) for x in leaves] == self.abstract and tuple(_abstract(t) for t in tables) == self.tables

    def wait(self) -> bool:
        """Block until the background compile has ended; whether it succeeded."""
        return self.future.exception() is None


class MaskedEvaluator:
    """The masked program of a PERMUTED teacher: candidates' outputs per micro-batch, ``batch`` per call.

    Holds the teacher's state, the re-fit tables and the device copies of the micro-batches it has seen (the
    calibration set is fixed: each is transferred once). ``precompiled``: a :class:`Precompile` of this
    teacher, whose program it runs if it is the same one."""

    def __init__(
        self,
        model: Any,
        tree: Tree,
        refits: Refits | None = None,
        batch: int | None = None,
        precompiled: Precompile | None = None,
    ):
        if getattr(model.config, "is_pruned", False) or getattr(model.config, "layers_kept", None) is not None:
            raise ValueError("masked evaluation runs candidates of the UNPRUNED (permuted) teacher")
        self.tree = tree
        self.layout = MaskLayout.build(tree, refits)
        gd, state = nnx.split(model)
        self.leaves, treedef = jax.tree.flatten(state)
        self.batch = default_batch() if batch is None else max(1, int(batch))
        self.tables = refit_tables(model, self.layout, refits)
        self.precompiled: Precompile | None = None  # the background compile this evaluator still has to wait for
        if precompiled is not None and precompiled.serves(
            gd, treedef, self.layout, self.batch, self.leaves, self.tables
        ):
            self.program, self.precompiled = precompiled.program, precompiled
        else:
            self.program = make_program(gd, treedef, self.layout)
        self._inputs: dict[int, tuple[dict, tuple]] = {}

    def _await_precompile(self) -> None:
        """Let a background compile of this program end before compiling or running it here (else both would
        compile it: jit does not share a compile in flight)."""
        if self.precompiled is not None:
            if not self.precompiled.wait():  # compiled here instead; say why, since only time would tell
                err = self.precompiled.future.exception()
                warnings.warn(f"background compile of the masked program failed: {err}", stacklevel=3)
            self.precompiled = None

    def data(self, assignments: Sequence[Assignment]) -> MaskData:
        """The stacked decision vectors of ``assignments`` (leading candidate axis)."""
        rows = [self.layout.data(self.tree, a) for a in assignments]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def _device_inputs(self, key: int, inputs: dict[str, Any]) -> tuple[dict, tuple]:
        if key not in self._inputs:
            arrays, static = split_inputs(inputs)
            self._inputs[key] = (jax.device_put(arrays), static)
        return self._inputs[key]

    def run(self, forward: Callable[..., Any], data: MaskData, key: int, inputs: dict[str, Any]) -> np.ndarray:
        """Outputs [candidates, *output] of the candidates ``data`` on micro-batch ``key`` (``inputs``), in
        calls of ``batch`` candidates (the last one padded by repeating its final candidate)."""
        self._await_precompile()
        arrays, static = self._device_inputs(key, inputs)
        n, b = len(data["counts"]), self.batch
        outs = []
        for lo in range(0, n, b):
            idx = np.minimum(np.arange(lo, lo + b), n - 1)  # pad: the same program for every chunk
            chunk = {k: v[idx] for k, v in data.items()}
            y = aot.call(self.program, forward, static, b > 1, self.leaves, self.tables, chunk, arrays)
            if aot.active():
                return y  # compile-only: the abstract output, nothing ran
            outs.append(y)  # dispatched asynchronously: read back once every call is queued
        return np.concatenate([np.asarray(y) for y in outs])[:n]

    def compile(self, forward: Callable[..., Any], key: int, inputs: dict[str, Any]) -> None:
        """Compile (ahead of time, nothing runs) the program of micro-batch ``key``'s task and shapes."""
        with aot.compile_only():
            self.run(forward, self.data([self.tree.full_assignment()]), key, inputs)
