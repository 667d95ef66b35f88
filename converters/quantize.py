"""Weight-only quantisation of Linear weights for exports: int8 and fp8 (e4m3fn), per output channel.

Format (docs/quantized-format.md): a quantised Linear weight ``X.weight`` of PyTorch shape ``[out, in]`` is
stored as ``X.weight`` (``I8`` or ``F8_E4M3``, same shape) plus ``X.weight_scale`` (``F32``, shape ``[out]``);
the dequantised weight is ``W[o, i] = float32(X.weight[o, i]) * X.weight_scale[o]``. Scales are symmetric
absmax: ``scale = absmax(W[o, :]) / QMAX`` with ``QMAX = 127`` (int8) or ``448`` (the largest finite
float8_e4m3fn); int8 values are ``clip(round_half_even(W / scale), -127, 127)``, fp8 values the
round-to-nearest-even cast of ``W / scale``. A row that is all zeros gets scale 1 (its values are 0).

Which tensors are quantised is decided by :func:`quantizable` from the key name alone (per architecture):
the Linear weights inside the repeated blocks, which hold >= 95% of the parameters. Everything else keeps the
export dtype (see the doc for the list and the reasons). The numpy path (export) and the torch path (the
device bench, which quantises random full-size weights on the GPU) compute the same bytes.
"""

from __future__ import annotations

import re
from typing import Any

import ml_dtypes
import numpy as np

METHODS = ("none", "int8", "fp8")
QMAX = {"int8": 127.0, "fp8": 448.0}
TAGS = {"int8": "I8", "fp8": "F8_E4M3"}
NP_DTYPES = {"int8": np.dtype(np.int8), "fp8": np.dtype(ml_dtypes.float8_e4m3fn)}
QUANT_METHOD = "tmp_jax_weight_only"
FORMAT_VERSION = 1
SCALE_SUFFIX = "_scale"

# Which torch keys are quantised is each architecture's own rule (``ArchHooks.quantize_rules``, registered with
# the model package): Linear weights of the repeated blocks. Not listed, and so kept in the export dtype:
# embeddings, lm_head, the routers (fp32 by design), norms, biases, pad tokens, convolutions, the image in/out
# layers, timestep embedders, adaLN of the final layer, VAE / ViT.
_COMPILED: dict[str, list[re.Pattern[str]]] = {}


def _rules(arch_name: str) -> list[re.Pattern[str]]:
    if arch_name not in _COMPILED:
        from tmp_jax import arch

        _COMPILED[arch_name] = [re.compile(r) for r in arch.get(arch_name).quantize_rules]
    return _COMPILED[arch_name]


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else a one-line ValueError naming the choices."""
    if method not in METHODS:
        raise ValueError(f"--quantize {method!r} is not supported; expected one of {', '.join(METHODS)}")
    return method


def quantizable(arch: str, key: str, shape: tuple[int, ...]) -> bool:
    """Whether the export quantises torch key ``key`` of ``shape`` for ``arch`` (2-D Linear weights only)."""
    return len(shape) == 2 and any(r.fullmatch(key) for r in _rules(arch))


def scale_key(key: str) -> str:
    """``X.weight`` -> ``X.weight_scale``."""
    return key + SCALE_SUFFIX


def quantize(w: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """``w`` ``[out, in]`` (any float dtype) -> (values ``[out, in]`` int8 / float8_e4m3fn, scale ``[out]`` fp32)."""
    check_method(method)
    w32 = np.asarray(w, np.float32)
    absmax = np.max(np.abs(w32), axis=1)  # [out]
    scale = np.where(absmax > 0, absmax / np.float32(QMAX[method]), np.float32(1.0)).astype(np.float32)
    x = w32 / scale[:, None]  # [out, in], |x| <= QMAX
    if method == "int8":
        q = np.clip(np.rint(x), -127, 127).astype(np.int8)
    else:
        q = x.astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """The fp32 product ``q * scale[:, None]``, cast to ``dtype``."""
    return (q.astype(np.float32) * scale.astype(np.float32)[:, None]).astype(dtype)


def error_bound(w: np.ndarray, scale: np.ndarray, method: str) -> np.ndarray:
    """Per-element bound on ``|w - dequantize(quantize(w))|`` (fp32 rounding included).

    int8: half a quantisation step, ``scale / 2``. fp8 e4m3fn (3 mantissa bits): half an ulp of the scaled
    value, ``2**-4 * |w|`` for normal values, and ``2**-10 * scale`` in the subnormal range (|w / scale| < 2**-6).
    """
    w32 = np.abs(np.asarray(w, np.float32))
    s = scale.astype(np.float32)[:, None]
    slack = 4 * np.finfo(np.float32).eps * (w32 + s)  # the fp32 divide / multiply
    if method == "int8":
        return s / 2 + slack
    return np.maximum(w32 * 2.0**-4, s * 2.0**-10) + slack


# --------------------------------------------------------------------------------------------------
# torch (same bytes as the numpy path; used on the device and by the runner)


def quantize_torch(w: Any, method: str) -> tuple[Any, Any]:
    """torch twin of :func:`quantize` (runs on the tensor's device)."""
    import torch

    check_method(method)
    w32 = w.float()
    absmax = w32.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / QMAX[method], torch.ones_like(absmax))
    x = w32 / scale[:, None]
    if method == "int8":
        q = torch.round(x).clamp_(-127, 127).to(torch.int8)  # torch.round is half-to-even, like np.rint
    else:
        q = x.to(torch.float8_e4m3fn)
    return q, scale


def dequantize_torch(q: Any, scale: Any, dtype: Any) -> Any:
    """``(float32(q) * scale[:, None]).to(dtype)`` on q's device."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def quantization_config(method: str, arch: str, keys: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` block written into an export's config.json."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "weight_dtype": {"int8": "int8", "fp8": "float8_e4m3fn"}[method],
        "scheme": "symmetric, per output channel; W = float32(q) * scale[:, None]",
        "scale_suffix": SCALE_SUFFIX,
        "scale_dtype": "float32",
        "qmax": QMAX[method],
        "quantized_patterns": [r.pattern for r in _rules(arch)],
        "num_quantized_tensors": len(keys),
        "doc": "docs/quantized-format.md (tmp-jax)",
    }


def read_quantization(conf: dict[str, Any], where: str) -> str:
    """``none`` / ``int8`` / ``fp8`` from an export's config.json (clear error for an unknown block)."""
    q = conf.get("quantization_config")
    if q is None:
        return "none"
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD or q.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}: quantization_config is not tmp-jax weight-only format {FORMAT_VERSION} "
            f"(quant_method {q.get('quant_method') if isinstance(q, dict) else q!r})"
        )
    dt = q.get("weight_dtype")
    for m, name in (("int8", "int8"), ("fp8", "float8_e4m3fn")):
        if dt == name:
            return m
    raise ValueError(f"{where}: quantization_config.weight_dtype {dt!r}, expected int8 or float8_e4m3fn")
