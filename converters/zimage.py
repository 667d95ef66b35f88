"""Z-Image on the converter side: the config.json of an export, the PyTorch reference of ``converters.run_torch``
(:mod:`converters.zimage_torch`), registered as the arch's :class:`converters.registry.ConverterHooks`.

The diffusers key table, the ComfyUI single-file reader, the config reader and save live in the model package
(:mod:`tmp_jax.models.z_image.checkpoint`), loading in :func:`tmp_jax.models.z_image.model.load_zimage`; they
are re-exported here, so ``from converters.zimage import load_zimage, zimage_key_table`` keeps working.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any

from converters.engine import write_json
from converters.registry import ConverterHooks, register
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
from tmp_jax.models.z_image.config import STACKS
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
    "write_export_config",
    "zimage_key_table",
]

REMOTE = Path(__file__).resolve().parent / "remote"
REMOTE_MODULE = "transformer_z_image_pruned"  # REMOTE/<this>.py: our per-block diffusers subclass


def write_export_config(src_cfg: Any, new_cfg: Any, folder: Path, _ecfg: Any) -> str:
    """Depth-only or uniform plans (equal refiner depths) become a stock ``ZImageTransformer2DModel`` config;
    anything heterogeneous is written with our diffusers subclass next to config.json (``auto_map``), loadable by
    ``AutoModel.from_pretrained(folder, trust_remote_code=True)``."""
    stock = all(
        b.heads == src_cfg.n_heads and b.ffn_dim == src_cfg.ffn_dim for s in STACKS for b in new_cfg.stack(s)
    ) and new_cfg.stack_len("noise_refiner") == new_cfg.stack_len("context_refiner")
    # Omni: the stock class builds n_refiner_layers SigLIP refiner blocks, and that stack is never pruned
    full_refiners = new_cfg.stack_len("noise_refiner") == src_cfg.n_refiner_layers
    stock = stock and (new_cfg.siglip_feat_dim is None or full_refiners)
    conf: dict[str, Any] = {"_diffusers_version": DIFFUSERS_VERSION}
    if stock:
        conf["_class_name"] = "ZImageTransformer2DModel"
        conf.update(new_cfg.to_hf_config(include_pruning=False))
        conf["n_refiner_layers"] = new_cfg.stack_len("noise_refiner")
        conf["n_layers"] = new_cfg.stack_len("layers")
    else:
        mod = REMOTE_MODULE
        conf["_class_name"] = "ZImagePrunedTransformer2DModel"
        conf["auto_map"] = {"AutoModel": f"{mod}.ZImagePrunedTransformer2DModel"}
        conf.update(new_cfg.to_hf_config(include_pruning=True))
        shutil.copy2(REMOTE / f"{mod}.py", folder / f"{mod}.py")
    write_json(folder / "config.json", conf)
    return "stock ZImageTransformer2DModel" if stock else "ZImagePrunedTransformer2DModel (trust_remote_code)"


HOOKS = register(
    ConverterHooks(
        "zimage",
        write_export_config=write_export_config,
        torch_reference=lambda: importlib.import_module("converters.zimage_torch"),
    )
)
