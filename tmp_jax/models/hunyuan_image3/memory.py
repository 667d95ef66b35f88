"""HunyuanImage-3.0's inference memory model for ``converters.memory_plan`` (registered as the arch's
``memory_model``): the token counts of a denoising step, an upper bound on one decoder layer's live activations,
and which exported tensors stay on the GPU, in CPU RAM, or are not loaded by the denoiser.

Every tensor the T2I step needs is resident except ``model.wte`` (CPU RAM: a step needs only its prefix's rows)
and routed experts, which the plan may offload per layer; ``lm_head``, ``model.ln_f`` and the VAE / ViT tensors
are not loaded by the denoiser.
"""

from __future__ import annotations

import re
from typing import Any

_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def _per_layer(v: Any, i: int) -> int:
    return int(v[i]) if isinstance(v, list) else int(v)


def tokens(conf: dict[str, Any], resolution: int, text_tokens: int) -> tuple[int, int]:
    """(image tokens, sequence tokens) of one step at ``resolution`` with a ``text_tokens`` prompt."""
    down = conf.get("vae_downsample_factor", [16, 16])
    patch = conf.get("patch_size", 1)
    img = (resolution // down[0] // patch) * (resolution // down[1] // patch)
    return img, img + text_tokens + 3  # <timestep>, <boi>/<eoi> style specials


def activation_bytes(conf: dict[str, Any], seq: int, c: int) -> int:
    """Upper bound on the live activations of one decoder layer (batch 1, compute itemsize ``c``)."""
    h, hd = conf["hidden_size"], conf["attention_head_dim"]
    n, kv = conf["num_attention_heads"], conf["num_key_value_heads"]
    n_layers = conf["num_hidden_layers"]
    inter = max(_per_layer(conf["moe_intermediate_size"], i) for i in range(n_layers))
    shared = max(
        _per_layer(conf["moe_intermediate_size"], i) * _per_layer(conf["num_shared_expert"], i) for i in range(n_layers)
    )
    experts = max(_per_layer(conf["num_experts"], i) for i in range(n_layers))
    b = 0
    b += 4 * seq * h * c + 3 * seq * h * 4  # residual, normed, attention / MoE outputs; fp32 RMSNorm temporaries
    b += seq * (n + 2 * kv) * hd * c  # fused qkv
    b += 3 * (n + kv) * seq * hd * 4  # q, k rotated in fp32 (+ rotate_half temporaries)
    b += 2 * seq * hd * 4  # cos / sin tables
    b += seq * seq * (1 + c)  # boolean joint mask + the additive mask SDPA may build from it
    b += 2 * seq * n * hd * c  # attention output and its transposed copy
    b += 2 * seq * experts * 4 + seq * h * 4  # fp32 router logits / probabilities, fp32 router input
    b += 3 * seq * 2 * inter * c + 2 * seq * h * c + seq * h * 4  # one expert over (at most) every token; fp32 sum
    b += 3 * seq * 2 * shared * c  # shared expert
    return b


def not_loaded(key: str) -> bool:
    """Tensors of the export the denoising step never reads."""
    return key in ("lm_head.weight", "model.ln_f.weight") or key.startswith(
        ("vae.", "vision_model.", "vision_aligner.")
    )


def cpu_resident(key: str) -> bool:
    """Tensors kept in CPU RAM (a step reads only a few rows of them)."""
    return key == "model.wte.weight"


def expert_of(key: str) -> tuple[int, int] | None:
    """(layer, expert) of a routed expert's tensor, else None (the plan may offload these per layer)."""
    m = _EXPERT.match(key)
    return (int(m.group(1)), int(m.group(2))) if m else None
