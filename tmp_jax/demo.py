"""`make demo`: the main job end to end on the embedded default teacher, writing ``demo-out/``.

1. search   — ``python -m tmp_jax.search`` on the embedded Z-Image Fashion-MNIST teacher at a 66% budget
2. distill  — a short recovery distillation of the winning subnetwork
3. export   — ``python -m converters.export --weights``: PyTorch safetensors that diffusers loads
4. check    — load the export in PyTorch (diffusers), sample from it with the same noise as JAX
5. report   — ``report.md`` (params before/after, metrics of teacher / pruned / recovered),
              ``samples.png`` (teacher vs pruned vs recovered, same noise, per class), ``pareto.png``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TEACHER = Path(__file__).resolve().parent / "assets" / "zimage-fmnist"


def _torch_samples(
    folder: Path, labels: np.ndarray, rows: np.ndarray, seed: int, steps: int, guidance: float
) -> np.ndarray:
    """Euler + CFG sampling with the EXPORTED PyTorch model for ``labels[rows]``, from the same noise
    as the JAX sampler gave those rows when it sampled all of ``labels``."""
    import torch
    from diffusers import AutoModel

    from tmp_jax import fmnist as fm
    from tmp_jax.sampling import sigma_schedule, unpatchify

    conf = json.loads((folder / "config.json").read_text())
    if "auto_map" in conf:
        model = AutoModel.from_pretrained(str(folder), trust_remote_code=True).eval()
    else:
        from diffusers import ZImageTransformer2DModel

        model = ZImageTransformer2DModel.from_pretrained(str(folder)).eval()
    p, C = conf["all_patch_size"][0], conf["in_channels"]
    hw = (fm.LATENT_SIZE, fm.LATENT_SIZE)
    n_tok, pdim = (hw[0] // p) * (hw[1] // p), p * p * C
    noise = jax.random.normal(jax.random.PRNGKey(seed), (len(labels), n_tok, pdim), jnp.float32)[rows]
    x = torch.from_numpy(np.array(unpatchify(noise, p, C, hw)))  # [N, C, 14, 14]
    labels = labels[rows]
    table = torch.from_numpy(fm.caption_table(conf["cap_feat_dim"]))
    sig = sigma_schedule(steps)
    with torch.no_grad():
        for s, s_next in zip(sig[:-1], sig[1:]):
            lat = [v[:, None] for v in x]  # (C, 1, H, W) each
            t = torch.full((len(labels),), 1.0 - float(s))
            cond = model(lat, t, [table[int(c)] for c in labels]).sample
            pred = torch.stack([o[:, 0] for o in cond])
            if guidance != 1.0:
                unc = model(lat, t, [table[fm.NULL_LABEL]] * len(labels)).sample
                pu = torch.stack([o[:, 0] for o in unc])
                pred = pu + guidance * (pred - pu)
            x = x - float(s_next - s) * pred
    return fm.from_latents(x.numpy())


def _grid(rows: list[np.ndarray], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0))
    for r, (imgs, name) in enumerate(zip(rows, names)):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(imgs[c], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: Path, *, generations: int, steps: int, budget: str = "66%", quick: bool = False) -> dict[str, Any]:
    from converters.export import ExportConfig, export
    from converters.zimage import load_zimage
    from search.engine import SearchConfig
    from search.engine import run as search_run
    from tmp_jax import fmnist as fm
    from tmp_jax import fmnist_classifier as classifier
    from tmp_jax.distill import DistillConfig
    from tmp_jax.distill import run as distill_run
    from tmp_jax.sampling import heldout_fm_mse, sample_images

    if not (TEACHER / "config.json").is_file():
        raise SystemExit(f"{TEACHER}: the embedded teacher is missing from this checkout")
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("search", "distill", "export"):  # the demo owns these: start fresh each run
        shutil.rmtree(out / sub, ignore_errors=True)
    t0 = time.time()
    print("[1/4] search", flush=True)
    res = search_run(
        SearchConfig(
            budget=budget,
            model=str(TEACHER),
            out=str(out / "search"),
            generations=generations,
            population=8 if quick else 12,
        )
    )
    plan = res.plan_paths[0]
    shutil.copy2(out / "search" / "pareto.png", out / "pareto.png")
    print("[2/4] distill", flush=True)
    dres = distill_run(
        DistillConfig(
            plan=plan,
            model=str(TEACHER),
            out=out / "distill",
            steps=steps,
            save_every=max(steps, 1),
            batch_size=16,
            remat=False,
        )
    )
    print("[3/4] export", flush=True)
    exp = export(
        ExportConfig(
            plan=plan,
            model=TEACHER,
            weights=out / "distill" / "weights",
            out=out / "export",
            overwrite=True,
            progress=False,
        )
    )
    print("[4/4] evaluate and sample", flush=True)
    teacher = dres["teacher"]
    from tmp_jax.compensate import from_plan
    from tmp_jax.materialize import kept_first_order, materialize
    from tmp_jax.plan import plan_assignment

    tree = dres["tree"]
    a = plan_assignment(dres["plan"])
    order = kept_first_order(tree, dres["plan"]["policy"]["kept_units"])
    # the pruned plan as searched (consumers re-fitted when the plan is compensated), before distillation
    pruned = materialize(teacher, tree, a, order, comp=from_plan(dres["plan"], res.plan_paths[0]))
    recovered = load_zimage(out / "distill" / "weights")
    test = fm.load_subset("test")
    n_eval = 100 if quick else 200
    imgs, labels = test.images[:n_eval], test.labels[:n_eval]
    steps_s = 8
    metrics: dict[str, dict[str, float]] = {}
    samples = {}
    ref_feats = classifier.features(test.images)
    for name, m in (("teacher", teacher), ("pruned", pruned), ("recovered", recovered)):
        s = sample_images(m, labels, seed=0, steps=steps_s, guidance=2.0)
        samples[name] = s
        metrics[name] = {
            "params": float(sum(int(np.prod(v.shape)) for v in jax.tree.leaves(_params(m)))),
            "heldout_fm_mse": heldout_fm_mse(m, imgs[:256], labels[:256]),
            "class_acc": classifier.accuracy(s, labels),
            "fid_cls": classifier.fid(classifier.features(s), ref_feats),
        }
    for name in ("pruned", "recovered"):
        metrics[name]["paired_mse_vs_teacher"] = float(
            np.mean((samples[name].astype(np.float32) - samples["teacher"].astype(np.float32)) ** 2) / 255.0**2
        )
    per_class = np.array([np.flatnonzero(labels == c)[0] for c in range(fm.NUM_CLASSES)])
    torch_imgs = _torch_samples(out / "export", labels, per_class, seed=0, steps=steps_s, guidance=2.0)
    jax_imgs = samples["recovered"][per_class]
    torch_vs_jax = float(np.abs(torch_imgs.astype(np.int32) - jax_imgs.astype(np.int32)).max())
    rows = [samples[k][per_class] for k in ("teacher", "pruned", "recovered")] + [torch_imgs]
    _grid(rows, ["teacher", "pruned", "recovered", "export (torch)"], out / "samples.png")
    result = {
        "metrics": metrics,
        "export": exp,
        "plan": str(plan),
        "seconds": time.time() - t0,
        "torch_vs_jax_max_pixel_diff": torch_vs_jax,
    }
    _report(out, result, dres["plan"])
    return result


def _params(m: Any) -> Any:
    from flax import nnx

    return nnx.state(m, nnx.Param)


def _report(out: Path, r: dict[str, Any], plan: dict[str, Any]) -> None:
    m = r["metrics"]
    lines = [
        "# tmp-jax demo: TMP on the embedded Z-Image Fashion-MNIST teacher",
        "",
        f"Budget {plan['budget'].get('text')} of parameters; plan: `{r['plan']}`; wall time {r['seconds']:.0f} s.",
        "",
        f"Parameters: {plan['counts']['before']['params']:,} -> {plan['counts']['after']['params']:,}",
        "",
        "| model | params | held-out FM MSE | class acc. of samples | FID_cls | paired sample MSE vs teacher |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("teacher", "pruned", "recovered"):
        x = m[k]
        lines.append(
            f"| {k} | {int(x['params']):,} | {x['heldout_fm_mse']:.4f} | {x['class_acc']:.3f} | {x['fid_cls']:.2f} | "
            f"{x.get('paired_mse_vs_teacher', 0.0):.4f} |"
        )
    lines += [
        "",
        f"Export: `{r['export']['out']}` ({r['export']['layout']}), {r['export']['bytes'] / 1e6:.1f} MB.",
        f"PyTorch samples from the export vs JAX samples of the recovered model: max pixel difference "
        f"{r['torch_vs_jax_max_pixel_diff']:.0f} / 255.",
        "",
        "Metrics: 8 Euler steps, CFG 2, fixed noise shared by all models; class accuracy and FID_cls from the",
        "committed evaluator CNN (test split). `samples.png`: one sample per class, same noise per column.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tmp_jax.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default: demo-out)")
    p.add_argument("--generations", type=int, default=4, help="search generations (default 4)")
    p.add_argument("--steps", type=int, default=100, help="distillation steps (default 100)")
    p.add_argument("--budget", default="66%", help="parameter budget (default 66%%)")
    p.add_argument("--quick", action="store_true", help="smaller evaluation (for tests)")
    a = p.parse_args(argv)
    from tmp_jax.compile_cache import enable_default

    enable_default()  # persistent XLA compilation cache (TMP_JAX_COMPILATION_CACHE=off disables)
    r = run(a.out, generations=a.generations, steps=a.steps, budget=a.budget, quick=a.quick)
    print((a.out / "report.md").read_text())
    print(f"wrote {a.out / 'report.md'}, {a.out / 'samples.png'}, {a.out / 'pareto.png'}")
    return 0 if r["torch_vs_jax_max_pixel_diff"] <= 8 else 1


if __name__ == "__main__":
    sys.exit(main())
