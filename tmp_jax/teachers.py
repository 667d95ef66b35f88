"""Loading a teacher by name or folder: the embedded Fashion-MNIST teachers, or any checkpoint folder of a registered
architecture.

A bottom-level module (it imports only the registry and dtype helpers) so that calibration, the trajectory tools,
distillation and the pruning problem can all load a teacher without importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tmp_jax import arch
from tmp_jax.dtypes import jnp_dtype

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED = {name: ASSETS / name for name in arch.embedded_teachers()}  # embedded teacher name -> its folder
DEFAULT_MODEL = next(iter(EMBEDDED))


def plan_teacher(plan_path: str | Path) -> str | None:
    """The embedded teacher the plan at ``plan_path`` was searched on (its recorded source is that teacher's
    folder), else None, also for a plan that cannot be read (the tool's own load of it reports that in one line).

    The default ``--model`` of the tools that take a plan (reconstruct, distill), so that ``--plan`` alone works for
    a plan of either embedded teacher, not only the default one; the plan's fingerprint is still checked against
    the teacher that is loaded (:func:`tmp_jax.distill.plan_student`)."""
    from tmp_jax.plan import load_plan

    try:
        src = load_plan(plan_path).get("source")
    except ValueError:
        return None
    path = src.get("path") if isinstance(src, dict) else None
    if not isinstance(path, str):
        return None
    p = Path(path)
    return p.name if p.name in EMBEDDED and p.parent.name == ASSETS.name else None


def load_model(model: str | None, dtype: str | None = "fp32") -> tuple[Any, Path | None, str]:
    """(the model in ``dtype`` (``"bf16"``, ``"fp32"``, ``"auto"``: :func:`tmp_jax.dtypes.resolve`), its folder or
    None, its name) of a checkpoint folder, an embedded name, or the default (None)."""
    dt = jnp_dtype(dtype)
    if model is None:
        model = DEFAULT_MODEL
    if model in EMBEDDED:
        p = EMBEDDED[model]
        if not (p / "config.json").is_file():
            raise ValueError(f"embedded model {model!r} is not available in this installation ({p})")
        cfg = json.loads((p / "config.json").read_text())
        return arch.detect(cfg).load(str(p), dtype=dt), p, model
    p = Path(model)
    conf = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if not conf.is_file():
        raise ValueError(f"--model {model}: no config.json (expected a HF/diffusers checkpoint folder)")
    cfg = json.loads(conf.read_text())
    return arch.detect(cfg).load(str(p), dtype=dt), p, str(p)
