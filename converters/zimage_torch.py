"""Z-Image's PyTorch reference for ``converters.run_torch`` (registered by :mod:`converters.zimage`).

diffusers' ``ZImageTransformer2DModel`` (stock configs) or our per-block subclass
(``converters.remote.transformer_z_image_pruned``, imported from this package, never from the export folder),
built on the meta device; every quantised ``nn.Linear`` is swapped for a :class:`~converters.run_torch.QLinear`
before the strict ``load_state_dict(assign=True)``. Sampling: seeded caption features (the text encoder and VAE
are not part of an export's denoiser); the model predicts ``x0 - noise`` at ``t = 1 - sigma``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from converters.run_torch import Export, load_strict, swap_linears

VAE_DOWNSAMPLE = 8  # the Z-Image VAE downsamples by 8


def build_zimage(ex: Export, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The diffusers module of a Z-Image export with its (possibly quantised) weights, strictly loaded."""
    from diffusers import ZImageTransformer2DModel

    from converters.remote.transformer_z_image_pruned import ZImagePrunedTransformer2DModel

    conf = {k: v for k, v in ex.conf.items() if not k.startswith("_") and k not in ("auto_map", "quantization_config")}
    cls = ZImagePrunedTransformer2DModel if "auto_map" in ex.conf else ZImageTransformer2DModel
    with torch.device("meta"):
        model = cls.from_config(conf)
    swap_linears(model, ex.quantized)
    sd = {k: ex.tensor(k, dtype, device) for k in ex.reader.keys()}
    load_strict(model, sd, ex.folder)
    return model.eval()


def build(ex: Export, dtype: torch.dtype, device: torch.device, plan: dict[str, Any] | None) -> nn.Module:
    """``converters.run_torch``'s builder: everything is resident (a memory plan only checks the estimate)."""
    return build_zimage(ex, dtype, device)


def euler(
    ex: Export,
    model: nn.Module,
    *,
    resolution: int,
    text_tokens: int,
    seed: int,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, Callable[[torch.Tensor, float, float], torch.Tensor]]:
    """Seeded initial latents and one flow-matching Euler step (sigma -> next sigma) of ``model``."""
    conf = ex.conf
    hw = resolution // VAE_DOWNSAMPLE
    x = torch.randn((conf["in_channels"], 1, hw, hw), generator=generator).to(device)
    cap = torch.randn((text_tokens, conf["cap_feat_dim"]), generator=generator).to(device)
    wdt = model.x_pad_token.dtype

    def step(x: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
        out = model([x.to(wdt)], torch.full((1,), 1.0 - s, device=device), [cap.to(wdt)]).sample[0]  # x0 - noise
        return x - (s_next - s) * out.float()

    return x, step
