"""HunyuanImage-3.0 on the converter side: the config.json of an export, the PyTorch reference of
``converters.run_torch`` (:mod:`converters.hunyuan_torch`), registered as the arch's
:class:`converters.registry.ConverterHooks`.

The key table (official checkpoint <-> :class:`tmp_jax.models.hunyuan_image3.HunyuanImage3`), the config reader
and save live in the model package (:mod:`tmp_jax.models.hunyuan_image3.checkpoint`), loading in
:func:`tmp_jax.models.hunyuan_image3.model.load_hunyuan`; they are re-exported here, so
``from converters.hunyuan import hunyuan_key_table, load_hunyuan`` keeps working.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from converters.registry import ConverterHooks, register
from tmp_jax.models.hunyuan_image3.checkpoint import (
    CONFIG_EXTRA,
    PASSTHROUGH_PREFIXES,
    WEIGHTS_PREFIX,
    hunyuan_key_table,
    read_config,
    save,
)
from tmp_jax.models.hunyuan_image3.config import PER_LAYER_FIELDS
from tmp_jax.models.hunyuan_image3.model import load_hunyuan

__all__ = [
    "CONFIG_EXTRA",
    "PASSTHROUGH_PREFIXES",
    "WEIGHTS_PREFIX",
    "hunyuan_key_table",
    "load_hunyuan",
    "read_config",
    "save",
    "write_export_config",
]

# config.json keys an export lowers to the pruned model's values (everything else is the source's)
PRUNED_FIELDS = ("num_hidden_layers", *PER_LAYER_FIELDS, "num_attention_heads", "num_key_value_heads")


def write_export_config(src_cfg: Any, new_cfg: Any, folder: Path, ecfg: Any) -> str:
    """The OFFICIAL layout: config.json is the source's (key order and unknown keys kept) with the pruned fields
    lowered, plus ``layers_kept`` (ORIGINAL layer indices, informative); every non-weight file of the source
    folder is copied (tokenizer, generation_config.json, the remote-code ``*.py``, sub-folders)."""
    from converters.export import TORCH_DTYPE_NAMES, copy_extra_files

    src = Path(ecfg.model)
    conf = json.loads((src / "config.json").read_text())  # key order and unknown keys kept
    new = new_cfg.to_hf_config()
    for k in PRUNED_FIELDS:
        conf[k] = new[k]
    conf["layers_kept"] = new["layers_kept"]  # original layer indices (informative extra key)
    if ecfg.dtype is not None:  # the weights were cast: say so (transformers 5 also reads "dtype")
        conf["torch_dtype"] = TORCH_DTYPE_NAMES[ecfg.dtype]
        if "dtype" in conf:
            conf["dtype"] = conf["torch_dtype"]
    (folder / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    copy_extra_files(src, folder, skip=(Path(ecfg.out),))
    return "official HunyuanImage3ForCausalMM layout (per-layer MoE lists)"


HOOKS = register(
    ConverterHooks(
        "hunyuan",
        write_export_config=write_export_config,
        torch_reference=lambda: importlib.import_module("converters.hunyuan_torch"),
    )
)
