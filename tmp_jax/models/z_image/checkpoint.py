"""Z-Image checkpoints: the diffusers key table (used in both directions), ComfyUI single-file input, the config
reader and save (:func:`tmp_jax.models.z_image.model.load_zimage` loads). ``converters.zimage`` re-exports them.

Every key is generated from the (possibly pruned, per-block) config, so expected shapes are computed,
never guessed. Transposes: every ``*.weight`` of a Linear is stored ``(out, in)`` in PyTorch and as a
``kernel`` ``(in, out)`` here; nothing else is transposed (norm weights, biases and pad tokens are
identical on both sides).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tmp_jax.models.z_image.config import SIGLIP_STACK, T_MID_DIM, ZImageConfig
from tmp_jax.safetensors_io import (
    CheckpointError,
    Entry,
    KeyTable,
    SafetensorsReader,
    TensorInfo,
    linear,
    same,
    save_model,
)
from tmp_jax.safetensors_io import (
    read_config as engine_read_config,
)

DIFFUSERS_VERSION = "0.42.1"
WEIGHTS_PREFIX = "diffusion_pytorch_model"


def _path(key: str) -> tuple[str | int, ...]:
    """diffusers key -> NNX state path (digits become list indices; Linear 'weight' is renamed later)."""
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def _lin(prefix: str, out_f: int, in_f: int, bias: bool = True) -> list[Entry]:
    p = _path(prefix)
    es = [linear(f"{prefix}.weight", (*p, "kernel"), (out_f, in_f))]
    if bias:
        es.append(same(f"{prefix}.bias", (*p, "bias"), (out_f,)))
    return es


def _norm(prefix: str, dim: int) -> Entry:
    return same(f"{prefix}.weight", (*_path(prefix), "weight"), (dim,))


def zimage_key_table(cfg: ZImageConfig) -> KeyTable:
    """The complete diffusers <-> NNX table for ``cfg`` (blocks renumbered contiguously per stack)."""
    d, hd = cfg.dim, cfg.head_dim
    es: list[Entry] = [
        same("x_pad_token", ("x_pad_token",), (1, d)),
        same("cap_pad_token", ("cap_pad_token",), (1, d)),
    ]
    for k, p, f in zip(cfg.patch_keys(), cfg.all_patch_size, cfg.all_f_patch_size):
        n = p * p * f * cfg.in_channels
        es += _lin(f"all_x_embedder.{k}", d, n)
        es += _lin(f"all_final_layer.{k}.linear", n, d)
        es += _lin(f"all_final_layer.{k}.adaLN_modulation.1", d, cfg.adaln_dim)
    es += _lin("t_embedder.mlp.0", T_MID_DIM, 256)
    es += _lin("t_embedder.mlp.2", cfg.adaln_dim, T_MID_DIM)
    es.append(_norm("cap_embedder.0", cfg.cap_feat_dim))
    es += _lin("cap_embedder.1", d, cfg.cap_feat_dim)
    if cfg.siglip_feat_dim is not None:  # omni/edit: SigLIP embedder, pad token and refiner (never pruned)
        es.append(same("siglip_pad_token", ("siglip_pad_token",), (1, d)))
        es.append(_norm("siglip_embedder.0", cfg.siglip_feat_dim))
        es += _lin("siglip_embedder.1", d, cfg.siglip_feat_dim)
    for stack in ("noise_refiner", "context_refiner", SIGLIP_STACK, "layers"):
        for i, b in enumerate(cfg.stack(stack)):
            pre = f"{stack}.{i}"
            if b.heads:
                inner = b.heads * hd
                for n in ("to_q", "to_k", "to_v"):
                    es += _lin(f"{pre}.attention.{n}", inner, d, bias=False)
                es += _lin(f"{pre}.attention.to_out.0", d, inner, bias=False)
                if cfg.qk_norm:
                    es += [_norm(f"{pre}.attention.norm_q", hd), _norm(f"{pre}.attention.norm_k", hd)]
                es += [_norm(f"{pre}.attention_norm1", d), _norm(f"{pre}.attention_norm2", d)]
            if b.ffn_dim:
                es += _lin(f"{pre}.feed_forward.w1", b.ffn_dim, d, bias=False)
                es += _lin(f"{pre}.feed_forward.w2", d, b.ffn_dim, bias=False)
                es += _lin(f"{pre}.feed_forward.w3", b.ffn_dim, d, bias=False)
                es += [_norm(f"{pre}.ffn_norm1", d), _norm(f"{pre}.ffn_norm2", d)]
            if stack not in ("context_refiner", SIGLIP_STACK):
                es += _lin(f"{pre}.adaLN_modulation.0", 4 * d, cfg.adaln_dim)
    return KeyTable(es)


# ----------------------------------------------------------------------------------------------
# ComfyUI single-file layout (input only)

COMFY_PREFIX = "model.diffusion_model."


class ComfyUIReader:
    """Presents a ComfyUI single-file Z-Image checkpoint under diffusers key names.

    ComfyUI fuses ``attention.qkv.weight`` as ``(3*dim, dim)`` rows ``[q; k; v]``, names the output
    projection ``attention.out`` and the QK norms ``q_norm`` / ``k_norm``, and prefixes every key with
    ``model.diffusion_model.``. The split happens lazily, one tensor at a time.
    """

    RENAMES = (
        (".attention.out.", ".attention.to_out.0."),
        (".attention.q_norm.", ".attention.norm_q."),
        (".attention.k_norm.", ".attention.norm_k."),
    )

    def __init__(self, inner: SafetensorsReader):
        self.inner = inner
        self.root = inner.root
        self.infos: dict[str, TensorInfo] = {}
        self._virtual: dict[str, tuple[str, int, int]] = {}  # key -> (fused key, part index, parts)
        self._cache: tuple[str, np.ndarray] | None = None
        for key, info in inner.infos.items():
            k = key[len(COMFY_PREFIX) :] if key.startswith(COMFY_PREFIX) else key
            if k.endswith(".attention.qkv.weight"):
                rows, cols = info.shape
                if rows % 3:
                    raise CheckpointError(f"{info.file}: {key!r} has {rows} rows, expected a multiple of 3 (q;k;v)")
                base = k[: -len("qkv.weight")]
                for j, n in enumerate(("to_q", "to_k", "to_v")):
                    vk = f"{base}{n}.weight"
                    self._virtual[vk] = (key, j, 3)
                    self.infos[vk] = TensorInfo(info.file, info.dtype, (rows // 3, cols), info.start, info.end)
                continue
            for a, b in self.RENAMES:
                k = k.replace(a, b)
            self._virtual[k] = (key, -1, 1)
            self.infos[k] = info

    def keys(self) -> list[str]:
        return list(self.infos)

    def read(self, key: str) -> np.ndarray:
        src, j, parts = self._virtual[key]
        if j < 0:
            return self.inner.read(src)
        if self._cache is None or self._cache[0] != src:
            self._cache = (src, self.inner.read(src))
        full = self._cache[1]
        n = full.shape[0] // parts
        return np.ascontiguousarray(full[j * n : (j + 1) * n])


def is_comfyui(reader: SafetensorsReader) -> bool:
    return any(k.startswith(COMFY_PREFIX) or k.endswith(".attention.qkv.weight") for k in reader.keys())


def open_reader(path: str | os.PathLike[str]) -> Any:
    """The streaming reader of a diffusers folder, a sharded folder or a single file; a ComfyUI single file is
    presented under diffusers key names (:class:`ComfyUIReader`)."""
    reader = SafetensorsReader(path)
    return ComfyUIReader(reader) if is_comfyui(reader) else reader


# ----------------------------------------------------------------------------------------------
# Config / save (loading: tmp_jax.models.z_image.model.load_zimage)


def read_config(folder: Path) -> ZImageConfig:
    """``config.json`` of a diffusers Z-Image transformer folder (clear one-line errors)."""
    return engine_read_config(folder, ZImageConfig.from_hf_config, "a diffusers transformer folder needs config.json")


def save_zimage(
    model: Any,
    path: str | os.PathLike[str],
    *,
    dtype: Any | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
    progress: bool = False,
) -> Path:
    """Write a diffusers-layout transformer folder; stock configs load in ``ZImageTransformer2DModel``."""
    cfg: ZImageConfig = model.config
    conf = {"_class_name": "ZImageTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION}
    conf.update(cfg.to_hf_config())
    return save_model(
        model,
        zimage_key_table(cfg),
        path,
        prefix=WEIGHTS_PREFIX,
        config=conf,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        progress=progress,
    )
