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
TRITON_ENV = "TMP_JAX_TRITON_GEMM"
TRITON_FLAG = "--xla_gpu_enable_triton_gemm=false"


def gpu_compile_flags() -> str:
    """Add ``--xla_gpu_enable_triton_gemm=false`` to ``XLA_FLAGS`` (GPU matmuls through cuBLAS, not Triton-generated
    kernels) unless ``XLA_FLAGS`` already sets that flag or ``TMP_JAX_TRITON_GEMM=1``; returns ``XLA_FLAGS``.

    Why: on a cold machine the compile wall is mostly XLA generating and autotuning a Triton kernel per matmul
    fusion. Measured side by side on one H100 (docs/benchmarks.md section 9): the random 6.15B Turbo's cold
    search compiled in 65 s of compile time instead of 420-478 s (43 s end to end instead of 102-125 s) at the
    same search throughput (2.49 evaluations/s vs 2.24-2.42); the embedded DiT's cold search took 13.2 s instead
    of 21.8 s, its search phase 18% slower (0.6 s). Has to run before JAX creates its GPU client (the CLIs call it
    through :func:`enable_default` first thing); it changes nothing on a CPU."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_triton_gemm" in flags or os.environ.get(TRITON_ENV, "").strip() in ("1", "on", "true"):
        return flags
    os.environ["XLA_FLAGS"] = (flags + " " + TRITON_FLAG).strip()
    return os.environ["XLA_FLAGS"]


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/tmp_jax/xla`` (``~/.cache/tmp_jax/xla``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tmp_jax" / "xla"


def enable_default() -> str | None:
    """Turn on the persistent compilation cache unless configured or disabled; returns the folder in use. Also sets
    the GPU compile flags of :func:`gpu_compile_flags` (whatever the cache setting)."""
    gpu_compile_flags()
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
