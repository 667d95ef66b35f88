"""Importance statistics sown by modules (``collect_stats`` flags + ``nnx.sow``), shared by every runner."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
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


def stat_dtype(dtype: Any) -> np.dtype:
    """The dtype a sown statistic is accumulated in: float32 for any narrower float (a bf16 model's statistics
    must not be summed over micro-batches in bf16: 8 mantissa bits lose the small terms), else its own."""
    if jnp.issubdtype(dtype, jnp.floating) and np.dtype(dtype).itemsize < 4:
        return np.dtype(np.float32)
    return np.dtype(dtype)


def flatten_intermediates(inter: nnx.State) -> dict[tuple, np.ndarray]:
    """Sown intermediates -> {module path + stat name: summed host array} (sow keeps tuples of calls; summed in
    at least fp32, :func:`stat_dtype`)."""
    stats = {}
    for path, v in nnx.to_flat_state(inter):
        val = v.get_value() if hasattr(v, "get_value") else v
        arrs = val if isinstance(val, tuple) else (val,)
        stats[tuple(path)] = np.asarray(sum(np.asarray(x).astype(stat_dtype(x.dtype)) for x in arrs))
    return stats


# ----------------------------------------------------------------------------------------------
# Fast path: one cached program per (model structure, body), one device-to-host copy per call


class _Program:
    """A jitted statistics forward for one model structure: the collecting treedef and the stat layout."""

    def __init__(self, treedef: Any, body: Callable, static: tuple):
        self.treedef = treedef  # the model's pytree structure with every collect_stats flag on
        self.layout: list[tuple[tuple, tuple, Any]] = []  # (path, shape, dtype) per statistic, set at trace time
        self.resident: list[tuple] = []  # paths of the statistics returned as device arrays (Grams)

        def run(leaves: list, *args: Any) -> tuple[Any, jax.Array, tuple]:
            model = jax.tree.unflatten(self.treedef, leaves)
            out = body(model, *static, *args)
            flat, big = [], []
            for path, v in nnx.to_flat_state(nnx.pop(model, nnx.Intermediate)):
                val = v.get_value() if hasattr(v, "get_value") else v
                arrs = val if isinstance(val, tuple) else (val,)
                x = sum(arrs[1:], arrs[0])  # sow keeps one entry per call: summed
                (big if is_resident(tuple(path)) else flat).append((tuple(path), x))
            self.layout = [(p, tuple(x.shape), stat_dtype(x.dtype)) for p, x in flat]
            self.resident = [p for p, _ in big]
            # one fp32 vector: a single device-to-host copy, however many modules sowed
            vec = jnp.concatenate([x.astype(jnp.float32).ravel() for _, x in flat]) if flat else jnp.zeros((0,))
            return out, vec, tuple(x for _, x in big)

        self.fn = jax.jit(run)


_PROGRAMS: dict[tuple, _Program] = {}


def run_collecting(model: nnx.Module, body: Callable, *args: Any, static: tuple = ()) -> tuple[Any, dict]:
    """``body(model_with_stats_on, *static, *args)`` jitted; returns (its output, {path + stat name: host array}).

    Same statistics as ``split_collecting`` + a jitted body + ``flatten_intermediates``, with the per-call host
    work cut to what the forward itself needs (calibration at full width runs this once per micro-batch, and a
    6B model has ~500 parameters in ~400 modules):

    * the model goes into the jit as a pytree (``jax.tree.flatten``, a C++ traversal, ~2 ms at full Z-Image
      width) instead of a graph-mode ``nnx.split`` with every flag flipped twice (~30 ms on a slow host);
    * the program is cached per pytree structure (the treedef holds the widths and the flags; equal treedefs
      have equal programs), so no graphdef is hashed as a static argument per call; the parameter values are
      read afresh each call, so weights updated in place are seen;
    * all statistics come back as one fp32 vector (one device-to-host copy) split on the host by the layout
      recorded at trace time (each sown array had its own synchronising copy before).

    ``static`` are hashable arguments passed to ``body`` before ``args`` (e.g. a patch key); ``body`` should be
    a module-level function (it is part of the cache key). Statistics are returned in their sown dtype, at least
    float32 (:func:`stat_dtype`; the models sow fp32 whatever their parameter dtype).
    Consumer Grams (``gram_*``, up to 10240^2 per FFN at full size) stay ON THE DEVICE: they are returned as
    device arrays, to be accumulated there over micro-batches (``calibrate``) and copied to the host once.
    """
    leaves, treedef = jax.tree.flatten(model)
    key = (treedef, body, static)
    prog = _PROGRAMS.get(key)
    if prog is None:
        nodes = [n for _, n in nnx.iter_graph(model) if hasattr(n, "collect_stats")]
        for n in nodes:
            n.collect_stats = True
        try:
            collecting = jax.tree.structure(model)
        finally:
            for n in nodes:
                n.collect_stats = False
        prog = _PROGRAMS[key] = _Program(collecting, body, static)
    out, vec, big = prog.fn(leaves, *args)
    host = np.asarray(jax.device_get(vec))
    stats, off = {}, 0
    for path, shape, dtype in prog.layout:
        n = int(np.prod(shape))
        stats[path] = host[off : off + n].reshape(shape).astype(dtype)
        off += n
    stats.update(zip(prog.resident, big))
    return out, stats


def is_resident(path: tuple) -> bool:
    """Statistics kept on the device between micro-batches (the consumer Grams)."""
    return bool(path) and isinstance(path[-1], str) and path[-1].startswith("gram_")


# ----------------------------------------------------------------------------------------------
# Shared statistic formulas


def set_grams(model: nnx.Module, on: bool, stride: int = 1) -> int:
    """Turn the consumer-Gram statistics of every module on or off; returns how many modules have them.

    ``stride``: the Grams of token-wise projections read every ``stride``-th token (``stride`` x cheaper; a
    least-squares re-fit only needs the Gram up to scale, and its damping is relative). Each module's
    ``collect_grams`` holds the stride (0 = off); it is part of the model's pytree structure, so programs
    compiled with other settings are cached apart (:func:`run_collecting`)."""
    if on and (not isinstance(stride, int) or stride < 1):
        raise ValueError(f"Gram token stride must be an integer >= 1, got {stride!r}")
    nodes = [n for _, n in nnx.iter_graph(model) if hasattr(n, "collect_grams")]
    for n in nodes:
        n.collect_grams = stride if on else 0
    return len(nodes)


class GramWeight(nnx.Variable):
    """Per-sample weights ``[B]`` of the consumer Grams (timestep weighting; calibration only, never a parameter)."""


def set_gram_weights(model: nnx.Module, weights: np.ndarray | jax.Array | None) -> None:
    """Weight every sample's rows in the consumer Grams of the next forwards: ``G = sum_b w_b sum_{t in b} x_t^T x_t``.

    ``weights``: (B,) for the micro-batch about to run (B = its leading axis), or None to drop them. Each
    module with ``collect_grams`` gets a ``gram_weight`` attribute (a :class:`GramWeight`) only while weights
    are set; None deletes it, so the model's pytree structure outside a weighted calibration is what it was
    (nothing else recompiles). The value is a leaf: programs are reused across micro-batches of one size."""
    w = None if weights is None else jnp.asarray(weights, jnp.float32).reshape(-1)
    for _, n in nnx.iter_graph(model):
        if not hasattr(n, "collect_grams"):
            continue
        if w is not None:
            n.gram_weight = GramWeight(w)
        elif "gram_weight" in vars(n):
            del n.gram_weight


def gram_row_weights(
    module: nnx.Module, b: int, t: int, stride: int = 1, token_mask: jax.Array | None = None
) -> jax.Array | None:
    """Row weights of a Gram over ``x.reshape(b * t, -1)[::stride]`` (``b`` samples of ``t`` tokens): the
    module's per-sample weights (:func:`set_gram_weights`) repeated over each sample's tokens, times
    ``token_mask`` (b, t) where given (padding excluded); None when there is neither (an unweighted Gram)."""
    gw = getattr(module, "gram_weight", None)
    if gw is None and token_mask is None:
        return None
    w = jnp.ones((b, t), jnp.float32) if token_mask is None else token_mask.reshape(b, t).astype(jnp.float32)
    if gw is not None:
        w = w * gw[...].reshape(b, 1)
    return w.reshape(-1)[::stride]


def gram(x: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """``x^T diag(weight) x`` for ``x`` (N, C) -> (C, C) fp32: the second moment a least-squares re-fit of the
    layer consuming ``x`` needs. Operands in their own dtype with fp32 accumulation (bf16 runs on tensor
    cores); fp32 operands at HIGHEST precision (no TF32)."""
    hp = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    xw = x if weight is None else x * weight[:, None].astype(x.dtype)
    return jnp.einsum("nc,nd->cd", xw, x, precision=hp, preferred_element_type=jnp.float32)


def group_output_energy(o: jax.Array, w_out: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """Per group g: ``sum_{b,t valid} ||o[b, t, g] @ W_g||^2`` with ``W_g`` = group g's rows of ``w_out``. -> (G,) fp32.

    ``o``: (B, T, G, C) the attention output split into groups (a head, or a KV group's query heads), before the
    output projection; ``w_out``: (G * C, dim); ``token_mask``: boolean (B, T) or None (padding excluded).
    Computed as the Frobenius product ``<O_g^T O_g, W_g W_g^T>`` of two per-group Gram matrices (G, C, C), both
    from the operands in their own dtype with fp32 accumulation: nothing of size (B, T, G, C) is written in fp32
    and nothing of size (B, T, G, dim) at all; ``o`` is only read (the attention kernel is unchanged).
    Equal to the direct form: ``sum_bt o G o^T = sum_cd (sum_bt o_c o_d) G_cd``; masked tokens are zeroed in one
    operand (exact), which drops them from the sum.
    """
    g, c = o.shape[-2], o.shape[-1]
    # fp32 operands: no TF32 on GPU; bf16 operands keep the default (bf16 tensor-core GEMM, fp32 accumulation)
    hp = jax.lax.Precision.HIGHEST if jnp.result_type(o, w_out) == jnp.float32 else None
    w = w_out.reshape(g, c, -1)  # [G, C, dim]
    gw = jnp.einsum("gce,gde->gcd", w, w, precision=hp, preferred_element_type=jnp.float32)  # [G, C, C]
    om = o if token_mask is None else jnp.where(token_mask.reshape(*token_mask.shape, 1, 1), o, jnp.zeros((), o.dtype))
    go = jnp.einsum("btgc,btgd->gcd", om, o, precision=hp, preferred_element_type=jnp.float32)  # [G, C, C]
    return jnp.sum(go * gw, axis=(1, 2))
