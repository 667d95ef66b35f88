"""Logical axis names -> mesh axes, through ONE rules table (``configs/sharding_rules.json``).

Parameters declare ``logical_axes`` metadata; nothing in model code names a mesh axis. The same
code therefore runs on one CPU, one GPU, 8 fake CPU devices in tests and a multi-host cluster.
"""

from __future__ import annotations

import json
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

RULES_PATH = Path(__file__).resolve().parents[1] / "configs" / "sharding_rules.json"


@lru_cache(maxsize=4)
def load_rules(path: str | None = None) -> dict[str, tuple[str, ...]]:
    """Read the rules table: logical axis name -> candidate mesh axes, in preference order."""
    p = Path(path) if path else RULES_PATH
    try:
        raw = json.loads(p.read_text())["rules"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read sharding rules ({e}); expected {{'rules': {{name: [axes]}}}}") from e
    return {k: tuple(v) for k, v in raw.items()}


def make_mesh(spec: str | None = None, devices: list[Any] | None = None) -> Mesh:
    """Build a mesh from ``"data:2,model:4"`` (axis:size, product = device count).

    ``None`` or ``"auto"`` puts every device on the ``data`` axis. One size may be ``-1`` (the rest).
    """
    devs = list(devices) if devices is not None else jax.devices()
    if not spec or spec == "auto":
        return Mesh(np.array(devs).reshape(len(devs)), ("data",))
    names, sizes = [], []
    for part in spec.split(","):
        try:
            name, size = part.split(":")
            names.append(name.strip())
            sizes.append(int(size))
        except ValueError as e:
            raise ValueError(f"--mesh {spec!r}: expected 'axis:size[,axis:size...]', got part {part!r}") from e
    if sizes.count(-1) > 1:
        raise ValueError(f"--mesh {spec!r}: at most one axis may have size -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devs) // known
    if int(np.prod(sizes)) != len(devs):
        raise ValueError(f"--mesh {spec!r}: axis sizes multiply to {int(np.prod(sizes))}, but {len(devs)} devices")
    return Mesh(np.array(devs).reshape(sizes), tuple(names))


def logical_to_pspec(
    axes: tuple[str | None, ...] | None,
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: dict[str, tuple[str, ...]] | None = None,
) -> PartitionSpec:
    """Resolve one array's logical axes to a PartitionSpec on ``mesh`` (see module doc)."""
    if axes is None:
        return PartitionSpec()
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    rules = rules if rules is not None else load_rules()
    used: set[str] = set()
    out: list[str | None] = []
    for name, dim in zip(axes, shape):
        chosen = None
        if name is not None:
            if name not in rules:
                raise ValueError(f"logical axis {name!r} is not in the rules table {RULES_PATH}")
            for cand in rules[name]:
                size = mesh.shape.get(cand, 1)
                if cand not in used and size > 1 and dim % size == 0:
                    chosen = cand
                    used.add(cand)
                    break
        out.append(chosen)
    return PartitionSpec(*out)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for every variable of a (possibly abstract) NNX state."""

    def one(v: nnx.Variable) -> NamedSharding:
        value = v.get_value()
        axes = v.get_metadata().get("logical_axes")
        return NamedSharding(mesh, logical_to_pspec(axes, tuple(value.shape), mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """The NamedSharding of one variable under the rules table."""
    value = var.get_value()
    return NamedSharding(mesh, logical_to_pspec(var.get_metadata().get("logical_axes"), tuple(value.shape), mesh))


def shard_module(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every parameter of ``model`` in its rule-resolved sharding (in place; returns model)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def _random_kind(path: tuple[Any, ...], ndim: int) -> str:
    """Which init a parameter gets, from its name (one rule for every architecture)."""
    name = str(path[-1])
    if name in ("weight", "scale"):  # RMSNorm / QK-norm / GroupNorm scales
        return "scale"
    if name == "bias":
        return "bias"
    if name == "kernel":  # Linear (in, out) or conv (kh, kw, in, out)
        return "kernel"
    if ndim == 3:  # stacked experts (E, in, out)
        return "experts"
    return "embedding"  # token embeddings, pad tokens


@cache
def _random_fn(shape: tuple[int, ...], dtype: str, kind: str, sharding: NamedSharding) -> Any:
    """One jitted generator per (shape, dtype, kind, sharding): the array is born in its sharding."""
    fan = int(np.prod(shape[:-1])) if kind == "kernel" else (shape[1] if kind == "experts" else 1)

    def gen(key: jax.Array) -> jax.Array:
        z = jax.random.normal(key, shape, jax.numpy.float32)
        if kind == "scale":
            z = 1.0 + 0.1 * z
        elif kind == "bias":
            z = 0.02 * z
        elif kind in ("kernel", "experts"):
            z = z / np.sqrt(fan)
        else:
            z = 0.02 * z
        return z.astype(dtype)

    return jax.jit(gen, out_shardings=sharding)


def random_on_mesh(abstract: nnx.Module, mesh: Mesh, seed: int = 0) -> nnx.Module:
    """Fill an ABSTRACT model (``nnx.eval_shape``) with random weights generated on the devices of
    ``mesh``, each parameter directly in its rule-resolved sharding: nothing full-size ever touches the
    host. Scales: norms 1 +- 0.1, kernels / stacked experts N(0, 1/fan_in), biases and embeddings
    N(0, 0.02^2). For benchmarks and full-scale dry runs (real weights come from ``from_pretrained``)."""
    gd, state = nnx.split(abstract)
    key = jax.random.key(seed)
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        v = var.get_value()
        sh = variable_sharding(var, mesh)
        kind = _random_kind(tuple(path), len(v.shape))
        leaves.append((path, _random_fn(tuple(v.shape), str(v.dtype), kind, sh)(jax.random.fold_in(key, i))))
    model = nnx.merge(gd, nnx.from_flat_state(leaves))
    return model
