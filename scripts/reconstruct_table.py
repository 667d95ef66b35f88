"""Side by side: a plan's student as searched vs after block-by-block reconstruction (issue 17).

For each ``--steps`` value the plan's student is built as the product builds it (:func:`tmp_jax.distill.plan_student`:
sliced, re-fitted with the plan's compensation unless ``--no-compensate``), reconstructed with that many Adam steps
per kept block (:func:`tmp_jax.reconstruct.reconstruct`, on the embedded teacher's trajectory calibration set; 0:
as searched) and scored like a quality-table row (``tmp_jax.evaluate``: velocity error, held-out FM MSE, class
accuracy, FID_cls, paired sample MSE; ``--bootstrap 1000`` adds 95% intervals). Each block's calibration error
before and after is printed and kept in ``--json``.

    python scripts/reconstruct_table.py --model hunyuan-fmnist --plan run/plan.json --steps 0 300 --samples 2048 \
        --bootstrap 1000 --json rec.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METRICS = ("vel_rel", "heldout_fm_mse", "class_acc", "fid_cls", "paired_mse")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hunyuan-fmnist", help="an embedded teacher")
    p.add_argument("--plan", type=Path, required=True, help="a plan.json of this model (its kept units are kept)")
    p.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[0, 300],
        help="Adam steps per kept block, one row each (0: as searched)",
    )
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: tmp_jax.reconstruct's)")
    p.add_argument("--samples", type=int, default=1024, help="samples per variant (20 Euler steps, CFG 2)")
    p.add_argument("--no-compensate", action="store_true", help="start from plain slices, not the re-fitted plan")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap replicates for 95%% intervals (0: none)")
    p.add_argument("--reference-cache", type=Path, default=None, help="keep the teacher's side here (tmp_jax.evaluate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)

    from tmp_jax.compile_cache import enable_default

    enable_default()
    from tmp_jax import arch
    from tmp_jax import evaluate as ev
    from tmp_jax.calibration import prepare
    from tmp_jax.distill import plan_student
    from tmp_jax.problem import _teacher_and_set
    from tmp_jax.reconstruct import ReconstructConfig, reconstruct

    teacher, path, _, batches, _ = _teacher_and_set(a.model, None, "fp32", None, 8, a.seed, "trajectory")
    inputs = [prepare(arch.get(teacher.ARCH), teacher.config, b) for b in batches]
    setting = ev.Setting("probe", fm_images=1024, samples=a.samples, steps=20, bootstrap=a.bootstrap)
    results: dict[str, Any] = {}
    for n in a.steps:
        student, _, _ = plan_student(a.plan, teacher, path, a.model, not a.no_compensate)
        t0 = time.perf_counter()
        fits = reconstruct(teacher, student, inputs, ReconstructConfig(n, a.lr)) if n else []
        fit_s = time.perf_counter() - t0
        r = ev.evaluate(student, teacher, setting=setting, seed=a.seed, reference_cache=a.reference_cache)
        blocks = [{"block": f.block, "before": f.before, "after": f.after, "kept": f.kept} for f in fits]
        keep = [k for k in r if k in METRICS or k.endswith("_ci")]
        results[f"steps={n}"] = {**{k: r[k] for k in keep}, "fit_s": round(fit_s, 1), "blocks": blocks}
        for f in fits:
            print(f"  {f.block}: {f.before:.4f} -> {f.after:.4f} ({f.seconds:.0f} s)", flush=True)
        print(f"steps={n}", json.dumps({k: round(float(r[k]), 4) for k in METRICS}), f"fit {fit_s:.0f} s", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
