"""Train the small real-data teachers (and the evaluator) on Fashion-MNIST.

    python scripts/train_teachers.py --model evaluator [--out tmp_jax/assets/evaluator.safetensors]
    python scripts/train_teachers.py --model zimage    [--out tmp_jax/assets/zimage-fmnist]
    python scripts/train_teachers.py --model hunyuan   [--out tmp_jax/assets/hunyuan-fmnist]

Data: the full 60k train split of the Debian package ``dataset-fashion-mnist`` (``$FMNIST_DIR``
overrides the folder); ``--subset`` uses the committed 4096-image subset instead (CPU debugging).

Z-Image teacher (:data:`ZIMAGE_TEACHER`, 5.09M parameters, bf16 file ~10 MB): our Flax NNX
``ZImageTransformer`` with dim 192, 6 heads of 32 (RoPE axes 8+12+12), 6 main layers, 1 refiner
layer per stack, in_channels 4 (pixel-unshuffled 14x14x4 latents), patch 2 -> 49 image tokens,
8 caption tokens of 32 features (:func:`tmp_jax.fmnist.caption_features`). Rectified flow in the
Z-Image convention: ``x = (1 - sigma) x0 + sigma eps``, model input ``t = 1 - sigma``, target
``x0 - eps``; logit-normal sigma, 10% of captions replaced by the null caption, AdamW (clip 1.0,
warmup + cosine), EMA 0.999, bf16 compute with fp32 master weights. The layout is computed once and
batches are drawn on the device inside one jitted ``lax.scan`` per chunk of steps.

HunyuanImage teacher (``tmp_jax.models.hunyuan_image3.train.FMNIST_CONFIG``, 4.85M parameters, bf16
~9.7 MB, official keys + config.json): our Flax NNX ``HunyuanImage3`` with hidden 128, 6 layers, 8 heads of
16 in 4 KV groups, 8 routed experts of width 192 (top-2) plus one shared expert, on the same 14x14x4 latents
(patch 1 -> 196 image tokens) with per-class prompt token ids (layout in that module). Rectified flow in the
HunyuanImage convention (``timestep = 1000 sigma``, target ``noise - x0``), the same sigma / label-drop /
optimiser / EMA as above, plus ``--balance-coef`` x the Switch load-balancing loss of every router
(``E * sum_e f_e P_e``, mean over layers); trained with the dense MoE path (``--moe-impl``).

``--max-seconds`` caps the training time: after two timed chunks the step count is lowered to fit
(and the cosine schedule is laid over that count); the metrics file records the steps taken, and
``--steps N --max-seconds 0`` repeats a run with exactly N steps. Seeded throughout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tmp_jax import fmnist_classifier as ev  # noqa: E402
from tmp_jax.fmnist import (  # noqa: E402
    ASSETS,
    NULL_LABEL,
    NUM_CLASSES,
    Split,
    caption_table,
    load_fmnist,
    load_subset,
    to_latents,
)
from tmp_jax.models.z_image import ZImageConfig, ZImageTransformer  # noqa: E402
from tmp_jax.sampling import (  # noqa: E402
    fixed_layout,
    flow_matching_loss,
    heldout_fm_mse,
    patchify,
    sample_images,
)

ZIMAGE_TEACHER = ZImageConfig(
    in_channels=4,
    dim=192,
    n_layers=6,
    n_refiner_layers=1,
    n_heads=6,
    n_kv_heads=6,
    cap_feat_dim=32,
    axes_dims=(8, 12, 12),
    axes_lens=(128, 32, 32),
)


def log(msg: str) -> None:
    print(msg, flush=True)


def load_data(subset: bool) -> tuple[Split, Split]:
    if subset:
        return load_subset("train"), load_subset("test")
    return load_fmnist("train"), load_fmnist("test")


# ----------------------------------------------------------------------------------------------
# Evaluator


def train_evaluator_cmd(args: argparse.Namespace) -> dict[str, Any]:
    train, test = load_data(args.subset)
    model, metrics = ev.train_evaluator(
        train, test, epochs=args.epochs or 15, batch=args.batch or 256, seed=args.seed, log=log
    )
    out = Path(args.out or ASSETS / "evaluator.safetensors")
    ev.save_evaluator(model, out)
    metrics["subset_test_accuracy"] = ev.accuracy(load_subset("test").images, load_subset("test").labels, model)
    log(f"wrote {out}; metrics {metrics}")
    return metrics


# ----------------------------------------------------------------------------------------------
# Z-Image teacher


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def make_draw(batch: int, n: int, label_drop: float) -> Any:
    """The traced batch sampler both teachers train with: ``draw(key, (x_all, y_all, table)) -> (key, batch)``:
    ``batch`` random train images, their noise, a logit-normal(0, 1) sigma and the caption rows of their
    labels (the null label with probability ``label_drop``, for classifier-free guidance)."""

    def draw(key: jax.Array, data: tuple) -> tuple:
        x_all, y_all, table = data
        key, ki, kn, ks, kd = jax.random.split(key, 5)
        idx = jax.random.randint(ki, (batch,), 0, n)
        x0 = x_all[idx]
        noise = jax.random.normal(kn, x0.shape, jnp.float32)
        sigma = jax.nn.sigmoid(jax.random.normal(ks, (batch,), jnp.float32))  # logit-normal(0, 1)
        lab = jnp.where(jax.random.uniform(kd, (batch,)) < label_drop, NULL_LABEL, y_all[idx])
        return key, (x0, noise, sigma, table[lab])

    return draw


def fit(
    args: argparse.Namespace, graphdef: Any, params: Any, draw: Any, loss_fn: Any, data: tuple
) -> tuple[Any, dict[str, Any]]:
    """The shared teacher training loop: AdamW (clip 1.0, warmup + cosine, decoupled weight decay), EMA,
    ``args.chunk`` steps per jitted ``lax.scan`` with batches drawn on the device, ``--max-seconds`` cap.

    ``draw(key, data) -> (key, batch)`` and ``loss_fn(params, batch) -> (loss, parts)`` are traced; ``data``
    is passed as an argument (not a closed-over constant: it is large). Returns the EMA parameters and the
    run's numbers (steps, seconds, last chunk's mean loss and parts)."""
    K, total = args.chunk, args.steps
    base = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b1=0.9, b2=0.99))
    opt_state = base.init(params)
    ema = jax.tree_util.tree_map(jnp.copy, params)

    @jax.jit
    def chunk(prm: Any, o: Any, e: Any, key: jax.Array, lrs: jax.Array, step0: jax.Array, data: tuple) -> tuple:
        def one(carry: tuple, inp: tuple) -> tuple:
            prm, o, e, key = carry
            lr, step = inp
            key, batch = draw(key, data)
            (loss, parts), g = jax.value_and_grad(loss_fn, has_aux=True)(prm, batch)
            upd, o = base.update(g, o, prm)
            prm = jax.tree_util.tree_map(lambda w, u: w - lr * (u + args.weight_decay * w), prm, upd)
            d = jnp.minimum(args.ema, (1.0 + step) / (10.0 + step))
            e = jax.tree_util.tree_map(lambda a, w: d * a + (1 - d) * w, e, prm)
            return (prm, o, e, key), (loss, parts)

        steps = step0 + jnp.arange(K, dtype=jnp.float32)
        (prm, o, e, key), (losses, parts) = jax.lax.scan(one, (prm, o, e, key), (lrs, steps))
        return prm, o, e, key, losses.mean(), jax.tree_util.tree_map(jnp.mean, parts)

    key = jax.random.PRNGKey(args.seed + 1)
    t_start = time.time()
    step, chunk_times, losses, parts = 0, [], [], {}
    while step < total:
        lrs = jnp.asarray([lr_at(step + i, total, args.lr, args.warmup) for i in range(K)], jnp.float32)
        t0 = time.time()
        params, opt_state, ema, key, loss, parts = chunk(params, opt_state, ema, key, lrs, jnp.float32(step), data)
        loss = float(loss)
        chunk_times.append(time.time() - t0)
        step += K
        losses.append(loss)
        if args.max_seconds and len(chunk_times) == 2:
            per_step = chunk_times[1] / K
            left = args.max_seconds - (time.time() - t_start)
            fit_steps = step + int(left / per_step) // K * K
            if fit_steps < total:
                log(f"  {per_step * 1e3:.2f} ms/step: lowering steps {total} -> {fit_steps} to fit --max-seconds")
                total = max(fit_steps, step)
        if step % (K * args.log_every) == 0 or step >= total:
            extra = "".join(f" {k} {float(v):.4f}" for k, v in parts.items() if k != "fm")
            log(f"  step {step}/{total} loss {loss:.4f}{extra} lr {float(lrs[-1]):.2e} ({time.time() - t_start:.0f}s)")
    info = {
        "steps": step,
        "train_seconds": time.time() - t_start,
        "final_train_loss": losses[-1],
        **{f"final_train_{k}": float(v) for k, v in parts.items()},
    }
    return ema, info


def train_zimage(args: argparse.Namespace) -> dict[str, Any]:
    cfg = ZIMAGE_TEACHER
    train, test = load_data(args.subset)
    B = args.batch or 256
    model = ZImageTransformer(cfg, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    log(f"zimage teacher: {n_params:,} params; train {len(train)} images; batch {B}; steps {args.steps}")
    lay = fixed_layout(cfg, B)
    p = cfg.all_patch_size[0]
    x_all = patchify(jnp.asarray(to_latents(train.images)), p)  # [N, 49, 16]
    y_all = jnp.asarray(train.labels, jnp.int32)
    table = jnp.asarray(caption_table(cfg.cap_feat_dim))
    n = x_all.shape[0]
    compute_dtype = jnp.bfloat16 if args.bf16 else jnp.float32

    draw = make_draw(B, n, args.label_drop)

    def loss_fn(prm: Any, batch: tuple) -> tuple:
        prm_c = jax.tree_util.tree_map(lambda v: v.astype(compute_dtype), prm)
        loss = flow_matching_loss(nnx.merge(graphdef, prm_c), lay, *batch)
        return loss, {"fm": loss}

    ema, info = fit(args, graphdef, params, draw, loss_fn, (x_all, y_all, table))
    step, train_s = info["steps"], info["train_seconds"]
    losses = [info["final_train_loss"]]

    teacher = nnx.merge(graphdef, ema)
    out = Path(args.out or ASSETS / "zimage-fmnist")
    teacher.save_pretrained(str(out), dtype=jnp.bfloat16, overwrite=True)
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"wrote {out} ({size / 1e6:.2f} MB)")

    # metrics on the committed test subset, with the saved bf16 weights
    loaded = ZImageTransformer.from_pretrained(str(out))
    sub = load_subset("test")
    rand = ZImageTransformer(cfg, rngs=nnx.Rngs(12345))
    metrics: dict[str, Any] = {
        "params": n_params,
        "steps": step,
        "batch": B,
        "train_seconds": train_s,
        "final_train_loss": losses[-1],
        "folder_bytes": size,
        "fm_mse_teacher": heldout_fm_mse(loaded, sub.images[:256], sub.labels[:256]),
        "fm_mse_random": heldout_fm_mse(rand, sub.images[:256], sub.labels[:256]),
    }
    log(f"held-out FM MSE: teacher {metrics['fm_mse_teacher']:.4f}, random {metrics['fm_mse_random']:.4f}")
    sample_metrics(args, loaded, sub, metrics)
    return metrics


def sample_metrics(args: argparse.Namespace, model: Any, sub: Split, metrics: dict[str, Any]) -> None:
    """``--eval-samples`` samples per ``--guidance``: evaluator accuracy and FID_cls (into ``metrics``)."""
    if not args.eval_samples:
        return
    evaluator = ev.load_evaluator_from(args.evaluator) if args.evaluator else ev.load_evaluator()
    labels = np.arange(args.eval_samples) % NUM_CLASSES
    ref_feats = ev.features(sub.images, evaluator)
    for g in args.guidance:
        t0 = time.time()
        imgs = sample_images(model, labels, seed=0, steps=args.sample_steps, guidance=g)
        acc = ev.accuracy(imgs, labels, evaluator)
        fid = ev.fid(ev.features(imgs, evaluator), ref_feats)
        metrics[f"sample_acc_g{g}"] = acc
        metrics[f"fid_cls_g{g}"] = fid
        log(f"samples g={g}: accuracy {acc:.4f} FID_cls {fid:.3f} ({time.time() - t0:.1f}s)")
        if args.samples_out and g == args.guidance[-1]:
            np.savez_compressed(args.samples_out, images=imgs[:200], labels=labels[:200])


# ----------------------------------------------------------------------------------------------
# HunyuanImage-3.0 teacher


def train_hunyuan(args: argparse.Namespace) -> dict[str, Any]:
    from converters.hunyuan import load_hunyuan
    from tmp_jax.models.hunyuan_image3 import HunyuanImage3
    from tmp_jax.models.hunyuan_image3.train import FMNIST_CONFIG, forward_train_aux, ids_table, save

    cfg = FMNIST_CONFIG
    train, _ = load_data(args.subset)
    B = args.batch or 256
    model = HunyuanImage3(cfg, rngs=nnx.Rngs(args.seed), moe_impl=args.moe_impl)
    graphdef, params = nnx.split(model)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    log(
        f"hunyuan teacher: {n_params:,} params; train {len(train)} images; batch {B}; steps {args.steps}; "
        f"moe impl {args.moe_impl}; balance coef {args.balance_coef}"
    )
    x_all = jnp.asarray(to_latents(train.images))  # [N, 4, 14, 14]
    y_all = jnp.asarray(train.labels, jnp.int32)
    table = jnp.asarray(ids_table(cfg))  # [11, S]
    n = x_all.shape[0]
    seq = table.shape[1]
    compute_dtype = jnp.bfloat16 if args.bf16 else jnp.float32

    draw = make_draw(B, n, args.label_drop)

    def loss_fn(prm: Any, batch: tuple) -> tuple:
        x0, noise, sigma, ids = batch
        prm_c = jax.tree_util.tree_map_with_path(
            lambda path, v: v if _is_router(path) else v.astype(compute_dtype), prm
        )  # the router (wg) stays fp32, as in the model
        s = sigma[:, None, None, None]
        inputs = {
            "input_ids": ids,
            "latents": (1.0 - s) * x0 + s * noise,
            "timestep": 1000.0 * sigma,
            "valid_lengths": jnp.full((B,), seq, jnp.int32),
        }
        v, _, balance = forward_train_aux(nnx.merge(graphdef, prm_c), inputs, remat=False)
        fm_loss = jnp.mean(jnp.square(v.astype(jnp.float32) - (noise - x0)))
        return fm_loss + args.balance_coef * balance, {"fm": fm_loss, "balance": balance}

    ema, info = fit(args, graphdef, params, draw, loss_fn, (x_all, y_all, table))
    teacher = nnx.merge(graphdef, ema)
    teacher.set_moe_impl("ragged")
    out = Path(args.out or ASSETS / "hunyuan-fmnist")
    save(teacher, out, overwrite=True, dtype=jnp.bfloat16)
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"wrote {out} ({size / 1e6:.2f} MB)")

    loaded = load_hunyuan(out, dtype=jnp.float32)  # the saved bf16 weights, as users load them
    sub = load_subset("test")
    rand = HunyuanImage3(cfg, rngs=nnx.Rngs(12345))  # the training init distribution
    metrics: dict[str, Any] = {
        "params": n_params,
        "batch": B,
        **info,
        "folder_bytes": size,
        "fm_mse_teacher": heldout_fm_mse(loaded, sub.images[:256], sub.labels[:256]),
        "fm_mse_random": heldout_fm_mse(rand, sub.images[:256], sub.labels[:256]),
        "router_load": router_load(loaded, sub),
    }
    log(f"held-out FM MSE: teacher {metrics['fm_mse_teacher']:.4f}, random {metrics['fm_mse_random']:.4f}")
    log(f"router load (fraction of assignments per expert, per layer): {metrics['router_load']}")
    sample_metrics(args, loaded, sub, metrics)
    return metrics


def _is_router(path: tuple) -> bool:
    return any(getattr(k, "key", getattr(k, "name", None)) == "wg" for k in path)


def router_load(model: Any, sub: Split, n: int = 64) -> list[list[float]]:
    """Per layer, the fraction of (token, slot) assignments each expert gets on ``n`` noised test images."""
    from tmp_jax.models.hunyuan_image3.model import attn_branch, t2i_embed
    from tmp_jax.models.hunyuan_image3.train import t2i_ids

    cfg = model.config
    x0 = jnp.asarray(to_latents(sub.images[:n]))
    noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape, jnp.float32)
    sigma = jnp.linspace(0.05, 0.95, n)
    s = sigma[:, None, None, None]
    ids = jnp.asarray(t2i_ids(sub.labels[:n], cfg))
    e = t2i_embed(
        model.model.wte,
        model.patch_embed,
        model.time_embed,
        model.timestep_emb,
        ids,
        (1 - s) * x0 + s * noise,
        1000.0 * sigma,
        None,
        image_token_id=cfg.image_token_id,
        head_dim=cfg.attention_head_dim,
        rope_theta=cfg.rope_theta,
    )
    x, loads = e["embeds"], []
    for layer in model.model.layers:
        x = attn_branch(layer.self_attn, layer.input_layernorm, x, e["cos"], e["sin"], e["mask"], e["token_mask"])
        h = layer.post_attention_layernorm(x)
        _, idx = layer.mlp.route(h.reshape(-1, h.shape[-1]))
        counts = np.bincount(np.asarray(idx).reshape(-1), minlength=layer.mlp.num_experts)
        loads.append([round(float(c / counts.sum()), 4) for c in counts])
        x = x + layer.mlp(h, e["token_mask"])
    return loads


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=["evaluator", "zimage", "hunyuan"])
    ap.add_argument("--out", default=None, help="output file (evaluator) or folder (teachers)")
    ap.add_argument("--metrics", default=None, help="write the metrics JSON here")
    ap.add_argument("--subset", action="store_true", help="train on the committed 4096-image subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--chunk", type=int, default=100, help="steps per jitted lax.scan")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None, help="evaluator epochs")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--label-drop", type=float, default=0.1)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--moe-impl", default="dense", choices=["dense", "ragged"], help="HunyuanImage training MoE path")
    ap.add_argument("--balance-coef", type=float, default=0.01, help="HunyuanImage router load-balancing weight")
    ap.add_argument("--max-seconds", type=float, default=0.0, help="training time cap (0 = none)")
    ap.add_argument("--log-every", type=int, default=10, help="log every N chunks")
    ap.add_argument("--eval-samples", type=int, default=0, help="sample N images and score them")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    ap.add_argument("--evaluator", default=None, help="evaluator weights (default: the committed one)")
    ap.add_argument("--samples-out", default=None, help="save 200 samples (npz)")
    args = ap.parse_args()
    log(f"jax {jax.__version__} devices {jax.devices()}")
    if args.model == "evaluator":
        metrics = train_evaluator_cmd(args)
    elif args.model == "zimage":
        metrics = train_zimage(args)
    else:
        metrics = train_hunyuan(args)
    metrics = {k: (float(v) if isinstance(v, np.floating) else v) for k, v in metrics.items()}
    if args.metrics:
        Path(args.metrics).write_text(json.dumps(metrics, indent=1) + "\n")
    log(json.dumps(metrics))


if __name__ == "__main__":
    main()
