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
