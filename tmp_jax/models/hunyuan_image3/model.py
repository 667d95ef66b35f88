"""HunyuanImage-3.0 in Flax NNX: the MoE decoder used as a text-to-image flow-matching denoiser.

One sequence carries text and image tokens::

    [template] prompt <boi> <img_size> <img_ratio> <timestep> <img> * (h*w) <eoi>

``<img>`` slots receive ``patch_embed(latents, time_embed(t))`` (a UNet down block), the ``<timestep>``
slot receives ``timestep_emb(t)``. Text attends causally, the image block bidirectionally. The hidden
states at the image slots, taken BEFORE ``ln_f``, go through ``final_layer`` (a UNet up block) conditioned
on ``time_embed_2(t)`` and give the velocity ``noise - x0``. ``forward_text`` is the plain causal LM
(``ln_f`` then ``lm_head``).

Layout choices (the converter in ``converters/hunyuan.py`` maps the released checkpoint onto them):

* The release fuses q/k/v into one ``qkv_proj`` interleaved by KV group; here ``q_proj`` / ``k_proj`` /
  ``v_proj`` are separate ``(in, out)`` kernels, query heads in the release's order ``h = g * q_per_kv + j``
  so that ``jax.nn.dot_product_attention``'s GQA grouping (query head ``h`` uses KV head
  ``h // q_per_kv``) matches.
* Routed experts are stacked expert-axis-first (``up_proj`` / ``gate_proj``: ``(E, hidden, inter)``,
  ``down_proj``: ``(E, inter, hidden)``) so expert pruning is slicing axis 0; the shared expert's fused
  ``gate_and_up_proj = [up; gate]`` is split into ``up_proj`` / ``gate_proj``.
* Images are NHWC inside the UNet heads (conv kernels ``(kh, kw, in, out)``); the public API takes and
  returns NCHW latents like the PyTorch references.
* Every MoE field may differ per layer (expert count, top-k, expert width, shared-expert count), which is
  what pruning produces.

Numerics follow the official code: RMSNorm / GroupNorm statistics in fp32, router (``wg``) in fp32 with a
softmax over all experts and renormalised top-k weights (also for top-1: the official eager path always
renormalises), RoPE tables and the QK-norm in fp32.

Pruning support (off by default; normal runs, parameter counts and parity are unaffected):

* ``collect_stats`` flags on :class:`Attention`, :class:`HunyuanMoE` and :class:`DecoderLayer` make them sow
  importance statistics (``nnx.Intermediate``), padding tokens excluded:

  - attention ``unit_stat`` ``[K]``: per KV group ``g``, ``sum_tokens ||o_g @ W_o[g]||^2``, the energy of the
    group's query heads' contribution through ``o_proj`` (computed as ``<O_g^T O_g, W_o[g] W_o[g]^T>``, two
    per-group Gram matrices with fp32 accumulation, so no ``[tokens, K, hidden]`` tensor and no fp32 copy of
    the attention output is materialised; :func:`tmp_jax.stats.group_output_energy`);
  - MoE ``unit_stat_experts`` ``[E]``: ``C_e + n_e * C / n`` with ``C_e = sum_{(t,j) routed to e} w_tj
    ||E_e(x_t)||`` (renormalised gate weight times the norm of the expert's output), ``n_e`` the number of
    (token, slot) pairs routed to ``e``, ``C = sum_e C_e``, ``n = sum_e n_e``: the output mass the expert
    delivers plus its share of the routed traffic valued at the layer's mean per-pair mass (removing a busy
    expert reroutes many tokens even when its outputs are small);
  - MoE ``unit_stat_expert_ffn`` ``[E, I]``: ``||W_down[e, c]|| * sum_{(t,j) routed to e} w_tj |h_tjc|``
    with ``h = up(x) * silu(gate(x))`` the expert's hidden activation (per expert: each expert keeps its
    own channels, ``Units.batch``);
  - decoder layer ``block_stat`` ``[2]``: ``[sum ||out - in||^2, sum ||in||^2]``.
* ``HunyuanMoE.expert_mask`` (an :class:`ExpertMask` variable, ``None`` by default): router logits of masked
  experts are set to ``-inf`` before the softmax, which is exactly what removing them does. Tests use it to
  run the full model as an exact oracle of a pruned one.

The classes come in the order of the official ``modeling_hunyuan_image_3.py``: helpers and RoPE, the
timestep embedder and UNet heads, then the decoder (norm, MLP, router, MoE, attention, layer, backbone) and the
top model. Where tokens sit in the sequence (2D RoPE positions, attention masks, the host-side check of a T2I
row) is in :mod:`.layout`; which GPU kernel runs the attention and the routed experts (cuDNN, the Mosaic-GPU
grouped matmul, expert parallelism under ``shard_map``) is chosen in :mod:`.kernels`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config
from tmp_jax.models.hunyuan_image3.kernels import attention, ragged_experts
from tmp_jax.models.hunyuan_image3.layout import (
    T2IMask,
    causal_mask,
    check_t2i_layout,
    joint_attention_mask,
    t2i_positions,
    text_positions,
)
from tmp_jax.nn import Axes, Linear, RMSNorm, timestep_embedding
from tmp_jax.stats import gram, gram_row_weights, group_output_energy

MOE_IMPLS = ("ragged", "dense")


# ----------------------------------------------------------------------------------------------------------
# Helpers and small layers (the official conv_nd / normalization helpers)
# ----------------------------------------------------------------------------------------------------------
def _normal(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype: jnp.dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)).astype(dtype)


def _masked_sum(x: jax.Array, token_mask: jax.Array | None) -> jax.Array:
    """Sum of ``x`` ``[B, S, ...]`` over batch and sequence, padding tokens (``token_mask`` false) excluded."""
    if token_mask is not None:
        x = jnp.where(token_mask.reshape(*token_mask.shape, *(1,) * (x.ndim - 2)), x, 0)
    return jnp.sum(x, axis=(0, 1))


class Conv2d(nnx.Module):
    """Stride-1 'same' convolution on NHWC inputs; kernel ``(kh, kw, in, out)`` (torch: out, in, kh, kw)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        k = kernel_size
        std = 1.0 / (in_channels * k * k) ** 0.5
        self.kernel = nnx.Param(
            _normal(rngs, (k, k, in_channels, out_channels), std, dtype),
            logical_axes=("conv_k", "conv_k", "conv_in", "conv_out"),
        )
        self.bias = nnx.Param(jnp.zeros((out_channels,), dtype), logical_axes=("conv_out",))
        self.padding = k // 2

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(kernel.dtype),
            kernel,
            window_strides=(1, 1),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...]


class GroupNorm(nnx.Module):
    """GroupNorm(32) over NHWC computed in fp32 (the official code runs it under autocast, i.e. fp32)."""

    def __init__(self, channels: int, *, groups: int = 32, eps: float = 1e-5, dtype: jnp.dtype = jnp.float32):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        self.groups = groups
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((channels,), dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((channels,), dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        xg = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)  # [B, H, W, G, C/G]
        mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)  # [B, H, W, C]
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# RoPE (the official build_2d_rope's cos / sin tables, rotate_half, apply_rotary_pos_emb)
# ----------------------------------------------------------------------------------------------------------
def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """fp32 ``(cos, sin)`` of shape ``[..., S, head_dim]`` for the half-split (rotate_half) convention.

    Frequency ``i`` (``theta ** (-2i / head_dim)``) rotates with y for even ``i`` and with x for odd ``i``.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [hd/2]
    inv_freq = inv_freq.reshape(head_dim // 4, 2)  # [hd/4, 2]: column 0 pairs with y, column 1 with x
    angles = positions.astype(jnp.float32)[..., None, :] * inv_freq  # [..., S, hd/4, 2]
    angles = angles.reshape(*angles.shape[:-2], head_dim // 2)  # [..., S, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [..., S, hd]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``[B, S, N, hd]`` with ``[B, S, hd]`` tables; fp32 result like the official code."""
    x = x.astype(jnp.float32)
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ----------------------------------------------------------------------------------------------------------
# Timestep embedder and UNet heads
# ----------------------------------------------------------------------------------------------------------
class TimestepEmbedder(nnx.Module):
    """Sinusoid(256, ``[cos, sin]``) -> Linear -> GELU(erf) -> Linear; ``mlp`` keeps nn.Sequential indices."""

    def __init__(self, hidden_size: int, *, frequency_embedding_size: int = 256, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nnx.List(
            [
                Linear(frequency_embedding_size, hidden_size, axes=(None, "mlp"), dtype=dtype, rngs=rngs),
                None,  # GELU
                Linear(hidden_size, hidden_size, axes=("mlp", "embed"), dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, t: jax.Array) -> jax.Array:
        freq = timestep_embedding(t, self.frequency_embedding_size).astype(self.mlp[0].kernel.dtype)
        return self.mlp[2](jax.nn.gelu(self.mlp[0](freq), approximate=False))


class ResBlock(nnx.Module):
    """Residual conv block, timestep scale/shift after the second GroupNorm (ADM style, no resampling).

    ``in_layers = [GN, SiLU, conv3x3]``, ``emb_layers = [SiLU, Linear(emb, 2*out)]``,
    ``out_layers = [GN, SiLU, Dropout, conv3x3]``, ``skip_connection`` = 1x1 conv when the width changes.
    """

    def __init__(self, in_channels: int, emb_channels: int, out_channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.in_layers = nnx.List(
            [
                GroupNorm(in_channels, dtype=dtype),
                None,
                Conv2d(in_channels, out_channels, 3, dtype=dtype, rngs=rngs),
            ]
        )
        self.emb_layers = nnx.List(
            [None, Linear(emb_channels, 2 * out_channels, axes=("embed", "conv_out"), dtype=dtype, rngs=rngs)]
        )
        self.out_layers = nnx.List(
            [
                GroupNorm(out_channels, dtype=dtype),
                None,
                None,
                Conv2d(out_channels, out_channels, 3, dtype=dtype, rngs=rngs),
            ]
        )
        self.skip_connection = (
            Conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        """``x``: [B, H, W, C_in], ``emb``: [B, emb] -> [B, H, W, C_out]."""
        h = self.in_layers[2](jax.nn.silu(self.in_layers[0](x)))
        scale, shift = jnp.split(self.emb_layers[1](jax.nn.silu(emb)), 2, axis=-1)  # 2 x [B, C_out]
        h = self.out_layers[0](h) * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
        h = self.out_layers[3](jax.nn.silu(h))
        skip = x if self.skip_connection is None else self.skip_connection(x)
        return skip + h


class UNetDown(nnx.Module):
    """Latents ``[B, C, H, W]`` -> tokens ``[B, H*W, hidden]`` (row-major): conv3x3, ResBlock (patch 1)."""

    def __init__(
        self,
        in_channels: int,
        emb_channels: int,
        hidden_channels: int,
        out_channels: int,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.model = nnx.List(
            [
                Conv2d(in_channels, hidden_channels, 3, dtype=dtype, rngs=rngs),
                ResBlock(hidden_channels, emb_channels, out_channels, dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, latents: jax.Array, emb: jax.Array) -> jax.Array:
        b, _, h, w = latents.shape
        x = jnp.transpose(latents, (0, 2, 3, 1))  # [B, H, W, C]
        x = self.model[1](self.model[0](x), emb)  # [B, H, W, hidden]
        return x.reshape(b, h * w, x.shape[-1])  # [B, H*W, hidden]


class UNetUp(nnx.Module):
    """Tokens ``[B, H*W, hidden]`` -> velocity ``[B, C, H, W]``: ResBlock then ``[GN, SiLU, conv3x3]``."""

    def __init__(
        self,
        in_channels: int,
        emb_channels: int,
        hidden_channels: int,
        out_channels: int,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.model = nnx.List(
            [
                ResBlock(in_channels, emb_channels, hidden_channels, dtype=dtype, rngs=rngs),
                nnx.List(
                    [
                        GroupNorm(hidden_channels, dtype=dtype),
                        None,
                        Conv2d(hidden_channels, out_channels, 3, dtype=dtype, rngs=rngs),
                    ]
                ),
            ]
        )

    def __call__(self, tokens: jax.Array, emb: jax.Array, token_h: int, token_w: int) -> jax.Array:
        b, _, c = tokens.shape
        x = tokens.reshape(b, token_h, token_w, c)  # [B, H, W, hidden]
        x = self.model[0](x, emb)
        head = self.model[1]
        x = head[2](jax.nn.silu(head[0](x)))  # [B, H, W, C]
        return jnp.transpose(x, (0, 3, 1, 2))  # [B, C, H, W]


# ----------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------
class QKNorm(RMSNorm):
    """Per-head RMSNorm of q / k with one ``[head_dim]`` weight shared by all heads.

    Unlike :class:`tmp_jax.nn.RMSNorm` the product with the weight is taken in fp32 for any weight dtype:
    the official code normalises the fp32 RoPE output and multiplies by the weight before casting down.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        return self.weight[...].astype(jnp.float32) * (xf * jax.lax.rsqrt(var + self.eps))


class SharedMLP(nnx.Module):
    """SwiGLU ``down(up(x) * silu(gate(x)))``; the release fuses ``gate_and_up_proj = [up; gate]``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        lin = dict(use_bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(hidden_size, intermediate_size, axes=("embed", "mlp"), **lin)
        self.gate_proj = Linear(hidden_size, intermediate_size, axes=("embed", "mlp"), **lin)
        self.down_proj = Linear(intermediate_size, hidden_size, axes=("mlp", "embed"), **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.up_proj(x) * jax.nn.silu(self.gate_proj(x)))


class TopKGate(nnx.Module):
    """The router ``wg`` (hidden -> experts, no bias), kept in fp32 whatever the model dtype."""

    def __init__(self, hidden_size: int, num_experts: int, *, rngs: nnx.Rngs):
        self.wg = Linear(
            hidden_size,
            num_experts,
            use_bias=False,
            axes=("embed", "exp_router"),
            dtype=jnp.float32,
            rngs=rngs,
        )
        # Tells the checkpoint engine not to cast it when loading with a reduced dtype.
        self.wg.kernel.set_metadata(keep_fp32=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Router logits ``[..., E]`` in fp32."""
        return self.wg(x.astype(jnp.float32))


class ExpertMask(nnx.Variable):
    """Boolean ``[E]`` keep-mask of a MoE router (not a parameter: never counted, loaded or exported)."""


class RoutedExperts(nnx.Module):
    """``E`` SwiGLU experts stacked expert-axis-first (expert pruning = slicing axis 0)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        e, h, i = num_experts, hidden_size, intermediate_size
        in_axes: Axes = ("exp", "embed", "exp_mlp")
        self.up_proj = nnx.Param(_normal(rngs, (e, h, i), h**-0.5, dtype), logical_axes=in_axes)
        self.gate_proj = nnx.Param(_normal(rngs, (e, h, i), h**-0.5, dtype), logical_axes=in_axes)
        self.down_proj = nnx.Param(_normal(rngs, (e, i, h), i**-0.5, dtype), logical_axes=("exp", "exp_mlp", "embed"))

    def ragged(
        self,
        x: jax.Array,
        weights: jax.Array,
        indices: jax.Array,
        stats: bool = False,
        grams: bool = False,
        gram_weight: jax.Array | None = None,
        channel_mask: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, ...]:
        """Grouped matmuls over expert-sorted token copies.

        ``x``: [N, H]; ``weights`` / ``indices``: [N, k] -> [N, H]. No capacity: every (token, slot) pair is
        computed, so nothing is ever dropped. With ``stats`` also returns per expert ``sum w * ||y||`` [E] and
        per (expert, channel) ``sum w * |h|`` [E, I] over the routed pairs (``y`` = unweighted expert output,
        ``h`` = hidden activation; pairs with weight 0, i.e. padding, contribute nothing). With ``stats`` and
        ``grams`` also the per-expert gate-weighted Gram of ``down_proj``'s input ``sum (w h)^T (w h)``
        [E, I, I] (compensated pruning re-fits each expert's kept channels with it), each pair's term times
        ``gram_weight`` [N] of its token where given (timestep weighting). Expert-parallel under
        ``shard_map`` while :func:`.kernels.set_expert_parallel` has set a mesh. ``channel_mask`` [I]: 0/1 weights of
        every expert's hidden channels before ``down_proj`` (masked candidate evaluation).
        """
        return ragged_experts(
            x,
            weights,
            indices,
            self.up_proj[...],
            self.gate_proj[...],
            self.down_proj[...],
            stats=stats,
            grams=grams,
            gram_weight=gram_weight,
            channel_mask=channel_mask,
        )

    def dense(
        self,
        x: jax.Array,
        weights: jax.Array,
        indices: jax.Array,
        stats: bool = False,
        grams: bool = False,
        gram_weight: jax.Array | None = None,
        channel_mask: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, ...]:
        """Reference path: every expert on every token, combined with the (sparse) routing weights.

        ``stats`` and ``channel_mask`` as in :meth:`ragged`."""
        n = x.shape[0]
        up_w, gate_w, down_w = self.up_proj[...], self.gate_proj[...], self.down_proj[...]
        combine = jnp.zeros((n, up_w.shape[0]), weights.dtype)
        combine = combine.at[jnp.arange(n)[:, None], indices].add(weights)  # [N, E], zero off the top-k
        xe = x.astype(up_w.dtype)
        up = jnp.einsum("nh,ehi->eni", xe, up_w)  # [E, N, I]
        gate = jnp.einsum("nh,ehi->eni", xe, gate_w)  # [E, N, I]
        hidden = up * jax.nn.silu(gate)  # [E, N, I]
        if channel_mask is not None:
            hidden = hidden * channel_mask.astype(hidden.dtype)
        y = jnp.einsum("eni,eih->enh", hidden, down_w)  # [E, N, H]
        out = jnp.einsum("enh,ne->nh", y, combine.astype(y.dtype))
        if not stats:
            return out
        cf = combine.astype(jnp.float32)  # [N, E]
        mass = jnp.einsum("en,ne->e", jnp.linalg.norm(y.astype(jnp.float32), axis=-1), cf)  # [E]
        channel = jnp.einsum("eni,ne->ei", jnp.abs(hidden.astype(jnp.float32)), cf)  # [E, I]
        if not grams:
            return out, mass, channel
        hw = hidden.astype(jnp.float32) * cf.T[:, :, None]  # [E, N, I]: the routed, weighted down_proj input
        lhs = hw if gram_weight is None else hw * gram_weight.astype(jnp.float32)[None, :, None]
        return out, mass, channel, jnp.einsum("eni,enj->eij", lhs, hw, precision=jax.lax.Precision.HIGHEST)


class HunyuanMoE(nnx.Module):
    """Routed experts (softmax over all experts, top-k, renormalised) plus the shared expert."""

    def __init__(self, config: HunyuanImage3Config, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, impl: str):
        if impl not in MOE_IMPLS:
            raise ValueError(f"moe impl {impl!r} not in {MOE_IMPLS}")
        hidden = config.hidden_size
        self.num_experts = config.num_experts[layer]
        self.moe_topk = config.moe_topk[layer]
        self.impl = impl
        self.gate = TopKGate(hidden, self.num_experts, rngs=rngs)
        self.experts = RoutedExperts(
            self.num_experts, hidden, config.moe_intermediate_size[layer], dtype=dtype, rngs=rngs
        )
        shared = config.shared_intermediate_size(layer)
        self.shared_mlp = SharedMLP(hidden, shared, dtype=dtype, rngs=rngs) if shared else None
        self.expert_mask: ExpertMask | None = nnx.data(None)  # see set_expert_mask
        self.collect_stats = False
        self.collect_grams = 0  # sow the per-expert down_proj input Grams too (> 0; every routed pair is read)

    def set_expert_mask(self, keep: np.ndarray | jax.Array | None) -> None:
        """Mask experts out of the router (``keep`` [E] bool; ``None`` removes the mask).

        A masked expert's logit is ``-inf`` before the softmax, so it is never selected and the remaining
        probabilities are those of a router without it: the layer computes exactly what the layer with that
        expert removed (its block and its ``wg`` column sliced away) computes, as long as ``moe_topk`` experts
        remain."""
        if keep is None:
            self.expert_mask = None
            return
        keep = jnp.asarray(keep, bool)
        if keep.shape != (self.num_experts,):
            raise ValueError(f"expert mask has shape {keep.shape}, expected ({self.num_experts},)")
        if int(np.asarray(keep).sum()) < self.moe_topk:
            raise ValueError(f"expert mask keeps {int(np.asarray(keep).sum())} experts, fewer than top-{self.moe_topk}")
        self.expert_mask = ExpertMask(keep)

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x`` [N, H] -> fp32 weights [N, k] (summing to 1) and expert indices [N, k]."""
        logits = self.gate(x)  # [N, E] fp32
        if self.expert_mask is not None:
            logits = jnp.where(self.expert_mask[...], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)  # [N, E] fp32
        weights, indices = jax.lax.top_k(probs, self.moe_topk)
        # The official eager path clamps the sum at 1e-8 before renormalising (top-1 gives weight 1).
        weights = weights / jnp.maximum(weights.sum(axis=-1, keepdims=True), 1e-8)
        return weights, indices

    def __call__(
        self, x: jax.Array, token_mask: jax.Array | None = None, channel_mask: jax.Array | None = None
    ) -> jax.Array:
        """``x`` [B, S, H]; ``token_mask`` [B, S] true for real tokens (padding gets no routed output);
        ``channel_mask`` [I]: 0/1 weights of every routed expert's hidden channels (masked evaluation; the
        shared expert is never masked)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [N, H]
        weights, indices = self.route(x2)
        if token_mask is not None:
            weights = weights * token_mask.reshape(-1, 1)
        # The official code casts the routing weights to the activation dtype before combining.
        weights = weights.astype(x.dtype)
        if self.collect_stats:
            # per-token Gram weights: each sample's timestep weight (None unless timestep weighting is on)
            gw = gram_row_weights(self, shape[0], x2.shape[0] // shape[0]) if self.collect_grams else None
            routed, mass, channel, *gram_e = getattr(self.experts, self.impl)(
                x2, weights, indices, stats=True, grams=self.collect_grams > 0, gram_weight=gw
            )
            self._sow_stats(indices, token_mask, mass, channel)
            if gram_e:  # [E, I, I] per-expert gate-weighted Gram of down_proj's input (compensated pruning)
                self.sow(nnx.Intermediate, "gram_expert_ffn", gram_e[0])
        else:
            routed = getattr(self.experts, self.impl)(x2, weights, indices, channel_mask=channel_mask)
        routed = routed.astype(x.dtype)
        out = routed if self.shared_mlp is None else self.shared_mlp(x2) + routed
        return out.reshape(shape)

    def _sow_stats(self, indices: jax.Array, token_mask: jax.Array | None, mass: jax.Array, channel: jax.Array) -> None:
        """Sow ``unit_stat_experts`` and ``unit_stat_expert_ffn`` (formulas in the module docstring)."""
        valid = jnp.ones(indices.shape[0], jnp.float32) if token_mask is None else token_mask.reshape(-1)
        pair_valid = jnp.broadcast_to(valid.astype(jnp.float32)[:, None], indices.shape).reshape(-1)
        counts = jax.ops.segment_sum(pair_valid, indices.reshape(-1), self.num_experts)  # [E] routed pairs
        mean_mass = jnp.sum(mass) / jnp.maximum(jnp.sum(counts), 1.0)
        self.sow(nnx.Intermediate, "unit_stat_experts", mass + counts * mean_mass)
        down_norm = jnp.linalg.norm(self.experts.down_proj[...].astype(jnp.float32), axis=-1)  # [E, I]
        self.sow(nnx.Intermediate, "unit_stat_expert_ffn", channel * down_norm)  # [E, I]: one order per expert


class Attention(nnx.Module):
    """GQA self-attention: RoPE, then QK-RMSNorm (after RoPE), SDPA, o_proj.

    ``mask``: a boolean [B, 1, S, S] array (XLA attention) or a :class:`T2IMask` (cuDNN split on GPU, see
    :func:`.kernels.t2i_attention_split`; XLA with its dense mask elsewhere; :func:`.kernels.attention` picks)."""

    def __init__(self, config: HunyuanImage3Config, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        hidden, hd = config.hidden_size, config.attention_head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = hd
        lin = dict(use_bias=False, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(hidden, self.num_heads * hd, axes=("embed", "heads"), **lin)
        self.k_proj = Linear(hidden, self.num_kv_heads * hd, axes=("embed", "kv_heads"), **lin)
        self.v_proj = Linear(hidden, self.num_kv_heads * hd, axes=("embed", "kv_heads"), **lin)
        self.o_proj = Linear(self.num_heads * hd, hidden, axes=("heads", "embed"), **lin)
        if config.use_qk_norm:
            self.query_layernorm = QKNorm(hd, eps=config.rms_norm_eps, axes=("head_dim",), dtype=dtype)
            self.key_layernorm = QKNorm(hd, eps=config.rms_norm_eps, axes=("head_dim",), dtype=dtype)
        else:
            self.query_layernorm = None
            self.key_layernorm = None
        self.collect_stats = False  # calibration sets this to sow importance statistics
        self.collect_grams = 0  # token stride of o_proj's input Gram it sows too (0: none; compensated pruning)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array | T2IMask,
        token_mask: jax.Array | None = None,
        head_mask: jax.Array | None = None,
    ) -> jax.Array:
        """``head_mask``: (num_heads,) 0/1 weights of each query head's output before ``o_proj`` (masked
        candidate evaluation, :mod:`tmp_jax.masked_eval`: a removed KV group = its query heads at 0)."""
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)  # [B, S, N, hd]
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)  # [B, S, K, hd]
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)  # [B, S, K, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.query_layernorm is not None:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = q.astype(v.dtype), k.astype(v.dtype)
        out = attention(q, k, v, mask, self.head_dim**-0.5)  # [B, S, N, hd]
        if head_mask is not None:
            out = out * head_mask.astype(out.dtype)[:, None]
        if self.collect_stats:  # per KV group: energy of its query heads' contribution through o_proj
            kv, width = self.num_kv_heads, (self.num_heads // self.num_kv_heads) * self.head_dim
            og = out.reshape(b, s, kv, width)  # [B, S, K, G*hd]: a KV group's query heads are contiguous
            # <O_k^T O_k, W_k W_k^T> (fp32 accumulation, padding zeroed): no [B, S, K, G*hd] fp32 tensor
            self.sow(nnx.Intermediate, "unit_stat", group_output_energy(og, self.o_proj.kernel[...], token_mask))
            if self.collect_grams:  # [N*hd, N*hd] Gram of o_proj's input (padding excluded): the KV-group re-fit
                st = self.collect_grams
                wt = gram_row_weights(self, b, s, st, token_mask)  # padding 0; x the sample's timestep weight
                self.sow(nnx.Intermediate, "gram_kv_groups", gram(out.reshape(b * s, -1)[::st], wt))
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))


def attn_branch(
    attn: Attention,
    norm: RMSNorm,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    mask: jax.Array | T2IMask,
    token_mask: jax.Array | None,
    head_mask: jax.Array | None = None,
    keep: jax.Array | None = None,
) -> jax.Array:
    """The attention half of a decoder layer: ``x + attn(input_layernorm(x))``.

    Masked candidate evaluation (:mod:`tmp_jax.masked_eval`): ``head_mask`` weights the query heads' outputs
    before ``o_proj``; ``keep`` (a 0/1 scalar) weights the whole residual contribution (0: a dropped layer's
    identity; ``o_proj`` has no bias, but the contribution is gated as a whole anyway)."""
    a = attn(norm(x), cos, sin, mask, token_mask, head_mask)
    return x + (a if keep is None else keep.astype(a.dtype) * a)


def moe_branch(
    moe: HunyuanMoE,
    norm: RMSNorm,
    x: jax.Array,
    token_mask: jax.Array | None,
    channel_mask: jax.Array | None = None,
    keep: jax.Array | None = None,
) -> jax.Array:
    """The MoE half of a decoder layer: ``x + moe(post_attention_layernorm(x))``; ``channel_mask`` (routed
    experts' hidden channels) and ``keep`` (the routed + shared contribution) as in :func:`attn_branch`."""
    m = moe(norm(x), token_mask, channel_mask)
    return x + (m if keep is None else keep.astype(m.dtype) * m)


class DecoderLayer(nnx.Module):
    """Pre-norm layer: ``x + attn(norm(x))`` then ``x + moe(norm(x))``."""

    def __init__(self, config: HunyuanImage3Config, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, moe_impl: str):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.mlp = HunyuanMoE(config, layer, dtype=dtype, rngs=rngs, impl=moe_impl)
        self.collect_stats = False

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, token_mask: jax.Array | None
    ) -> jax.Array:
        x_in = x
        x = attn_branch(self.self_attn, self.input_layernorm, x, cos, sin, mask, token_mask)
        x_mid = x
        x = moe_branch(self.mlp, self.post_attention_layernorm, x, token_mask)
        if self.collect_stats:  # what each branch adds to the residual stream (commensurate unit scores)
            for mod, d in ((self.self_attn, x_mid - x_in), (self.mlp, x - x_mid)):
                e = _masked_sum(jnp.sum(jnp.square(d.astype(jnp.float32)), axis=-1), token_mask)
                mod.sow(nnx.Intermediate, "res_energy", e)
        if self.collect_stats:  # how much the layer changes its input: [sum ||out-in||^2, sum ||in||^2]
            xf, xi = x.astype(jnp.float32), x_in.astype(jnp.float32)
            d = _masked_sum(jnp.sum(jnp.square(xf - xi), axis=-1), token_mask)
            self.sow(
                nnx.Intermediate,
                "block_stat",
                jnp.stack([d, _masked_sum(jnp.sum(jnp.square(xi), axis=-1), token_mask)]),
            )
        return x


class Embed(nnx.Module):
    """Token embedding table ``(vocab, hidden)`` (the release's ``wte``)."""

    def __init__(self, num_embeddings: int, features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            _normal(rngs, (num_embeddings, features), 0.02, dtype), logical_axes=("vocab", "embed")
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class HunyuanImage3Model(nnx.Module):
    """Backbone: ``wte``, decoder ``layers`` and ``ln_f`` (applied only by the text head)."""

    def __init__(self, config: HunyuanImage3Config, *, dtype: jnp.dtype, rngs: nnx.Rngs, moe_impl: str):
        self.wte = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                DecoderLayer(config, i, dtype=dtype, rngs=rngs, moe_impl=moe_impl)
                for i in range(config.num_hidden_layers)
            ]
        )
        self.ln_f = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

    def __call__(
        self,
        embeds: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        token_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Last hidden states ``[B, S, H]`` BEFORE ``ln_f``."""
        h = embeds
        for layer in self.layers:
            h = layer(h, cos, sin, mask, token_mask)
        return h


# ----------------------------------------------------------------------------------------------------------
# Top model (the official HunyuanImage3ForCausalMM)
# ----------------------------------------------------------------------------------------------------------
class VisionAligner(nnx.Module):
    """The release's ``vision_aligner`` (``LightProjector``, ``projector_type == "mlp_gelu"``).

    ``layers`` keeps the torch ``nn.Sequential`` indices: Linear at ``0, 2, 4, ...`` (``depth`` of them, with
    biases), exact (erf) GELU between them. Release: ``depth = 2``, ``1152 -> 4096 -> 4096``, i.e. the four
    keys ``vision_aligner.layers.{0,2}.{weight,bias}``.
    """

    def __init__(self, input_dim: int, hidden_size: int, depth: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        layers: list[Linear | None] = [Linear(input_dim, hidden_size, axes=(None, "mlp"), dtype=dtype, rngs=rngs)]
        for _ in range(1, depth):
            layers += [None, Linear(hidden_size, hidden_size, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)]
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` [..., input_dim] -> [..., hidden]."""
        h = self.layers[0](x)
        for i in range(2, len(self.layers), 2):
            h = self.layers[i](jax.nn.gelu(h, approximate=False))
        return h


def vision_aligner_from_config(config: HunyuanImage3Config, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> VisionAligner:
    """The aligner ``config.vit_aligner`` describes (validated by the config when ``ti2i`` is set)."""
    va = config.vit_aligner
    return VisionAligner(int(va["input_dim"]), config.hidden_size, int(va["depth"]), dtype=dtype, rngs=rngs)


def t2i_embed(
    wte: Embed,
    patch_embed: UNetDown,
    time_embed: TimestepEmbedder,
    timestep_emb: TimestepEmbedder,
    input_ids: jax.Array,
    latents: jax.Array,
    timestep: jax.Array,
    valid_lengths: jax.Array | None,
    *,
    image_token_id: int,
    head_dim: int,
    rope_theta: float,
) -> dict[str, jax.Array]:
    """Everything before the decoder layers of a T2I forward (see :meth:`HunyuanImage3.__call__`).

    Returns ``embeds`` [B, S, H], RoPE ``cos`` / ``sin`` [B, S, hd], the joint attention ``mask`` (a
    :class:`T2IMask`: the [B, 1, S, S] boolean mask and the image span it encodes), ``token_mask`` [B, S]
    (real tokens) and ``image_index`` [B, h*w] (the image slots).
    """
    batch, seq_len = input_ids.shape
    _, _, token_h, token_w = latents.shape
    num_image = token_h * token_w
    is_image = input_ids == image_token_id
    starts = jnp.argmax(is_image, axis=1).astype(jnp.int32)  # [B] first image token
    rows = jnp.arange(batch)
    image_index = jnp.minimum(starts[:, None] + jnp.arange(num_image)[None], seq_len - 1)  # [B, h*w]
    if valid_lengths is None:
        valid_lengths = jnp.full((batch,), seq_len, jnp.int32)

    embeds = wte(input_ids)  # [B, S, H]
    image_tokens = patch_embed(latents.astype(embeds.dtype), time_embed(timestep))  # [B, h*w, H]
    timestep_tokens = timestep_emb(timestep)  # [B, H]
    embeds = embeds.at[rows[:, None], image_index].set(image_tokens.astype(embeds.dtype))
    embeds = embeds.at[rows, starts - 1].set(timestep_tokens.astype(embeds.dtype))

    cos, sin = rope_cos_sin(t2i_positions(seq_len, starts, token_h, token_w), head_dim, rope_theta)
    mask = T2IMask(joint_attention_mask(seq_len, starts, num_image, valid_lengths), starts, num_image)
    token_mask = jnp.arange(seq_len)[None, :] < valid_lengths[:, None]  # [B, S]
    return {
        "embeds": embeds,
        "cos": cos,
        "sin": sin,
        "mask": mask,
        "token_mask": token_mask,
        "image_index": image_index,
    }


def t2i_head(
    final_layer: UNetUp,
    time_embed_2: TimestepEmbedder,
    hidden: jax.Array,
    image_index: jax.Array,
    timestep: jax.Array,
    token_h: int,
    token_w: int,
) -> jax.Array:
    """Hidden states [B, S, H] (before ``ln_f``) -> velocity [B, C, h, w] from the image slots."""
    rows = jnp.arange(hidden.shape[0])
    image_hidden = hidden[rows[:, None], image_index]  # [B, h*w, H]
    return final_layer(image_hidden, time_embed_2(timestep), token_h, token_w)


class HunyuanImage3(nnx.Module):
    """HunyuanImage-3.0: T2I flow-matching denoiser (``__call__``) and causal LM (``forward_text``).

    Args:
        config: the model config.
        dtype: parameter / compute dtype (the router stays fp32).
        rngs: init randomness (weights are normally loaded through ``converters.hunyuan``).
        moe_impl: ``"ragged"`` (sorted tokens + ``jax.lax.ragged_dot``) or ``"dense"`` (every expert on every
            token; reference path for tests). Switch later with :meth:`set_moe_impl`.
    """

    ARCH = "hunyuan"  # key of the architecture hooks (tmp_jax.arch)

    def __init__(
        self,
        config: HunyuanImage3Config,
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
        moe_impl: str = "ragged",
    ):
        self.config = config
        hidden, latent = config.hidden_size, config.latent_channels
        self.model = HunyuanImage3Model(config, dtype=dtype, rngs=rngs, moe_impl=moe_impl)
        self.lm_head = Linear(
            hidden, config.vocab_size, use_bias=False, axes=("embed", "vocab"), dtype=dtype, rngs=rngs
        )
        self.timestep_emb = TimestepEmbedder(hidden, dtype=dtype, rngs=rngs)
        self.time_embed = TimestepEmbedder(hidden, dtype=dtype, rngs=rngs)
        self.patch_embed = UNetDown(latent, hidden, config.patch_embed_hidden_dim, hidden, dtype=dtype, rngs=rngs)
        self.time_embed_2 = TimestepEmbedder(hidden, dtype=dtype, rngs=rngs)
        self.final_layer = UNetUp(hidden, hidden, config.patch_embed_hidden_dim, latent, dtype=dtype, rngs=rngs)
        # Instruct (TI2I) / Instruct-Distil modules, used by tmp_jax.models.hunyuan_image3.instruct; None unless
        # the config enables them (built last: the T2I parameters and their init are unchanged).
        self.guidance_emb = TimestepEmbedder(hidden, dtype=dtype, rngs=rngs) if config.cfg_distilled else None
        self.timestep_r_emb = TimestepEmbedder(hidden, dtype=dtype, rngs=rngs) if config.use_meanflow else None
        self.vision_aligner = vision_aligner_from_config(config, dtype=dtype, rngs=rngs) if config.ti2i else None

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        dtype: Any = jnp.float32,
        mesh: jax.sharding.Mesh | None = None,
        progress: bool = False,
    ) -> HunyuanImage3:
        """Load an official-layout checkpoint folder (or one this project saved or exported, per-layer MoE
        lists included); streamed, strict, VAE / vision tensors skipped, the router kept fp32."""
        return load_hunyuan(path, dtype=dtype, mesh=mesh, progress=progress)

    def save_pretrained(self, path: str | os.PathLike[str], dtype: Any | None = None, overwrite: bool = False) -> None:
        """Write the official layout (config.json + ``model*.safetensors`` [+ index]) atomically; the folder
        loads back with :meth:`from_pretrained` (the denoiser only: no VAE / vision tensors)."""
        from tmp_jax.models.hunyuan_image3.checkpoint import save  # the arch's save hook (official keys + config)

        save(self, path, overwrite=overwrite, dtype=dtype)

    def set_moe_impl(self, impl: str) -> None:
        """Choose the routed-expert implementation of every layer (``"ragged"`` or ``"dense"``)."""
        if impl not in MOE_IMPLS:
            raise ValueError(f"moe impl {impl!r} not in {MOE_IMPLS}")
        for layer in self.model.layers:
            layer.mlp.impl = impl

    def __call__(
        self,
        input_ids: jax.Array,
        latents: jax.Array,
        timestep: jax.Array,
        valid_lengths: jax.Array | None = None,
    ) -> jax.Array:
        """Predict the flow velocity ``noise - x0`` of the noisy latents.

        Args:
            input_ids: [B, S] right-padded token ids; every row holds exactly ``h*w`` contiguous
                ``image_token_id`` tokens directly after ``timestep_token_id`` (checked when concrete).
            latents: [B, C, h, w] noisy VAE latents (one image per row, same size for the batch).
            timestep: [B] flow-matching timesteps ``sigma * 1000``.
            valid_lengths: [B] number of non-padding tokens per row (default: all).

        Returns:
            [B, C, h, w] velocity in the model dtype.
        """
        cfg = self.config
        _, _, token_h, token_w = latents.shape
        try:
            check_t2i_layout(np.asarray(input_ids), token_h * token_w, cfg)
        except jax.errors.TracerArrayConversionError:
            pass  # traced under jit: the caller is responsible for the layout
        e = t2i_embed(
            self.model.wte,
            self.patch_embed,
            self.time_embed,
            self.timestep_emb,
            input_ids,
            latents,
            timestep,
            valid_lengths,
            image_token_id=cfg.image_token_id,
            head_dim=cfg.attention_head_dim,
            rope_theta=cfg.rope_theta,
        )
        hidden = self.model(e["embeds"], e["cos"], e["sin"], e["mask"], e["token_mask"])  # before ln_f
        return t2i_head(self.final_layer, self.time_embed_2, hidden, e["image_index"], timestep, token_h, token_w)

    def forward_text(self, input_ids: jax.Array) -> jax.Array:
        """Causal next-token logits ``[B, S, vocab]`` in fp32 (text positions, no padding)."""
        _, seq_len = input_ids.shape
        cos, sin = rope_cos_sin(text_positions(seq_len), self.config.attention_head_dim, self.config.rope_theta)
        hidden = self.model(self.model.wte(input_ids), cos, sin, causal_mask(seq_len))
        return self.lm_head(self.model.ln_f(hidden)).astype(jnp.float32)


def load_hunyuan(
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    mesh: Any = None,
    config: HunyuanImage3Config | None = None,
    progress: bool = False,
) -> HunyuanImage3:
    """Load an official (or pruned) HunyuanImage-3.0 checkpoint folder into :class:`HunyuanImage3`, streamed
    tensor by tensor and strictly (VAE / vision keys are skipped); the router stays fp32 for any ``dtype``."""
    from tmp_jax.models.hunyuan_image3.checkpoint import hunyuan_key_table, read_config
    from tmp_jax.safetensors_io import SafetensorsReader, load_into

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg = config if config is not None else read_config(folder)
    model_dtype = jnp.float32 if dtype is None else dtype
    abstract = nnx.eval_shape(lambda: HunyuanImage3(cfg, dtype=model_dtype, rngs=nnx.Rngs(0)))
    return load_into(
        abstract, hunyuan_key_table(cfg), SafetensorsReader(path), dtype=dtype, mesh=mesh, progress=progress
    )
