"""``converters.engine`` is :mod:`tmp_jax.safetensors_io`, the streaming safetensors engine, under its old name.

The engine moved down into ``tmp_jax`` because the model packages read and write their checkpoints through it,
and ``converters`` depends on the models, never the reverse. This module makes the old import path the SAME module
object (not a copy), so ``converters.engine.X`` and ``tmp_jax.safetensors_io.X`` are one thing, monkeypatches
included.
"""

import sys

from tmp_jax import safetensors_io

sys.modules[__name__] = safetensors_io
