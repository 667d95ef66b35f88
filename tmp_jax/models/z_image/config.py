"""Z-Image DiT configuration: the diffusers ``config.json`` keys, plus optional per-block widths.

The 16 stock fields are exactly those of ``diffusers.ZImageTransformer2DModel``. Pruned models add
per-stack lists (``layers_heads``, ``layers_ffn_dims``, ``layers_kept``, and the same for
``noise_refiner`` / ``context_refiner``): a pruned model is just another config and the unpruned one
is the special case where they are absent. A width of 0 means that sub-layer is skipped (its residual
branch removed).

Omni/Edit models (``siglip_feat_dim`` set) add a ``siglip_refiner`` stack of ``n_refiner_layers``
unmodulated blocks, like diffusers. It is not one of the prunable ``STACKS``: it always keeps
``n_refiner_layers`` full-width blocks, pruned or not (see ``structure.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ADALN_EMBED_DIM = 256  # hard-coded in diffusers: adaLN input width is min(dim, 256)
SEQ_MULTI_OF = 32  # every image/caption segment is padded to a multiple of 32 tokens
T_MID_DIM = 1024  # timestep-MLP middle width
STACKS = ("noise_refiner", "context_refiner", "layers")
SIGLIP_STACK = "siglip_refiner"  # omni only; never pruned (n_refiner_layers full-width blocks)
# Token counts of one forward that FLOP budgets (``--budget-kind flops``) use when the problem gives none
# (``tmp_jax.arch.default_tokens``): a 1024x1024 image (latent 128x128, patch 2 -> 4096 tokens) and a 512-token
# caption (the pipeline's max_sequence_length); the unified stream of the main layers is both.
DEFAULT_TOKENS = {"image": 4096, "caption": 512, "all": 4608}
STOCK_KEYS = (
    "all_patch_size",
    "all_f_patch_size",
    "in_channels",
    "dim",
    "n_layers",
    "n_refiner_layers",
    "n_heads",
    "n_kv_heads",
    "norm_eps",
    "qk_norm",
    "cap_feat_dim",
    "siglip_feat_dim",
    "rope_theta",
    "t_scale",
    "axes_dims",
    "axes_lens",
)
TUPLE_KEYS = {"all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"}
# Hugging Face / diffusers bookkeeping that a config.json may carry next to the fields: which class and
# library wrote it, where its remote code lives (our own heterogeneous exports write ``auto_map``), the weight
# dtype. None of it changes the network, so it is ignored on read, like every ``_``-prefixed key
# (``_class_name``, ``_diffusers_version``, ``_name_or_path``, ...). Anything else unknown is still an error.
HF_METADATA_KEYS = frozenset({"auto_map", "architectures", "transformers_version", "torch_dtype", "dtype"})


@dataclass(frozen=True)
class BlockSpec:
    """One transformer block of a stack: original index, attention heads and FFN width (0 = skipped)."""

    index: int
    heads: int
    ffn_dim: int


@dataclass(frozen=True)
class ZImageConfig:
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)
    # --- pruning extensions (None = stock/uniform) ---------------------------------------------
    layers_heads: tuple[int, ...] | None = None
    layers_ffn_dims: tuple[int, ...] | None = None
    layers_kept: tuple[int, ...] | None = None
    noise_refiner_heads: tuple[int, ...] | None = None
    noise_refiner_ffn_dims: tuple[int, ...] | None = None
    noise_refiner_kept: tuple[int, ...] | None = None
    context_refiner_heads: tuple[int, ...] | None = None
    context_refiner_ffn_dims: tuple[int, ...] | None = None
    context_refiner_kept: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for k in TUPLE_KEYS:
            object.__setattr__(self, k, tuple(int(v) for v in getattr(self, k)))
        for s in STACKS:
            for suffix in ("heads", "ffn_dims", "kept"):
                v = getattr(self, f"{s}_{suffix}")
                if v is not None:
                    object.__setattr__(self, f"{s}_{suffix}", tuple(int(x) for x in v))
        if len(self.all_patch_size) != len(self.all_f_patch_size):
            raise ValueError("all_patch_size and all_f_patch_size must have the same length")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim != sum(self.axes_dims):
            raise ValueError(
                f"head_dim = dim // n_heads = {self.head_dim} must equal sum(axes_dims) = {sum(self.axes_dims)}"
            )
        if any(d % 2 for d in self.axes_dims):
            raise ValueError(f"every axes_dims entry must be even (RoPE pairs), got {list(self.axes_dims)}")
        if len(self.axes_dims) != len(self.axes_lens):
            raise ValueError("axes_dims and axes_lens must have the same length")
        if len(self.axes_dims) != 3:
            raise ValueError(f"Z-Image uses 3 RoPE axes (f, h, w); got axes_dims={list(self.axes_dims)}")
        if self.layers_kept is not None and len(self.layers_kept) != self.n_layers:
            raise ValueError(f"n_layers={self.n_layers} but layers_kept lists {len(self.layers_kept)} blocks")
        for s in STACKS:
            n = self.stack_len(s)
            for suffix in ("heads", "ffn_dims", "kept"):
                v = getattr(self, f"{s}_{suffix}")
                if v is not None and len(v) != n:
                    raise ValueError(f"{s}_{suffix} has {len(v)} entries, but stack {s} has {n} blocks")
            for b in self.stack(s):
                if not 0 <= b.heads <= self.n_heads:
                    raise ValueError(f"{s} block {b.index}: heads={b.heads} must be in [0, {self.n_heads}]")
                if not 0 <= b.ffn_dim <= self.ffn_dim:
                    raise ValueError(f"{s} block {b.index}: ffn_dim={b.ffn_dim} must be in [0, {self.ffn_dim}]")
            kept = getattr(self, f"{s}_kept")
            if kept is not None and list(kept) != sorted(set(kept)):
                raise ValueError(f"{s}_kept must be strictly increasing original indices, got {list(kept)}")
        if self.siglip_feat_dim is not None and int(self.siglip_feat_dim) <= 0:
            raise ValueError(f"siglip_feat_dim must be a positive width or null, got {self.siglip_feat_dim}")

    # ---- derived -----------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Stock FFN hidden width, derived from dim in diffusers (10240 for Turbo)."""
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def is_pruned(self) -> bool:
        return any(getattr(self, f"{s}_{x}") is not None for s in STACKS for x in ("heads", "ffn_dims", "kept"))

    def stack_len(self, stack: str) -> int:
        if stack == SIGLIP_STACK:
            return self.n_refiner_layers if self.siglip_feat_dim is not None else 0
        kept = getattr(self, f"{stack}_kept")
        if kept is not None:
            return len(kept)
        return self.n_layers if stack == "layers" else self.n_refiner_layers

    def stack(self, stack: str) -> list[BlockSpec]:
        """The blocks of ``stack`` ('noise_refiner', 'context_refiner', 'layers', and 'siglip_refiner' for
        omni models, always full width) with their widths."""
        n = self.stack_len(stack)
        if stack == SIGLIP_STACK:
            return [BlockSpec(i, self.n_heads, self.ffn_dim) for i in range(n)]
        kept = getattr(self, f"{stack}_kept") or tuple(range(n))
        heads = getattr(self, f"{stack}_heads") or (self.n_heads,) * n
        ffn = getattr(self, f"{stack}_ffn_dims") or (self.ffn_dim,) * n
        return [BlockSpec(kept[i], heads[i], ffn[i]) for i in range(n)]

    def patch_keys(self) -> list[str]:
        return [f"{p}-{f}" for p, f in zip(self.all_patch_size, self.all_f_patch_size)]

    # ---- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> ZImageConfig:
        """Build from a diffusers ``config.json`` dict (keys starting with '_' and :data:`HF_METADATA_KEYS`
        are ignored). Per-block widths are the ``{stack}_heads`` / ``_ffn_dims`` / ``_kept`` lists, as
        :meth:`to_hf_config` and ``converters.export`` write them."""
        if "quantization_config" in d:  # int8 / fp8 weights + scales: the JAX model has no such layers
            raise ValueError(
                "quantization_config (a --quantize int8 / fp8 export) cannot be loaded into the JAX model: "
                "run it with python -m converters.run_torch, or export without --quantize"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if not k.startswith("_") and k not in names and k not in HF_METADATA_KEYS]
        if unknown:
            raise ValueError(f"config.json: unknown Z-Image field {unknown[0]!r} (known: {', '.join(STOCK_KEYS)})")
        kwargs = {k: v for k, v in d.items() if k in names}
        return cls(**kwargs)

    def to_hf_config(self, include_pruning: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in STOCK_KEYS:
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else v
        if include_pruning:
            for s in STACKS:
                for suffix in ("heads", "ffn_dims", "kept"):
                    v = getattr(self, f"{s}_{suffix}")
                    if v is not None:
                        out[f"{s}_{suffix}"] = list(v)
        return out

    def replace(self, **kw: Any) -> ZImageConfig:
        return dataclasses.replace(self, **kw)


TURBO = ZImageConfig(axes_lens=(1536, 512, 512))
TINY = ZImageConfig(
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=32,
    axes_dims=(8, 12, 12),
    axes_lens=(256, 64, 64),
)
