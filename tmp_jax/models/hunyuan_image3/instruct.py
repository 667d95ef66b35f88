"""HunyuanImage-3.0-Instruct (TI2I, image editing) and Instruct-Distil on top of :class:`HunyuanImage3`.

The Instruct release runs the same MoE denoiser as the T2I model; only the token sequence, the embeddings
scattered into it, the 2D RoPE positions and the attention mask change. This module builds those and reuses
the model's own modules (``wte``, ``patch_embed``, ``time_embed``, ``timestep_emb``, the decoder layers,
``final_layer``, ``time_embed_2``) plus the three that the config adds to :class:`HunyuanImage3` (see
``HunyuanImage3.__init__``): ``vision_aligner`` (``config.ti2i``), ``guidance_emb`` (``config.cfg_distilled``)
and ``timestep_r_emb`` (``config.use_meanflow``).

Sequence of one TI2I row (``K >= 0`` condition images, then the target image)::

    seg_0 | <boi> shape <timestep> <img>*(hc*wc) <joint_img_sep> <img>*(hv*wv) <eoi> | seg_1 | ... (K times)
          | <boi> shape <timestep> [<guidance>] [<timestep_r>] <img>*(h*w) <eoi> | seg_{K+1}

``seg_i`` are text segments (chat template, instruction, ``<bos>`` / ``<eos>``), ``shape`` the release's
``<img_size_*> <img_ratio_*>`` tokens (any ids; :func:`build_ti2i_batch` takes them per image block).

What fills the slots (official ``modeling_hunyuan_image_3.py`` / ``tokenization_hunyuan_image_3.py`` of
Tencent-Hunyuan/HunyuanImage-3.0, read as reference text):

* condition image ``k``: its clean VAE latents ``[B, C, hc, wc]`` go through the SAME ``patch_embed`` as the
  target, conditioned on ``time_embed(0)`` (``vae_encode`` always uses ``t = 0`` for condition images); its
  ``<timestep>`` slot gets ``timestep_emb(0)`` (the release scatters ``cond_timestep`` = 0 there); its SigLIP2
  features (an input here: the ViT runs outside, ``[B, hv*wv, vit_dim]`` with ``vit_dim`` = 1152 in the
  release) go through ``vision_aligner`` (``mlp_gelu``: Linear, GELU(erf), Linear) into the ViT slots;
* target: ``patch_embed(latents, time_embed(t))``, ``<timestep>`` <- ``timestep_emb(t)``, ``<guidance>`` <-
  ``guidance_emb(guidance)`` and ``<timestep_r>`` <- ``timestep_r_emb(timestep_r)``, in that slot order;
* every other position: ``wte(input_ids)``.

2D RoPE (``build_2d_rope`` with ``cond_token_attn_type == "joint_full"``): every image block, the VAE block
and the ViT block of each condition image separately and the target block, is an ``h x w`` grid starting at
its first sequence index ``L``: ``y = floor(L + (h*w - h)/2) + row``, ``x = floor(L + (h*w - w)/2) + col``;
every other token (text, ``<boi>``, shape tokens, ``<timestep>``, ``<joint_img_sep>``, ``<eoi>``) has
``y = x = its sequence index``, so text after a block resumes at ``L + h*w``. The ViT grid is ``(hv, wv)`` =
the SigLIP2 patch grid of the condition image (the vision image info's ``token_height`` / ``token_width``),
tokens row-major in the order the features are given. The shared reference notes
(``shared/reference/hunyuan-image-3.md``) only say "each with its own 2D RoPE grid"; the grid shape and the
row-major order are taken from the official code. NOT modelled (the reference notes are silent and the
release code was not run here): SigLIP2 naflex padding patches; the ViT span must hold exactly ``hv * wv``
real tokens.

Attention mask (``_prepare_attention_mask_for_generation`` + ``prepare_full_attn_slices`` for
``cond_image_type == "vae_vit"``, ``"joint_full"``): causal everywhere, plus bidirectional inside each
condition image's JOINT span ``[first VAE token, last ViT token]`` (VAE tokens, ``<joint_img_sep>``, ViT
tokens; not its ``<boi>`` / shape / ``<timestep>`` / ``<eoi>``), plus bidirectional inside the target's
``<img>`` block. Two different condition images see each other only causally (the later one sees the
earlier one), exactly as the release builds one full block per joint slice. Padded keys are masked; a padded
query attends to itself (as in the T2I mask). Target image queries therefore see exactly the keys before the
end of the target block, so the mask is a :class:`T2IMask` and the GPU cuDNN split applies unchanged.

Instruct-Distil: ``guidance`` and ``timestep_r`` are the raw scalars fed to their TimestepEmbedders (the
same sinusoid + MLP as ``timestep_emb``). Which values the release's sampler feeds (the guidance scale and
its scaling; ``timestep_r`` = the next timestep of the schedule in the ports we read) is the caller's
business and is not verified here.

No PyTorch reference implements this path (nemo-automodel 0.7.0 has no image conditioning and no
guidance / timestep_r embeddings): the pieces nemo does have (``patch_embed`` with ``t = 0``, the
TimestepEmbedder) are tested against it, the rest (positions, mask, aligner, slot filling) against explicit
hand-computed cases (``tests/test_hunyuan_instruct.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config
from tmp_jax.models.hunyuan_image3.layout import T2IMask, block_positions
from tmp_jax.models.hunyuan_image3.model import rope_cos_sin, t2i_head


# ----------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TI2ILayout:
    """Static shapes of a TI2I batch (every row has the same image sizes; one compile per layout).

    ``target_hw``: target latent grid ``(h, w)``; ``cond_vae_hw[k]`` / ``cond_vit_hw[k]``: the VAE latent grid
    and the ViT patch grid of condition image ``k``. Per-row offsets are arrays (see :func:`ti2i_embed`).
    """

    target_hw: tuple[int, int]
    cond_vae_hw: tuple[tuple[int, int], ...] = ()
    cond_vit_hw: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_hw", tuple(int(v) for v in self.target_hw))
        object.__setattr__(self, "cond_vae_hw", tuple(tuple(int(v) for v in hw) for hw in self.cond_vae_hw))
        object.__setattr__(self, "cond_vit_hw", tuple(tuple(int(v) for v in hw) for hw in self.cond_vit_hw))
        if len(self.cond_vae_hw) != len(self.cond_vit_hw):
            raise ValueError(
                f"TI2ILayout: {len(self.cond_vae_hw)} VAE grids but {len(self.cond_vit_hw)} ViT grids "
                "(every condition image enters as VAE and ViT tokens)"
            )
        for hw in (self.target_hw, *self.cond_vae_hw, *self.cond_vit_hw):
            if len(hw) != 2 or min(hw) < 1:
                raise ValueError(f"TI2ILayout: every grid must be (h, w) with h, w >= 1, got {hw}")

    @property
    def num_cond(self) -> int:
        return len(self.cond_vae_hw)

    @property
    def num_target(self) -> int:
        return self.target_hw[0] * self.target_hw[1]

    def cond_lengths(self, k: int) -> tuple[int, int]:
        """(VAE tokens, ViT tokens) of condition image ``k``."""
        (hc, wc), (hv, wv) = self.cond_vae_hw[k], self.cond_vit_hw[k]
        return hc * wc, hv * wv


def num_target_slots(config: HunyuanImage3Config) -> int:
    """Scalar slots before the target ``<img>`` block: ``<timestep>`` [``<guidance>``] [``<timestep_r>``]."""
    return 1 + int(config.cfg_distilled) + int(config.use_meanflow)


def _spans(layout: TI2ILayout, cond_start: jax.Array) -> list[dict[str, Any]]:
    """Per condition image: first VAE index [B], first ViT index [B] and end of the joint span [B]."""
    out = []
    for k in range(layout.num_cond):
        n_vae, n_vit = layout.cond_lengths(k)
        vae = cond_start[:, k].astype(jnp.int32)
        vit = vae + n_vae + 1  # <joint_img_sep> sits between the two spans
        out.append({"vae": vae, "vit": vit, "end": vit + n_vit})
    return out


# ----------------------------------------------------------------------------------------------------------
# Positions and mask
# ----------------------------------------------------------------------------------------------------------
def ti2i_positions(seq_len: int, layout: TI2ILayout, target_start: jax.Array, cond_start: jax.Array) -> jax.Array:
    """``[B, S, 2]`` RoPE positions of a TI2I batch (VAE and ViT grids of every condition image, target)."""
    blocks = []
    for k, span in enumerate(_spans(layout, cond_start)):
        blocks.append((span["vae"], *layout.cond_vae_hw[k]))
        blocks.append((span["vit"], *layout.cond_vit_hw[k]))
    blocks.append((target_start, *layout.target_hw))
    return block_positions(seq_len, blocks)


def ti2i_attention_mask(
    seq_len: int, layout: TI2ILayout, target_start: jax.Array, cond_start: jax.Array, valid_lengths: jax.Array
) -> jax.Array:
    """``[B, 1, S, S]`` boolean mask (query, key): causal, bidirectional joint spans and target block.

    See the module docstring. With no condition image it equals
    :func:`tmp_jax.models.hunyuan_image3.layout.joint_attention_mask`.
    """
    index = jnp.arange(seq_len)
    causal = index[None, :] <= index[:, None]  # [q, k]
    spans = [(s["vae"], s["end"]) for s in _spans(layout, cond_start)]
    spans.append((target_start, target_start + layout.num_target))
    full = jnp.zeros((target_start.shape[0], seq_len, seq_len), bool)
    for lo, hi in spans:
        inside = (index[None, :] >= lo[:, None]) & (index[None, :] < hi[:, None])  # [B, S]
        full = full | (inside[:, :, None] & inside[:, None, :])  # [B, q, k]
    key_valid = index[None, :] < valid_lengths[:, None]  # [B, k]
    mask = (causal[None] | full) & key_valid[:, None, :]
    mask = mask | jnp.eye(seq_len, dtype=bool)[None]  # padded queries attend to themselves
    return mask[:, None]


# ----------------------------------------------------------------------------------------------------------
# Embedding and forward
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(
    model: Any,
    layout: TI2ILayout,
    latents: jax.Array,
    cond_start: jax.Array | None,
    cond_latents: Sequence[jax.Array],
    vit_features: Sequence[jax.Array],
    guidance: jax.Array | None,
    timestep_r: jax.Array | None,
) -> None:
    """Shape / presence checks on static information (they run under jit too)."""
    cfg: HunyuanImage3Config = model.config
    if tuple(latents.shape[2:]) != layout.target_hw:
        raise ValueError(f"latents grid {tuple(latents.shape[2:])} != layout.target_hw {layout.target_hw}")
    k = layout.num_cond
    if len(cond_latents) != k or len(vit_features) != k:
        raise ValueError(
            f"layout has {k} condition images; got {len(cond_latents)} cond_latents and "
            f"{len(vit_features)} vit_features"
        )
    if k:
        if model.vision_aligner is None:
            raise ValueError("condition images need the vision_aligner: build the model with config.ti2i=True")
        if cond_start is None or tuple(cond_start.shape) != (latents.shape[0], k):
            got = None if cond_start is None else tuple(cond_start.shape)
            raise ValueError(f"cond_start must be [B, {k}] (first VAE token of each condition image), got {got}")
        dim = model.vision_aligner.layers[0].in_features
        for i, (lat, vit) in enumerate(zip(cond_latents, vit_features)):
            want = (latents.shape[0], cfg.latent_channels, *layout.cond_vae_hw[i])
            if tuple(lat.shape) != want:
                raise ValueError(f"cond_latents[{i}] has shape {tuple(lat.shape)}, expected {want}")
            want = (latents.shape[0], layout.cond_lengths(i)[1], dim)
            if tuple(vit.shape) != want:
                raise ValueError(f"vit_features[{i}] has shape {tuple(vit.shape)}, expected {want} ([B, hv*wv, dim])")
    for name, value, on in (
        ("guidance", guidance, cfg.cfg_distilled),
        ("timestep_r", timestep_r, cfg.use_meanflow),
    ):
        flag = "cfg_distilled" if name == "guidance" else "use_meanflow"
        if on and value is None:
            raise ValueError(f"config.{flag} is set: the <{name}> slot needs `{name}` [B]")
        if not on and value is not None:
            raise ValueError(f"`{name}` given but config.{flag} is off (the model has no {name} embedder)")


def ti2i_embed(
    model: Any,
    input_ids: jax.Array,
    latents: jax.Array,
    timestep: jax.Array,
    *,
    layout: TI2ILayout,
    target_start: jax.Array,
    cond_start: jax.Array | None = None,
    cond_latents: Sequence[jax.Array] = (),
    vit_features: Sequence[jax.Array] = (),
    guidance: jax.Array | None = None,
    timestep_r: jax.Array | None = None,
    valid_lengths: jax.Array | None = None,
) -> dict[str, Any]:
    """Everything before the decoder layers of a TI2I forward; the same dict as ``model.t2i_embed``.

    Args:
        model: a :class:`~tmp_jax.models.hunyuan_image3.model.HunyuanImage3`.
        input_ids: [B, S] right-padded ids laid out as in the module docstring (:func:`build_ti2i_batch`).
        latents: [B, C, h, w] noisy target latents; ``timestep`` [B] = sigma * 1000.
        layout: the static image grids.
        target_start: [B] first target ``<img>`` index; the scalar slots sit right before it.
        cond_start: [B, K] first VAE token of each condition image (its ``<timestep>`` is at ``- 1``, its
            ``<joint_img_sep>`` right after the VAE span, the ViT span right after that).
        cond_latents: K clean VAE latents [B, C, hc, wc] (through ``patch_embed`` with t = 0).
        vit_features: K SigLIP2 features [B, hv*wv, vit_dim] (through ``vision_aligner``).
        guidance / timestep_r: [B] scalars for the ``<guidance>`` / ``<timestep_r>`` slots (required exactly
            when ``cfg_distilled`` / ``use_meanflow``).
        valid_lengths: [B] non-padding tokens per row (default: all).

    Returns:
        ``embeds`` [B, S, H], ``cos`` / ``sin`` [B, S, hd], ``mask`` (:class:`T2IMask`), ``token_mask`` [B, S],
        ``image_index`` [B, h*w] (the target slots, for ``t2i_head``).
    """
    _check_inputs(model, layout, latents, cond_start, cond_latents, vit_features, guidance, timestep_r)
    cfg: HunyuanImage3Config = model.config
    batch, seq_len = input_ids.shape
    n_target = layout.num_target
    rows = jnp.arange(batch)
    target_start = target_start.astype(jnp.int32)
    image_index = jnp.minimum(target_start[:, None] + jnp.arange(n_target)[None], seq_len - 1)  # [B, h*w]
    if valid_lengths is None:
        valid_lengths = jnp.full((batch,), seq_len, jnp.int32)
    if cond_start is None:
        cond_start = jnp.zeros((batch, 0), jnp.int32)

    # Same operations, in the same order, as t2i_embed for the target (bit-identical without conditions).
    embeds = model.model.wte(input_ids)  # [B, S, H]
    dtype = embeds.dtype
    image_tokens = model.patch_embed(latents.astype(dtype), model.time_embed(timestep))  # [B, h*w, H]
    timestep_tokens = model.timestep_emb(timestep)  # [B, H]
    embeds = embeds.at[rows[:, None], image_index].set(image_tokens.astype(dtype))
    slot = target_start - num_target_slots(cfg)  # [B] the target's <timestep>
    embeds = embeds.at[rows, slot].set(timestep_tokens.astype(dtype))
    if cfg.cfg_distilled:
        slot = slot + 1
        embeds = embeds.at[rows, slot].set(model.guidance_emb(guidance).astype(dtype))
    if cfg.use_meanflow:
        slot = slot + 1
        embeds = embeds.at[rows, slot].set(model.timestep_r_emb(timestep_r).astype(dtype))

    if layout.num_cond:
        clean = jnp.zeros((batch,), jnp.float32)  # condition images are clean: t = 0
        clean_time, clean_timestep = model.time_embed(clean), model.timestep_emb(clean).astype(dtype)  # [B, H]
        for k, span in enumerate(_spans(layout, cond_start)):
            n_vae, n_vit = layout.cond_lengths(k)
            vae_index = span["vae"][:, None] + jnp.arange(n_vae)[None]  # [B, hc*wc]
            vit_index = span["vit"][:, None] + jnp.arange(n_vit)[None]  # [B, hv*wv]
            cond_tokens = model.patch_embed(cond_latents[k].astype(dtype), clean_time)  # [B, hc*wc, H]
            embeds = embeds.at[rows[:, None], vae_index].set(cond_tokens.astype(dtype))
            embeds = embeds.at[rows, span["vae"] - 1].set(clean_timestep)
            vit_tokens = model.vision_aligner(vit_features[k].astype(dtype))  # [B, hv*wv, H]
            embeds = embeds.at[rows[:, None], vit_index].set(vit_tokens.astype(dtype))

    positions = ti2i_positions(seq_len, layout, target_start, cond_start)
    cos, sin = rope_cos_sin(positions, cfg.attention_head_dim, cfg.rope_theta)
    dense = ti2i_attention_mask(seq_len, layout, target_start, cond_start, valid_lengths)
    token_mask = jnp.arange(seq_len)[None, :] < valid_lengths[:, None]  # [B, S]
    return {
        "embeds": embeds,
        "cos": cos,
        "sin": sin,
        "mask": T2IMask(dense, target_start, n_target),
        "token_mask": token_mask,
        "image_index": image_index,
    }


def ti2i_forward(
    model: Any,
    input_ids: jax.Array,
    latents: jax.Array,
    timestep: jax.Array,
    *,
    layout: TI2ILayout,
    target_start: jax.Array,
    cond_start: jax.Array | None = None,
    cond_latents: Sequence[jax.Array] = (),
    vit_features: Sequence[jax.Array] = (),
    guidance: jax.Array | None = None,
    timestep_r: jax.Array | None = None,
    valid_lengths: jax.Array | None = None,
) -> jax.Array:
    """Velocity ``[B, C, h, w]`` of the target latents of a TI2I batch (arguments as :func:`ti2i_embed`).

    The layout of concrete ``input_ids`` is checked on the host (:func:`check_ti2i_layout`); under jit the
    caller is responsible for it, as for the T2I forward.
    """
    try:
        check_ti2i_layout(
            np.asarray(input_ids),
            model.config,
            layout,
            np.asarray(target_start),
            None if cond_start is None else np.asarray(cond_start),
        )
    except jax.errors.TracerArrayConversionError:
        pass
    e = ti2i_embed(
        model,
        input_ids,
        latents,
        timestep,
        layout=layout,
        target_start=target_start,
        cond_start=cond_start,
        cond_latents=cond_latents,
        vit_features=vit_features,
        guidance=guidance,
        timestep_r=timestep_r,
        valid_lengths=valid_lengths,
    )
    hidden = model.model(e["embeds"], e["cos"], e["sin"], e["mask"], e["token_mask"])  # before ln_f
    h, w = layout.target_hw
    return t2i_head(model.final_layer, model.time_embed_2, hidden, e["image_index"], timestep, h, w)


# ----------------------------------------------------------------------------------------------------------
# Host-side sequence builder and layout check
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TI2ITokens:
    """Ids of the special tokens the TI2I sequence needs beyond the config's ``<img>`` / ``<timestep>``.

    They come from the release tokenizer (``<boi>``, ``<eoi>``, ``<joint_img_sep>``, ``<guidance>``,
    ``<timestep_r>``); the config does not carry them.
    """

    boi: int
    eoi: int
    joint_img_sep: int
    guidance: int | None = None
    timestep_r: int | None = None


def build_ti2i_batch(
    config: HunyuanImage3Config,
    tokens: TI2ITokens,
    layout: TI2ILayout,
    segments: Sequence[Sequence[Sequence[int]]],
    shape_tokens: Sequence[Sequence[int]] | None = None,
    pad_to: int | None = None,
) -> dict[str, np.ndarray]:
    """Right-padded TI2I rows (module docstring layout) and the offsets :func:`ti2i_forward` needs.

    Args:
        config: model config (``<img>`` / ``<timestep>`` / pad ids, which scalar slots the target has).
        tokens: the other special ids.
        layout: image grids (the same for every row).
        segments: per row, ``K + 2`` text segments: before condition image 0, after each condition image,
            after the target (include ``<bos>`` / ``<eos>`` / chat template yourself).
        shape_tokens: ``K + 1`` id sequences placed between ``<boi>`` and ``<timestep>`` of each image block
            (condition images, then the target; the release's ``<img_size_*> <img_ratio_*>``); default none.
        pad_to: padded length (default: the longest row).

    Returns:
        ``input_ids`` [B, S] int32, ``target_start`` [B], ``cond_start`` [B, K], ``valid_lengths`` [B].
    """
    k = layout.num_cond
    shape_tokens = [()] * (k + 1) if shape_tokens is None else [tuple(s) for s in shape_tokens]
    if len(shape_tokens) != k + 1:
        raise ValueError(f"shape_tokens needs {k + 1} entries (one per image block), got {len(shape_tokens)}")
    slots = [config.timestep_token_id]
    for name, on in (("guidance", config.cfg_distilled), ("timestep_r", config.use_meanflow)):
        if on:
            tok = getattr(tokens, name)
            if tok is None:
                raise ValueError(f"config enables the <{name}> slot: TI2ITokens.{name} must be set")
            slots.append(tok)
    img = config.image_token_id
    rows, target_starts, cond_starts = [], [], []
    for r, segs in enumerate(segments):
        if len(segs) != k + 2:
            raise ValueError(f"row {r}: {len(segs)} text segments, expected {k + 2} (K + 2 with K = {k})")
        ids: list[int] = list(segs[0])
        starts = []
        for i in range(k):
            n_vae, n_vit = layout.cond_lengths(i)
            ids += [tokens.boi, *shape_tokens[i], config.timestep_token_id]
            starts.append(len(ids))
            ids += [img] * n_vae + [tokens.joint_img_sep] + [img] * n_vit + [tokens.eoi]
            ids += list(segs[i + 1])
        ids += [tokens.boi, *shape_tokens[k], *slots]
        target_starts.append(len(ids))
        ids += [img] * layout.num_target + [tokens.eoi] + list(segs[k + 1])
        rows.append(ids)
        cond_starts.append(starts)
    seq = max(map(len, rows)) if pad_to is None else pad_to
    if seq < max(map(len, rows)):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({max(map(len, rows))} tokens)")
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    input_ids = np.full((len(rows), seq), pad, np.int32)
    for b, ids in enumerate(rows):
        input_ids[b, : len(ids)] = ids
    return {
        "input_ids": input_ids,
        "target_start": np.asarray(target_starts, np.int32),
        "cond_start": np.asarray(cond_starts, np.int32).reshape(len(rows), k),
        "valid_lengths": np.asarray([len(r) for r in rows], np.int32),
    }


def check_ti2i_layout(
    input_ids: np.ndarray,
    config: HunyuanImage3Config,
    layout: TI2ILayout,
    target_start: np.ndarray,
    cond_start: np.ndarray | None,
    tokens: TI2ITokens | None = None,
) -> None:
    """Raise ValueError unless every row holds ``<img>`` ids in all image slots, ``<timestep>`` ids in the
    timestep slots and (with ``tokens``) the separator / guidance / timestep_r ids where the layout puts them,
    with the spans inside the sequence, in order and not overlapping (host-side)."""
    ids = np.asarray(input_ids)
    seq_len = ids.shape[1]
    img, ts = config.image_token_id, config.timestep_token_id
    n_slots = num_target_slots(config)
    bad: dict[int, str] = {}
    for b, row in enumerate(ids):
        checks: list[tuple[int, int, int | None, str]] = []  # (first index, length, expected id, what)
        end = 0
        for k in range(layout.num_cond):
            n_vae, n_vit = layout.cond_lengths(k)
            s = int(cond_start[b, k])
            if s - 1 < end:
                bad[b] = f"condition image {k} starts at {s}, overlapping what precedes it"
                break
            checks += [
                (s - 1, 1, ts, f"cond {k} <timestep>"),
                (s, n_vae, img, f"cond {k} VAE span"),
                (s + n_vae, 1, None if tokens is None else tokens.joint_img_sep, f"cond {k} <joint_img_sep>"),
                (s + n_vae + 1, n_vit, img, f"cond {k} ViT span"),
            ]
            end = s + n_vae + 1 + n_vit
        if b in bad:
            continue
        t = int(target_start[b])
        if t - n_slots < end:
            bad[b] = f"target block starts at {t}, overlapping the condition images"
            continue
        checks += [(t - n_slots, 1, ts, "target <timestep>"), (t, layout.num_target, img, "target span")]
        extra = []
        if config.cfg_distilled:
            extra.append(("guidance", None if tokens is None else tokens.guidance))
        if config.use_meanflow:
            extra.append(("timestep_r", None if tokens is None else tokens.timestep_r))
        for j, (name, tok) in enumerate(extra):
            checks.append((t - n_slots + 1 + j, 1, tok, f"target <{name}>"))
        for first, length, want, what in checks:
            if first < 0 or first + length > seq_len:
                bad[b] = f"{what} [{first}, {first + length}) lies outside the sequence of {seq_len}"
                break
            if want is not None and not np.all(row[first : first + length] == want):
                bad[b] = f"{what} at [{first}, {first + length}) does not hold id {want}"
                break
    if bad:
        detail = "; ".join(f"row {b}: {why}" for b, why in sorted(bad.items()))
        raise ValueError(f"TI2I layout mismatch: {detail}")


# ----------------------------------------------------------------------------------------------------------
# TI2I calibration micro-batches (the ``hunyuan`` arch's ``"ti2i"`` task hooks)
# ----------------------------------------------------------------------------------------------------------
# Format (docs/calibration-format.md, "TI2I micro-batches (HunyuanImage-3.0-Instruct)"); every row of a
# micro-batch has the same image grids (one static layout, read from the array shapes, so one compile each):
#   input_ids (B, S) int32, latents (B, C, h, w), timestep (B,) = sigma * 1000, valid_lengths (B,),
#   target_start (B,) int32, cond_start (B, K) int32 (K >= 1),
#   cond_latents_{k} (B, C, hc_k, wc_k) clean VAE latents, vit_features_{k} (B, hv_k, wv_k, vit_dim) SigLIP2
#   patch grid (row-major), guidance (B,) iff cfg_distilled, timestep_r (B,) iff use_meanflow.
TI2I_REQUIRED = ("input_ids", "latents", "timestep", "valid_lengths", "target_start", "cond_start")


def is_ti2i_batch(batch: dict[str, Any]) -> bool:
    return "cond_start" in batch


def prepare_ti2i_batch(config: HunyuanImage3Config, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """TI2I micro-batch -> model inputs (arrays only: the layout is read from their shapes); the token layout
    is checked on the host. ``mask`` (B, C, h): every output element is a target-image element."""
    missing = [k for k in TI2I_REQUIRED if k not in batch]
    if missing:
        raise ValueError(f"HunyuanImage TI2I batch: missing array {missing[0]!r} (needs {', '.join(TI2I_REQUIRED)})")
    ids = np.asarray(batch["input_ids"]).astype(np.int32)
    lat = np.asarray(batch["latents"], np.float32)
    if lat.ndim != 4 or lat.shape[1] != config.latent_channels:
        raise ValueError(
            f"HunyuanImage TI2I batch: latents must be (B, {config.latent_channels}, h, w), got {lat.shape}"
        )
    b = lat.shape[0]
    cs = np.asarray(batch["cond_start"]).astype(np.int32)
    if cs.ndim != 2 or cs.shape[0] != b or cs.shape[1] < 1:
        raise ValueError(f"HunyuanImage TI2I batch: cond_start must be (B={b}, K >= 1), got {cs.shape}")
    k = cs.shape[1]
    conds, vits = [], []
    for i in range(k):
        for name in (f"cond_latents_{i}", f"vit_features_{i}"):
            if name not in batch:
                raise ValueError(f"HunyuanImage TI2I batch: cond_start has {k} images but {name!r} is missing")
        c, v = np.asarray(batch[f"cond_latents_{i}"], np.float32), np.asarray(batch[f"vit_features_{i}"], np.float32)
        if c.ndim != 4 or c.shape[:2] != (b, config.latent_channels):
            raise ValueError(f"HunyuanImage TI2I batch: cond_latents_{i} must be (B, C, hc, wc), got {c.shape}")
        if v.ndim != 4 or v.shape[0] != b:
            raise ValueError(f"HunyuanImage TI2I batch: vit_features_{i} must be (B, hv, wv, vit_dim), got {v.shape}")
        conds.append(c)
        vits.append(v)

    def per_row(name: str, dtype: Any) -> np.ndarray:  # one value per batch row, (B,) or (B, 1)
        a = np.asarray(batch[name]).astype(dtype)
        if a.size != b:
            raise ValueError(f"HunyuanImage TI2I batch: {name!r} must hold one value per row (B={b},), got {a.shape}")
        return a.reshape(b)

    inputs: dict[str, Any] = {
        "input_ids": ids,
        "latents": lat,
        "timestep": per_row("timestep", np.float32),
        "valid_lengths": per_row("valid_lengths", np.int32),
        "target_start": per_row("target_start", np.int32),
        "cond_start": cs,
        "cond_latents": tuple(conds),
        "vit_features": tuple(vits),
        "mask": np.ones((b, lat.shape[1], lat.shape[2]), bool),
    }
    for name, on in (("guidance", config.cfg_distilled), ("timestep_r", config.use_meanflow)):
        if on and name not in batch:
            raise ValueError(f"HunyuanImage TI2I batch: the model's <{name}> slot needs the array {name!r} (B,)")
        if on:
            inputs[name] = per_row(name, np.float32)
    check_ti2i_layout(ids, config, ti2i_layout_of(inputs), inputs["target_start"], cs)
    return inputs


def ti2i_layout_of(inputs: dict[str, Any]) -> TI2ILayout:
    """The static layout of prepared TI2I inputs, from their array shapes (works on tracers)."""
    return TI2ILayout(
        target_hw=tuple(inputs["latents"].shape[2:]),
        cond_vae_hw=tuple(tuple(c.shape[2:]) for c in inputs["cond_latents"]),
        cond_vit_hw=tuple(tuple(v.shape[1:3]) for v in inputs["vit_features"]),
    )


def _ti2i_kwargs(inputs: dict[str, Any]) -> dict[str, Any]:
    return dict(
        layout=ti2i_layout_of(inputs),
        target_start=jnp.asarray(inputs["target_start"]),
        cond_start=jnp.asarray(inputs["cond_start"]),
        cond_latents=tuple(jnp.asarray(c) for c in inputs["cond_latents"]),
        vit_features=tuple(jnp.asarray(v).reshape(v.shape[0], -1, v.shape[-1]) for v in inputs["vit_features"]),
        guidance=None if inputs.get("guidance") is None else jnp.asarray(inputs["guidance"]),
        timestep_r=None if inputs.get("timestep_r") is None else jnp.asarray(inputs["timestep_r"]),
        valid_lengths=jnp.asarray(inputs["valid_lengths"]),
    )


def _model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if k not in ("mask", "task")}


def _forward_fn(gd: Any, state: Any, inputs: dict) -> jax.Array:
    model = nnx.merge(gd, state)
    return ti2i_forward(model, inputs["input_ids"], inputs["latents"], inputs["timestep"], **_ti2i_kwargs(inputs))


_forward_jit = jax.jit(_forward_fn, static_argnums=(0,))


def forward_ti2i(model: Any, inputs: dict[str, Any]) -> jax.Array:
    """Velocity (B, C, h, w) of the target on prepared TI2I inputs (whole-model jit; compiled per model graph,
    so evaluating candidates this way materialises each one: the correct, slower fallback path)."""
    gd, st = nnx.split(model)
    return _forward_jit(gd, st, _model_inputs(inputs))


def _stats_fn(gd: Any, state: Any, inputs: dict) -> tuple:
    model = nnx.merge(gd, state)
    out = ti2i_forward(model, inputs["input_ids"], inputs["latents"], inputs["timestep"], **_ti2i_kwargs(inputs))
    return out, nnx.pop(model, nnx.Intermediate)


_stats_jit = jax.jit(_stats_fn, static_argnums=(0,))


def collect_stats_ti2i(model: Any, inputs: dict[str, Any]) -> tuple[jax.Array, dict]:
    """Teacher output and the statistics the decoder layers sow on TI2I inputs (same keys as T2I)."""
    from tmp_jax.stats import flatten_intermediates, split_collecting

    gd, st = split_collecting(model)
    out, inter = _stats_jit(gd, st, _model_inputs(inputs))
    return out, flatten_intermediates(jax.device_get(inter))


def forward_train_ti2i(model: Any, inputs: dict[str, Any], remat: bool = True) -> tuple:
    """Traceable TI2I forward for distillation: (velocity [B, C, h, w], hidden states after every layer)."""
    from tmp_jax.models.hunyuan_image3.train import _layer_remat, _layer_train

    t = jnp.asarray(inputs["timestep"])
    e = ti2i_embed(model, jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["latents"]), t, **_ti2i_kwargs(inputs))
    call = _layer_remat if remat else _layer_train
    x, feats = e["embeds"], []
    for layer in model.model.layers:
        x, _ = call(layer, x, e["cos"], e["sin"], e["mask"], e["token_mask"])
        feats.append(x)
    h, w = inputs["latents"].shape[2:]
    return t2i_head(model.final_layer, model.time_embed_2, x, e["image_index"], t, h, w), feats


def synthetic_ti2i_calib(
    config: HunyuanImage3Config, n: int, batch: int = 4, seed: int = 0, tokens: TI2ITokens | None = None
) -> list[dict[str, np.ndarray]]:
    """Random TI2I micro-batches in the format above (tests / models without data): one condition image per
    row (tiny: VAE 2x3, ViT 2x2, target 2x2 latents; full size: 1024^2 -> 64x64 VAE, 32x32 ViT), text
    segments of random length, ``guidance`` / ``timestep_r`` when the config has those slots. ``tokens``: the
    release's ``<boi>`` / ``<eoi>`` / ... ids (default: the last non-special ids of the vocabulary)."""
    if config.vit_aligner is None:
        raise ValueError("synthetic TI2I batches need an Instruct config (vit_aligner: the ViT feature width)")
    rng = np.random.default_rng(seed)
    tiny = config.hidden_size < 1024
    side = config.image_base_size // config.vae_downsample_factor[0]
    layout = (
        TI2ILayout(target_hw=(2, 2), cond_vae_hw=((2, 3),), cond_vit_hw=((2, 2),))
        if tiny
        else TI2ILayout(target_hw=(side, side), cond_vae_hw=((side, side),), cond_vit_hw=((32, 32),))
    )
    ids = (config.image_token_id, config.timestep_token_id, config.pad_token_id, config.bos_token_id)
    special = {t for t in (*ids, config.eos_token_id) if t is not None}
    free = [i for i in range(config.vocab_size - 1, -1, -1) if i not in special]
    if tokens is None:
        tokens = TI2ITokens(*free[:5])
    vocab = np.setdiff1d(np.arange(config.vocab_size), [*special, *free[:5]])
    head = [] if config.bos_token_id is None else [config.bos_token_id]
    tail = [] if config.eos_token_id is None else [config.eos_token_id]
    lo, hi = (2, 6) if tiny else (16, 96)
    vit_dim = int(config.vit_aligner["input_dim"])
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        segs = [
            [head + rng.choice(vocab, int(rng.integers(lo, hi + 1))).tolist(), rng.choice(vocab, 2).tolist(), tail]
            for _ in range(b)
        ]
        # one padded length for every micro-batch of the set: one compile
        conds = sum(4 + sum(layout.cond_lengths(k)) for k in range(layout.num_cond))  # <boi> <ts> VAE <sep> ViT <eoi>
        pad_to = len(head) + hi + 2 + len(tail) + conds + 2 + num_target_slots(config) + layout.num_target
        rows = build_ti2i_batch(config, tokens, layout, segs, pad_to=pad_to)
        mb = {
            **rows,
            "latents": rng.standard_normal((b, config.latent_channels, *layout.target_hw)).astype(np.float32),
            "timestep": (1000.0 * rng.uniform(0.0, 1.0, b)).astype(np.float32),
            "cond_latents_0": rng.standard_normal((b, config.latent_channels, *layout.cond_vae_hw[0])).astype(
                np.float32
            ),
            "vit_features_0": rng.standard_normal((b, *layout.cond_vit_hw[0], vit_dim)).astype(np.float32),
        }
        if config.cfg_distilled:
            mb["guidance"] = (1000.0 * rng.uniform(1.0, 8.0, b)).astype(np.float32)
        if config.use_meanflow:
            mb["timestep_r"] = (mb["timestep"] * rng.uniform(0.0, 1.0, b)).astype(np.float32)
        out.append(mb)
    return out
