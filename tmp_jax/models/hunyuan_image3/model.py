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
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config
from tmp_jax.nn import Axes, Linear, RMSNorm, timestep_embedding
from tmp_jax.stats import gram, gram_row_weights, group_output_energy

MOE_IMPLS = ("ragged", "dense")

# ----------------------------------------------------------------------------------------------------------
# GPU kernels, chosen at trace time
#
# Grouped matmul of the routed experts (``TMP_JAX_MOE_KERNEL``): "auto" = the Pallas Mosaic-GPU Hopper kernel
# (``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu``) on a single-device Hopper GPU process for bf16 operands
# whose shapes it supports, ``jax.lax.ragged_dot`` otherwise (CPU, fp32, several devices: XLA partitions
# ragged_dot over an expert-sharded mesh, the Mosaic kernel has no sharding rule; with expert parallelism on,
# :func:`set_expert_parallel`, each device runs the kernel on its own experts under shard_map). XLA on this GPU stack
# lowers ragged_dot to a dense GEMM over every expert (docs/benchmarks.md, section 3), hence the kernel.
# "xla" / "mosaic" force one ("mosaic" raises where the kernel cannot run).
#
# Attention on the T2I joint mask (``TMP_JAX_ATTENTION``, the same setting as Z-Image's): "auto" = cuDNN flash
# attention on GPU for bf16/fp16 with head_dim <= 128, split by query block (image queries see every key before
# the end of the image span, unmasked, as cuDNN key lengths; the few text queries use XLA with their mask rows),
# XLA attention with the boolean mask otherwise. The text-only causal path always uses XLA.
MOE_KERNEL: str = os.environ.get("TMP_JAX_MOE_KERNEL", "auto")
ATTENTION_IMPLEMENTATION: str = os.environ.get("TMP_JAX_ATTENTION", "auto")
MOSAIC_BLOCK = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4)  # best of 2 tried on H100


#: (mesh, axis) of expert parallelism, or None. While set, the ``ragged`` routed experts run under
#: ``shard_map``: each device holds E / P experts and computes only the (token, slot) pairs routed to
#: them (with the Mosaic kernel on Hopper), then the partial outputs are summed over the axis.
EXPERT_PARALLEL: tuple[jax.sharding.Mesh, str] | None = None


def _expert_parallel_unsupported(mesh: jax.sharding.Mesh, axis: str) -> str | None:
    """Why expert parallelism cannot run on ``mesh`` (None: it can): no ``axis``, or another model-parallel axis."""
    if axis not in mesh.shape:
        return f"mesh axes {tuple(mesh.shape)} have no {axis!r} axis"
    others = [a for a, n in mesh.shape.items() if n > 1 and a not in (axis, "data")]
    if others:
        return f"mesh axes {others} of size > 1 are not supported (only data, {axis})"
    return None


def set_expert_parallel(mesh: jax.sharding.Mesh | None, axis: str = "expert") -> None:
    """Run routed experts expert-parallel over ``mesh`` axis ``axis`` (None: off); for functions traced after.

    The experts' parameters must be sharded over that axis on their expert dimension (the ``exp`` logical
    axis of ``configs/sharding_rules.json`` maps to ``expert``). Tokens may be sharded over a ``data`` axis;
    any other mesh axis of size > 1 (tensor-parallel ``model``) is not supported by this path.
    """
    global EXPERT_PARALLEL
    why = None if mesh is None else _expert_parallel_unsupported(mesh, axis)
    if why:
        raise ValueError(f"expert parallelism: {why}")
    EXPERT_PARALLEL = None if mesh is None else (mesh, axis)


def maybe_expert_parallel(mesh: jax.sharding.Mesh | None, axis: str = "expert") -> bool:
    """Expert parallelism on for ``mesh`` where it applies (an ``axis`` of size > 1, no other model-parallel
    axis), off otherwise (so a later run without a mesh does not inherit an earlier one); returns whether it
    is on. Forward passes only (calibration, candidate evaluation): both paths compute the same function, so
    this is a speed setting, and a function traced without it is still correct."""
    ok = mesh is not None and mesh.shape.get(axis, 1) > 1 and _expert_parallel_unsupported(mesh, axis) is None
    set_expert_parallel(mesh if ok else None, axis)
    return ok


def set_moe_kernel(name: str) -> None:
    """'auto', 'xla' or 'mosaic'; affects functions traced after the call."""
    if name not in ("auto", "xla", "mosaic"):
        raise ValueError(f"MoE kernel must be auto, xla or mosaic, got {name!r}")
    global MOE_KERNEL
    MOE_KERNEL = name


def set_attention_implementation(name: str) -> None:
    """'auto', 'xla' or 'cudnn'; affects functions traced after the call."""
    if name not in ("auto", "xla", "cudnn"):
        raise ValueError(f"attention implementation must be auto, xla or cudnn, got {name!r}")
    global ATTENTION_IMPLEMENTATION
    ATTENTION_IMPLEMENTATION = name


def _is_hopper() -> bool:
    """sm_90 (H100 / H200 / H800 / GH200): the Mosaic kernel uses Hopper's wgmma and TMA (and assumes 132 SMs)."""
    d = jax.devices()[0]
    if d.platform != "gpu":
        return False
    cc = str(getattr(d, "compute_capability", ""))
    return cc.startswith("9") if cc else any(h in d.device_kind for h in ("H100", "H200", "H800"))


def _mosaic_unsupported(lhs: jax.Array, rhs: jax.Array) -> str | None:
    """Why the Mosaic-GPU grouped matmul cannot run ``lhs [M, K] x rhs [G, K, N]`` here (None: it can)."""
    k, n = lhs.shape[1], rhs.shape[2]
    if jax.default_backend() != "gpu" or not _is_hopper():
        return "not a Hopper GPU"
    if lhs.dtype != jnp.bfloat16 or rhs.dtype != jnp.bfloat16:
        return f"operands {lhs.dtype} x {rhs.dtype}, the kernel path takes bf16"
    if k % MOSAIC_BLOCK["block_k"] or n % MOSAIC_BLOCK["block_n"]:
        return f"K={k} / N={n} not multiples of {MOSAIC_BLOCK['block_k']} / {MOSAIC_BLOCK['block_n']}"
    return None


def _use_mosaic(lhs: jax.Array, rhs: jax.Array, per_device: bool = False) -> bool:
    why = _mosaic_unsupported(lhs, rhs)
    if MOE_KERNEL == "mosaic":
        if why:
            raise ValueError(f"TMP_JAX_MOE_KERNEL=mosaic: {why}")
        return True
    return MOE_KERNEL == "auto" and why is None and (per_device or jax.device_count() == 1)


def _mosaic_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    n_blocks = rhs.shape[2] // MOSAIC_BLOCK["block_n"]
    grid_block_n = next(g for g in (8, 4, 2, 1) if n_blocks % g == 0)
    return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes, grid_block_n=grid_block_n, **MOSAIC_BLOCK)


@jax.custom_vjp
def _mosaic_grouped(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return _mosaic_ragged_dot(lhs, rhs, group_sizes)


def _mosaic_fwd(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> tuple:
    return _mosaic_ragged_dot(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _mosaic_bwd(res: tuple, g: jax.Array) -> tuple:
    # The kernel is forward-only: gradients (distillation) go through XLA's ragged_dot, exact but slow.
    lhs, rhs, group_sizes = res
    _, vjp = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, group_sizes), lhs, rhs)
    return (*vjp(g), None)


_mosaic_grouped.defvjp(_mosaic_fwd, _mosaic_bwd)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, per_device: bool = False) -> jax.Array:
    """``lhs`` [M, K] rows sorted by group x ``rhs`` [G, K, N] -> [M, N] (``jax.lax.ragged_dot`` semantics).

    ``per_device``: called inside ``shard_map`` on one device's shards, where the Mosaic kernel applies even in
    a multi-device process. Rows past ``sum(group_sizes)`` are unspecified on the Mosaic path: callers mask them.
    """
    if _use_mosaic(lhs, rhs, per_device):
        return _mosaic_grouped(lhs, rhs, group_sizes)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


@partial(jax.tree_util.register_dataclass, data_fields=["dense", "image_start"], meta_fields=["num_image"])
@dataclasses.dataclass(frozen=True)
class T2IMask:
    """The joint T2I attention mask with the layout it encodes (what the cuDNN path needs).

    ``dense`` [B, 1, S, S] bool (:func:`joint_attention_mask`), ``image_start`` [B] first image token per row,
    ``num_image`` the (static) image span length. Image queries attend to exactly the keys before
    ``image_start + num_image``; every other query row is given by ``dense``.
    """

    dense: jax.Array
    image_start: jax.Array
    num_image: int


def _attention_impl(q: jax.Array, mask: object) -> str:
    impl = ATTENTION_IMPLEMENTATION
    if not isinstance(mask, T2IMask):
        return "xla"
    if impl == "auto":
        ok = (
            jax.default_backend() == "gpu"
            and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] <= 128
            and q.shape[-1] % 8 == 0
        )
        impl = "cudnn" if ok else "xla"
    return impl


def t2i_attention_split(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: T2IMask, scale: float, implementation: str = "cudnn"
) -> jax.Array:
    """Exact joint-mask attention as cuDNN flash attention for the image queries + XLA for the rest.

    q [B, S, N, hd], k / v [B, S, K, hd] -> [B, S, N, hd]. Image queries of row b see keys
    ``[0, image_start[b] + num_image)`` with no other mask (causal text before, the image block in full), which
    cuDNN takes as per-row key lengths; the ``S - num_image`` other queries (text, padding) are gathered and
    run through XLA with their rows of the dense mask. (``implementation="xla"`` runs the image part through
    XLA too: the same split, testable on the CPU.)
    """
    b, s = q.shape[:2]
    n_img = mask.num_image
    start = mask.image_start.astype(jnp.int32)[:, None]  # [B, 1]
    idx_img = start + jnp.arange(n_img, dtype=jnp.int32)[None]  # [B, n_img]
    q_img = jnp.take_along_axis(q, idx_img[:, :, None, None], axis=1)  # [B, n_img, N, hd]
    end = (start[:, 0] + n_img).astype(jnp.int32)  # [B]
    o_img = jax.nn.dot_product_attention(
        q_img, k, v, scale=scale, key_value_seq_lengths=end, implementation=implementation
    )  # [B, n_img, N, hd]
    n_txt = s - n_img
    if n_txt == 0:
        return o_img
    j = jnp.arange(n_txt, dtype=jnp.int32)[None]
    idx_txt = jnp.where(j < start, j, j + n_img)  # [B, n_txt] the non-image positions, in order
    q_txt = jnp.take_along_axis(q, idx_txt[:, :, None, None], axis=1)  # [B, n_txt, N, hd]
    m_txt = jnp.take_along_axis(mask.dense, idx_txt[:, None, :, None], axis=2)  # [B, 1, n_txt, S]
    o_txt = jax.nn.dot_product_attention(q_txt, k, v, mask=m_txt, scale=scale)  # [B, n_txt, N, hd]
    both = jnp.concatenate([o_txt, o_img], axis=1)  # [B, S, N, hd]: text rows, then image rows
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    rel = pos - start
    inv = jnp.where((rel >= 0) & (rel < n_img), n_txt + rel, jnp.where(pos < start, pos, pos - n_img))  # [B, S]
    return jnp.take_along_axis(both, inv[:, :, None, None], axis=1)


def _normal(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype: jnp.dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)).astype(dtype)


class ExpertMask(nnx.Variable):
    """Boolean ``[E]`` keep-mask of a MoE router (not a parameter: never counted, loaded or exported)."""


def _masked_sum(x: jax.Array, token_mask: jax.Array | None) -> jax.Array:
    """Sum of ``x`` ``[B, S, ...]`` over batch and sequence, padding tokens (``token_mask`` false) excluded."""
    if token_mask is not None:
        x = jnp.where(token_mask.reshape(*token_mask.shape, *(1,) * (x.ndim - 2)), x, 0)
    return jnp.sum(x, axis=(0, 1))


# ----------------------------------------------------------------------------------------------------------
# Small layers
# ----------------------------------------------------------------------------------------------------------
class Embed(nnx.Module):
    """Token embedding table ``(vocab, hidden)`` (the release's ``wte``)."""

    def __init__(self, num_embeddings: int, features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            _normal(rngs, (num_embeddings, features), 0.02, dtype), logical_axes=("vocab", "embed")
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class QKNorm(RMSNorm):
    """Per-head RMSNorm of q / k with one ``[head_dim]`` weight shared by all heads.

    Unlike :class:`tmp_jax.nn.RMSNorm` the product with the weight is taken in fp32 for any weight dtype:
    the official code normalises the fp32 RoPE output and multiplies by the weight before casting down.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        return self.weight[...].astype(jnp.float32) * (xf * jax.lax.rsqrt(var + self.eps))


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
# Positions, RoPE and masks
# ----------------------------------------------------------------------------------------------------------
def text_positions(seq_len: int) -> jax.Array:
    """``[1, S, 2]`` (y, x) positions of a text-only sequence: y = x = index (reduces to 1D RoPE)."""
    index = jnp.arange(seq_len, dtype=jnp.int32)
    return jnp.stack([index, index], axis=-1)[None]


def block_positions(seq_len: int, blocks: Sequence[tuple[jax.Array, int, int]]) -> jax.Array:
    """``[B, S, 2]`` (y, x) positions: each ``(start [B], h, w)`` block on its centred grid, the rest 1D.

    Block token (row, col) starting at ``L`` sits at ``y = L + floor((h*w - h)/2) + row``,
    ``x = L + floor((h*w - w)/2) + col``; tokens outside every block keep ``y = x = index``. Blocks must not
    overlap. With one block this is :func:`t2i_positions`.
    """
    index = jnp.arange(seq_len, dtype=jnp.int32)[None]  # [1, S]
    batch = blocks[0][0].shape[0] if blocks else 1
    y = jnp.broadcast_to(index, (batch, seq_len))
    x = y
    for start, h, w in blocks:
        n = h * w
        start = start.astype(jnp.int32)[:, None]  # [B, 1]
        offset = index - start
        inside = (offset >= 0) & (offset < n)
        offset = jnp.clip(offset, 0, n - 1)
        row, col = offset // w, offset % w
        # (n - h) // 2 == floor((n - h) / 2) because n >= h; adding integers keeps the floor exact.
        y = jnp.where(inside, start + (n - h) // 2 + row, y)
        x = jnp.where(inside, start + (n - w) // 2 + col, x)
    return jnp.stack([y, x], axis=-1)  # [B, S, 2]


def t2i_positions(seq_len: int, image_starts: jax.Array, token_h: int, token_w: int) -> jax.Array:
    """``[B, S, 2]`` (y, x) positions, one ``token_h x token_w`` image per row from ``image_starts[b]``.

    Image token (row, col) of a block starting at L sits at ``y = L + floor((h*w - h) / 2) + row``,
    ``x = L + floor((h*w - w) / 2) + col`` (the official grid is centred in the span, truncated to
    integers); every other token keeps its sequence index, so text after the block resumes at ``L + h*w``.
    """
    return block_positions(seq_len, [(image_starts, token_h, token_w)])


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


def causal_mask(seq_len: int) -> jax.Array:
    """``[1, 1, S, S]`` boolean causal mask (query, key), true where attention is allowed."""
    index = jnp.arange(seq_len)
    return (index[None, :] <= index[:, None])[None, None]


def joint_attention_mask(
    seq_len: int, image_starts: jax.Array, num_image_tokens: int, valid_lengths: jax.Array
) -> jax.Array:
    """``[B, 1, S, S]`` boolean mask: causal text, bidirectional image block, padded keys masked out.

    Padded queries would otherwise see no key at all; they attend to themselves so the softmax stays finite
    (their outputs are never read).
    """
    index = jnp.arange(seq_len)
    causal = index[None, :] <= index[:, None]  # [q, k]
    start = image_starts[:, None]
    in_image = (index[None, :] >= start) & (index[None, :] < start + num_image_tokens)  # [B, S]
    image_block = in_image[:, :, None] & in_image[:, None, :]  # [B, q, k]
    key_valid = index[None, :] < valid_lengths[:, None]  # [B, k]
    mask = (causal[None] | image_block) & key_valid[:, None, :]
    mask = mask | jnp.eye(seq_len, dtype=bool)[None]
    return mask[:, None]


def check_t2i_layout(input_ids: np.ndarray, num_image_tokens: int, config: HunyuanImage3Config) -> None:
    """Raise ValueError unless every row holds one contiguous span of ``num_image_tokens`` image tokens
    preceded by the ``<timestep>`` token (host-side; the jitted forward cannot raise on traced values)."""
    ids = np.asarray(input_ids)
    bad = []
    for b, row in enumerate(ids):
        where = np.flatnonzero(row == config.image_token_id)
        ok = (
            where.size == num_image_tokens
            and where.size > 0
            and where[-1] - where[0] + 1 == num_image_tokens
            and where[0] >= 1
            and row[where[0] - 1] == config.timestep_token_id
        )
        if not ok:
            bad.append(b)
    if bad:
        raise ValueError(
            f"rows {bad}: every row needs one contiguous span of {num_image_tokens} image tokens "
            f"(id {config.image_token_id}) directly after the <timestep> token "
            f"(id {config.timestep_token_id})"
        )


# ----------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------
class Attention(nnx.Module):
    """GQA self-attention: RoPE, then QK-RMSNorm (after RoPE), SDPA, o_proj.

    ``mask``: a boolean [B, 1, S, S] array (XLA attention) or a :class:`T2IMask` (cuDNN split on GPU, see
    :func:`t2i_attention_split`; XLA with its dense mask elsewhere)."""

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
        scale = self.head_dim**-0.5
        if _attention_impl(q, mask) == "cudnn":
            out = t2i_attention_split(q, k, v, mask, scale)  # [B, S, N, hd]
        else:
            dense = mask.dense if isinstance(mask, T2IMask) else mask
            out = jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale)  # [B, S, N, hd]
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


class SharedMLP(nnx.Module):
    """SwiGLU ``down(up(x) * silu(gate(x)))``; the release fuses ``gate_and_up_proj = [up; gate]``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        lin = dict(use_bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(hidden_size, intermediate_size, axes=("embed", "mlp"), **lin)
        self.gate_proj = Linear(hidden_size, intermediate_size, axes=("embed", "mlp"), **lin)
        self.down_proj = Linear(intermediate_size, hidden_size, axes=("mlp", "embed"), **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.up_proj(x) * jax.nn.silu(self.gate_proj(x)))


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
        ``shard_map`` while :func:`set_expert_parallel` has set a mesh. ``channel_mask`` [I]: 0/1 weights of
        every expert's hidden channels before ``down_proj`` (masked candidate evaluation).
        """
        up_w, gate_w, down_w = self.up_proj[...], self.gate_proj[...], self.down_proj[...]
        ep = EXPERT_PARALLEL
        if ep is None or up_w.shape[0] % ep[0].shape[ep[1]]:  # off, or experts (a pruned count) don't split evenly
            n_e = up_w.shape[0]
            return _routed_pairs(
                x,
                weights,
                indices,
                up_w,
                gate_w,
                down_w,
                0,
                n_e,
                stats,
                False,
                grams,
                gram_weight=gram_weight,
                channel_mask=channel_mask,
            )
        if channel_mask is not None:  # zero down_proj rows: the same product, and nothing new to shard
            down_w = down_w * channel_mask.astype(down_w.dtype)[None, :, None]
        return _routed_pairs_expert_parallel(
            x, weights, indices, up_w, gate_w, down_w, stats, *ep, grams=grams, gram_weight=gram_weight
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


def _routed_pairs(
    x: jax.Array,
    weights: jax.Array,
    indices: jax.Array,
    up_w: jax.Array,
    gate_w: jax.Array,
    down_w: jax.Array,
    e0: jax.Array | int,
    num_experts: int,
    stats: bool,
    per_device: bool,
    grams: bool = False,
    gram_weight: jax.Array | None = None,
    channel_mask: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """The routed experts ``e0 .. e0 + E_loc`` (``up_w`` etc. [E_loc, ...]) applied to their (token, slot) pairs.

    ``x`` [N, H], ``weights`` / ``indices`` [N, k] over all ``num_experts``. Pairs routed to other experts
    contribute 0, so summing the outputs of disjoint expert ranges gives the full layer (expert
    parallelism); with ``e0 = 0`` and every expert local this is the whole routed MoE. Returns [N, H]
    (+ ``mass`` [E_loc], ``channel`` [E_loc, I] with ``stats``; see :meth:`RoutedExperts.ragged`).
    ``channel_mask`` [I]: 0/1 weights of the hidden channels before ``down_proj`` (masked evaluation).
    """
    n, k = indices.shape
    m, e_loc = n * k, up_w.shape[0]
    flat = indices.reshape(-1)  # [N*k]
    order = jnp.argsort(flat, stable=True)  # [N*k], expert-major order of the (token, slot) pairs
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E] pairs per expert
    group_sizes = jax.lax.dynamic_slice_in_dim(sizes, e0, e_loc)  # [E_loc]
    start = jnp.sum(jnp.where(jnp.arange(num_experts) < e0, sizes, 0))  # first sorted row of expert e0
    # rows of the local experts first: sorted position (i + start) mod M  -> local row i
    pick = jnp.take(order, (jnp.arange(m) + start) % m)  # [N*k] pair index per local row
    valid = jnp.arange(m) < jnp.sum(group_sizes)  # [N*k] rows that belong to a local expert
    xs = jnp.take(x, pick // k, axis=0).astype(up_w.dtype)  # [N*k, H]
    up = grouped_matmul(xs, up_w, group_sizes, per_device)  # [N*k, I]
    gate = grouped_matmul(xs, gate_w, group_sizes, per_device)  # [N*k, I]
    hidden = up * jax.nn.silu(gate)  # [N*k, I]
    if channel_mask is not None:
        hidden = hidden * channel_mask.astype(hidden.dtype)
    # rows past the local groups are unspecified on the Mosaic path (may be NaN): select them away, don't multiply
    y = jnp.where(valid[:, None], grouped_matmul(hidden, down_w, group_sizes, per_device), 0)  # [N*k, H]
    ws = jnp.where(valid, jnp.take(weights.reshape(-1), pick), 0)  # [N*k] weights, 0 off the local experts
    if stats:
        wf = ws.astype(jnp.float32)
        local_ids = jnp.where(valid, jnp.take(flat, pick) - e0, e_loc)  # [N*k]; e_loc = dropped
        norms = jnp.linalg.norm(y.astype(jnp.float32), axis=-1)  # [N*k]
        mass = jax.ops.segment_sum(wf * norms, local_ids, e_loc, indices_are_sorted=True)  # [E_loc]
        act = wf[:, None] * jnp.abs(jnp.where(valid[:, None], hidden, 0).astype(jnp.float32))  # [N*k, I]
        channel = jax.ops.segment_sum(act, local_ids, e_loc, indices_are_sorted=True)  # [E_loc, I]
        if grams:  # per local expert sum (w h)^T (w h): a ragged contraction over its expert-sorted rows
            hw = wf[:, None] * jnp.where(valid[:, None], hidden, 0).astype(jnp.float32)  # [N*k, I]
            dn = jax.lax.RaggedDotDimensionNumbers(
                dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
            )
            hp = jax.lax.Precision.HIGHEST
            lhs = hw if gram_weight is None else hw * jnp.take(gram_weight.astype(jnp.float32), pick // k)[:, None]
            gram_e = jax.lax.ragged_dot_general(lhs, hw, group_sizes, dn, precision=hp)  # [E_loc, I, I]
    y = y * ws[:, None].astype(y.dtype)
    # back to (token, slot) order by a gather (a scatter of [N*k, H] rows is far slower on GPU): the pair at
    # sorted position j sits at local row (j - start) mod M
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(m, dtype=order.dtype))  # [N*k] sorted position
    y = jnp.take(y, (inverse - start) % m, axis=0)
    out = y.reshape(n, k, -1).sum(axis=1)  # [N, H], summed over slots like the official code
    if stats and grams:
        return out, mass, channel, gram_e
    return (out, mass, channel) if stats else out


def _routed_pairs_expert_parallel(
    x: jax.Array,
    weights: jax.Array,
    indices: jax.Array,
    up_w: jax.Array,
    gate_w: jax.Array,
    down_w: jax.Array,
    stats: bool,
    mesh: jax.sharding.Mesh,
    axis: str,
    grams: bool = False,
    gram_weight: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """:func:`_routed_pairs` under ``shard_map``: experts split over ``axis``, partial outputs summed (psum).

    Tokens stay where they are (sharded over ``data`` when the mesh has it, else replicated): each device
    routes its tokens' pairs to its own E / P experts only, so its grouped-matmul work is its share of the
    routed pairs; the [N, H] partial outputs are all-reduced over the expert axis.
    """
    from jax.sharding import PartitionSpec as P

    num_e = up_w.shape[0]  # a multiple of the axis size (RoutedExperts.ragged checks)
    data = "data" if mesh.shape.get("data", 1) > 1 and x.shape[0] % mesh.shape["data"] == 0 else None
    tok, exp = P(data), P(axis)

    def local(x, weights, indices, up_w, gate_w, down_w, *gw):  # one device: its tokens, its E / P experts
        e0 = jax.lax.axis_index(axis) * up_w.shape[0]
        res = _routed_pairs(x, weights, indices, up_w, gate_w, down_w, e0, num_e, stats, True, grams, *gw)
        if not stats:
            return jax.lax.psum(res, axis)
        out, *st = res
        if data is not None:  # statistics are over every token: sum the data shards
            st = [jax.lax.psum(v, data) for v in st]
        return (jax.lax.psum(out, axis), *st)

    out_specs = (tok, exp, exp, exp)[: 4 if grams else 3] if stats else tok
    gw = () if gram_weight is None else (gram_weight,)  # per-token Gram weights: sharded like the tokens
    in_specs = (tok, tok, tok, exp, exp, exp) + (tok,) * len(gw)
    f = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return f(x, weights, indices, up_w, gate_w, down_w, *gw)


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
        if config.ti2i:
            from tmp_jax.models.hunyuan_image3.instruct import vision_aligner_from_config  # imports this module
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
        from converters.hunyuan import load_hunyuan

        return load_hunyuan(path, dtype=dtype, mesh=mesh, progress=progress)

    def save_pretrained(self, path: str | os.PathLike[str], dtype: Any | None = None, overwrite: bool = False) -> None:
        """Write the official layout (config.json + ``model*.safetensors`` [+ index]) atomically; the folder
        loads back with :meth:`from_pretrained` (the denoiser only: no VAE / vision tensors)."""
        from tmp_jax.models.hunyuan_image3.train import save  # the arch's save hook (official keys + config)

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
