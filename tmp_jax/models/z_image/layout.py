"""Host-side layout of Z-Image batches: what diffusers' ``patchify_and_embed`` (T2I) and
``patchify_and_embed_omni`` + ``_build_unified_sequence`` (omni / TI2I) do before the first layer.

Ragged batches (different image sizes, caption lengths, condition images) are patchified and padded in numpy,
exactly like diffusers: every segment padded to 32 tokens by repeating its last row (the model replaces pad
rows by its pad tokens), samples right-padded to the batch maximum (masked), RoPE position ids per token, and
gather indices of the unified sequence. The dense part of the forward then runs jitted on these arrays
(:meth:`tmp_jax.models.z_image.model.ZImageTransformer.forward_padded` / ``forward_omni_padded``), and
:func:`unpatchify` / :func:`unpatchify_omni` turn its output tokens back into latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from tmp_jax.models.z_image.config import SEQ_MULTI_OF, ZImageConfig

# ----------------------------------------------------------------------------------------------
# Host-side layout of ragged batches (identical to diffusers' patchify_and_embed)


@dataclass
class Layout:
    """Padded arrays fed to :meth:`ZImageTransformer.forward_padded` plus what is needed to unpatchify."""

    arrays: dict[str, np.ndarray]
    sizes: list[tuple[int, int, int]]  # (F, H, W) per sample
    ori_lens: list[int]  # image tokens per sample before padding to 32
    patch_key: str

    @property
    def dense(self) -> bool:
        """No inter-sample padding (every sample the same length): attention needs no key mask."""
        return all(bool(np.all(self.arrays[k])) for k in ("img_valid", "cap_valid", "uni_valid"))


def _pad32(n: int) -> int:
    return (-n) % SEQ_MULTI_OF


def make_layout(
    cfg: ZImageConfig,
    x: list[np.ndarray],
    cap_feats: list[np.ndarray],
    patch_size: int = 2,
    f_patch_size: int = 1,
) -> Layout:
    """Patchify images, pad segments to 32 and samples to the batch max, build position ids / masks."""
    if len(x) != len(cap_feats):
        raise ValueError(f"got {len(x)} images but {len(cap_feats)} caption feature arrays")
    if not x:
        raise ValueError("empty batch")
    key = f"{patch_size}-{f_patch_size}"
    if key not in cfg.patch_keys():
        raise ValueError(f"patch size {key} not in the model's {cfg.patch_keys()}")
    pH = pW = patch_size
    pF = f_patch_size
    imgs, img_pos, img_pad, caps, cap_pos, cap_pad = [], [], [], [], [], []
    sizes, ori_lens = [], []
    for i, (im, cap) in enumerate(zip(x, cap_feats)):
        im = np.asarray(im)
        cap = np.asarray(cap)
        if im.ndim != 4 or im.shape[0] != cfg.in_channels:
            raise ValueError(f"x[{i}]: expected (C={cfg.in_channels}, F, H, W), got {im.shape}")
        if cap.ndim != 2 or cap.shape[1] != cfg.cap_feat_dim or cap.shape[0] == 0:
            raise ValueError(f"cap_feats[{i}]: expected (L>0, {cfg.cap_feat_dim}), got {cap.shape}")
        C, F, H, W = im.shape
        if F % pF or H % pH or W % pW:
            raise ValueError(f"x[{i}]: (F, H, W)={F, H, W} not divisible by patch ({pF}, {pH}, {pW})")
        # caption: positions (1 + k, 0, 0) for every token incl. its pad-to-32 tail
        L = cap.shape[0]
        cap_len = L + _pad32(L)
        caps.append(np.concatenate([cap, np.repeat(cap[-1:], cap_len - L, 0)], 0))
        cap_pos.append(np.stack([1 + np.arange(cap_len), np.zeros(cap_len), np.zeros(cap_len)], -1))
        cap_pad.append(np.arange(cap_len) >= L)
        # image: (C, F, H, W) -> (Ft*Ht*Wt, pF*pH*pW*C), channel fastest
        Ft, Ht, Wt = F // pF, H // pH, W // pW
        p = im.reshape(C, Ft, pF, Ht, pH, Wt, pW).transpose(1, 3, 5, 2, 4, 6, 0)
        p = p.reshape(Ft * Ht * Wt, pF * pH * pW * C)  # [tokens, patch_dim]
        n = p.shape[0]
        pad = _pad32(n)
        imgs.append(np.concatenate([p, np.repeat(p[-1:], pad, 0)], 0))
        f, h, w = np.meshgrid(np.arange(Ft), np.arange(Ht), np.arange(Wt), indexing="ij")
        pos = np.stack([cap_len + 1 + f.ravel(), h.ravel(), w.ravel()], -1)
        img_pos.append(np.concatenate([pos, np.zeros((pad, 3))], 0))
        img_pad.append(np.arange(n + pad) >= n)
        if cap_len + 1 + Ft > cfg.axes_lens[0] or Ht > cfg.axes_lens[1] or Wt > cfg.axes_lens[2]:
            raise ValueError(
                f"sample {i}: RoPE positions (f<{cap_len + 1 + Ft}, h<{Ht}, w<{Wt}) exceed axes_lens "
                f"{list(cfg.axes_lens)}"
            )
        sizes.append((F, H, W))
        ori_lens.append(n)

    def stack(items: list[np.ndarray], dtype: Any, fill: float = 0) -> tuple[np.ndarray, np.ndarray]:
        T = max(len(a) for a in items)
        out = np.full((len(items), T, *items[0].shape[1:]), fill, dtype)
        valid = np.zeros((len(items), T), bool)
        for b, a in enumerate(items):
            out[b, : len(a)] = a
            valid[b, : len(a)] = True
        return out, valid

    img_arr, img_valid = stack(imgs, np.asarray(x[0]).dtype)
    cap_arr, cap_valid = stack(caps, np.asarray(cap_feats[0]).dtype)
    img_pos_arr, _ = stack(img_pos, np.int32)
    cap_pos_arr, _ = stack(cap_pos, np.int32)
    img_pad_arr, _ = stack(img_pad, bool)
    cap_pad_arr, _ = stack(cap_pad, bool)
    # unified sequence per sample: [image tokens (padded to 32), caption tokens (padded to 32)],
    # as gather indices into concat([img, cap], axis=1).
    Lx = img_arr.shape[1]
    uni = [np.concatenate([np.arange(len(a)), Lx + np.arange(len(c))]) for a, c in zip(imgs, caps)]
    uni_idx, uni_valid = stack(uni, np.int32)
    arrays = {
        "img": img_arr,
        "img_pad": img_pad_arr,
        "img_valid": img_valid,
        "img_pos": img_pos_arr,
        "cap": cap_arr,
        "cap_pad": cap_pad_arr,
        "cap_valid": cap_valid,
        "cap_pos": cap_pos_arr,
        "uni_idx": uni_idx,
        "uni_valid": uni_valid,
    }
    return Layout(arrays, sizes, ori_lens, key)


def unpatchify(
    cfg: ZImageConfig, out: np.ndarray | jax.Array, layout: Layout, patch_size: int, f_patch_size: int
) -> list[jax.Array]:
    """(B, T, patch_dim) unified outputs -> list of (C, F, H, W) images (image tokens come first)."""
    p = (f_patch_size, patch_size, patch_size)
    return [
        _unpatch(out[b, :n], cfg.out_channels, size, p)
        for b, (size, n) in enumerate(zip(layout.sizes, layout.ori_lens))
    ]


def _unpatch(tok: Any, C: int, size: tuple[int, int, int], p: tuple[int, int, int]) -> Any:
    """(n, pF*pH*pW*C) tokens of one image -> (C, F, H, W) (inverse of the patchify in make_layout)."""
    (F, H, W), (pF, pH, pW) = size, p
    tok = tok.reshape(F // pF, H // pH, W // pW, pF, pH, pW, C)  # [Ft, Ht, Wt, pF, pH, pW, C]
    return tok.transpose(6, 0, 3, 1, 4, 2, 5).reshape(C, F, H, W)


def key_mask(valid: jax.Array) -> jax.Array:
    """A layout's ``*_valid`` (B, S) -> the (B, 1, 1, S) attention key mask (keys past each sample's length off).

    Valid tokens come first in every row :func:`make_layout` / :func:`make_omni_layout` build, so this is a
    prefix mask: :func:`tmp_jax.models.z_image.kernels.attention` passes it to cuDNN as key lengths.
    """
    return valid[:, None, None, :]  # [B, 1, 1, S]


# ----------------------------------------------------------------------------------------------
# Host-side layout of omni (TI2I) batches (identical to diffusers' patchify_and_embed_omni)


@dataclass
class OmniLayout:
    """Padded arrays fed to :meth:`ZImageTransformer.forward_omni_padded` plus the target's place.

    ``targets[b]`` = (offset of the target's first token in the unified sequence, its token count,
    its (F, H, W)); the target is the LAST non-None image of sample b (diffusers' rule).
    ``arrays`` holds ``img*`` / ``cap*`` (and ``sig*`` when SigLIP features are used) with ``*_noise``
    int32 per-token noise flags (1 = noisy), and ``uni_idx`` / ``uni_valid`` / ``uni_noise`` for the
    unified ``[caption, image, siglip]`` sequence gathered from ``concat([cap, img, sig], axis=1)``.
    """

    arrays: dict[str, np.ndarray]
    sizes: list[list[tuple[int, int, int] | None]]  # per sample, per image: (F, H, W) or None
    targets: list[tuple[int, int, tuple[int, int, int]]]
    patch_key: str


def _segment_pos(grid: tuple[int, int, int], start: tuple[int, int, int], pad: int) -> np.ndarray:
    """diffusers' ``_pad_with_ids`` positions: the grid from ``start`` (f, h, w order) + ``pad`` zero rows."""
    f, h, w = np.meshgrid(*(np.arange(s0, s0 + n) for s0, n in zip(start, grid)), indexing="ij")
    pos = np.stack([f.ravel(), h.ravel(), w.ravel()], -1)
    return np.concatenate([pos, np.zeros((pad, 3), pos.dtype)], 0).astype(np.int32)


def _stack_rows(items: list[np.ndarray], dtype: Any, tail: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad per-sample arrays to the batch max (zeros) -> (out, valid)."""
    T = max(len(a) for a in items)
    out = np.zeros((len(items), T, *tail), dtype)
    valid = np.zeros((len(items), T), bool)
    for b, a in enumerate(items):
        out[b, : len(a)] = a
        valid[b, : len(a)] = True
    return out, valid


def make_omni_layout(
    cfg: ZImageConfig,
    x: list[list[np.ndarray | None]],
    cap_feats: list[list[np.ndarray]],
    siglip_feats: list[list[np.ndarray | None] | None] | None,
    image_noise_mask: list[list[int]],
    patch_size: int = 2,
    f_patch_size: int = 1,
) -> OmniLayout:
    """Lay out an omni batch exactly like diffusers' ``patchify_and_embed_omni`` + ``_build_unified_sequence``.

    Per sample b: images ``x[b]`` (condition latents then the target, each (C, F, H, W) or None for an
    empty slot), caption segments ``cap_feats[b]`` (at least one per image), SigLIP features
    ``siglip_feats[b]`` (per image (H_s, W_s, siglip_feat_dim) or None), ``image_noise_mask[b]`` (one flag
    per image; 1 = noisy target, 0 = clean condition). Caption segment j takes image j's flag (1 beyond
    the images). Every segment is padded to 32 tokens with pad tokens. RoPE frame axis: caption j starts
    at ``s_j = 1 + sum_{k<j} (L_k + 2)``; image j sits at frame ``s_j + L_j``, its SigLIP tokens at
    ``s_j + L_j + 1`` with (h, w) rescaled onto the latent's (H, W) grid.

    Two diffusers details are mirrored on purpose so outputs agree: caption position ids are the first
    ``sum(padded lengths)`` rows of the per-segment ids concatenated, each segment contributing its
    padded grid PLUS its pad rows again (so later segments are shifted when a segment's length is not a
    multiple of 32); SigLIP features (H_s, W_s, C) are flattened as ``permute(2, 0, 1).reshape(H_s*W_s, C)``.
    SigLIP is used iff the model has ``siglip_feat_dim`` and ``siglip_feats[0]`` is not None.
    """
    B = len(x)
    if B == 0:
        raise ValueError("empty batch")
    if len(cap_feats) != B:
        raise ValueError(f"omni mode: got {B} image lists but {len(cap_feats)} caption segment lists")
    if image_noise_mask is None or len(image_noise_mask) != B:
        raise ValueError("omni mode needs image_noise_mask: one list of 0/1 flags per sample, one flag per image")
    key = f"{patch_size}-{f_patch_size}"
    if key not in cfg.patch_keys():
        raise ValueError(f"patch size {key} not in the model's {cfg.patch_keys()}")
    use_sig = cfg.siglip_feat_dim is not None and siglip_feats is not None and siglip_feats[0] is not None
    if use_sig and len(siglip_feats) != B:
        raise ValueError(f"siglip_feats has {len(siglip_feats)} entries for a batch of {B}")
    pH = pW = patch_size
    pF = f_patch_size
    pdim = pF * pH * pW * cfg.in_channels
    imgs, img_pos, img_pad, img_noise = [], [], [], []
    caps, cap_pos, cap_pad, cap_noise = [], [], [], []
    sigs, sig_pos, sig_pad, sig_noise = [], [], [], []
    sizes, targets = [], []
    for b in range(B):
        xs, cs, nm = list(x[b]), list(cap_feats[b]), [int(v) for v in image_noise_mask[b]]
        if not xs:
            raise ValueError(f"x[{b}]: an omni sample needs at least one image (the target)")
        if len(nm) != len(xs):
            raise ValueError(f"image_noise_mask[{b}] has {len(nm)} flags for {len(xs)} images")
        if len(cs) < len(xs):
            raise ValueError(f"cap_feats[{b}] has {len(cs)} segments, need at least one per image ({len(xs)})")
        # caption segments
        feats, pos, pad, noise, ends = [], [], [], [], []
        cu = 1
        for j, cap in enumerate(cs):
            cap = np.asarray(cap)
            if cap.ndim != 2 or cap.shape[1] != cfg.cap_feat_dim or cap.shape[0] == 0:
                raise ValueError(f"cap_feats[{b}][{j}]: expected (L>0, {cfg.cap_feat_dim}), got {cap.shape}")
            L = cap.shape[0]
            P = L + _pad32(L)
            feats.append(np.concatenate([cap, np.repeat(cap[-1:], P - L, 0)], 0))
            pos.append(_segment_pos((P, 1, 1), (cu, 0, 0), P - L))  # P + (P - L) rows: diffusers' layout
            pad.append(np.arange(P) >= L)
            noise += [nm[j] if j < len(nm) else 1] * P
            cu += L
            ends.append(cu)
            cu += 2  # room for this segment's VAE image and SigLIP frames
        n_cap = sum(len(f) for f in feats)
        caps.append(np.concatenate(feats, 0))
        cap_pos.append(np.concatenate(pos, 0)[:n_cap])
        cap_pad.append(np.concatenate(pad))
        cap_noise.append(np.asarray(noise, np.int32))
        # VAE image tokens
        feats, pos, pad, noise, sz = [], [], [], [], []
        cu_x, target = 0, None
        for j, im in enumerate(xs):
            if im is None:
                feats.append(np.zeros((SEQ_MULTI_OF, pdim), np.float32))
                pos.append(np.zeros((SEQ_MULTI_OF, 3), np.int32))
                pad.append(np.ones(SEQ_MULTI_OF, bool))
                noise += [nm[j]] * SEQ_MULTI_OF
                sz.append(None)
                cu_x += SEQ_MULTI_OF
                continue
            im = np.asarray(im)
            if im.ndim != 4 or im.shape[0] != cfg.in_channels:
                raise ValueError(f"x[{b}][{j}]: expected (C={cfg.in_channels}, F, H, W), got {im.shape}")
            C, F, H, W = im.shape
            if F % pF or H % pH or W % pW:
                raise ValueError(f"x[{b}][{j}]: (F, H, W)={F, H, W} not divisible by patch ({pF}, {pH}, {pW})")
            Ft, Ht, Wt = F // pF, H // pH, W // pW
            p = im.reshape(C, Ft, pF, Ht, pH, Wt, pW).transpose(1, 3, 5, 2, 4, 6, 0)
            p = p.reshape(Ft * Ht * Wt, pdim)  # [tokens, patch_dim], channel fastest
            n = p.shape[0]
            pd = _pad32(n)
            feats.append(np.concatenate([p, np.repeat(p[-1:], pd, 0)], 0))
            pos.append(_segment_pos((Ft, Ht, Wt), (ends[j], 0, 0), pd))
            pad.append(np.arange(n + pd) >= n)
            noise += [nm[j]] * (n + pd)
            sz.append((F, H, W))
            target = (cu_x, n, (F, H, W))
            cu_x += n + pd
        if target is None:
            raise ValueError(f"x[{b}]: every image is None; the last non-None image is the output")
        imgs.append(np.concatenate(feats, 0))
        img_pos.append(np.concatenate(pos, 0))
        img_pad.append(np.concatenate(pad))
        img_noise.append(np.asarray(noise, np.int32))
        sizes.append(sz)
        targets.append((n_cap + target[0], target[1], target[2]))
        # SigLIP tokens
        if use_sig:
            sf = siglip_feats[b]
            if sf is None or len(sf) != len(xs):
                raise ValueError(
                    f"siglip_feats[{b}]: expected a list with one entry (array or None) per image ({len(xs)}), "
                    f"got {'None' if sf is None else len(sf)}"
                )
            feats, pos, pad, noise = [], [], [], []
            for j, sg in enumerate(sf):
                if sg is None:
                    feats.append(np.zeros((SEQ_MULTI_OF, cfg.siglip_feat_dim), np.float32))
                    pos.append(np.zeros((SEQ_MULTI_OF, 3), np.int32))
                    pad.append(np.ones(SEQ_MULTI_OF, bool))
                    noise += [nm[j]] * SEQ_MULTI_OF
                    continue
                sg = np.asarray(sg)
                if sg.ndim != 3 or sg.shape[2] != cfg.siglip_feat_dim:
                    raise ValueError(f"siglip_feats[{b}][{j}]: expected (H, W, {cfg.siglip_feat_dim}), got {sg.shape}")
                sH, sW, sC = sg.shape
                flat = sg.transpose(2, 0, 1).reshape(sH * sW, sC)  # diffusers' flattening, kept as is
                n = flat.shape[0]
                pd = _pad32(n)
                feats.append(np.concatenate([flat, np.repeat(flat[-1:], pd, 0)], 0))
                ps = _segment_pos((1, sH, sW), (ends[j] + 1, 0, 0), pd)
                if sz[j] is not None:  # rescale (h, w) onto the latent grid, in fp32 then truncated like torch
                    pf = ps.astype(np.float32)
                    pf[:, 1] = pf[:, 1] / np.float32(max(sH - 1, 1)) * np.float32(sz[j][1] - 1)
                    pf[:, 2] = pf[:, 2] / np.float32(max(sW - 1, 1)) * np.float32(sz[j][2] - 1)
                    ps = pf.astype(np.int32)
                pos.append(ps)
                pad.append(np.arange(n + pd) >= n)
                noise += [nm[j]] * (n + pd)
            sigs.append(np.concatenate(feats, 0))
            sig_pos.append(np.concatenate(pos, 0))
            sig_pad.append(np.concatenate(pad))
            sig_noise.append(np.asarray(noise, np.int32))
    for b in range(B):
        for name, pp in (("caption", cap_pos[b]), ("image", img_pos[b]), ("siglip", sig_pos[b] if use_sig else None)):
            if pp is not None and (pp.max(0) >= np.asarray(cfg.axes_lens)).any():
                raise ValueError(
                    f"sample {b}: {name} RoPE positions up to {pp.max(0).tolist()} exceed axes_lens "
                    f"{list(cfg.axes_lens)}"
                )

    dt_x = next(np.asarray(v).dtype for v in x[0] if v is not None)
    dt_c = np.asarray(cap_feats[0][0]).dtype
    arrays: dict[str, np.ndarray] = {}
    streams = [("cap", caps, cap_pos, cap_pad, cap_noise, cfg.cap_feat_dim, dt_c)]
    streams.append(("img", imgs, img_pos, img_pad, img_noise, pdim, dt_x))
    if use_sig:
        dt_s = next(np.asarray(v).dtype for v in siglip_feats[0] if v is not None)
        streams.append(("sig", sigs, sig_pos, sig_pad, sig_noise, cfg.siglip_feat_dim, dt_s))
    uni, uni_noise = [[] for _ in range(B)], [[] for _ in range(B)]
    off = 0
    for name, feats, pos, pad, noise, width, dt in streams:
        arrays[name], arrays[f"{name}_valid"] = _stack_rows(feats, dt, (width,))
        arrays[f"{name}_pos"], _ = _stack_rows(pos, np.int32, (3,))
        arrays[f"{name}_pad"], _ = _stack_rows(pad, bool)
        arrays[f"{name}_noise"], _ = _stack_rows(noise, np.int32)
        for b in range(B):  # unified order: [caption, image, siglip]
            uni[b].append(off + np.arange(len(feats[b])))
            uni_noise[b].append(noise[b])
        off += arrays[name].shape[1]
    arrays["uni_idx"], arrays["uni_valid"] = _stack_rows([np.concatenate(u) for u in uni], np.int32)
    arrays["uni_noise"], _ = _stack_rows([np.concatenate(u) for u in uni_noise], np.int32)
    return OmniLayout(arrays, sizes, targets, key)


def unpatchify_omni(
    cfg: ZImageConfig, out: np.ndarray | jax.Array, layout: OmniLayout, patch_size: int, f_patch_size: int
) -> list[jax.Array]:
    """(B, T, patch_dim) unified omni outputs -> each sample's target (C, F, H, W)."""
    p = (f_patch_size, patch_size, patch_size)
    return [
        _unpatch(out[b, off : off + n], cfg.out_channels, size, p) for b, (off, n, size) in enumerate(layout.targets)
    ]
