"""The plan file (``plan.json``, schema: docs/plan-format.md): build, write and read it, and the assignment it
holds. Bottom-level: the search writes plans, and distillation, export and evaluation read them, so this lives in
``tmp_jax`` (which never imports ``search``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tmp_jax.tree import Assignment, Tree

FORMAT_VERSION = 2  # 2: per-expert kept lists for expert channels (docs/plan-format.md, Compatibility)
READ_VERSIONS = (1, 2)  # version 1 plans (one kept list for every expert) are still read


class BudgetLike(Protocol):
    """What a plan records of its budget (``search.budget.Budget`` is one)."""

    kind: str

    def to_json(self) -> dict[str, Any]: ...


_NUM_LIST = re.compile(r"\[\s*(-?\d[-\d.eE+,\s]*?)\s*\]")


def plan_json(obj: Any) -> str:
    """Indented JSON with number lists on one line (kept-unit index lists are long)."""
    text = json.dumps(obj, indent=2, default=_json_default)
    return _NUM_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def versions() -> dict[str, str]:
    """Library versions recorded in every plan."""
    from importlib import metadata

    out = {}
    for name in ("jax", "flax", "evosax", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    import tmp_jax

    out["tmp_jax"] = getattr(tmp_jax, "__version__", "unknown")
    return out


# --------------------------------------------------------------------------------------------------
# Plans


def build_plan(
    problem: Any,
    budget: BudgetLike,
    genome: np.ndarray,
    fitness: float,
    n_samples: int,
    search: dict[str, Any],
    tokens: dict[str, int],
) -> dict[str, Any]:
    """The plan for one budget (schema: docs/plan-format.md)."""
    from tmp_jax.materialize import kept_units

    tree = problem.tree
    a = tree.decode(genome)
    before, after = tree.count(tree.full_assignment()), tree.count(a)
    kept = kept_units(tree, a, getattr(problem, "order", None))
    return {
        "format_version": FORMAT_VERSION,
        "arch": tree.spec.arch,
        "source": jsonable(getattr(problem, "source", {}) or {}),
        "budget": {
            **budget.to_json(),
            "full": budget_metric(tree, tree.full_assignment(), budget.kind, tokens),
            "floor": budget_metric(tree, tree.decode(np.zeros(tree.n_genes, np.int64)), budget.kind, tokens),
        },
        "policy": {
            "dropped": sorted(a.dropped),
            "keep": {f"{n}/{k}": int(v) for (n, k), v in sorted(a.keep.items())},
            # per-expert groups: one list per expert (docs/plan-format.md)
            "kept_units": {f"{n}/{k}": np.asarray(ids, np.int64).tolist() for (n, k), ids in sorted(kept.items())},
        },
        "genome": {"genes": [g.name for g in tree.genes], "levels": [int(x) for x in genome]},
        "counts": {
            "before": {"params": before["params"], "active": before["active"], "bytes": before["bytes"]},
            "after": {"params": after["params"], "active": after["active"], "bytes": after["bytes"]},
            "flops_before": tree.flops(tree.full_assignment(), tokens),
            "flops_after": tree.flops(a, tokens),
            "tokens": dict(tokens),
        },
        "fitness": {
            "value": float(fitness),
            "n_samples": int(n_samples),
            "metric": "normalised teacher-output error (lower is better)",
        },
        "search": search,
        "versions": versions(),
    }


def budget_metric(tree: Tree, a: Assignment, kind: str, tokens: dict[str, int]) -> int:
    if kind == "flops":
        return int(tree.flops(a, tokens))
    c = tree.count(a)
    return int(c["bytes" if kind == "memory" else kind])


def jsonable(o: Any) -> Any:
    """Problem metadata (configs may be dataclasses / tuples) as plain JSON values."""
    import dataclasses

    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return jsonable(dataclasses.asdict(o))
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [jsonable(v) for v in o]
    if isinstance(o, np.generic | np.ndarray):
        return o.tolist()
    if o is None or isinstance(o, str | int | float | bool):
        return o
    return str(o)


_REQUIRED = ("arch", "budget", "policy", "genome", "counts", "fitness")


def load_plan(path: str | Path) -> dict[str, Any]:
    """Read and validate a plan.json; raises ValueError with a clear message on a foreign or newer file."""
    p = Path(path)
    try:
        plan = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read plan ({e})") from e
    if not isinstance(plan, dict) or "format_version" not in plan:
        raise ValueError(f"{p}: not a tmp-jax plan (no format_version)")
    v = plan["format_version"]
    if v not in READ_VERSIONS:
        raise ValueError(
            f"{p}: plan format_version {v!r} is not supported; this tmp_jax "
            f"({versions()['tmp_jax']}) reads format_version {', '.join(map(str, READ_VERSIONS))}"
        )
    missing = [k for k in _REQUIRED if k not in plan]
    if missing:
        raise ValueError(f"{p}: plan lacks {', '.join(missing)}")
    return plan


def plan_assignment(plan: dict[str, Any]) -> Assignment:
    """The plan's assignment (dropped nodes, kept counts), for materialise / export."""
    pol = plan["policy"]
    return Assignment.from_json({"dropped": pol["dropped"], "keep": pol["keep"]})
