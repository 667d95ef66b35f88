"""Configuration of the HunyuanImage-3.0 MoE transformer (``model_type`` ``hunyuan_image_3_moe``).

Field names are exactly the keys of the released ``config.json`` so
:meth:`HunyuanImage3Config.from_hf_config` is a filter plus normalisation: the four MoE fields that the
official code accepts either as a scalar or as a per-layer list (``num_experts``, ``moe_topk``,
``moe_intermediate_size``, ``num_shared_expert``) are always stored as tuples of length
``num_hidden_layers`` here, which is what a pruned checkpoint writes back. ``image_token_id`` /
``timestep_token_id`` come from the tokenizer of the release (nemo-automodel carries them in its config
too). The VAE / ViT sub-configs are not part of the denoiser; only ``vae["latent_channels"]`` is used.

Pruning extension: ``layers_kept`` lists the ORIGINAL indices of the decoder layers a pruned model keeps
(layer ``i`` of the pruned model is layer ``layers_kept[i]`` of the source). It is written to config.json
only when set and is ignored by the official code (which simply reads ``num_hidden_layers`` contiguous
layers). A pruned config may keep zero layers (``layers_kept == ()``).

Instruct (TI2I) / Instruct-Distil fields, all off by default (the base T2I model, today's behaviour), written
by :meth:`HunyuanImage3Config.to_hf_config` only when set so existing config dicts and fingerprints are
unchanged: ``cfg_distilled`` (adds the ``guidance_emb`` embedder and a ``<guidance>`` slot), ``use_meanflow``
(adds ``timestep_r_emb`` and a ``<timestep_r>`` slot), ``cond_image_type`` / ``cond_token_attn_type`` (the
release's ``"vae_vit"`` / ``"joint_full"``; kept so they round-trip, checked when the TI2I path is built) and
``vit_aligner`` (the release's aligner sub-config ``{projector_type, input_dim, n_embed, depth}``). The
extension flag ``ti2i`` (ours, not read by the official code) ports ``vision_aligner`` into the model; without
it the aligner stays a passthrough key of the converter, as the T2I denoiser does not use it (see
:mod:`tmp_jax.models.hunyuan_image3.instruct`).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The four MoE fields that may be per-layer lists in config.json.
PER_LAYER_FIELDS: tuple[str, ...] = ("num_experts", "moe_topk", "moe_intermediate_size", "num_shared_expert")

# Token counts of one forward that FLOP budgets (``--budget-kind flops``) use when the problem gives none
# (``tmp_jax.arch.default_tokens``): the release's T2I sequence for a 1024x1024 image -- VAE /16, patch 1:
# 64x64 = 4096 ``<img>`` tokens -- a 128-token prompt (``converters.memory_plan``'s default ``--text-tokens``) and
# the five specials ``<boi> <img_size> <img_ratio> <timestep> <eoi>``. It is ONE joint sequence: every layer runs
# over all of it (Z-Image's image / caption refiners see only their own stream).
DEFAULT_TOKENS = {"all": 4096 + 128 + 5}

_GROUPNORM_GROUPS = 32  # the UNet patch_embed / final_layer use GroupNorm(32, channels)
# Instruct / Instruct-Distil fields (and the ti2i extension) written to config.json only when set.
_INSTRUCT_FIELDS: tuple[str, ...] = (
    "cfg_distilled",
    "use_meanflow",
    "cond_image_type",
    "cond_token_attn_type",
    "vit_aligner",
    "ti2i",
)


def _freeze(value: Any) -> Any:
    """Recursively turn dicts into read-only mappings and lists into tuples (frozen, hashable config)."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Inverse of :func:`_freeze`, for writing config.json."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class HunyuanImage3Config:
    """HunyuanImage-3.0 backbone + T2I heads; defaults are the released 80B model (see :data:`FULL`)."""

    vocab_size: int = 133120
    hidden_size: int = 4096
    intermediate_size: int = 3072
    moe_intermediate_size: tuple[int, ...] | int = 3072
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    attention_head_dim: int = 128
    num_experts: tuple[int, ...] | int = 64
    moe_topk: tuple[int, ...] | int = 8
    num_shared_expert: tuple[int, ...] | int = 1
    use_mixed_mlp_moe: bool = True
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    use_qk_norm: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    max_position_embeddings: int = 22800
    tie_word_embeddings: bool = False
    img_proj_type: str = "unet"
    patch_size: int = 1
    patch_embed_hidden_dim: int = 1024
    image_base_size: int = 1024
    vae_downsample_factor: tuple[int, ...] = (16, 16)
    image_token_id: int = 128006
    timestep_token_id: int = 128017
    pad_token_id: int | None = 128009
    bos_token_id: int | None = 127958
    eos_token_id: int | None = 127957
    # Only "latent_channels" is read; the rest of the VAE sub-config is kept so it round-trips. Excluded
    # from the hash (a mapping is unhashable) but not from equality.
    vae: Mapping[str, Any] = field(default_factory=lambda: {"latent_channels": 32}, hash=False)
    # --- pruning extension (None = unpruned): original indices of the kept decoder layers -------------------
    layers_kept: tuple[int, ...] | None = None
    # --- Instruct (TI2I) / Instruct-Distil fields of the release (defaults: the base T2I model) ---------------
    cfg_distilled: bool = False  # guidance_emb + <guidance> slot
    use_meanflow: bool = False  # timestep_r_emb + <timestep_r> slot
    cond_image_type: str | None = None  # release: "vae_vit"
    cond_token_attn_type: str | None = None  # release: "joint_full"
    # The release's aligner sub-config (projector_type mlp_gelu, input_dim 1152, n_embed 4096, depth 2); hash
    # excluded like ``vae``.
    vit_aligner: Mapping[str, Any] | None = field(default=None, hash=False)
    # --- extension: build the TI2I conditioning path (vision_aligner) into the model -------------------------
    ti2i: bool = False

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.layers_kept is not None:
            object.__setattr__(self, "layers_kept", tuple(int(i) for i in self.layers_kept))
        min_layers = 0 if self.layers_kept is not None else 1  # a pruned model may drop every layer
        if not isinstance(n, int) or n < min_layers:
            what = "a non-negative" if min_layers == 0 else "a positive"
            raise ValueError(f"num_hidden_layers must be {what} int, got {n!r}")
        if self.layers_kept is not None:
            kept = self.layers_kept
            if len(kept) != n:
                raise ValueError(f"layers_kept lists {len(kept)} layers but num_hidden_layers is {n}")
            if list(kept) != sorted(set(kept)) or (kept and kept[0] < 0):
                raise ValueError(f"layers_kept must be strictly increasing original indices, got {list(kept)}")
        for name in PER_LAYER_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if len(value) != n:
                    raise ValueError(f"{name} has {len(value)} entries but num_hidden_layers is {n}")
                values = tuple(int(v) for v in value)
            else:
                values = (int(value),) * n
            object.__setattr__(self, name, values)
        object.__setattr__(self, "vae", _freeze(dict(self.vae)))
        if self.vit_aligner is not None:
            object.__setattr__(self, "vit_aligner", _freeze(dict(self.vit_aligner)))
        object.__setattr__(self, "vae_downsample_factor", tuple(self.vae_downsample_factor))
        self._validate()

    def _validate(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU experts), got {self.hidden_act!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not divisible by num_key_value_heads "
                f"({self.num_key_value_heads}): the fused qkv_proj needs equal query heads per KV group"
            )
        if self.attention_head_dim % 4:
            raise ValueError(f"attention_head_dim ({self.attention_head_dim}) must be divisible by 4 for the 2D RoPE")
        for name, channels in (
            ("hidden_size", self.hidden_size),
            ("patch_embed_hidden_dim", self.patch_embed_hidden_dim),
        ):
            if channels % _GROUPNORM_GROUPS:
                raise ValueError(f"{name} ({channels}) must be a multiple of 32 (GroupNorm(32) in the UNet heads)")
        if self.img_proj_type != "unet" or self.patch_size != 1:
            raise ValueError(
                f"only the released UNet image projection with patch_size 1 is implemented "
                f"(got img_proj_type={self.img_proj_type!r}, patch_size={self.patch_size})"
            )
        if not self.norm_topk_prob:
            raise ValueError("norm_topk_prob=False is not supported: the official eager MoE always renormalises top-k")
        if self.attention_bias or self.mlp_bias:
            raise ValueError("attention_bias / mlp_bias are not supported (the release has no backbone biases)")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=True is not supported (the release has separate wte / lm_head)")
        if "latent_channels" not in self.vae:
            raise ValueError("vae must contain 'latent_channels'")
        for layer in range(self.num_hidden_layers):
            e, k = self.num_experts[layer], self.moe_topk[layer]
            if e < 1:
                raise ValueError(f"num_experts[{layer}] = {e}: every layer needs at least one routed expert")
            if not 1 <= k <= e:
                raise ValueError(f"moe_topk[{layer}] = {k} must be in [1, num_experts[{layer}] = {e}]")
            if self.moe_intermediate_size[layer] < 1:
                raise ValueError(f"moe_intermediate_size[{layer}] = {self.moe_intermediate_size[layer]} must be >= 1")
            if self.num_shared_expert[layer] < 0:
                raise ValueError(f"num_shared_expert[{layer}] = {self.num_shared_expert[layer]} must be >= 0")
        for name in ("image_token_id", "timestep_token_id"):
            token = getattr(self, name)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"{name} ({token}) is outside the vocabulary [0, {self.vocab_size})")
        if self.ti2i:
            self._validate_ti2i()

    def _validate_ti2i(self) -> None:
        """The TI2I path implements the release's conditioning: VAE + ViT tokens, jointly bidirectional."""
        if self.cond_image_type not in (None, "vae_vit"):
            raise ValueError(f"ti2i: cond_image_type must be 'vae_vit' (the release), got {self.cond_image_type!r}")
        if self.cond_token_attn_type not in (None, "joint_full"):
            raise ValueError(
                f"ti2i: cond_token_attn_type must be 'joint_full' (the release), got {self.cond_token_attn_type!r}"
            )
        va = self.vit_aligner
        if va is None:
            raise ValueError("ti2i needs vit_aligner = {projector_type, input_dim, n_embed, depth} (release config)")
        if va.get("projector_type") != "mlp_gelu":
            raise ValueError(f"vit_aligner.projector_type must be 'mlp_gelu', got {va.get('projector_type')!r}")
        depth, dim, n_embed = va.get("depth"), va.get("input_dim"), va.get("n_embed")
        if not isinstance(depth, int) or depth < 1 or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"vit_aligner needs a positive int depth and input_dim, got {dict(va)!r}")
        if n_embed != self.hidden_size:
            raise ValueError(f"vit_aligner.n_embed ({n_embed}) must equal hidden_size ({self.hidden_size})")

    @property
    def latent_channels(self) -> int:
        """VAE latent channels (the image tokens' input / output channels)."""
        return int(self.vae["latent_channels"])

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim

    @property
    def q_per_kv(self) -> int:
        """Query heads per KV group."""
        return self.num_attention_heads // self.num_key_value_heads

    def shared_intermediate_size(self, layer: int) -> int:
        """Shared-expert width of ``layer``: ``moe_intermediate_size[l] * num_shared_expert[l]`` (0: none)."""
        if not self.use_mixed_mlp_moe:
            return 0
        return self.moe_intermediate_size[layer] * self.num_shared_expert[layer]

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> HunyuanImage3Config:
        """Build from a config.json dict; unknown keys are ignored, known ones validated, and a
        ``quantization_config`` (a ``--quantize`` export) is refused.

        ``head_dim`` is accepted as an alias of ``attention_head_dim``; ``rope_scaling.type`` must be
        ``custom`` and ``moe_layer_num_skipped`` must be 0 (what the official code can run as released).
        """
        if "quantization_config" in hf:  # int8 / fp8 weights + scales: the JAX model has no such layers
            raise ValueError(
                "quantization_config (a --quantize int8 / fp8 export) cannot be loaded into the JAX model: "
                "run it with python -m converters.run_torch, or export without --quantize"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in known}
        if "attention_head_dim" not in kwargs and hf.get("head_dim") is not None:
            kwargs["attention_head_dim"] = hf["head_dim"]
        elif hf.get("head_dim") is not None and hf["head_dim"] != kwargs["attention_head_dim"]:
            raise ValueError(f"head_dim ({hf['head_dim']}) != attention_head_dim ({kwargs['attention_head_dim']})")
        if "model_type" in hf and hf["model_type"] not in ("hunyuan_image_3_moe", "Hunyuan"):
            raise ValueError(f"model_type {hf['model_type']!r} is not a HunyuanImage-3.0 config")
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling is not None and rope_scaling.get("type", rope_scaling.get("rope_type")) != "custom":
            raise ValueError(f"rope_scaling must have type 'custom' (the 2D RoPE), got {rope_scaling!r}")
        if hf.get("rope_type", "2d") not in ("2d", "default"):
            raise ValueError(f"rope_type must be '2d', got {hf['rope_type']!r}")
        if hf.get("moe_layer_num_skipped", 0):
            raise ValueError("moe_layer_num_skipped > 0 (dense leading layers) is not supported")
        if isinstance(kwargs.get("eos_token_id"), (list, tuple)):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (per-layer fields as lists); merge into the original config.

        ``layers_kept`` appears only when set (pruned models)."""
        out = {f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if out["layers_kept"] is None:  # pruning extension: only written for pruned models
            del out["layers_kept"]
        for name in _INSTRUCT_FIELDS:  # only when set: T2I config dicts (and their fingerprints) are unchanged
            if out[name] in (None, False):
                del out[name]
        return out

    def replace(self, **changes: Any) -> HunyuanImage3Config:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


# The released 80B checkpoint (tencent/HunyuanImage-3.0).
FULL = HunyuanImage3Config()

# The tiny config used against nemo-automodel's reference on CPU (hidden and patch dims multiples of 32).
TINY = HunyuanImage3Config(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=32,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    attention_head_dim=16,
    num_experts=4,
    moe_topk=2,
    num_shared_expert=1,
    patch_embed_hidden_dim=32,
    image_token_id=100,
    timestep_token_id=101,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    max_position_embeddings=512,
    vae={"latent_channels": 32},
)
