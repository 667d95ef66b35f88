"""Z-Image on the converter side.

The diffusers key table, the ComfyUI single-file reader, the config reader and save live in the model package
(:mod:`tmp_jax.models.z_image.checkpoint`), loading in :func:`tmp_jax.models.z_image.model.load_zimage`; they
are re-exported here, so ``from converters.zimage import load_zimage, zimage_key_table`` keeps working.
"""

from __future__ import annotations

from tmp_jax.models.z_image.checkpoint import (
    COMFY_PREFIX,
    DIFFUSERS_VERSION,
    WEIGHTS_PREFIX,
    ComfyUIReader,
    is_comfyui,
    open_reader,
    read_config,
    save_zimage,
    zimage_key_table,
)
from tmp_jax.models.z_image.model import load_zimage

__all__ = [
    "COMFY_PREFIX",
    "DIFFUSERS_VERSION",
    "WEIGHTS_PREFIX",
    "ComfyUIReader",
    "is_comfyui",
    "load_zimage",
    "open_reader",
    "read_config",
    "save_zimage",
    "zimage_key_table",
]
