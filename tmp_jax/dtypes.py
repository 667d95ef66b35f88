"""The ``--dtype bf16|fp32|auto`` option shared by search, distill and evaluate (and the calibration they run).

``--dtype`` is the dtype the teacher (or the model under evaluation) is LOADED in, and so the dtype its forwards
run in. What it does not change, wherever it is set:

* statistics and consumer Grams are accumulated in float32 (the modules sow fp32 values; calibration sums them
  in fp32 on the host or on the device, :func:`tmp_jax.calibration.calibrate`);
* the search fitness is computed in float64 on the host from the candidate's and the teacher's outputs;
* compensation re-fits are solved in float32 / float64 and only stored in the model dtype;
* distillation keeps fp32 master weights and fp32 optimiser state.

``auto`` (the default of the command-line tools) is bf16 where the backend is a GPU or TPU (bf16 GEMMs run at
several times the fp32 rate there, and a bf16 teacher needs half the memory) and fp32 on the CPU (where bf16 is
emulated and no faster, and where every committed quality number was measured).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

CHOICES = ("auto", "bf16", "fp32")
# what users may type -> the canonical numpy/JAX dtype name recorded in plans and resume signatures
_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}
ACCELERATORS = ("gpu", "tpu", "cuda", "rocm")

HELP = (
    "dtype the teacher is loaded and run in: bf16, fp32 or auto (default: auto = bf16 on a GPU/TPU, fp32 on the "
    "CPU). Statistics and Grams are accumulated in fp32 and errors computed in fp64 either way"
)


def canonical(spec: str | None) -> str:
    """``"auto"``, ``"bfloat16"`` or ``"float32"`` for a ``--dtype`` value (``bf16`` / ``fp32`` / ``auto``, or the
    long names; None = auto), without deciding ``auto`` (no backend is started). Anything else is a ValueError
    with a one-line message."""
    if spec is None or str(spec).lower() == "auto":
        return "auto"
    name = _NAMES.get(str(spec).lower())
    if name is None:
        raise ValueError(f"--dtype {spec}: expected one of {', '.join(CHOICES)}")
    return name


def resolve(spec: str | None = "auto", backend: str | None = None) -> str:
    """``"bfloat16"`` or ``"float32"`` for a ``--dtype`` value (:func:`canonical`); ``auto`` decides by ``backend``
    (default: ``jax.default_backend()``): bf16 on a GPU / TPU, fp32 otherwise."""
    name = canonical(spec)
    if name != "auto":
        return name
    if backend is None:
        import jax

        backend = jax.default_backend()
    return "bfloat16" if str(backend).lower() in ACCELERATORS else "float32"


def jnp_dtype(spec: str | None = "auto") -> Any:
    """The JAX dtype of ``spec`` (resolved as :func:`resolve` does)."""
    import jax.numpy as jnp

    return jnp.dtype(resolve(spec))


def add_argument(parser: argparse.ArgumentParser, help: str = HELP, default: str = "auto") -> None:
    """Add ``--dtype`` to ``parser``; the value is checked by :func:`from_args` (one-line error)."""
    parser.add_argument("--dtype", default=default, metavar="{" + ",".join(CHOICES) + "}", help=help)


def from_args(parser: argparse.ArgumentParser, value: str) -> str:
    """The :func:`canonical` value of a parsed ``--dtype`` (``auto`` is decided later, when the backend is up); a
    bad value prints ONE line (``PROG: error: --dtype fp16: expected one of auto, bf16, fp32``, no usage block:
    the valid values are in the line) and exits with code 2, like argparse's own errors."""
    try:
        return canonical(value)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def model_dtype(model: Any) -> str:
    """The dtype most of ``model``'s floating parameters (by element count) are in, as a name (``"bfloat16"``):
    what a model "is in" when a few tensors stay fp32 on purpose (HunyuanImage's router)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    count: dict[str, int] = {}
    for x in jax.tree.leaves(nnx.state(model, nnx.Param)):
        if jnp.issubdtype(x.dtype, jnp.floating):  # bf16 is not a numpy floating type, but is a JAX one
            name = np.dtype(x.dtype).name
            count[name] = count.get(name, 0) + int(np.prod(x.shape))
    return max(count, key=count.__getitem__) if count else "float32"
