"""Z-Image TI2I (Omni/Edit) calibration inputs: the micro-batch format, a synthetic generator, and
``prepare_batch`` for the omni path.

A TI2I micro-batch (docs/calibration-format.md, section "TI2I micro-batches") holds fixed-shape,
zero-padded arrays: the noised target, up to K clean condition latents with their sizes, S caption
segments with their lengths and, for models with ``siglip_feat_dim``, one SigLIP grid per condition.
:func:`model_args` turns it into exactly the nested lists diffusers' omni forward takes (the
pipeline's layout: conditions then the target, noise mask ``[0] * n + [1]``, SigLIP ``[s_1..s_n,
None]``), and :func:`prepare_batch` into the padded arrays of :func:`make_omni_layout` plus the loss
mask of the target's tokens. A micro-batch is TI2I iff it has ``cond_latents``
(:func:`is_ti2i_batch`); :func:`prepare_any` dispatches between this and the T2I runner.

Registered as the ``zimage`` arch's ``"ti2i"`` task hooks (``structure.HOOKS.tasks``), which calibration,
search and distillation pick per micro-batch by its task tag: :func:`prepare_batch`, :func:`collect_stats`
and :func:`forward` (whole-model jitted), :func:`forward_pruned` (the candidate evaluation on the permuted
teacher: prefix slices inside the T2I runner's per-sub-layer jitted functions, zero recompiles after
warm-up), :func:`forward_masked` (the same at full width, decisions as masks: :mod:`tmp_jax.masked_eval`),
:func:`forward_train` (the traceable distillation forward) and :func:`synthetic_ti2i_calib`.
:func:`batch_from_args` is the inverse of :func:`model_args` (the dump script records diffusers' omni
arguments with it).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax import aot
from tmp_jax.models.z_image.config import ZImageConfig
from tmp_jax.models.z_image.layout import key_mask, make_omni_layout
from tmp_jax.models.z_image.model import ZImageTransformer
from tmp_jax.stats import flatten_intermediates, split_collecting

REQUIRED = ("latents", "t", "cond_latents", "cond_sizes", "cap_feats", "cap_lens")
SIGLIP_KEYS = ("siglip_feats", "siglip_sizes")


def is_ti2i_batch(batch: dict[str, np.ndarray]) -> bool:
    return "cond_latents" in batch


def _check(cfg: ZImageConfig, batch: dict[str, np.ndarray]) -> None:
    missing = [k for k in REQUIRED if k not in batch]
    if missing:
        raise ValueError(f"TI2I batch: missing array {missing[0]!r} (needs {', '.join(REQUIRED)})")
    lat, cond, csz = batch["latents"], batch["cond_latents"], batch["cond_sizes"]
    cap, lens = batch["cap_feats"], batch["cap_lens"]
    B = lat.shape[0]
    if lat.ndim != 5 or lat.shape[1] != cfg.in_channels:
        raise ValueError(f"TI2I batch: latents must be (B, {cfg.in_channels}, F, H, W), got {lat.shape}")
    if cond.ndim != 6 or cond.shape[:3] != (B, cond.shape[1], cfg.in_channels):
        raise ValueError(f"TI2I batch: cond_latents must be (B, K, {cfg.in_channels}, F, H, W), got {cond.shape}")
    if csz.shape != (B, cond.shape[1], 2):
        raise ValueError(f"TI2I batch: cond_sizes must be (B, K, 2) = {(B, cond.shape[1], 2)}, got {csz.shape}")
    if cap.ndim != 4 or cap.shape[0] != B or cap.shape[3] != cfg.cap_feat_dim:
        raise ValueError(f"TI2I batch: cap_feats must be (B, S, L, {cfg.cap_feat_dim}), got {cap.shape}")
    if lens.shape != cap.shape[:2]:
        raise ValueError(f"TI2I batch: cap_lens must be (B, S) = {cap.shape[:2]}, got {lens.shape}")
    if np.asarray(batch["t"]).shape != (B,):
        raise ValueError(f"TI2I batch: t must be (B,) = ({B},), got {np.asarray(batch['t']).shape}")
    has_sig = [k in batch for k in SIGLIP_KEYS]
    if any(has_sig) and not all(has_sig):
        raise ValueError("TI2I batch: siglip_feats and siglip_sizes go together")
    if all(has_sig):
        sf, ss = batch["siglip_feats"], batch["siglip_sizes"]
        if sf.ndim != 5 or sf.shape[:2] != cond.shape[:2]:
            raise ValueError(
                f"TI2I batch: siglip_feats must be (B, K, H_s, W_s, D) with K={cond.shape[1]}, got {sf.shape}"
            )
        if ss.shape != (B, cond.shape[1], 2):
            raise ValueError(f"TI2I batch: siglip_sizes must be (B, K, 2), got {ss.shape}")
        if cfg.siglip_feat_dim is not None and sf.shape[4] != cfg.siglip_feat_dim:
            raise ValueError(
                f"TI2I batch: siglip_feats width {sf.shape[4]}, model siglip_feat_dim {cfg.siglip_feat_dim}"
            )


def model_args(cfg: ZImageConfig, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """A TI2I micro-batch -> diffusers' omni forward arguments (``x``, ``t``, ``cap_feats``,
    ``siglip_feats``, ``image_noise_mask``), nested per-sample lists of numpy arrays."""
    _check(cfg, batch)
    lat, cond, csz = batch["latents"], batch["cond_latents"], batch["cond_sizes"]
    cap, lens = batch["cap_feats"], np.asarray(batch["cap_lens"])
    sig = batch.get("siglip_feats")
    ssz = batch.get("siglip_sizes")
    x, caps, sigs, masks = [], [], [], []
    for b in range(lat.shape[0]):
        n = int(np.count_nonzero(csz[b, :, 0]))
        if n == 0:
            raise ValueError(f"TI2I batch: sample {b} has no condition image (put T2I samples in T2I micro-batches)")
        if np.count_nonzero(csz[b, n:, 0]) or (csz[b, :n] <= 0).any():
            raise ValueError(f"TI2I batch: cond_sizes[{b}] must list its conditions first, each (H, W) > 0")
        xs = []
        for j in range(n):
            H, W = (int(v) for v in csz[b, j])
            if H > cond.shape[4] or W > cond.shape[5]:
                raise ValueError(f"TI2I batch: cond_sizes[{b}][{j}] = {(H, W)} exceeds cond_latents' {cond.shape[4:]}")
            xs.append(cond[b, j, :, :, :H, :W])
        x.append([*xs, lat[b]])
        masks.append([0] * n + [1])
        segs = [int(v) for v in lens[b]]
        k = next((i for i, v in enumerate(segs) if v == 0), len(segs))
        if any(segs[k:]) or k < n + 1:
            raise ValueError(
                f"TI2I batch: cap_lens[{b}] = {segs}: need >= {n + 1} leading non-empty segments (n conditions + 1)"
            )
        caps.append([cap[b, i, : segs[i]] for i in range(k)])
        if sig is not None:
            ss = []
            for j in range(n):
                h, w = (int(v) for v in ssz[b, j])
                if h <= 0 or w <= 0 or h > sig.shape[2] or w > sig.shape[3]:
                    raise ValueError(f"TI2I batch: siglip_sizes[{b}][{j}] = {(h, w)} is not inside {sig.shape[2:4]}")
                ss.append(sig[b, j, :h, :w])
            sigs.append([*ss, None])  # the target has no SigLIP features (pipeline layout)
    return {
        "x": x,
        "t": np.asarray(batch["t"], np.float32),
        "cap_feats": caps,
        "siglip_feats": sigs if sig is not None else None,
        "image_noise_mask": masks,
    }


def prepare_batch(cfg: ZImageConfig, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """TI2I micro-batch -> omni model inputs: ``arrays`` (:func:`make_omni_layout`), ``t``,
    ``patch_key`` and ``mask`` (B, T_unified): True on the target image's real tokens (the loss
    tokens; conditions, captions, SigLIP and pad tokens are excluded)."""
    a = model_args(cfg, batch)
    layout = make_omni_layout(cfg, a["x"], a["cap_feats"], a["siglip_feats"], a["image_noise_mask"])
    T = layout.arrays["uni_idx"].shape[1]
    mask = np.zeros((len(a["x"]), T), bool)
    for b, (off, n, _) in enumerate(layout.targets):
        mask[b, off : off + n] = True
    return {"arrays": layout.arrays, "t": a["t"], "patch_key": layout.patch_key, "mask": mask}


def prepare_any(cfg: ZImageConfig, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """T2I or TI2I micro-batch -> model inputs (TI2I iff the batch has ``cond_latents``)."""
    if is_ti2i_batch(batch):
        return prepare_batch(cfg, batch)
    from tmp_jax.models.z_image import runner

    return runner.prepare_batch(cfg, batch)


def is_omni_inputs(inputs: dict[str, Any]) -> bool:
    """Prepared inputs of the omni path (``uni_noise`` present) rather than T2I."""
    return "uni_noise" in inputs["arrays"]


def synthetic_ti2i_calib(
    cfg: ZImageConfig, n: int, batch: int = 4, seed: int = 0, max_cond: int = 2
) -> list[dict[str, np.ndarray]]:
    """Random TI2I micro-batches in the format above (tests / models without data).

    Each sample has 1..max_cond condition latents of varying size, ``n_cond + 2`` caption segments
    (the Omni pipeline's chat template) of varying length and, when the model has
    ``siglip_feat_dim``, one SigLIP grid per condition.
    """
    rng = np.random.default_rng(seed)
    tiny = cfg.dim < 1024
    hw = 8 if tiny else 128  # target latent side (1024^2 / 8 at full size)
    sides = (4, 8, 12) if tiny else (64, 96, 128)
    L, D = (12, cfg.cap_feat_dim) if tiny else (256, cfg.cap_feat_dim)
    sg = 4 if tiny else 32  # SigLIP grid side (patch tokens)
    out = []
    for i in range(0, n, batch):
        B = min(batch, n - i)
        K, S = max_cond, max_cond + 2
        ncond = rng.integers(1, max_cond + 1, B)
        cond = np.zeros((B, K, cfg.in_channels, 1, max(sides), max(sides)), np.float32)
        csz = np.zeros((B, K, 2), np.int32)
        cap = np.zeros((B, S, L, D), np.float32)
        lens = np.zeros((B, S), np.int32)
        for b in range(B):
            for j in range(ncond[b]):
                h, w = rng.choice(sides, 2)
                cond[b, j, :, :, :h, :w] = rng.standard_normal((cfg.in_channels, 1, h, w))
                csz[b, j] = (h, w)
            for s in range(ncond[b] + 2):
                lens[b, s] = rng.integers(1, L + 1)
                cap[b, s, : lens[b, s]] = rng.standard_normal((lens[b, s], D))
        mb = {
            "latents": rng.standard_normal((B, cfg.in_channels, 1, hw, hw)).astype(np.float32),
            "t": rng.uniform(0.0, 1.0, B).astype(np.float32),
            "cond_latents": cond,
            "cond_sizes": csz,
            "cap_feats": cap,
            "cap_lens": lens,
        }
        if cfg.siglip_feat_dim is not None:
            sf = np.zeros((B, K, sg, sg, cfg.siglip_feat_dim), np.float32)
            ssz = np.zeros((B, K, 2), np.int32)
            for b in range(B):
                for j in range(ncond[b]):
                    h, w = rng.integers(2, sg + 1, 2)
                    sf[b, j, :h, :w] = rng.standard_normal((h, w, cfg.siglip_feat_dim))
                    ssz[b, j] = (h, w)
            mb["siglip_feats"], mb["siglip_sizes"] = sf, ssz
        out.append(mb)
    return out


# ----------------------------------------------------------------------------------------------
# Running prepared omni inputs (whole-model jit; the lead wires these into calibration / search)


@partial(jax.jit, static_argnums=(0, 4))
def _forward_jit(gd: Any, state: Any, arrays: dict, t: jax.Array, pk: str) -> jax.Array:
    return nnx.merge(gd, state).forward_omni_padded(arrays, t, pk)


def forward(model: ZImageTransformer, inputs: dict[str, Any]) -> jax.Array:
    """(B, T_unified, patch_dim) omni output on prepared inputs (read the target through ``mask``)."""
    gd, st = nnx.split(model)
    return _forward_jit(gd, st, inputs["arrays"], jnp.asarray(inputs["t"]), inputs["patch_key"])


@partial(jax.jit, static_argnums=(0, 4))
def _stats_jit(gd: Any, state: Any, arrays: dict, t: jax.Array, pk: str) -> tuple:
    model = nnx.merge(gd, state)
    out = model.forward_omni_padded(arrays, t, pk)
    return out, nnx.pop(model, nnx.Intermediate)


def collect_stats(model: ZImageTransformer, inputs: dict[str, Any]) -> tuple[jax.Array, dict]:
    """Teacher output and the sown importance statistics on omni inputs (same keys as T2I's runner,
    plus ``siglip_refiner`` ones, which the tree ignores: those blocks are unprunable)."""
    gd, st = split_collecting(model)
    out, inter = _stats_jit(gd, st, inputs["arrays"], jnp.asarray(inputs["t"]), inputs["patch_key"])
    return out, flatten_intermediates(inter)


def _call_block(blk: nnx.Module, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array, c: Any) -> jax.Array:
    return blk(x, mask, cos, sin, c)


_remat_block = nnx.remat(_call_block)


def forward_train(model: ZImageTransformer, inputs: dict[str, Any], remat: bool = True) -> tuple:
    """Omni counterpart of the T2I runner's ``forward_train`` (distillation): (B, T_unified, patch_dim)
    output and the list of main-block outputs, every block rematerialised. Traceable (no host work)."""
    a = inputs["arrays"]
    pk = inputs.get("patch_key", model.config.patch_keys()[0])
    call = _remat_block if remat else _call_block
    e = model.embed_omni(a, jnp.asarray(inputs["t"]), pk)
    img, cap, sig = e["img"], e["cap"], e.get("sig")
    for blk in model.noise_refiner:
        img = call(blk, img, a["img_valid"][:, None, None, :], *e["img_cs"], e["img_cond"])
    for blk in model.context_refiner:
        cap = call(blk, cap, a["cap_valid"][:, None, None, :], *e["cap_cs"], None)
    if sig is not None:
        for blk in model.siglip_refiner:
            sig = call(blk, sig, a["sig_valid"][:, None, None, :], *e["sig_cs"], None)
    x, cos, sin, mask, cond = model.unify_omni(a, img, cap, sig, e)
    feats = []
    for blk in model.layers:
        x = call(blk, x, mask, cos, sin, cond)
        feats.append(x)
    return model.all_final_layer[pk](x, cond), feats


# ----------------------------------------------------------------------------------------------
# Candidate evaluation on the permuted teacher (the T2I runner's per-sub-layer jitted functions)


class _OmniStem(nnx.Module):
    """View of everything outside the prunable blocks on the omni path: the T2I stem plus the SigLIP
    embedder, pad token and refiner (unprunable: the same full blocks for every candidate)."""

    _embed_stream = ZImageTransformer._embed_stream  # what ``embed_omni`` calls on its ``self``

    def __init__(self, m: ZImageTransformer):
        from tmp_jax.models.z_image.runner import _Stem

        stem = _Stem(m)
        for k in ("t_embedder", "all_x_embedder", "all_final_layer", "cap_embedder", "x_pad_token", "cap_pad_token"):
            setattr(self, k, getattr(stem, k))
        self.config = stem.config.replace(siglip_feat_dim=m.config.siglip_feat_dim)
        if m.config.siglip_feat_dim is not None:
            self.siglip_embedder = m.siglip_embedder
            self.siglip_pad_token = m.siglip_pad_token
            self.siglip_refiner = m.siglip_refiner


@partial(jax.jit, static_argnums=(0, 4))
def _omni_stem(gd: Any, state: Any, arrays: dict, t: jax.Array, pk: str) -> dict:
    """Omni embeddings + the (full, unprunable) SigLIP refiner: everything before the prunable stacks."""
    stem = nnx.merge(gd, state)
    e = ZImageTransformer.embed_omni(stem, arrays, t, pk)
    if "sig" in e:
        sig, m_sig = e["sig"], key_mask(arrays["sig_valid"])
        for blk in stem.siglip_refiner:
            sig = blk(sig, m_sig, *e["sig_cs"])
        e["sig"] = sig
    return e


@jax.jit
def _unify_omni(arrays: dict, img: jax.Array, cap: jax.Array, sig: Any, e: dict) -> tuple:
    return ZImageTransformer.unify_omni(None, arrays, img, cap, sig, e)


@partial(jax.jit, static_argnums=(0, 4))
def _final_omni(gd: Any, state: Any, x: jax.Array, cond: tuple, pk: str) -> jax.Array:
    return nnx.merge(gd, state).all_final_layer[pk](x, cond)


def forward_pruned(
    model: ZImageTransformer, tree: Any, a: Any, inputs: dict[str, Any], refits: Any = None
) -> jax.Array:
    """The candidate ``a`` of the PERMUTED teacher on omni inputs, evaluated without building it.

    Same result as ``forward(materialize(model, tree, a), inputs)``: the prunable blocks run through the T2I
    runner's per-sub-layer functions (as in :func:`tmp_jax.models.z_image.runner.forward_pruned`: the
    teacher's full sub-layer state sliced to the kept prefix inside the jit, compiled once per sub-layer kind
    and width), with omni's per-token ``(c_noisy, c_clean, noise)`` conditioning; the stem, SigLIP refiner,
    unify and final layer are width-free and compiled once per input shape."""
    from tmp_jax.models.z_image.runner import PrunedStacks

    stacks = PrunedStacks(model, tree, a, refits)
    arrs, t, pk = inputs["arrays"], jnp.asarray(inputs["t"]), inputs["patch_key"]
    gd, st = nnx.split(_OmniStem(model))
    e = aot.call(_omni_stem, gd, st, arrs, t, pk)
    run = stacks.run
    m_img, m_cap = key_mask(jnp.asarray(arrs["img_valid"])), key_mask(jnp.asarray(arrs["cap_valid"]))
    img = run("noise_refiner", e["img"], m_img, *e["img_cs"], e["img_cond"])
    cap = run("context_refiner", e["cap"], m_cap, *e["cap_cs"], None)
    x, cos, sin, mask, cond = aot.call(_unify_omni, arrs, img, cap, e.get("sig"), e)
    x = run("layers", x, mask, cos, sin, cond)
    return aot.call(_final_omni, gd, st, x, cond, pk)


def forward_masked(model: ZImageTransformer, m: Any, inputs: dict[str, Any]) -> jax.Array:
    """Candidate ``m`` (a :class:`tmp_jax.masked_eval.MaskView`) of the PERMUTED teacher on omni inputs,
    traceable: :meth:`ZImageTransformer.forward_omni_padded` with the prunable stacks run by the T2I runner's
    :func:`~tmp_jax.models.z_image.runner.masked_stack` (head / channel masks, branch gates); the SigLIP
    refiner is unprunable and runs in full. Same result as :func:`forward_pruned`."""
    from tmp_jax.models.z_image.runner import masked_stack

    a, t, pk = inputs["arrays"], jnp.asarray(inputs["t"]), inputs["patch_key"]
    e = model.embed_omni(a, t, pk)
    img, cap, sig = e["img"], e["cap"], e.get("sig")
    img = masked_stack(model, "noise_refiner", m, img, key_mask(a["img_valid"]), *e["img_cs"], e["img_cond"])
    cap = masked_stack(model, "context_refiner", m, cap, key_mask(a["cap_valid"]), *e["cap_cs"], None)
    if sig is not None:
        m_sig = key_mask(a["sig_valid"])
        for blk in model.siglip_refiner:
            sig = blk(sig, m_sig, *e["sig_cs"])
    x, cos, sin, mask, cond = model.unify_omni(a, img, cap, sig, e)
    x = masked_stack(model, "layers", m, x, mask, cos, sin, cond)
    return model.all_final_layer[pk](x, cond)


# ----------------------------------------------------------------------------------------------
# Recording: diffusers' omni forward arguments -> one TI2I micro-batch


def batch_from_args(
    x: list[list[np.ndarray]],
    t: np.ndarray,
    cap_feats: list[list[np.ndarray]],
    siglip_feats: list[list[np.ndarray | None]] | None,
    image_noise_mask: list[list[int]],
) -> dict[str, np.ndarray]:
    """diffusers' omni forward arguments (nested per-sample lists, numpy) -> a TI2I micro-batch.

    The inverse of :func:`model_args` for the pipeline's layout: per sample, clean conditions first, the
    noisy target last (``image_noise_mask[b] == [0] * n + [1]``), ``siglip_feats[b]`` = ``[s_1..s_n, None]``
    (or None). Zero-pads to the largest condition / segment / SigLIP grid of the batch."""
    B = len(x)
    if not (len(cap_feats) == len(image_noise_mask) == B) or np.asarray(t).reshape(-1).shape != (B,):
        raise ValueError(f"omni arguments: x, t, cap_feats and image_noise_mask must have {B} samples each")
    for b, m in enumerate(image_noise_mask):
        if len(m) != len(x[b]) or list(m) != [0] * (len(m) - 1) + [1] or len(m) < 2:
            raise ValueError(f"omni arguments: image_noise_mask[{b}] = {list(m)}: expected [0] * n + [1] with n >= 1")
    conds = [xs[:-1] for xs in x]
    K = max(len(c) for c in conds)
    S = max(len(c) for c in cap_feats)
    C, F = x[0][-1].shape[:2]
    Hc = max(c.shape[2] for cs in conds for c in cs)
    Wc = max(c.shape[3] for cs in conds for c in cs)
    L = max(seg.shape[0] for segs in cap_feats for seg in segs)
    D = cap_feats[0][0].shape[1]
    cond = np.zeros((B, K, C, F, Hc, Wc), np.float32)
    csz = np.zeros((B, K, 2), np.int32)
    cap = np.zeros((B, S, L, D), np.float32)
    lens = np.zeros((B, S), np.int32)
    for b in range(B):
        for j, c in enumerate(conds[b]):
            cond[b, j, :, :, : c.shape[2], : c.shape[3]] = c
            csz[b, j] = c.shape[2:4]
        for j, seg in enumerate(cap_feats[b]):
            cap[b, j, : seg.shape[0]] = seg
            lens[b, j] = seg.shape[0]
    out = {
        "latents": np.stack([np.asarray(xs[-1], np.float32) for xs in x]),
        "t": np.asarray(t, np.float32).reshape(-1),
        "cond_latents": cond,
        "cond_sizes": csz,
        "cap_feats": cap,
        "cap_lens": lens,
    }
    if siglip_feats is not None and any(s is not None for s in siglip_feats):
        if any(s is None for s in siglip_feats):
            raise ValueError("omni arguments: siglip_feats must be given for every sample or for none")
        grids = [g for s in siglip_feats for g in s[:-1]]
        if any(g is None for g in grids) or any(s[-1] is not None for s in siglip_feats):
            raise ValueError("omni arguments: siglip_feats[b] must be one grid per condition, then None (target)")
        Hs, Ws = max(g.shape[0] for g in grids), max(g.shape[1] for g in grids)
        sf = np.zeros((B, K, Hs, Ws, grids[0].shape[2]), np.float32)
        ssz = np.zeros((B, K, 2), np.int32)
        for b, s in enumerate(siglip_feats):
            for j, g in enumerate(s[:-1]):
                sf[b, j, : g.shape[0], : g.shape[1]] = g
                ssz[b, j] = g.shape[:2]
        out["siglip_feats"], out["siglip_sizes"] = sf, ssz
    return out
