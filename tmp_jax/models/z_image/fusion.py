"""Projection fusion: Z-Image's inference weight layout (q|k|v in one kernel, w1|w3 in one).

:func:`fuse_projections` rewrites a loaded model in place so every attention runs one ``(dim, 3 * inner)`` GEMM
instead of three and every FFN one ``(dim, 2 * hidden)`` GEMM instead of two. The forward passes in ``model.py``
read the fused attribute when it is set (``Attention.to_qkv``, ``FeedForward.w13``) and split its output in the
order given by :data:`FUSED`. This module finds those sub-modules by their attributes, so it does not import
``model.py``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from tmp_jax.nn import Linear

#: fused attribute -> the bias-free projections concatenated into it, in output-column order. The forward
#: splits the fused output in the same order: ``Attention`` reshapes to (..., 3, heads, head_dim) = q | k | v,
#: ``FeedForward`` splits in two halves = w1 | w3.
FUSED: dict[str, tuple[str, ...]] = {"to_qkv": ("to_q", "to_k", "to_v"), "w13": ("w1", "w3")}


def _fused_linear(parts: list[Linear]) -> Linear:
    """One bias-free Linear whose kernel is ``concat([p.kernel for p in parts], axis=1)`` (built once)."""
    kernel = jnp.concatenate([p.kernel[...] for p in parts], axis=1)  # [in, sum(out)]
    lin = nnx.eval_shape(
        lambda: Linear(kernel.shape[0], kernel.shape[1], use_bias=False, axes=("embed", None), rngs=nnx.Rngs(0))
    )
    lin.kernel = nnx.Param(kernel, logical_axes=("embed", None))
    return lin


def fuse_projections(model: nnx.Module) -> nnx.Module:
    """Inference layout, in place: per block q|k|v in one ``(dim, 3 * inner)`` kernel, w1|w3 in one.

    The same function (each output column is the same dot product), computed with fewer and wider GEMMs
    and without the weight concatenation XLA's dot merger otherwise emits on every call (it merges
    ``to_q`` and ``to_k``, which share an input). Measured on an H200 (bench/zimage_forward.py
    ``--fused``; docs/benchmarks.md section 1). For running a model only: calibration, pruning,
    conversion and export read ``to_q`` / ``to_k`` / ``to_v`` / ``w1`` / ``w3``, which are None afterwards.
    Modules already fused are left as they are. Returns ``model``.
    """
    # Collect first, then rewrite: the module graph is not changed while it is being walked.
    todo = [
        (module, fused, parts)
        for _, module in model.iter_modules()
        for fused, parts in FUSED.items()
        if hasattr(module, fused) and getattr(module, fused) is None  # declared by the module, not fused yet
    ]
    for module, fused, parts in todo:
        setattr(module, fused, _fused_linear([getattr(module, p) for p in parts]))
        for p in parts:
            setattr(module, p, None)
    return model
