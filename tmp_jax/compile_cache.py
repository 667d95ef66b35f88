"""Persistent XLA compilation cache for the command-line tools.

A full-width search compiles one program per (sub-layer, width-level combination) in its warm-up (minutes
for HunyuanImage-3.0), a distillation its train step, an evaluation its sampler. With the cache on disk, a
second run of the same job (a resume after a crash, the next budget, the export check) loads them instead.

The CLIs call :func:`enable_default` first thing. It does nothing when a cache directory is already
configured (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``), and it is off with
``TMP_JAX_COMPILATION_CACHE=off``; ``TMP_JAX_COMPILATION_CACHE=DIR`` picks the folder. Library use (import
``tmp_jax`` in your own program) never turns it on by itself.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "TMP_JAX_COMPILATION_CACHE"


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/tmp_jax/xla`` (``~/.cache/tmp_jax/xla``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tmp_jax" / "xla"


def enable_default() -> str | None:
    """Turn on the persistent compilation cache unless configured or disabled; returns the folder in use."""
    import jax

    choice = os.environ.get(ENV, "").strip()
    if choice.lower() in ("off", "0", "false", "no"):
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return str(current)
    folder = Path(choice) if choice else default_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home, say: run without a cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # programs that compile in under a second are cheaper to rebuild than to read back
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return str(folder)
