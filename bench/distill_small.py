"""Distillation step time of the embedded Fashion-MNIST students (issue 17: target <= 15 ms/step on a GPU).

For each embedded teacher, a uniform plan at ``--budget`` (one-shot, no re-fit: the step time does not depend on
the plan's quality) is distilled twice in one process, side by side:

- ``fused``: ``tmp_jax.distill.run`` as users run it: one program per step (gradient + AdamW), losses read
  every 25 steps, next batch built in a thread, checkpoints by step (500) or wall time (300 s);
- ``per-step``: the loop before issue 17 (kept here only as the baseline): ``Trainer.gradients`` then
  ``Trainer.apply`` (two programs), ``float(loss)`` every step, an orbax checkpoint every 50 steps.

Steady state = the second half of each run (compile excluded).

    python bench/distill_small.py [--steps 600] [--batch 8,32] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ("zimage-fmnist", "hunyuan-fmnist")


def _plan(model: str, budget: str, work: Path) -> Path:
    from search.engine import SearchConfig
    from search.engine import run as search_run

    res = search_run(
        SearchConfig(
            budget=budget,
            model=model,
            out=str(work / f"plan-{model}"),
            strategy="uniform",
            progress=False,
            summary=False,
            compensate=False,
        )
    )
    return Path(res.plan_paths[0])


def _per_step(cfg, steps: int) -> float:
    """The pre-issue-17 loop; returns steady-state ms/step."""
    import numpy as np
    import orbax.checkpoint as ocp

    from tmp_jax.distill import build_pair, make_trainer, training_batches

    teacher, student, _, _ = build_pair(cfg)
    batch_at = training_batches(cfg, teacher.config, teacher.ARCH)
    trainer, params, opt = make_trainer(cfg, teacher, student)
    mngr = ocp.CheckpointManager(
        (Path(cfg.out) / "ckpt").resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    )
    marks = []
    for step in range(steps):
        loss, _, g, n = trainer.gradients(params, batch_at(step))
        if not math.isfinite(loss):
            raise RuntimeError(f"loss {loss}")
        params, opt = trainer.apply(params, opt, g, n)
        if (step + 1) % 50 == 0:
            mngr.save(step + 1, args=ocp.args.StandardSave({"params": params, "opt": opt}))
            mngr.wait_until_finished()
        marks.append(time.perf_counter())
    h = steps // 2
    return float(np.mean(np.diff(marks[h:]))) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="steps of the fused run (the per-step run does a third)")
    p.add_argument("--batch", default="8,32", help="comma-separated batch sizes")
    p.add_argument("--budget", default="50%")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", type=Path, default=None, help="write distill_small.json here")
    a = p.parse_args(argv)
    import jax

    from tmp_jax.distill import DistillConfig, run

    work = Path(tempfile.mkdtemp(prefix="distill-small-"))
    rows = []
    for model in a.models.split(","):
        plan = _plan(model, a.budget, work)
        for b in (int(x) for x in a.batch.split(",")):
            base = dict(plan=plan, model=model, batch_size=b, lr=1e-3, warmup=10, progress=False, remat=False)
            t = time.time()
            res = run(DistillConfig(**base, out=work / f"f-{model}-{b}", steps=a.steps))
            fused = res["step_ms"]
            fused_wall = time.time() - t
            n = max(100, a.steps // 3)
            per = _per_step(DistillConfig(**base, out=work / f"p-{model}-{b}", steps=n), n)
            row = {"model": model, "batch": b, "fused_ms": fused, "per_step_ms": per, "fused_wall_s": fused_wall}
            row["speedup"] = per / fused if fused else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    dev = jax.devices()[0]
    out = {"device": getattr(dev, "device_kind", str(dev)), "steps": a.steps, "budget": a.budget, "rows": rows}
    print("| model | batch | fused ms/step | per-step ms/step (old loop) | speed-up |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['fused_ms']:.2f} | {r['per_step_ms']:.2f} | {r['speedup']:.1f}x |")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "distill_small.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
