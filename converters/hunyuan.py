"""HunyuanImage-3.0 on the converter side.

The key table (official checkpoint <-> :class:`tmp_jax.models.hunyuan_image3.HunyuanImage3`), the config reader
and save live in the model package (:mod:`tmp_jax.models.hunyuan_image3.checkpoint`), loading in
:func:`tmp_jax.models.hunyuan_image3.model.load_hunyuan`; they are re-exported here, so
``from converters.hunyuan import hunyuan_key_table, load_hunyuan`` keeps working.
"""

from __future__ import annotations

from tmp_jax.models.hunyuan_image3.checkpoint import (
    CONFIG_EXTRA,
    PASSTHROUGH_PREFIXES,
    WEIGHTS_PREFIX,
    hunyuan_key_table,
    read_config,
    save,
)
from tmp_jax.models.hunyuan_image3.model import load_hunyuan

__all__ = [
    "CONFIG_EXTRA",
    "PASSTHROUGH_PREFIXES",
    "WEIGHTS_PREFIX",
    "hunyuan_key_table",
    "load_hunyuan",
    "read_config",
    "save",
]
