"""Z-Image's inference memory model for ``converters.memory_plan`` (registered as the arch's ``memory_model``):
the token counts of a denoising step and an upper bound on one block's live activations. Everything is
resident (no experts), so the plan only checks the estimate against the target.
"""

from __future__ import annotations

from typing import Any


def tokens(conf: dict[str, Any], resolution: int, text_tokens: int) -> tuple[int, int]:
    """(image tokens, sequence tokens) of one step at ``resolution`` with a ``text_tokens`` caption."""
    p = (conf.get("all_patch_size") or [2])[0]
    img = (resolution // 8 // p) ** 2  # the VAE downsamples by 8
    return img, img + -(-text_tokens // 32) * 32  # captions are padded to a multiple of 32


def activation_bytes(conf: dict[str, Any], seq: int, c: int) -> int:
    """Upper bound on the live activations of one block (batch 1, compute itemsize ``c``)."""
    d = conf["dim"]
    ffn = int(d / 3 * 8)
    for s in ("noise_refiner", "context_refiner", "layers"):
        ffn = max([ffn, *(conf.get(f"{s}_ffn_dims") or [])])
    b = 0
    b += 4 * seq * d * c + 3 * seq * d * 4  # residual / normed / branch outputs, fp32 RMSNorm temporaries
    b += 3 * seq * d * c + 2 * 2 * seq * d * 4  # q, k, v; q / k rotated as complex fp32
    b += 2 * seq * d * c  # attention output (+ copy)
    b += 3 * seq * ffn * c  # w1, w3 outputs and their product
    b += 2 * seq * d * 4  # unified / padded sequences, fp32 modulation temporaries
    return b


def not_loaded(key: str) -> bool:
    return False


def cpu_resident(key: str) -> bool:
    return False


def expert_of(key: str) -> tuple[int, int] | None:
    return None
