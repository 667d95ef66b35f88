"""Z-Image single-stream DiT in Flax NNX, mirroring ``diffusers.ZImageTransformer2DModel``.

Module and attribute names follow diffusers (``layers.3.attention.to_q``, ``all_x_embedder["2-1"]``,
``t_embedder.mlp.0`` ...) so the converter is an identity plus explicit transposes. The classes come in the
order of diffusers' ``transformer_z_image.py``: ``TimestepEmbedder``, the attention (its processor's RoPE),
``FeedForward``, ``ZImageTransformerBlock``, ``FinalLayer``, the RoPE tables (``RopeEmbedder``) and the model.

Ragged batches (different image sizes and caption lengths) are laid out on the host exactly like diffusers
(segments padded to 32 tokens with pad tokens, inter-sample padding masked; :mod:`.layout`) and the dense part
runs in one jitted function, :meth:`ZImageTransformer.forward_padded`. Which attention kernel runs is chosen
in :mod:`.kernels`; the fused q|k|v and w1|w3 inference layout is built by :mod:`.fusion`.

Omni/Edit mode (diffusers' nested-list inputs: per sample, condition latents + target, caption
segments, optional SigLIP features and an image noise mask) is laid out by
:func:`~tmp_jax.models.z_image.layout.make_omni_layout` and runs in
:meth:`ZImageTransformer.forward_omni_padded`: sequence ``[caption segments, VAE image tokens, SigLIP tokens]``,
per-token adaLN from the noisy (t) or clean (t = 1) timestep embedding.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax.models.z_image.config import SIGLIP_STACK, T_MID_DIM, BlockSpec, ZImageConfig
from tmp_jax.models.z_image.kernels import attention
from tmp_jax.models.z_image.layout import key_mask, make_layout, make_omni_layout, unpatchify, unpatchify_omni
from tmp_jax.nn import Linear, RMSNorm, timestep_embedding
from tmp_jax.stats import gram, gram_row_weights, group_output_energy

# ----------------------------------------------------------------------------------------------
# Timestep embedder


class TimestepEmbedder(nnx.Module):
    """Sinusoid(256) in fp32 -> Linear(256, 1024) -> SiLU -> Linear(1024, out)."""

    def __init__(self, out_size: int, mid_size: int, *, dtype: Any, rngs: nnx.Rngs, freq_dim: int = 256):
        self.freq_dim = freq_dim
        self.mlp = nnx.List(
            [
                Linear(freq_dim, mid_size, axes=("adaln", "mlp"), dtype=dtype, rngs=rngs),
                None,  # SiLU
                Linear(mid_size, out_size, axes=("mlp", "adaln"), dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, t: jax.Array) -> jax.Array:
        emb = timestep_embedding(t, self.freq_dim).astype(self.mlp[0].kernel.dtype)
        return self.mlp[2](jax.nn.silu(self.mlp[0](emb)))


# ----------------------------------------------------------------------------------------------
# Attention (diffusers' ZSingleStreamAttnProcessor: QK-norm, RoPE, SDPA, to_out)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Interleaved complex-pair rotation (GPT-J style) in fp32. x: (B, T, N, D); cos/sin: (B, T, D/2).

    Pair j = (x[2j], x[2j+1]) = (a, b) becomes (a c - b s, b c + a s). Written as one elementwise pass,
    ``x * c2 + swap(x) * sign * s2`` (c2 / s2: cos / sin repeated per pair; swap: (b, a) per pair; sign:
    -1 on even, +1 on odd entries), so every output element is written contiguously. The equivalent
    ``stack([...], -1)`` form lowers to a concatenate along the size-2 minor axis, which XLA's GPU emitter
    writes with 2-element strides: it ran at 1.6 TB/s on an H200 against ~3.5 TB/s for plain elementwise
    fusions (bench/zimage_block.py profile, docs/benchmarks.md section 1).
    """
    D = x.shape[-1]
    xf = x.astype(jnp.float32)
    swapped = xf.reshape(*x.shape[:-1], D // 2, 2)[..., ::-1].reshape(x.shape)  # [B, T, N, D]: (b, a) pairs
    c2 = jnp.repeat(cos, 2, axis=-1)[:, :, None, :]  # [B, T, 1, D]
    s2 = jnp.repeat(sin, 2, axis=-1)[:, :, None, :] * jnp.tile(jnp.asarray([-1.0, 1.0], jnp.float32), D // 2)
    return (xf * c2 + swapped * s2).astype(x.dtype)


def head_output_energy(o: jax.Array, w_out: jax.Array) -> jax.Array:
    """Per head n: ``sum_{b,t} ||o[b, t, n] @ W_n||^2`` with ``W_n`` = head n's rows of ``w_out``. -> (N,) fp32.

    ``o``: (B, T, N, D) attention output (the tensor the forward already has, before ``to_out``); ``w_out``:
    (N * D, dim). :func:`tmp_jax.stats.group_output_energy`: ``<O_n^T O_n, W_n W_n^T>`` from two per-head Gram
    matrices (N, D, D) with fp32 accumulation, so nothing of size (B, T, N, D) is written in fp32 and the
    attention (cuDNN flash on GPU) is unchanged.
    """
    return group_output_energy(o, w_out)


class Attention(nnx.Module):
    """Self-attention with QK-RMSNorm then RoPE; ``heads`` may be fewer than the config's (pruned)."""

    def __init__(self, cfg: ZImageConfig, heads: int, *, dtype: Any, rngs: nnx.Rngs):
        hd = cfg.head_dim
        self.heads = heads
        self.head_dim = hd
        inner = heads * hd
        self.to_q = Linear(cfg.dim, inner, use_bias=False, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.to_k = Linear(cfg.dim, inner, use_bias=False, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.to_v = Linear(cfg.dim, inner, use_bias=False, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.norm_q = RMSNorm(hd, eps=1e-5, axes=("head_dim",), dtype=dtype) if cfg.qk_norm else None
        self.norm_k = RMSNorm(hd, eps=1e-5, axes=("head_dim",), dtype=dtype) if cfg.qk_norm else None
        self.to_out = nnx.List(
            [Linear(inner, cfg.dim, use_bias=False, axes=("heads", "embed"), dtype=dtype, rngs=rngs)]
        )
        self.collect_stats = False  # calibration sets this to sow importance statistics
        self.collect_grams = 0  # token stride of the to_out input Gram it sows too (0: none; compensated pruning)
        self.to_qkv: Linear | None = nnx.data(None)  # set by fuse_projections (fusion.py; to_q/k/v then None)

    def __call__(
        self, x: jax.Array, mask: jax.Array | None, cos: jax.Array, sin: jax.Array, head_mask: jax.Array | None = None
    ) -> jax.Array:
        """``head_mask``: (heads,) 0/1 weights of each head's output before ``to_out`` (masked candidate
        evaluation, :mod:`tmp_jax.masked_eval`: a 0 removes the head exactly as slicing it away would)."""
        B, T, _ = x.shape
        if self.to_qkv is not None:
            qkv = self.to_qkv(x).reshape(B, T, 3, self.heads, self.head_dim)  # [B, T, 3, N, D]: q | k | v
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = self.to_q(x).reshape(B, T, self.heads, self.head_dim)  # [B, T, N, D]
            k = self.to_k(x).reshape(B, T, self.heads, self.head_dim)
            v = self.to_v(x).reshape(B, T, self.heads, self.head_dim)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attention(q, k, v, mask)  # [B, T, N, D]
        if head_mask is not None:
            o = o * head_mask.astype(o.dtype)[:, None]
        if self.collect_stats:  # per-head energy of its contribution through to_out (importance)
            self.sow(nnx.Intermediate, "unit_stat", head_output_energy(o, self.to_out[0].kernel[...]))
            if self.collect_grams:  # [N*D, N*D] Gram of to_out's input: the re-fit of the kept heads' rows
                st = self.collect_grams  # rows weighted per sample when timestep weighting is on
                rw = gram_row_weights(self, B, T, st)
                self.sow(nnx.Intermediate, "gram_heads", gram(o.reshape(B * T, -1)[::st], rw))
        y = self.to_out[0](o.reshape(B, T, self.heads * self.head_dim))
        if self.collect_stats:  # the branch output energy before the post-norm (scales unit scores)
            self.sow(nnx.Intermediate, "out_energy", jnp.sum(jnp.square(y.astype(jnp.float32))))
        return y


# ----------------------------------------------------------------------------------------------
# Feed-forward, transformer block, final layer


class FeedForward(nnx.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int, *, dtype: Any, rngs: nnx.Rngs):
        self.w1 = Linear(dim, hidden, use_bias=False, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.w2 = Linear(hidden, dim, use_bias=False, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.w3 = Linear(dim, hidden, use_bias=False, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.w13: Linear | None = nnx.data(None)  # set by fuse_projections (fusion.py; w1/w3 then None)
        self.collect_stats = False
        self.collect_grams = 0  # token stride of w2's input Gram it sows too (0: none; compensated pruning)

    def __call__(self, x: jax.Array, channel_mask: jax.Array | None = None) -> jax.Array:
        """``channel_mask``: (hidden,) 0/1 weights of the hidden activation before ``w2`` (masked evaluation)."""
        if self.w13 is not None:
            u1, u3 = jnp.split(self.w13(x), 2, axis=-1)  # [..., hidden] each: w1 | w3 columns
            h = jax.nn.silu(u1) * u3
        else:
            h = jax.nn.silu(self.w1(x)) * self.w3(x)
        if channel_mask is not None:
            h = h * channel_mask.astype(h.dtype)
        if self.collect_stats:  # per-channel sum |activation| x ||w2 row|| (importance)
            # one column reduction over the h the w2 GEMM reads anyway (bf16 in, fp32 sum; no fp32 copy of h)
            act = jnp.sum(jnp.abs(h), axis=tuple(range(h.ndim - 1)), dtype=jnp.float32)  # [hidden]
            w2n = jnp.sqrt(jnp.sum(jnp.square(self.w2.kernel[...].astype(jnp.float32)), axis=1))  # [hidden]
            self.sow(nnx.Intermediate, "unit_stat", act * w2n)
            if self.collect_grams:  # [hidden, hidden] Gram of w2's input: the re-fit of the kept channels' rows
                st, b = self.collect_grams, h.shape[0]  # rows weighted per sample when timestep weighting is on
                rw = gram_row_weights(self, b, h.size // (b * h.shape[-1]), st)
                self.sow(nnx.Intermediate, "gram_ffn", gram(h.reshape(-1, h.shape[-1])[::st], rw))
        y = self.w2(h)
        if self.collect_stats:  # the branch output energy before the post-norm (scales unit scores)
            self.sow(nnx.Intermediate, "out_energy", jnp.sum(jnp.square(y.astype(jnp.float32))))
        return y


class ZImageTransformerBlock(nnx.Module):
    """Sandwich-norm block; modulated blocks take adaLN scale/gates from ``c`` (no SiLU before it).

    A block with 0 heads (or FFN width 0) has no attention (FFN) sub-layer: the residual branch is
    skipped, which is what dropping that sub-layer means.
    """

    def __init__(self, cfg: ZImageConfig, spec: BlockSpec, *, modulation: bool, dtype: Any, rngs: nnx.Rngs):
        dim, eps = cfg.dim, cfg.norm_eps
        self.modulation = modulation
        has_attn, has_ffn = spec.heads > 0, spec.ffn_dim > 0
        self.attention = Attention(cfg, spec.heads, dtype=dtype, rngs=rngs) if has_attn else None
        self.feed_forward = FeedForward(dim, spec.ffn_dim, dtype=dtype, rngs=rngs) if has_ffn else None
        self.attention_norm1 = RMSNorm(dim, eps=eps, axes=("embed",), dtype=dtype) if has_attn else None
        self.ffn_norm1 = RMSNorm(dim, eps=eps, axes=("embed",), dtype=dtype) if has_ffn else None
        self.attention_norm2 = RMSNorm(dim, eps=eps, axes=("embed",), dtype=dtype) if has_attn else None
        self.ffn_norm2 = RMSNorm(dim, eps=eps, axes=("embed",), dtype=dtype) if has_ffn else None
        self.adaLN_modulation = (
            nnx.List([Linear(cfg.adaln_dim, 4 * dim, axes=("adaln", "embed"), dtype=dtype, rngs=rngs)])
            if modulation
            else None
        )
        self.collect_stats = False

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        cos: jax.Array,
        sin: jax.Array,
        c: jax.Array | None = None,
    ) -> jax.Array:
        """x: (B, T, dim); c: (B, adaln) or per-token (B, T, adaln) conditioning (modulated blocks)."""
        x_in = x
        s_msa, g_msa, s_mlp, g_mlp = self.modulation_terms(c)
        if self.attention is not None:
            x0, x = (
                x,
                attn_branch(
                    self.attention, self.attention_norm1, self.attention_norm2, x, mask, cos, sin, s_msa, g_msa
                ),
            )
            if self.collect_stats:  # what the branch adds to the residual stream (after post-norm and gate)
                self.attention.sow(nnx.Intermediate, "res_energy", jnp.sum(jnp.square((x - x0).astype(jnp.float32))))
        if self.feed_forward is not None:
            x0, x = x, ffn_branch(self.feed_forward, self.ffn_norm1, self.ffn_norm2, x, s_mlp, g_mlp)
            if self.collect_stats:
                self.feed_forward.sow(nnx.Intermediate, "res_energy", jnp.sum(jnp.square((x - x0).astype(jnp.float32))))
        if self.collect_stats:  # how much the block changes its input: [sum ||out-in||^2, sum ||in||^2]
            d = jnp.sum(jnp.square((x - x_in).astype(jnp.float32)))
            self.sow(nnx.Intermediate, "block_stat", jnp.stack([d, jnp.sum(jnp.square(x_in.astype(jnp.float32)))]))
        return x

    def modulation_terms(self, c: jax.Array | tuple | None) -> tuple:
        """(scale_msa, gate_msa, scale_mlp, gate_mlp) from adaLN (no SiLU before it); Nones if unmodulated.

        ``c`` is (B, adaln), per-token (B, T, adaln), or omni's ``(c_noisy, c_clean, noise)`` triple
        (built by :meth:`ZImageTransformer.forward_omni_padded`): both (B, adaln) embeddings are
        projected, then each token takes the noisy one where ``noise == 1`` (diffusers'
        ``select_per_token``; selecting before or after the elementwise 1 + s / tanh is the same).
        """
        if not self.modulation:
            return (None, None, None, None)
        if isinstance(c, tuple):
            c_noisy, c_clean, noise = c
            lin = self.adaLN_modulation[0]
            mod = jnp.where(noise[..., None] == 1, lin(c_noisy)[:, None, :], lin(c_clean)[:, None, :])  # [B, T, 4d]
        else:
            mod = self.adaLN_modulation[0](c)  # [B, 4*dim] or [B, T, 4*dim]
        if mod.ndim == 2:
            mod = mod[:, None, :]
        scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(mod, 4, axis=-1)
        return 1.0 + scale_msa, jnp.tanh(gate_msa), 1.0 + scale_mlp, jnp.tanh(gate_mlp)


def attn_branch(attention, norm1, norm2, x, mask, cos, sin, scale=None, gate=None, head_mask=None, keep=None):  # noqa: ANN001, ANN201
    """``x + gate * norm2(attn(norm1(x) * scale))`` (scale/gate None for unmodulated blocks).

    Masked candidate evaluation (:mod:`tmp_jax.masked_eval`): ``head_mask`` weights each head's output before
    ``to_out``; ``keep`` (a 0/1 scalar) weights the branch's whole residual contribution, so 0 is exactly the
    skipped sub-layer ``x`` (the post-norm of the adaLN-gated branch is inside the contribution)."""
    h = norm1(x)
    if scale is not None:
        h = h * scale
    a = norm2(attention(h, mask, cos, sin, head_mask))
    a = a if gate is None else gate * a
    return x + (a if keep is None else keep.astype(a.dtype) * a)


def ffn_branch(ff, norm1, norm2, x, scale=None, gate=None, channel_mask=None, keep=None) -> jax.Array:  # noqa: ANN001
    """``x + gate * norm2(ffn(norm1(x) * scale))`` (scale/gate None for unmodulated blocks); ``channel_mask``
    and ``keep`` as in :func:`attn_branch` (the FFN's hidden channels before ``w2``)."""
    h = norm1(x)
    if scale is not None:
        h = h * scale
    f = norm2(ff(h, channel_mask))
    f = f if gate is None else gate * f
    return x + (f if keep is None else keep.astype(f.dtype) * f)


class FinalLayer(nnx.Module):
    """LayerNorm (no affine, eps 1e-6) * (1 + Linear(SiLU(c))) -> Linear to patch pixels."""

    def __init__(self, cfg: ZImageConfig, out_features: int, *, dtype: Any, rngs: nnx.Rngs):
        self.linear = Linear(cfg.dim, out_features, axes=("embed", "patch"), dtype=dtype, rngs=rngs)
        # index 0 is the SiLU of the PyTorch Sequential (no parameters)
        self.adaLN_modulation = nnx.List(
            [None, Linear(cfg.adaln_dim, cfg.dim, axes=("adaln", "embed"), dtype=dtype, rngs=rngs)]
        )

    def __call__(self, x: jax.Array, c: jax.Array | tuple) -> jax.Array:
        """``c``: (B, adaln), (B, T, adaln) or omni's ``(c_noisy, c_clean, noise)`` (per-token select)."""
        if isinstance(c, tuple):
            c_noisy, c_clean, noise = c
            lin = self.adaLN_modulation[1]
            sn, sc = 1.0 + lin(jax.nn.silu(c_noisy)), 1.0 + lin(jax.nn.silu(c_clean))
            scale = jnp.where(noise[..., None] == 1, sn[:, None, :], sc[:, None, :])  # [B, T, dim]
        else:
            scale = 1.0 + self.adaLN_modulation[1](jax.nn.silu(c))
        if scale.ndim == 2:
            scale = scale[:, None, :]
        xf = x.astype(jnp.float32)
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
        xn = ((xf - mu) * jax.lax.rsqrt(var + 1e-6)).astype(x.dtype)
        return self.linear(xn * scale)


# ----------------------------------------------------------------------------------------------
# RoPE tables (diffusers' RopeEmbedder)


def rope_tables(cfg: ZImageConfig) -> list[np.ndarray]:
    """Per-axis angle tables ``(axes_lens[i], axes_dims[i] // 2)``, computed in float64 then rounded
    to fp32 exactly like diffusers (so cos/sin agree to the last bit of the angle)."""
    out = []
    for d, e in zip(cfg.axes_dims, cfg.axes_lens):
        inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        out.append(np.outer(np.arange(e, dtype=np.float64), inv).astype(np.float32))
    return out


def rope_cos_sin(cfg: ZImageConfig, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``pos``: (B, T, 3) int32 -> cos, sin: (B, T, head_dim // 2) fp32."""
    angles = [jnp.asarray(tab)[pos[..., i]] for i, tab in enumerate(rope_tables(cfg))]
    ang = jnp.concatenate(angles, axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


# ----------------------------------------------------------------------------------------------
# Model


class ZImageTransformer(nnx.Module):
    """Z-Image DiT. ``model(x, t, cap_feats)`` takes the same arguments as diffusers' forward."""

    ARCH = "zimage"  # key of the architecture hooks (tmp_jax.arch)

    def __init__(self, cfg: ZImageConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        patch_in = {
            k: p * p * f * cfg.in_channels
            for k, p, f in zip(cfg.patch_keys(), cfg.all_patch_size, cfg.all_f_patch_size)
        }
        self.all_x_embedder = nnx.Dict(
            {k: Linear(n, cfg.dim, axes=("patch", "embed"), dtype=dtype, rngs=rngs) for k, n in patch_in.items()}
        )
        self.all_final_layer = nnx.Dict({k: FinalLayer(cfg, n, dtype=dtype, rngs=rngs) for k, n in patch_in.items()})
        self.noise_refiner = nnx.List(
            [
                ZImageTransformerBlock(cfg, s, modulation=True, dtype=dtype, rngs=rngs)
                for s in cfg.stack("noise_refiner")
            ]
        )
        self.context_refiner = nnx.List(
            [
                ZImageTransformerBlock(cfg, s, modulation=False, dtype=dtype, rngs=rngs)
                for s in cfg.stack("context_refiner")
            ]
        )
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim, T_MID_DIM, dtype=dtype, rngs=rngs)
        self.cap_embedder = nnx.List(
            [
                RMSNorm(cfg.cap_feat_dim, eps=cfg.norm_eps, axes=("cap",), dtype=dtype),
                Linear(cfg.cap_feat_dim, cfg.dim, axes=("cap", "embed"), dtype=dtype, rngs=rngs),
            ]
        )
        self.x_pad_token = nnx.Param(jnp.zeros((1, cfg.dim), dtype), logical_axes=(None, "embed"))
        self.cap_pad_token = nnx.Param(jnp.zeros((1, cfg.dim), dtype), logical_axes=(None, "embed"))
        self.layers = nnx.List(
            [ZImageTransformerBlock(cfg, s, modulation=True, dtype=dtype, rngs=rngs) for s in cfg.stack("layers")]
        )
        if cfg.siglip_feat_dim is not None:  # omni/edit: SigLIP image features (attributes absent otherwise)
            sd = cfg.siglip_feat_dim
            self.siglip_embedder = nnx.List(
                [
                    RMSNorm(sd, eps=cfg.norm_eps, axes=("cap",), dtype=dtype),
                    Linear(sd, cfg.dim, axes=("cap", "embed"), dtype=dtype, rngs=rngs),
                ]
            )
            self.siglip_refiner = nnx.List(
                [
                    ZImageTransformerBlock(cfg, s, modulation=False, dtype=dtype, rngs=rngs)
                    for s in cfg.stack(SIGLIP_STACK)
                ]
            )
            self.siglip_pad_token = nnx.Param(jnp.zeros((1, cfg.dim), dtype), logical_axes=(None, "embed"))

    # -- dense part (jit-friendly) -------------------------------------------------------------
    def embed(self, a: dict[str, jax.Array], t: jax.Array, patch_key: str) -> dict[str, jax.Array]:
        """Timestep, patch and caption embeddings, pad tokens and RoPE tables."""
        cfg = self.config
        c = self.t_embedder(t * cfg.t_scale).astype(a["img"].dtype)
        img = self.all_x_embedder[patch_key](a["img"])
        img = jnp.where(a["img_pad"][..., None], self.x_pad_token[...].astype(img.dtype), img)
        img = jnp.where(a["img_valid"][..., None], img, 0)
        cap = self.cap_embedder[1](self.cap_embedder[0](a["cap"]))
        cap = jnp.where(a["cap_pad"][..., None], self.cap_pad_token[...].astype(cap.dtype), cap)
        cap = jnp.where(a["cap_valid"][..., None], cap, 0)
        img_cs = rope_cos_sin(cfg, a["img_pos"])
        cap_cs = rope_cos_sin(cfg, a["cap_pos"])
        return {"c": c, "img": img, "cap": cap, "img_cs": img_cs, "cap_cs": cap_cs}

    def unify(self, a: dict[str, jax.Array], img: jax.Array, cap: jax.Array, e: dict[str, Any]) -> tuple:
        """Gather [image, caption] per sample into the unified sequence (+ RoPE, key mask)."""
        both = jnp.concatenate([img, cap], axis=1)  # [B, Lx+Lc, dim]
        idx = a["uni_idx"]
        x = jnp.take_along_axis(both, idx[..., None], axis=1)
        cos = jnp.take_along_axis(jnp.concatenate([e["img_cs"][0], e["cap_cs"][0]], 1), idx[..., None], 1)
        sin = jnp.take_along_axis(jnp.concatenate([e["img_cs"][1], e["cap_cs"][1]], 1), idx[..., None], 1)
        x = jnp.where(a["uni_valid"][..., None], x, 0)
        return x, cos, sin, key_mask(a["uni_valid"])

    def forward_padded(
        self,
        a: dict[str, jax.Array],
        t: jax.Array,
        patch_key: str,
        return_features: bool = False,
        dense: bool = False,
    ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """The dense forward on a ``Layout``'s arrays (:mod:`.layout`) -> (B, T_unified, patch_dim).

        ``dense=True`` (static; ``Layout.dense``): the layout has no inter-sample padding, so attention
        runs unmasked (cuDNN without key lengths). With padding it would be wrong.
        """
        e = self.embed(a, t, patch_key)
        c = e["c"]
        img, cap = e["img"], e["cap"]
        m_img, m_cap = (None, None) if dense else (key_mask(a["img_valid"]), key_mask(a["cap_valid"]))
        for blk in self.noise_refiner:
            img = blk(img, m_img, *e["img_cs"], c)
        for blk in self.context_refiner:
            cap = blk(cap, m_cap, *e["cap_cs"])
        x, cos, sin, mask = self.unify(a, img, cap, e)
        mask = None if dense else mask
        feats = []
        for blk in self.layers:
            x = blk(x, mask, cos, sin, c)
            if return_features:
                feats.append(x)
        out = self.all_final_layer[patch_key](x, c)
        return (out, feats) if return_features else out

    def _embed_stream(self, a: dict[str, jax.Array], name: str, embed: Any, pad_token: jax.Array) -> jax.Array:
        h = embed(a[name])
        h = jnp.where(a[f"{name}_pad"][..., None], pad_token.astype(h.dtype), h)
        return jnp.where(a[f"{name}_valid"][..., None], h, 0)

    def embed_omni(self, a: dict[str, jax.Array], t: jax.Array, patch_key: str) -> dict[str, Any]:
        """Omni stem: noisy / clean timestep embeddings, embedded streams (pad tokens in) and RoPE tables.

        Returns ``c_noisy``, ``c_clean`` (B, adaln), ``img`` / ``cap`` (and ``sig`` when the arrays carry
        SigLIP features) (B, L, dim), their ``*_cs`` (cos, sin) and ``img_cond`` = the noise refiner's
        ``(c_noisy, c_clean, img_noise)`` conditioning.
        """
        cfg = self.config
        dt = a["img"].dtype
        c_noisy = self.t_embedder(t * cfg.t_scale).astype(dt)
        c_clean = self.t_embedder(jnp.ones_like(t) * cfg.t_scale).astype(dt)  # conditions are clean: t = 1
        e: dict[str, Any] = {"c_noisy": c_noisy, "c_clean": c_clean, "img_cond": (c_noisy, c_clean, a["img_noise"])}
        e["img"] = self._embed_stream(a, "img", self.all_x_embedder[patch_key], self.x_pad_token[...])
        e["cap"] = self._embed_stream(
            a, "cap", lambda v: self.cap_embedder[1](self.cap_embedder[0](v)), self.cap_pad_token[...]
        )
        e["img_cs"], e["cap_cs"] = rope_cos_sin(cfg, a["img_pos"]), rope_cos_sin(cfg, a["cap_pos"])
        if "sig" in a:
            if cfg.siglip_feat_dim is None:
                raise ValueError("omni arrays carry SigLIP features but the model has no siglip_feat_dim")
            e["sig"] = self._embed_stream(
                a, "sig", lambda v: self.siglip_embedder[1](self.siglip_embedder[0](v)), self.siglip_pad_token[...]
            )
            e["sig_cs"] = rope_cos_sin(cfg, a["sig_pos"])
        return e

    def unify_omni(
        self, a: dict[str, jax.Array], img: jax.Array, cap: jax.Array, sig: jax.Array | None, e: dict[str, Any]
    ) -> tuple:
        """Gather ``[caption, image, siglip]`` per sample into the unified sequence.

        Returns (x, cos, sin, key mask, cond) with cond = ``(c_noisy, c_clean, uni_noise)`` for the
        main blocks and the final layer. Uses no parameters (callable as ``ZImageTransformer.unify_omni(None, ...)``).
        """
        parts, cs = [cap, img], [e["cap_cs"], e["img_cs"]]
        if sig is not None:
            parts.append(sig)
            cs.append(e["sig_cs"])
        idx = a["uni_idx"][..., None]  # [B, T, 1] gather into concat([cap, img, sig], axis=1)
        x = jnp.take_along_axis(jnp.concatenate(parts, 1), idx, 1)
        cos = jnp.take_along_axis(jnp.concatenate([c[0] for c in cs], 1), idx, 1)
        sin = jnp.take_along_axis(jnp.concatenate([c[1] for c in cs], 1), idx, 1)
        x = jnp.where(a["uni_valid"][..., None], x, 0)
        return x, cos, sin, key_mask(a["uni_valid"]), (e["c_noisy"], e["c_clean"], a["uni_noise"])

    def forward_omni_padded(
        self, a: dict[str, jax.Array], t: jax.Array, patch_key: str, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """The dense omni forward on an ``OmniLayout``'s arrays (:mod:`.layout`) -> (B, T_unified, patch_dim).

        Modulated blocks and the final layer take ``(c_noisy, c_clean, noise)``: c_noisy embeds t,
        c_clean embeds t = 1 (clean); each token uses the one its noise flag selects. The SigLIP stream
        runs iff the arrays carry ``sig`` (see :func:`make_omni_layout`).
        """
        e = self.embed_omni(a, t, patch_key)
        img, cap, sig = e["img"], e["cap"], e.get("sig")
        m_img, m_cap = key_mask(a["img_valid"]), key_mask(a["cap_valid"])
        for blk in self.noise_refiner:
            img = blk(img, m_img, *e["img_cs"], e["img_cond"])
        for blk in self.context_refiner:
            cap = blk(cap, m_cap, *e["cap_cs"])
        if sig is not None:
            m_sig = key_mask(a["sig_valid"])
            for blk in self.siglip_refiner:
                sig = blk(sig, m_sig, *e["sig_cs"])
        x, cos, sin, mask, cond = self.unify_omni(a, img, cap, sig, e)
        feats = []
        for blk in self.layers:
            x = blk(x, mask, cos, sin, cond)
            if return_features:
                feats.append(x)
        out = self.all_final_layer[patch_key](x, cond)
        return (out, feats) if return_features else out

    # -- public API ------------------------------------------------------------------------------
    def __call__(
        self,
        x: list[Any],
        t: Any,
        cap_feats: list[Any],
        patch_size: int = 2,
        f_patch_size: int = 1,
        *,
        siglip_feats: list[Any] | None = None,
        image_noise_mask: list[list[int]] | None = None,
    ) -> list[jax.Array]:
        """diffusers' forward. Basic (T2I): x list of (C, F, H, W); t (B,) in [0, 1] (1 = clean);
        cap_feats list of (L_i, cap_feat_dim). Returns the list of (C, F, H, W) outputs (``.sample``).

        Omni (TI2I; ``x[0]`` is a list): x[b] = condition latents + target (None = empty slot),
        cap_feats[b] = caption segments, ``siglip_feats[b]`` = per-image (H_s, W_s, siglip_feat_dim) or
        None (or None for the whole sample / batch), ``image_noise_mask[b]`` = per-image 0 (clean) / 1
        (noisy). Returns each sample's target output, like diffusers. See :func:`make_omni_layout`.
        """
        if x and isinstance(x[0], list | tuple):
            return self._call_omni(x, t, cap_feats, siglip_feats, image_noise_mask, patch_size, f_patch_size)
        layout = make_layout(
            self.config,
            [np.asarray(v) for v in x],
            [np.asarray(c) for c in cap_feats],
            patch_size,
            f_patch_size,
        )
        t = jnp.asarray(t, jnp.float32).reshape(-1)
        if t.shape[0] != len(x):
            raise ValueError(f"t has {t.shape[0]} entries for a batch of {len(x)}")
        graphdef, state = nnx.split(self)
        out = _forward_jit(graphdef, layout.patch_key, layout.dense, state, layout.arrays, t)
        return unpatchify(self.config, out, layout, patch_size, f_patch_size)

    def _call_omni(
        self,
        x: list[Any],
        t: Any,
        cap_feats: list[Any],
        siglip_feats: list[Any] | None,
        image_noise_mask: list[list[int]] | None,
        patch_size: int,
        f_patch_size: int,
    ) -> list[jax.Array]:
        def host(v: Any) -> np.ndarray | None:
            return None if v is None else np.asarray(v)

        sig = None
        if siglip_feats is not None:
            sig = [None if s is None else [host(v) for v in s] for s in siglip_feats]
        layout = make_omni_layout(
            self.config,
            [[host(v) for v in xs] for xs in x],
            [[host(c) for c in cs] for cs in cap_feats],
            sig,
            image_noise_mask,
            patch_size,
            f_patch_size,
        )
        t = jnp.asarray(t, jnp.float32).reshape(-1)
        if t.shape[0] != len(x):
            raise ValueError(f"t has {t.shape[0]} entries for a batch of {len(x)}")
        graphdef, state = nnx.split(self)
        out = _forward_omni_jit(graphdef, layout.patch_key, state, layout.arrays, t)
        return unpatchify_omni(self.config, out, layout, patch_size, f_patch_size)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: Any = jnp.float32,
        mesh: jax.sharding.Mesh | None = None,
        progress: bool = False,
    ) -> ZImageTransformer:
        """Load a diffusers transformer folder (or one this project exported); streamed, strict."""
        return load_zimage(path, dtype=dtype, mesh=mesh, progress=progress)

    def save_pretrained(self, path: str, dtype: Any | None = None, overwrite: bool = False, **kw: Any) -> None:
        """Write a diffusers-layout folder (config.json + safetensors [+ index]) atomically."""
        from tmp_jax.models.z_image.checkpoint import save_zimage

        save_zimage(self, path, dtype=dtype, overwrite=overwrite, **kw)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _forward_jit(
    graphdef: Any, patch_key: str, dense: bool, state: Any, arrays: dict[str, Any], t: jax.Array
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    return model.forward_padded(arrays, t, patch_key, dense=dense)


@partial(jax.jit, static_argnums=(0, 1))
def _forward_omni_jit(graphdef: Any, patch_key: str, state: Any, arrays: dict[str, Any], t: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    return model.forward_omni_padded(arrays, t, patch_key)


def init_abstract(cfg: ZImageConfig, dtype: Any = jnp.float32) -> ZImageTransformer:
    """Abstract (shape-only) model: no weights are materialised."""
    return nnx.eval_shape(lambda: ZImageTransformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def load_zimage(
    path: str | os.PathLike[str],
    *,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    config: ZImageConfig | None = None,
    progress: bool = False,
) -> ZImageTransformer:
    """Load a diffusers folder, a sharded folder, or a ComfyUI single file (give ``config`` or put a
    config.json next to it) into a :class:`ZImageTransformer`, streaming tensor by tensor."""
    from tmp_jax.models.z_image.checkpoint import open_reader, read_config, zimage_key_table
    from tmp_jax.safetensors_io import load_into

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg = config if config is not None else read_config(folder)
    reader = open_reader(path)
    model = init_abstract(cfg, dtype)
    return load_into(model, zimage_key_table(cfg), reader, dtype=dtype, mesh=mesh, progress=progress)
