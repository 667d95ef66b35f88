"""Distillation throughput at full Z-Image-Turbo size (issue 7): seconds/step, tokens/s, peak memory.

A ~4B student (the uniform genome closest to ``--target-params``: every block kept, one heads level and
one FFN level in all 34 blocks; 19/30 heads and FFN 6400/10240 at 4.0B) is distilled from the 6.15B
Turbo teacher at 1024x1024 (latent 16x1x128x128 -> 4096 image tokens, plus a 512-token caption = 4608
tokens per sample). Everything the step does is the project's own code:

- teacher: random bf16 weights generated ON THE DEVICE (one jitted generator per parameter shape on
  ``nnx.eval_shape`` metadata), never on the host;
- student: ``tmp_jax.materialize.materialize`` of the plan's prefix slices of the device-resident
  teacher (device slices; no host copy); the identity importance order (the random teacher counts as
  already permuted);
- step: ``tmp_jax.distill.make_trainer`` -> ``Trainer.gradients`` (teacher forward, student forward +
  backward with per-block remat, velocity + feature alignment, micro-batches summed into one donated
  fp32 buffer) and ``Trainer.apply`` (clip + AdamW warm-up/cosine on the fp32 master weights), with
  ``compute_dtype=bfloat16`` and the loss weights / optimiser settings of ``configs/distill.json``;
- data: ``tmp_jax.distill.training_batches`` on a small ``--data`` .npz of random clean latents and
  caption features (the real noising + ``prepare_batch`` layout), prepared before the timed loop.

``Trainer.grad_step`` and ``apply_fn`` are compiled ahead of time (``.lower().compile()``) so the
compile time and XLA's memory analysis are reported separately; the compiled executables are then what
``Trainer.gradients`` / ``apply`` call. Phases: (A) batch 1; (B) batch ``--accum`` as that many
micro-batches of 1 (gradient accumulation, same executable); (C) batch ``--big`` as ONE micro-batch (new
compile), only if the time budget and XLA's predicted memory allow.

    python bench/distill_throughput.py --out DIR      # full size on the accelerator
    python bench/distill_throughput.py --tiny         # small config, CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 1e9


def _mem() -> dict:
    import jax

    s = jax.devices()[0].memory_stats() or {}  # None on the CPU
    return {k: int(s[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in s}


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def random_teacher(cfg, seed: int = 0):
    """The full model with random bf16 weights generated on the default device (never on the host)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from tmp_jax.models.z_image import model as zm

    graphdef, state = nnx.split(zm.init_abstract(cfg, jnp.bfloat16))

    @partial(jax.jit, static_argnums=(1, 2))
    def gen(key: jax.Array, shape: tuple, kind: str) -> jax.Array:
        z = jax.random.normal(key, shape, jnp.float32)
        if kind == "kernel":
            z = z / np.sqrt(shape[0])
        elif kind == "weight":  # norm scales around 1
            z = 1.0 + 0.1 * z
        else:  # biases, pad tokens
            z = 0.1 * z
        return z.astype(jnp.bfloat16)

    key = jax.random.key(seed)
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        name = str(path[-1])
        kind = name if name in ("kernel", "weight") else "other"
        leaves.append((path, gen(jax.random.fold_in(key, i), tuple(var.get_value().shape), kind)))
    jax.block_until_ready([v for _, v in leaves])
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def step_flops(cfg, heads: list[int], ffn: list[int], n_img: int, n_cap: int) -> float:
    """Analytic matmul FLOPs (2 per MAC) of one forward of one sample: every Linear + QK^T and PV.

    ``heads`` / ``ffn``: per block, refiners first (noise, context) then the main blocks.
    """
    d, hd = cfg.dim, cfg.head_dim
    r = cfg.n_refiner_layers
    toks = [n_img] * r + [n_cap] * r + [n_img + n_cap] * cfg.n_layers
    mod = [True] * r + [False] * r + [True] * cfg.n_layers
    total = 0.0
    for t, h, f, m in zip(toks, heads, ffn, mod, strict=True):
        total += 2 * t * (4 * d * h * hd + 3 * d * f) + 4 * t * t * h * hd + (2 * cfg.adaln_dim * 4 * d if m else 0)
    total += 2 * n_img * 64 * d + 2 * n_cap * cfg.cap_feat_dim * d + 2 * (n_img + n_cap) * d * 64
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small config on the CPU (smoke test of the script)")
    ap.add_argument("--target-params", type=float, default=4.0e9)
    ap.add_argument("--iters", type=int, default=5, help="timed steps per phase (fewer if the budget runs out)")
    ap.add_argument("--accum", type=int, default=4, help="phase B: micro-batches of 1 per step")
    ap.add_argument("--big", type=int, default=4, help="phase C: batch size as one micro-batch (0: skip)")
    ap.add_argument("--budget-s", type=float, default=170, help="start no phase predicted to end after this (s)")
    ap.add_argument("--mem-fraction", default="0.95", help="XLA_PYTHON_CLIENT_MEM_FRACTION (JAX default: 0.75)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", args.mem_fraction)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from candidate_eval import pick_genome
    from flax import nnx

    from tmp_jax.distill import DistillConfig, load_defaults, make_trainer, training_batches
    from tmp_jax.materialize import count_params, materialize
    from tmp_jax.models.z_image import TURBO, ZImageConfig
    from tmp_jax.models.z_image import kernels as zk
    from tmp_jax.models.z_image.structure import build_spec
    from tmp_jax.tree import Tree

    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    dev = jax.devices()[0]
    res: dict = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__}
    res["device"], res["platform"] = str(dev.device_kind), dev.platform
    res["mem_fraction"] = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if args.tiny:
        cfg = ZImageConfig(
            dim=256,
            n_layers=4,
            n_refiner_layers=1,
            n_heads=4,
            n_kv_heads=4,
            cap_feat_dim=64,
            axes_dims=(16, 24, 24),
            axes_lens=(256, 64, 64),
        )
        side, cap_len = 32, 40
    else:
        cfg, side, cap_len = TURBO, 128, 512
    n_img, n_cap = (side // 2) ** 2, cap_len + (-cap_len) % 32
    tok = n_img + n_cap
    res["config"] = "tiny" if args.tiny else "TURBO"
    res["tokens_per_sample"] = {"image": n_img, "caption": n_cap, "total": tok}

    # -- plan: the uniform genome closest to the target ------------------------------------------
    tree = Tree(build_spec(cfg))
    target = args.target_params * tree.full["params"] / 6_154_908_736 if args.tiny else args.target_params
    genome, n_student = pick_genome(tree, target)
    a = tree.decode(genome)
    hg = next(i for i, g in enumerate(tree.genes) if g.kind == "heads")
    fg = next(i for i, g in enumerate(tree.genes) if g.kind == "ffn")
    heads, ffn = tree.genes[hg].counts[genome[hg]], tree.genes[fg].counts[genome[fg]]
    res["student_plan"] = {"params": n_student, "heads": heads, "ffn": ffn, "blocks": "all 34 kept (uniform)"}
    log(f"teacher {tree.full['params'] / 1e9:.3f}B; student {n_student / 1e9:.3f}B: heads {heads}, FFN {ffn}")

    # -- matmul ceiling (for an achieved-rate column) ----------------------------------------------
    n = 1024 if args.tiny else 8192
    x = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    mm(x, x).block_until_ready()
    t0 = time.perf_counter()
    reps = 5 if args.tiny else 40
    for _ in range(reps):
        y = mm(x, x)
    y.block_until_ready()
    res["matmul_tflops"] = 2 * n**3 / ((time.perf_counter() - t0) / reps) / 1e12
    del x, y
    log(f"bf16 matmul {n}^3: {res['matmul_tflops']:.1f} TFLOP/s")

    # -- teacher on the device, student sliced from it -------------------------------------------
    mem = {"start": _mem()}
    t0 = time.perf_counter()
    teacher = random_teacher(cfg)
    res["teacher_init_s"] = time.perf_counter() - t0
    res["teacher_params"] = count_params(teacher)
    mem["teacher"] = _mem()
    t_leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(teacher, nnx.Param))]
    platforms = {d.platform for v in t_leaves for d in v.devices()}
    log(f"teacher {res['teacher_params'] / 1e9:.3f}B bf16 generated on {platforms} in {res['teacher_init_s']:.1f}s")
    t0 = time.perf_counter()
    student = materialize(teacher, tree, a)
    s_leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(student, nnx.Param))]
    jax.block_until_ready(s_leaves)
    res["materialize_s"] = time.perf_counter() - t0
    res["student_params"] = count_params(student)
    assert res["student_params"] == n_student, (res["student_params"], n_student)
    t_ids = {id(v) for v in t_leaves}
    shared = sum(int(v.size) for v in s_leaves if id(v) in t_ids)  # unsliced leaves alias the teacher's
    res["student_params_shared_with_teacher"] = shared
    res["student_on"] = sorted({d.platform for v in s_leaves for d in v.devices()})
    del t_leaves, s_leaves
    mem["student_bf16"] = _mem()
    log(f"student materialised on {res['student_on']} in {res['materialize_s']:.2f}s ({shared / 1e6:.1f}M shared)")

    # -- the project's training step ----------------------------------------------------------------
    d = load_defaults()
    dcfg = DistillConfig(
        plan=None,  # no plan file: the student is built in memory above
        steps=2000,
        batch_size=1,
        micro_batch=1,
        lr=d["lr"],
        warmup=d["warmup"],
        weight_decay=d["weight_decay"],
        clip_norm=d["clip_norm"],
        w_out=d["w_out"],
        w_feat=d["w_feat"],
        compute_dtype="bfloat16",
        remat=True,
        progress=False,
    )
    res["distill_config"] = {k: getattr(dcfg, k) for k in ("lr", "warmup", "clip_norm", "w_out", "w_feat", "steps")}
    t0 = time.perf_counter()
    trainer, params, opt_state = make_trainer(dcfg, teacher, student)
    jax.block_until_ready((params, opt_state))
    res["trainer_init_s"] = time.perf_counter() - t0
    mem["master_adam"] = _mem()
    # run() keeps the bf16 student module alive beside the fp32 master; here it is dropped
    del student
    mem["master_adam_no_bf16_student"] = _mem()
    log(f"fp32 master + AdamW state initialised in {res['trainer_init_s']:.1f}s; memory {mem}")

    # -- data: the real noising + layout on a small random clean set -------------------------------
    tmp = Path(tempfile.mkdtemp(prefix="distill_bench_"))
    rng = np.random.default_rng(0)
    n_data = max(args.accum, args.big, 1)
    np.savez(
        tmp / "data.npz",
        latents=rng.standard_normal((n_data, cfg.in_channels, 1, side, side)).astype(np.float32),
        cap_feats=rng.standard_normal((n_data, cap_len, cfg.cap_feat_dim)).astype(np.float32),
        cap_lens=np.full(n_data, cap_len, np.int32),
    )

    def batches(bsz: int, n: int) -> tuple[list[dict], float]:
        at = training_batches(replace(dcfg, data=str(tmp / "data.npz"), batch_size=bsz), cfg, "zimage")
        t0 = time.perf_counter()
        out = [at(s) for s in range(n)]
        return out, (time.perf_counter() - t0) / n

    # -- compile ahead of time: compile seconds and XLA's memory analysis --------------------------
    def struct(tree_):
        return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding), tree_)

    jit_grad, jit_apply = trainer.grad_step, trainer.apply_fn

    def compile_grad(inputs: dict) -> tuple:
        t0 = time.perf_counter()
        c = jit_grad.lower(struct(params), trainer.t_state, inputs, struct(params)).compile()
        dt = time.perf_counter() - t0
        ma = c.memory_analysis()
        info = {"compile_s": dt}
        try:  # which attention kernel the optimised program really calls
            info["cudnn_in_hlo"] = "cudnn" in c.as_text().lower()
        except Exception:  # noqa: BLE001
            pass
        if ma is not None:
            for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes"):
                info[k] = int(getattr(ma, k, 0) or 0)
        return c, info

    phases: list[dict] = []
    res["phases"] = phases
    losses: list[float] = []

    def run_phase(name: str, tr, bsz: int, n_micro: int, compile_info: dict, iters: int) -> None:
        nonlocal params, opt_state
        inputs, prep_s = batches(bsz, iters + 1)
        ph = {"phase": name, "batch": bsz, "micro_batch": bsz // n_micro, "n_micro": n_micro, **compile_info}
        ph["host_batch_prep_s"] = prep_s
        t0 = time.perf_counter()
        loss, _, g, nm = tr.gradients(params, inputs[0])
        params, opt_state = tr.apply(params, opt_state, g, nm)
        jax.block_until_ready(params)
        ph["first_step_s"] = time.perf_counter() - t0
        losses.append(loss)
        ts, tg = [], []
        for i in range(1, iters + 1):
            if i > 2 and elapsed() > args.budget_s + 15:
                ph["note"] = f"time budget: {i - 1} timed steps"
                break
            t0 = time.perf_counter()
            loss, parts, g, nm = tr.gradients(params, inputs[i])
            t1 = time.perf_counter()
            params, opt_state = tr.apply(params, opt_state, g, nm)
            jax.block_until_ready(params)
            ts.append(time.perf_counter() - t0)
            tg.append(t1 - t0)
            losses.append(loss)
        ph["step_s_all"] = ts
        ph["step_s"] = statistics.median(ts)
        ph["gradients_s"] = statistics.median(tg)
        ph["tokens_per_s"] = bsz * tok / ph["step_s"]
        ph["image_tokens_per_s"] = bsz * n_img / ph["step_s"]
        ph["samples_per_s"] = bsz / ph["step_s"]
        ph["loss_last"], ph["loss_parts_last"] = loss, parts
        ph["mem_after"] = _mem()
        phases.append(ph)
        log(
            f"{name}: batch {bsz} ({n_micro} x {bsz // n_micro}): {ph['step_s']:.3f} s/step "
            f"(gradients {ph['gradients_s']:.3f}), {ph['tokens_per_s']:.0f} tokens/s; first step "
            f"{ph['first_step_s']:.1f}s; loss {loss:.4g}; mem {ph['mem_after']}"
        )

    def dump() -> None:  # after every phase: a run cut off by the time limit still leaves its numbers
        res["losses"] = losses
        res["mem"] = mem
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(res, indent=2, default=str))

    def elapsed() -> float:
        return time.time() - t_start

    # apply_fn: compiled once, its shapes do not depend on the batch
    t0 = time.perf_counter()
    c_apply = jit_apply.lower(struct(params), struct(opt_state), struct(params), 1).compile()
    res["apply_compile_s"] = time.perf_counter() - t0
    ma = c_apply.memory_analysis()
    res["apply_temp_bytes"] = int(getattr(ma, "temp_size_in_bytes", 0) or 0) if ma is not None else None
    log(f"apply (clip + AdamW) compiled in {res['apply_compile_s']:.1f}s")

    # (A) batch 1, and (B) the same executable accumulated over --accum micro-batches of 1
    probe, _ = batches(1, 1)
    res["attention"] = zk.ATTENTION_IMPLEMENTATION + (" (cuDNN on GPU)" if dev.platform == "gpu" else "")
    try:
        c1, info1 = compile_grad(probe[0])
    except Exception as e:  # noqa: BLE001 - e.g. no cuDNN attention backward here: say so, retry with XLA's
        log(f"grad_step compile FAILED ({type(e).__name__}: {str(e)[:400]}); retrying with XLA attention")
        res["attention_fallback"] = f"{type(e).__name__}: {str(e)[:600]}"
        jax.clear_caches()
        zk.set_attention_implementation("xla")
        res["attention"] = "xla (fallback)"
        c1, info1 = compile_grad(probe[0])
    res["grad_compile"] = info1
    log(f"grad_step (teacher fwd + student fwd/bwd, micro-batch 1) compiled in {info1['compile_s']:.1f}s: {info1}")
    dump()
    tr1 = replace(trainer, grad_step=c1, apply_fn=c_apply, micro=1)
    try:
        run_phase("A", tr1, 1, 1, info1, args.iters)
        dump()
        n_b = max(2, args.iters - 2)
        est = (n_b + 1) * args.accum * phases[-1]["step_s"] + 5
        if args.accum > 1 and elapsed() + est < args.budget_s:
            run_phase("B", tr1, args.accum, args.accum, {**info1, "compile_s": 0.0}, n_b)
        elif args.accum > 1:
            phases.append({"phase": "B", "batch": args.accum, "skipped": f"time budget (needs ~{est:.0f}s)"})
        dump()
    except Exception as e:  # noqa: BLE001 - record and still write the results
        phases.append({"phase": "A/B", "error": f"{type(e).__name__}: {str(e)[:600]}"})
        log(f"FAILED: {type(e).__name__}: {str(e)[:600]}")
    # (C) one micro-batch of --big: a new compile; run only if the budget and XLA's prediction allow
    if args.big > 1 and phases and "step_s" in phases[0]:
        need = 1.3 * info1["compile_s"] + (args.iters + 1) * args.big * phases[0]["step_s"] + 10
        if elapsed() + need > args.budget_s:
            phases.append({"phase": "C", "batch": args.big, "skipped": f"time budget (needs ~{need:.0f}s)"})
            log(f"C skipped: time budget (needs ~{need:.0f}s at {elapsed():.0f}s)")
        else:
            try:
                probe, _ = batches(args.big, 1)
                cb, infob = compile_grad(probe[0])
                lim, now = _mem().get("bytes_limit"), _mem().get("bytes_in_use", 0)
                # resident: teacher, master, moments; the step adds its fp32 accumulator and its temp
                want = infob.get("temp_size_in_bytes", 0) + 4 * res["student_params"]
                if lim is not None and now + want > lim:
                    phases.append({"phase": "C", "batch": args.big, **infob, "skipped": "XLA predicts OOM"})
                    log(f"C skipped: resident {_gb(now)} GB + temp {_gb(want)} GB > limit {_gb(lim)} GB")
                else:
                    run_phase("C", replace(tr1, grad_step=cb, micro=args.big), args.big, 1, infob, args.iters)
            except Exception as e:  # noqa: BLE001
                phases.append({"phase": "C", "batch": args.big, "error": f"{type(e).__name__}: {str(e)[:600]}"})
                log(f"C FAILED: {type(e).__name__}: {str(e)[:600]}")
    shutil.rmtree(tmp, ignore_errors=True)
    res["losses"] = losses
    res["losses_finite"] = bool(np.all(np.isfinite(losses))) if losses else None
    res["mem"] = mem
    res["mem_final"] = _mem()

    # -- analytic memory breakdown ------------------------------------------------------------------
    ns, nt = res["student_params"], res["teacher_params"]
    sh = res["student_params_shared_with_teacher"]
    L = cfg.n_layers + 2 * cfg.n_refiner_layers
    act_saved = (cfg.n_layers * tok + cfg.n_refiner_layers * (n_img + n_cap)) * cfg.dim * 2  # remat: block inputs
    t_feats = cfg.n_layers * tok * cfg.dim * 2  # the teacher's block outputs, kept for the feature loss
    res["analytic"] = {
        "teacher_bf16": 2 * nt,
        "student_bf16_module (run() keeps it; dropped here)": 2 * (ns - sh),
        "student_fp32_master": 4 * ns,
        "adam_mu_nu_fp32": 8 * ns,
        "grad_accumulator_fp32": 4 * ns,
        "persistent_total": 2 * nt + 16 * ns,
        "in_step_bf16_compute_copy": 2 * ns,
        "per_sample_saved_block_inputs_bf16": act_saved,
        "per_sample_teacher_features_bf16": t_feats,
        "blocks": L,
    }
    fl_t = step_flops(cfg, [cfg.n_heads] * L, [cfg.ffn_dim] * L, n_img, n_cap)
    fl_s = step_flops(cfg, [heads] * L, [ffn] * L, n_img, n_cap)
    res["flops_per_sample"] = {
        "teacher_fwd": fl_t,
        "student_fwd": fl_s,
        "model": fl_t + 3 * fl_s,
        "hw": fl_t + 4 * fl_s,
    }
    for ph in phases:
        if "step_s" in ph:
            ph["model_tflops"] = ph["batch"] * (fl_t + 3 * fl_s) / ph["step_s"] / 1e12
            ph["hw_tflops"] = ph["batch"] * (fl_t + 4 * fl_s) / ph["step_s"] / 1e12
    tab = table(res)
    print(tab, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(res, indent=2, default=str))
        (args.out / "table.md").write_text(tab + "\n")
    if res["losses_finite"] is False:
        raise SystemExit("non-finite loss")
    if not any("step_s" in p for p in phases):
        raise SystemExit("no phase completed")


def table(res: dict) -> str:
    peak = res["matmul_tflops"]
    lines = [
        f"device {res['device']}; student {res['student_params'] / 1e9:.3f}B (heads {res['student_plan']['heads']}, "
        f"FFN {res['student_plan']['ffn']}) from teacher {res['teacher_params'] / 1e9:.3f}B; "
        f"{res['tokens_per_sample']['total']} tokens/sample; bf16 matmul {peak:.0f} TFLOP/s",
        "| phase | batch | micro-batches x size | s/step | tokens/s | samples/s | compile s | first step s "
        "| XLA temp GB | peak GB after | model TFLOP/s (MFU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ph in res["phases"]:
        if "step_s" not in ph:
            why = ph.get("error") or ph.get("skipped")
            lines.append(f"| {ph['phase']} | {ph.get('batch', '-')} | | {why} | | | | | | | |")
            continue
        lines.append(
            f"| {ph['phase']} | {ph['batch']} | {ph['n_micro']} x {ph['micro_batch']} | {ph['step_s']:.3f} | "
            f"{ph['tokens_per_s']:.0f} | {ph['samples_per_s']:.2f} | {ph['compile_s']:.1f} | "
            f"{ph['first_step_s']:.1f} | "
            f"{_gb(ph.get('temp_size_in_bytes'))} | {_gb(ph['mem_after'].get('peak_bytes_in_use'))} | "
            f"{ph['model_tflops']:.0f} ({100 * ph['model_tflops'] / peak:.0f}%) |"
        )
    an = res["analytic"]
    lines.append("")
    lines.append("| memory (analytic) | GB |")
    lines.append("|---|---|")
    for k, v in an.items():
        if k != "blocks":
            lines.append(f"| {k} | {_gb(v)} |")
    for k, v in res["mem"].items():
        lines.append(f"| measured in use after {k} | {_gb(v.get('bytes_in_use'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
