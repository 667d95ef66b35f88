"""Apply an assignment: a physically smaller model (sliced weights, smaller config), generically.

Also the function-preserving importance-ordered permutation: after :func:`permute`, keeping the ``k``
most important units of any node is keeping a PREFIX, so candidates are sets of prefix lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax import arch
from tmp_jax.tree import Assignment, PathT, Tree

Order = dict[tuple[str, str], np.ndarray]  # (node, units kind) -> unit ids, most important first


def kept_units(tree: Tree, a: Assignment, order: Order | None = None) -> dict[tuple[str, str], np.ndarray]:
    """Kept unit ids (ORIGINAL numbering, ascending) for every unit group of every kept node.

    A batched group (``Units.batch``, e.g. expert channels) with a 2-D order gets a (batch units, k) array:
    row ``e`` = the channels expert ``e`` keeps (every expert has a row, kept or not)."""
    out = {}
    for n in tree.spec.nodes():
        if n.name in a.dropped:
            continue
        for u in n.units:
            k = tree.kept_count(a, n.name, u.kind)
            o = order.get((n.name, u.kind)) if order else None
            ids = np.arange(u.n) if o is None else np.asarray(o)
            out[(n.name, u.kind)] = np.sort(ids[..., :k], axis=-1)
    return out


def _element_index(units: np.ndarray, group: int) -> np.ndarray:
    """Unit ids [..., k] -> element indices [..., k*group] (unit u owns ``[u*group, (u+1)*group)``)."""
    units = np.asarray(units)
    return (units[..., :, None] * group + np.arange(group)).reshape(*units.shape[:-1], -1)


SliceEntry = tuple[int, np.ndarray]  # (axis, element indices [k]; or [rows, k]: per row of axis 0, batched groups)


def slice_plan(tree: Tree, a: Assignment, order: Order | None = None) -> dict[PathT, list[SliceEntry]]:
    """Source parameter path -> list of (axis, element indices) to keep, applied by :func:`take_kept`.

    A batched group with per-row kept units gives a 2-D index: one row per KEPT unit of its batch group
    (ascending), for the tensor after that group's own axis-0 selection."""
    kept = kept_units(tree, a, order)
    plan: dict[PathT, list[SliceEntry]] = {}
    for n in tree.spec.nodes():
        if n.name in a.dropped:
            continue
        for u in n.units:
            ids = kept[(n.name, u.kind)]
            if ids.ndim == 2:  # rows of the batch group's kept units, in their (ascending) kept order
                ids = ids[kept[(n.name, u.batch)]]
            for s in u.slices:
                plan.setdefault(s.path, []).append((s.axis, _element_index(ids, s.group)))
    return plan


def take_kept(arr: Any, entries: list[SliceEntry], skip: int | None = None) -> Any:
    """``arr`` sliced by a :func:`slice_plan` entry list (host or device arrays); ``skip``: an axis already
    reduced (a re-fitted consumer). 1-D selections go first, so a per-row (2-D) selection sees the tensor
    whose axis 0 is already reduced to its rows."""
    for axis, idx in sorted(entries, key=lambda e: np.ndim(e[1])):
        if axis == skip:
            continue
        if np.ndim(idx) == 1:
            arr = _take(arr, idx, axis)
            continue
        if idx.shape[0] != arr.shape[0]:
            raise ValueError(f"per-row selection of {idx.shape[0]} rows for a tensor with {arr.shape[0]} on axis 0")
        shape = [1] * arr.ndim
        shape[0], shape[axis] = idx.shape
        full = idx.reshape(shape)  # [rows, 1.., k, 1..]: broadcast along the other axes
        if isinstance(arr, np.ndarray):
            arr = np.take_along_axis(arr, full, axis=axis)
        else:
            arr = jnp.take_along_axis(arr, jnp.asarray(full), axis=axis)
    return arr


def prefix_shapes(tree: Tree, a: Assignment) -> dict[PathT, tuple[int, ...]]:
    """Kept shape of every sliced parameter of a PERMUTED model under ``a`` (source paths).

    After :func:`permute` every kept set is a prefix, so parameter ``p`` of the candidate is
    ``full[p][:s0, :s1, ...]`` with ``(s0, s1, ...) = prefix_shapes(tree, a)[p]``: the slice plan of
    :func:`slice_plan` with the identity order, as lengths instead of index arrays. Evaluators slice
    these prefixes inside their jitted functions instead of materialising a candidate. Parameters of
    dropped nodes are absent; unsliced parameters are absent too (they keep their full shape).
    """
    out: dict[PathT, list[int]] = {}
    for n in tree.spec.nodes():
        if n.name in a.dropped:
            continue
        for u in n.units:
            k = tree.kept_count(a, n.name, u.kind)
            for s in u.slices:
                shape = out.setdefault(s.path, list(tree.spec.shapes[s.path]))
                shape[s.axis] = k * s.group
    return {p: tuple(v) for p, v in out.items()}


Cut = tuple[tuple[PathT, tuple[int, ...]], ...]  # (view-relative path, kept prefix shape), hashable (static)


def prefix_cut(
    state: nnx.State,
    src_path: Callable[[PathT], PathT],
    shapes: dict[PathT, tuple[int, ...]],
    want: nnx.State | None = None,
) -> Cut:
    """The static cut of a sub-module view's FULL state: which leaves to slice to which prefix shape.

    ``src_path`` maps a view-relative path to the model's parameter path (the key of ``shapes``, from
    :func:`prefix_shapes`). ``want``: the abstract state of the pruned view (its graphdef's shapes); every
    cut leaf must match it, so a slice plan and a pruned graph that disagree fail here, not in the forward.
    """
    cut = []
    for path, var in nnx.to_flat_state(state):
        path = tuple(path)
        full = tuple(var.get_value().shape)
        kept = shapes.get(src_path(path), full)
        if kept != full:
            cut.append((path, kept))
    if want is not None:
        got = dict(cut)
        for path, var in nnx.to_flat_state(want):
            path = tuple(path)
            full = tuple(state_shape(state, path))
            if tuple(var.get_value().shape) != got.get(path, full):
                raise ValueError(
                    f"prefix cut of {path}: slice plan gives {got.get(path, full)}, the pruned module has "
                    f"{tuple(var.get_value().shape)}"
                )
    return tuple(cut)


def state_shape(state: nnx.State, path: PathT) -> tuple[int, ...]:
    node: Any = state
    for k in path:
        node = node[k]
    return tuple(node.get_value().shape)


def apply_cut(state: nnx.State, cut: Cut) -> nnx.State:
    """Slice the leaves named by ``cut`` to their prefixes (traceable: used inside jitted functions, where
    the slice fuses into the consumer or costs one copy of the KEPT weights, never a host round trip)."""
    if not cut:
        return state
    want = dict(cut)
    flat = []
    for path, var in nnx.to_flat_state(state):
        kept = want.get(tuple(path))
        if kept is not None:
            x = var.get_value()
            var = var.replace(jax.lax.slice(x, (0,) * x.ndim, kept))
        flat.append((path, var))
    return nnx.from_flat_state(flat)


Refits = dict[tuple[PathT, int], Any]  # (consumer parameter path, kept units) -> re-fitted FULL-shape consumer


def with_refits(state: nnx.State, src_path: Callable[[PathT], PathT], refits: Refits | None, kept: int) -> nnx.State:
    """``state`` (a sub-layer view of the PERMUTED teacher) with its consumer leaf swapped for the re-fit at
    ``kept`` units (:meth:`tmp_jax.compensate.Compensation.level_refits`): same shape and dtype, so the
    compiled cut functions are reused; the prefix cut then takes the kept rows. No refits: ``state``."""
    if not refits:
        return state
    flat, hit = [], False
    for path, var in nnx.to_flat_state(state):
        r = refits.get((src_path(tuple(path)), kept))
        if r is not None:
            var, hit = var.replace(r), True
        flat.append((path, var))
    return nnx.from_flat_state(flat) if hit else state


def kept_first_order(tree: Tree, kept_units_json: dict[str, Any]) -> Order:
    """A plan's ``policy.kept_units`` ({"node/kind": [ids]}, or [[ids] per expert] for a batched group) as an
    order with the kept units first, so :func:`materialize` keeps exactly them (in ascending original order).
    A 1-D list for a batched group (plans before per-expert orders) means the same units in every row.
    Raises ValueError naming the group for an unknown group, ids out of range, or repeated ids."""
    order = {}
    for key, ids in kept_units_json.items():
        node, kind = key.rsplit("/", 1)
        try:
            u = tree.units(node, kind)
        except KeyError:
            raise ValueError(f"kept_units[{key!r}]: no such unit group in this model") from None
        try:
            ids = np.asarray(ids, np.int64)
        except (TypeError, ValueError):
            raise ValueError(f"kept_units[{key!r}]: expected a list of unit ids (or one list per expert)") from None
        if (ids.ndim == 2 and u.batch is None) or ids.ndim not in (1, 2):
            raise ValueError(f"kept_units[{key!r}]: expected a flat list of unit ids, got shape {ids.shape}")
        if u.batch is not None and ids.ndim == 2 and ids.shape[0] != tree.units(node, u.batch).n:
            raise ValueError(
                f"kept_units[{key!r}]: {ids.shape[0]} rows, expected one per {u.batch} ({tree.units(node, u.batch).n})"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= u.n):
            raise ValueError(f"kept_units[{key!r}]: ids outside [0, {u.n})")
        rows = ids.reshape(-1, ids.shape[-1])
        if any(len(np.unique(r)) != len(r) for r in rows):
            raise ValueError(f"kept_units[{key!r}]: repeated unit ids")
        full = np.stack([np.concatenate([r, np.setdiff1d(np.arange(u.n), r)]) for r in rows])
        order[(node, kind)] = full if ids.ndim == 2 else full[0]
    return order


def materialize(
    model: Any,
    tree: Tree,
    a: Assignment,
    order: Order | None = None,
    dtype: Any = None,
    comp: Any = None,
    refits: Refits | None = None,
) -> Any:
    """A new, smaller model computing the pruned network ``a`` (weights sliced from ``model``).

    ``comp``: a :class:`tmp_jax.compensate.Compensation` in ``model``'s numbering: the kept consumer rows are
    re-fitted (least squares on the calibration Grams) instead of only sliced. ``refits``: the precomputed
    re-fits of a PERMUTED model (``order`` None), taken instead of solving (the search's materialising path)."""
    hooks = arch.get(tree.spec.arch)
    src_cfg = model.config
    new_cfg = hooks.pruned_config(src_cfg, tree, a)
    src = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if dtype is None:
        dtype = next(iter(src.values())).dtype
    new = hooks.init_abstract(new_cfg, dtype)
    pmap = hooks.path_map(src_cfg, new_cfg)
    plan = slice_plan(tree, a, order)
    consumers = comp.consumers(tree) if comp is not None else {}
    rows_per_unit = {
        (s.path, s.axis): s.group for n in tree.spec.nodes() for u in n.units for s in u.slices if s.consumer
    }
    kept = kept_units(tree, a, order) if consumers else {}
    state = nnx.state(new, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        sp = pmap(tuple(path))
        arr = _host_or_device(src[sp])
        skip = None
        for axis, idx in plan.get(sp, []) if refits else ():
            g = rows_per_unit.get((sp, axis))  # a consumer: its precomputed re-fit at this kept count, if any
            if g is not None and (sp, idx.shape[-1] // g) in refits:
                arr = refits[(sp, idx.shape[-1] // g)]  # full shape (rows past the kept prefix zero): sliced below
        if sp in consumers:  # re-fit the kept rows first (on the full consumer), then slice the other axes
            node, kind, _, s = consumers[sp]
            arr, skip = comp.apply(tree, sp, np.asarray(arr), kept[(node, kind)]), s.axis
        arr = take_kept(arr, plan.get(sp, []), skip)
        want = var.get_value()
        if tuple(arr.shape) != tuple(want.shape):
            raise ValueError(f"materialise {path}: sliced {arr.shape} != expected {want.shape}")
        var.set_value(jnp.asarray(arr, want.dtype))
    nnx.update(new, state)
    return new


def _host_or_device(x: Any) -> Any:
    """CPU arrays are sliced with numpy (no per-shape XLA compiles); accelerator arrays stay on device."""
    if isinstance(x, np.ndarray):
        return x
    if all(d.platform == "cpu" for d in x.devices()) and len(x.devices()) == 1:
        return np.asarray(x)
    return x


def _take(arr: Any, idx: np.ndarray, axis: int) -> Any:
    if isinstance(arr, np.ndarray):
        return np.take(arr, idx, axis=axis)
    if len(idx) and np.array_equal(idx, np.arange(len(idx))):  # a prefix: a plain slice
        sl = [slice(None)] * arr.ndim
        sl[axis] = slice(0, len(idx))
        return arr[tuple(sl)]
    return jnp.take(arr, jnp.asarray(idx), axis=axis)


def permute(model: Any, tree: Tree, order: Order) -> Any:
    """Reorder units inside every node by ``order`` (function-preserving), in place.

    Batched groups (2-D orders, one row per unit of the batch group: per-expert channels) are permuted
    first, row by row in the ORIGINAL batch numbering; then the 1-D groups (the experts themselves)."""
    state = nnx.state(model, nnx.Param)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    groups = [(n, u) for n in tree.spec.nodes() for u in n.units if order.get((n.name, u.kind)) is not None]
    for n, u in sorted(groups, key=lambda nu: -np.ndim(order[(nu[0].name, nu[1].kind)])):
        o = np.asarray(order[(n.name, u.kind)])
        for s in u.slices:
            var = flat[s.path]
            var.set_value(take_kept(var.get_value(), [(s.axis, _element_index(o, s.group))]))
    nnx.update(model, state)
    return model


def count_params(model: Any) -> int:
    return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
