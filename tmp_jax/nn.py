"""Small Flax NNX building blocks shared by every architecture.

Every parameter carries ``logical_axes`` metadata (one name per dimension); the one rules table in
``configs/sharding_rules.json`` (see :mod:`tmp_jax.sharding`) maps those names to mesh axes. Layers
are named like their PyTorch counterparts (``kernel`` for a Linear weight stored ``(in, out)``,
``weight`` for norm scales) so converter tables stay close to an identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Axes = tuple[str | None, ...]


def _normal(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype: jnp.dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with kernel stored ``(in, out)`` (PyTorch stores ``(out, in)``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        axes: Axes = ("embed", "mlp"),
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        std = 1.0 / max(in_features, 1) ** 0.5
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), std, dtype), logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=(axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        y = jnp.einsum("...i,io->...o", x.astype(kernel.dtype), kernel)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    """RMSNorm with fp32 statistics, matching diffusers/transformers casting rules.

    The normalised value is cast to the weight dtype when that is a half type (diffusers), else to
    the input dtype, then scaled by ``weight``.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-5,
        axes: Axes = ("norm",),
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        in_dtype = x.dtype
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        h = xf * jax.lax.rsqrt(var + self.eps)
        w = self.weight[...]
        if w.dtype in (jnp.bfloat16, jnp.float16):
            return h.astype(w.dtype) * w
        return (h * w.astype(jnp.float32)).astype(in_dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding ``[cos, sin]`` in fp32 (GLIDE/DiT convention), ``t``: (B,) -> (B, dim)."""
    half = dim // 2
    # static table, built on the host: the fp32 exponent torch forms, exponentiated in fp64 and rounded
    # (XLA's fp32 exp differs from torch's in 17 of 128 entries, which large t amplifies; this leaves 2)
    expo = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = jnp.asarray(np.exp(expo.astype(np.float64)).astype(np.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb
