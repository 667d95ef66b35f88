"""Probe: would a sequential re-fit of a plan's kept consumer rows beat the independent one? (issue 17)

The shipped compensation (:mod:`tmp_jax.compensate`) re-fits every consumer on the TEACHER's input Gram
``G = X^T X``: ``W'_K = argmin ||X W - X_K W'||``, each layer as if every layer before it were unpruned. Two
sequential variants, fitted group by group in forward order with every group before already pruned and
re-fitted (the student's input ``Xs`` of the group, at full width in a model where only the earlier groups are
cut):

* ``adapted`` (SparseGPT / SlimGPT style): ``argmin ||Xs W - Xs_K W'||`` (the student's input distribution);
* ``cross``: ``argmin ||X W - Xs_K W'||`` (the teacher's output of the group on the teacher's input: upstream
  error is compensated too; needs the cross term ``Xs^T X``).

Each is scored like a quality-table row (``tmp_jax.evaluate``: velocity error, held-out FM MSE, class accuracy,
FID_cls, paired sample MSE). The consumer inputs are recorded in an eager forward (a Python hook on
:class:`tmp_jax.nn.Linear`), so only dense consumers are covered (attention outputs, dense FFNs; not the routed
experts' grouped GEMM) and the model must be small: this is a measurement tool, not the product path.

    python scripts/refit_probe.py --model zimage-fmnist --plan PLAN.json --samples 1024
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METRICS = ("vel_rel", "heldout_fm_mse", "class_acc", "fid_cls", "paired_mse")


def _module(root: Any, path: tuple) -> Any:
    for p in path:
        root = root[p] if isinstance(p, int) else getattr(root, p)
    return root


def record_inputs(model: Any, hooks: Any, inputs: list[dict], consumers: dict, keys: set) -> dict[tuple, np.ndarray]:
    """(node, kind) -> the consumer's input rows ``[tokens, N]`` (float64) over every calibration micro-batch.

    The consumer Linear gets a static ``probe_key`` attribute (it survives NNX's split/merge, a Python id would
    not); the forward runs eagerly so the hook sees concrete arrays."""
    import jax

    from tmp_jax import nn

    rec: dict[tuple, list[np.ndarray]] = {}
    orig = nn.Linear.__call__

    def hooked(self: Any, x: Any) -> Any:
        k = getattr(self, "probe_key", None)
        if k in keys:
            rec.setdefault(k, []).append(np.asarray(x.reshape(-1, x.shape[-1]), np.float64))  # [B*T, N]
        return orig(self, x)

    for path, (node, kind, _, _) in consumers.items():
        if (node, kind) in keys:
            _module(model, path[:-1]).probe_key = (node, kind)  # path ends with the kernel
    nn.Linear.__call__ = hooked
    try:
        with jax.disable_jit():
            for inp in inputs:
                hooks.for_task(inp["task"]).forward(model, inp)
    finally:
        nn.Linear.__call__ = orig
    return {k: np.concatenate(v) for k, v in rec.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="zimage-fmnist", help="an embedded teacher")
    p.add_argument("--plan", type=Path, required=True, help="a plan.json of this model (its kept units are kept)")
    p.add_argument("--samples", type=int, default=1024, help="samples per variant (20 Euler steps, CFG 2)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from tmp_jax.compile_cache import enable_default

    enable_default()
    from tmp_jax import arch
    from tmp_jax import evaluate as ev
    from tmp_jax.calibration import calibrate
    from tmp_jax.compensate import Compensation, CompensationConfig, gram_stats, refit
    from tmp_jax.materialize import kept_first_order, materialize
    from tmp_jax.plan import plan_assignment
    from tmp_jax.problem import _teacher_and_set
    from tmp_jax.tree import Assignment, Tree

    plan = json.loads(a.plan.read_text())
    teacher, _, _, batches, _ = _teacher_and_set(a.model, None, "fp32", None, 0, a.seed, "trajectory")
    hooks = arch.get(teacher.ARCH)
    tree = Tree(hooks.build_spec(teacher.config))
    cfg = CompensationConfig()
    cal = calibrate(teacher, batches, grams=True)
    base = Compensation(gram_stats(tree, cal.stats), cfg)
    asg = plan_assignment(plan)
    order = kept_first_order(tree, plan["policy"]["kept_units"])
    consumers = base.consumers(tree)
    dense = {(n, k) for n, k, u, _ in consumers.values() if u.batch is None}
    setting = ev.Setting("probe", fm_images=1024, samples=a.samples, steps=20)

    class Sequential(Compensation):
        """Re-fits the groups in ``fits`` from (student Gram, right-hand Gram), the others as shipped."""

        def __init__(self, fits: dict[tuple, tuple[np.ndarray, np.ndarray]]):
            super().__init__(base.grams, cfg)
            self.fits = fits

        def apply(self, tree_: Any, path: Any, w: Any, ids: np.ndarray) -> np.ndarray | None:
            c = self.consumers(tree_).get(path)
            if c is None or (c[0], c[1]) not in self.fits:
                return super().apply(tree_, path, w, ids)
            gs, rhs_g = self.fits[(c[0], c[1])]
            return refit(gs, np.asarray(w), ids, c[3].group, c[3].axis, cfg.damp, rhs_gram=rhs_g)

    results: dict[str, dict[str, float]] = {}

    def score(fits: dict | None, tag: str) -> None:
        m = materialize(teacher, tree, asg, order, comp=base if fits is None else Sequential(fits))
        r = ev.evaluate(m, teacher, setting=setting, seed=a.seed)
        results[tag] = {k: float(r[k]) for k in METRICS}
        print(tag, json.dumps({k: round(v, 4) for k, v in results[tag].items()}), flush=True)

    score(None, "independent (shipped)")
    x_teacher = record_inputs(teacher, hooks, cal.inputs, consumers, dense)
    nodes = [n.name for n in tree.spec.nodes()]
    cross: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    done: set[tuple] = set()
    for key in sorted(dense, key=lambda k: nodes.index(k[0])):  # forward order (spec order)
        if not any(key[0] == d or key[0].startswith(d + ".") for d in asg.dropped):  # a dropped node's: none
            # only what comes before this group cut (and re-fitted sequentially): this group at full width
            before = {d for d in asg.dropped if nodes.index(d) < nodes.index(key[0])}
            cut = Assignment(before, {k: v for k, v in asg.keep.items() if k in done})
            hyb = materialize(teacher, tree, cut, order, comp=Sequential(cross))
            xs = record_inputs(hyb, hooks, cal.inputs, base.consumers(tree), {key})[key]
            cross[key] = (xs.T @ xs, xs.T @ x_teacher[key])  # [N, N] each: Xs^T Xs, Xs^T X
        done.add(key)
    score(cross, "sequential, cross term")
    score({k: (g, g) for k, (g, _) in cross.items()}, "sequential, adapted")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
