"""The converter side of each architecture: the config.json an export writes and how PyTorch runs an export.

The model side of an architecture (key table, config reader, weights prefix, quantisation rules, memory model)
is its :class:`tmp_jax.arch.ArchHooks`. What needs the PyTorch world (the stock / remote-code class an export
names, the reference modules of ``converters.run_torch``) stays in ``converters``, which depends on the model
packages and never the reverse: the module ``converters.NAME`` of a registered architecture ``NAME`` registers
its :class:`ConverterHooks` when imported, and :func:`find` imports it on first use. Generic converter code
(``converters.export``, ``converters.run_torch``) looks hooks up here by the arch's name; it names no
architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ConverterHooks:
    name: str  # the architecture (tmp_jax.arch) name
    # (source cfg, pruned cfg, output folder, converters.export.ExportConfig) -> layout description (the CLI
    # prints it): writes config.json and whatever else the layout needs next to the weights (remote code, the
    # source folder's other files)
    write_export_config: Callable[[Any, Any, Path, Any], str]
    # () -> the arch's PyTorch reference module (imports torch; see converters.run_torch), or None:
    #   build(export, dtype, device, memory_plan or None) -> nn.Module with the export's weights loaded;
    #   euler(export, model, resolution, text_tokens, seed, generator, device) -> (initial latents,
    #       step(x, sigma, next sigma) -> x): one flow-matching Euler step of the model's own convention
    torch_reference: Callable[[], Any] | None = None


_REGISTRY: dict[str, ConverterHooks] = {}


def register(h: ConverterHooks) -> ConverterHooks:
    _REGISTRY[h.name] = h
    return h


def find(name: str) -> ConverterHooks | None:
    """The converter hooks of architecture ``name`` (importing ``converters.NAME`` the first time), or None if a
    registered architecture has none (or ``name`` is no registered architecture)."""
    if name not in _REGISTRY:
        from tmp_jax import arch

        if name in arch.names():
            arch.import_if_present(f"{__package__}.{name}")
    return _REGISTRY.get(name)
