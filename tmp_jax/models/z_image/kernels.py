"""Which attention kernel Z-Image's blocks run: cuDNN flash attention on GPU, XLA's reference attention otherwise.

The choice is made at trace time from :data:`ATTENTION_IMPLEMENTATION` (env ``TMP_JAX_ATTENTION``, or
:func:`set_attention_implementation`), so the model code in ``model.py`` calls :func:`attention` and never names
a backend. The computed function is the same on every path; only speed and the accepted masks differ.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

# "auto": cuDNN flash attention on GPU for bf16/fp16 (head_dim <= 128), XLA's reference attention
# otherwise (CPU, fp32). "xla" / "cudnn" force one. Read at trace time; the env var sets the default.
# (jax's Pallas Mosaic-GPU flash attention was measured too, bench/attention_kernels.py: its tiles are
# fp16-only and it ran at 516 TFLOP/s against cuDNN's 609 on an H200 at this model's shapes.)
ATTENTION_IMPLEMENTATION: str = os.environ.get("TMP_JAX_ATTENTION", "auto")


def set_attention_implementation(name: str) -> None:
    """'auto', 'xla' or 'cudnn'; affects functions traced after the call."""
    if name not in ("auto", "xla", "cudnn"):
        raise ValueError(f"attention implementation must be auto, xla or cudnn, got {name!r}")
    global ATTENTION_IMPLEMENTATION
    ATTENTION_IMPLEMENTATION = name


def _attention_impl(q: jax.Array, mask: jax.Array | None) -> str:
    impl = ATTENTION_IMPLEMENTATION
    key_only = mask is None or (mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1)
    if impl == "auto":
        ok = (
            jax.default_backend() == "gpu"
            and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] <= 128
            and q.shape[-1] % 8 == 0
            and key_only
        )
        impl = "cudnn" if ok else "xla"
    if impl == "cudnn" and not key_only:
        raise ValueError("cuDNN attention here takes only a key mask of shape (B, 1, 1, S)")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention, q/k/v: (B, T, N, D). ``mask``: (B, 1, 1, S) key mask or None (no padding).

    Every key mask this model builds (:func:`tmp_jax.models.z_image.layout.key_mask` of a layout's ``*_valid``)
    is a prefix mask (valid keys first), so on the cuDNN path it is passed as per-sample key lengths
    (cuDNN's padding mask, no materialised bias) instead of a boolean mask.
    """
    if _attention_impl(q, mask) == "cudnn":
        kv_len = None if mask is None else jnp.sum(mask.reshape(mask.shape[0], -1), axis=-1, dtype=jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_len, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
