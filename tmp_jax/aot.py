"""Compile-only runs of the blockwise evaluators: the search warm-up compiles without executing.

The evaluators (``runner.forward_pruned``) are chains of separately jitted sub-layer functions. Their
warm-up must compile every width level's program, but running the candidates to get there costs device
memory per run, which forbids running many at once. Inside :func:`compile_only` (a per-thread switch),
every call routed through :func:`call` lowers and compiles its function for the arguments' shapes
(ahead-of-time: ``f.lower(*args).compile()``, which fills ``f``'s own cache, so the later real call with
arrays of those shapes compiles nothing) and returns the abstract output (``jax.ShapeDtypeStruct``), which
the next call of the chain takes in place of an array. Nothing is executed and no activation is
allocated, so warm-up threads can compile side by side at any model size (XLA compiles without the GIL).

Outside :func:`compile_only`, :func:`call` is ``f(*args)``.

:func:`compile_events` counts the XLA compiles of the process (fresh, or read back from the persistent
cache): the zero-recompile checks count those, since an ahead-of-time compile leaves jit's dispatch-cache
size (``f._cache_size()``) to grow at the first real call without any compiling.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import jax

_LOCAL = threading.local()
_LOCK = threading.Lock()
_COMPILES = [0]
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # around every XLA compile or cache read


def _on_duration(event: str, *_a: Any, **_k: Any) -> None:
    if event == _BACKEND_COMPILE:
        with _LOCK:
            _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)


_TEMP = [0]  # the largest device workspace (temp bytes) of a program compiled ahead of time so far


def _note_temp(compiled: Any) -> None:
    try:
        t = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - a backend without memory analysis: no estimate
        return
    with _LOCK:
        _TEMP[0] = max(_TEMP[0], t)


def memory_bound_workers(default: int) -> int:
    """How many programs may compile side by side on this device: ``default`` where the device keeps no
    memory statistics (CPU), else at most the free device memory over four times the largest workspace of the
    programs compiled so far. GPU autotuning runs each candidate kernel on buffers of the program's operand
    sizes, so concurrent compiles of a large model's sub-layers can exhaust the memory the weights leave."""
    try:
        st = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
        st = {}
    if "bytes_limit" not in st or _TEMP[0] <= 0:
        return default
    free = int(st["bytes_limit"]) - int(st.get("bytes_in_use", 0))
    return max(1, min(default, free // (4 * _TEMP[0])))


def env_count(name: str, default: int) -> int:
    """A positive integer from environment variable ``name`` (a thread or batch count), else ``default``;
    anything else set there is a one-line ValueError naming the variable."""
    env = os.environ.get(name)
    if not env:
        return default
    try:
        n = int(env)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{name}={env!r}: expected a positive integer")
    return n


def compile_events() -> int:
    """XLA compiles in this process since ``tmp_jax.aot`` was imported (persistent-cache reads included)."""
    return _COMPILES[0]


@contextmanager
def compile_only() -> Iterator[None]:
    """Within the block (this thread only), :func:`call` compiles instead of running."""
    prev = getattr(_LOCAL, "on", False)
    _LOCAL.on = True
    try:
        yield
    finally:
        _LOCAL.on = prev


def active() -> bool:
    """Whether this thread is inside :func:`compile_only`."""
    return getattr(_LOCAL, "on", False)


def call(f: Callable[..., Any], *args: Any) -> Any:
    """``f(*args)`` for a jitted ``f``; inside :func:`compile_only` its compile for these argument shapes
    (static arguments included) and its abstract output instead."""
    if not active():
        return f(*args)
    compiled = f.lower(*args).compile()
    _note_temp(compiled)
    out = compiled.out_info
    if any(_committed(x) for x in jax.tree.leaves(args)):
        return out
    # A real call on uncommitted arrays returns uncommitted arrays, which the next jitted call sees with no
    # sharding; an abstract output that carried one would lower the next program for another cache key.
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, weak_type=s.weak_type), out)


def _committed(x: Any) -> bool:
    """Whether a real call would see ``x`` as placed: a committed array, or an abstract one with a sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x.sharding is not None
    return bool(getattr(x, "_committed", False))
