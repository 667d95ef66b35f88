"""Shared helpers for Z-Image tests: tiny REAL diffusers models with every parameter randomised."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_KW = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=32,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 12, 12],
    axes_lens=[256, 64, 64],
)


def tiny_diffusers(seed: int = 0, **overrides):
    """A real ``ZImageTransformer2DModel`` with EVERY parameter randomised (norms and pad tokens too)."""
    import torch
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    m = ZImageTransformer2DModel(**{**TINY_KW, **overrides}).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 2 and "pad_token" not in name:  # Linear (out, in): well-conditioned random init
                p.copy_(r / p.shape[1] ** 0.5)
            elif "norm" in name:  # RMSNorm weights: random around 1 (the default 1 hides bugs)
                p.copy_(1.0 + 0.2 * r)
            else:  # biases and pad tokens (default 0 hides bugs)
                p.copy_(0.5 * r)
    return m


def save_diffusers(m, folder: Path, **kw) -> Path:
    m.save_pretrained(str(folder), **kw)
    return folder


def inputs(seed: int = 0, sizes=((8, 12), (12, 8)), cap_lens=(7, 40)):
    rng = np.random.default_rng(seed)
    x = [rng.standard_normal((16, 1, h, w)).astype(np.float32) for h, w in sizes]
    cap = [rng.standard_normal((n, 32)).astype(np.float32) for n in cap_lens]
    t = np.linspace(0.25, 0.625, len(sizes)).astype(np.float32)
    return x, t, cap


def torch_forward(m, x, t, cap):
    import torch

    with torch.no_grad():
        out = m([torch.from_numpy(v) for v in x], torch.from_numpy(t), [torch.from_numpy(c) for c in cap])
    return [o.numpy() for o in out.sample]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------------------------
# Omni / Edit (TI2I) inputs: nested per-sample lists, diffusers' pipeline layout

SIGLIP_DIM = 24


def omni_inputs(seed: int = 0, conds=((8, 12), (12, 8)), target=((8, 8), (12, 12)), cap_lens=None, siglip=True):
    """A ragged omni batch: sample b has ``len(conds[b])`` condition latents + a target.

    ``conds[b]``: list of (H, W) condition latent sizes (may be empty); captions: ``n_cond + 2`` segments
    like the pipeline's chat template (lengths from ``cap_lens[b]`` or random, incl. non-multiples of 32);
    SigLIP: per condition an (H_s, W_s, SIGLIP_DIM) grid, None for the target (pipeline layout); a
    sample without conditions gets ``[None]`` (diffusers cannot mix None samples into a SigLIP batch).
    """
    rng = np.random.default_rng(seed)
    conds = [list(c) if isinstance(c[0] if c else (), tuple) else [c] for c in conds]
    x, cap, sig, mask = [], [], [], []
    for b, cs in enumerate(conds):
        th, tw = target[b]
        x.append([rng.standard_normal((16, 1, h, w)).astype(np.float32) for h, w in cs])
        x[-1].append(rng.standard_normal((16, 1, th, tw)).astype(np.float32))
        lens = cap_lens[b] if cap_lens is not None else rng.integers(3, 45, len(cs) + 2).tolist()
        cap.append([rng.standard_normal((n, 32)).astype(np.float32) for n in lens])
        if siglip:
            sg = [
                rng.standard_normal((rng.integers(2, 6), rng.integers(2, 6), SIGLIP_DIM)).astype(np.float32) for _ in cs
            ]
            sig.append(sg + [None] if sg else [None])  # no condition: one empty SigLIP slot (32 pad tokens)
        mask.append([0] * len(cs) + [1])
    t = np.linspace(0.2, 0.7, len(conds)).astype(np.float32)
    return x, t, cap, (sig if siglip else None), mask


def torch_forward_omni(m, x, t, cap, sig, mask):
    import torch

    def tt(v):
        return None if v is None else torch.from_numpy(v)

    tsig = [None if s is None else [tt(v) for v in s] for s in sig] if sig is not None else [None] * len(x)
    with torch.no_grad():
        out = m(
            [[tt(v) for v in xs] for xs in x],
            torch.from_numpy(t),
            [[tt(c) for c in cs] for cs in cap],
            siglip_feats=tsig,
            image_noise_mask=mask,
        )
    return [o.numpy() for o in out.sample]
