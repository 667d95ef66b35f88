"""Z-Image DiT forward benchmark: our JAX forward vs diffusers eager vs torch.compile, one machine.

Full-size Turbo (6.15B) in bf16 at 1024x1024 (latent 16x1x128x128 -> 4096 image tokens, caption 512
tokens -> 4608 unified tokens), batch 1 and 4. Random weights are generated ON THE DEVICE (JAX: a jitted
generator per parameter shape; PyTorch: the module is constructed under ``torch.device('cuda')`` with
bf16 as default dtype), never on the host. Each framework runs in its own subprocess, one after the
other, so neither sees the other's allocator.

    python bench/zimage_forward.py --out DIR             # everything (GPU)
    python bench/zimage_forward.py --tiny --out DIR      # small config, CPU smoke test of the script

Timing: warm-up (compile) then the median of ``--iters`` runs, each synchronised
(``block_until_ready`` / ``torch.cuda.synchronize``). MFU is analytic FLOPs (matmuls + attention)
over time, against a bf16 8192^3 matmul measured in JAX in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TURBO_KW = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)
TINY_KW = dict(
    TURBO_KW, dim=256, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=64, axes_dims=[32, 48, 48]
)


def shapes(args: argparse.Namespace) -> tuple[dict, int, int]:
    """(config kwargs, latent side, caption length)."""
    if args.tiny:
        return TINY_KW, 32, 40
    return TURBO_KW, args.res // 8, args.cap_len


def flops(kw: dict, side: int, cap_len: int, batch: int) -> float:
    """Analytic forward FLOPs (2 per MAC): every Linear + QK^T and PV. Norms/RoPE/elementwise ignored."""
    d, ffn = kw["dim"], int(kw["dim"] / 3 * 8)
    n_img = (side // 2) ** 2
    n_img += (-n_img) % 32
    n_cap = cap_len + (-cap_len) % 32
    per_tok_block = 2 * (4 * d * d + 3 * d * ffn)  # attention projections + SwiGLU

    def blocks(n: int, tokens: int, mod: bool) -> float:
        lin = tokens * per_tok_block + (2 * 256 * 4 * d if mod else 0)
        attn = 4 * tokens * tokens * d  # QK^T + PV over all heads
        return n * (lin + attn)

    r = kw["n_refiner_layers"]
    total = blocks(r, n_img, True) + blocks(r, n_cap, False) + blocks(kw["n_layers"], n_img + n_cap, True)
    total += 2 * n_img * 64 * d + 2 * n_cap * kw["cap_feat_dim"] * d + 2 * (n_img + n_cap) * d * 64  # embed/final
    return batch * total


def med_ms(ts: list[float]) -> float:
    return 1e3 * statistics.median(ts)


# ------------------------------------------------------------------------------------------------
# JAX


def part_jax(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from tmp_jax.models.z_image import ZImageConfig
    from tmp_jax.models.z_image import model as zm
    from tmp_jax.models.z_image.fusion import fuse_projections
    from tmp_jax.models.z_image.kernels import set_attention_implementation
    from tmp_jax.models.z_image.layout import make_layout

    res: dict = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "runs": []}
    kw, side, cap_len = shapes(args)
    deadline = time.time() + args.jax_budget_s

    # -- bf16 matmul ceiling ----------------------------------------------------------------------
    n = 1024 if args.tiny else 8192
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    for _ in range(3):
        mm(a, b).block_until_ready()
    reps = 5 if args.tiny else 50
    per_run = []
    for _ in range(3):  # 3 batches of `reps` back-to-back launches, one sync each
        t0 = time.perf_counter()
        outs = [mm(a, b) for _ in range(reps)]
        outs[-1].block_until_ready()
        per_run.append((time.perf_counter() - t0) / reps)
        del outs
    mm_s = statistics.median(per_run)
    res["matmul"] = {"n": n, "ms": 1e3 * mm_s, "tflops": 2 * n**3 / mm_s / 1e12}
    print(f"[jax] bf16 matmul {n}^3: {1e3 * mm_s:.3f} ms = {res['matmul']['tflops']:.1f} TFLOP/s", flush=True)
    del a, b

    # -- random weights generated on the device -----------------------------------------------------
    cfg = ZImageConfig(**kw)
    t0 = time.perf_counter()
    abstract = zm.init_abstract(cfg, jnp.bfloat16)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)

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

    key = jax.random.key(0)
    leaves = []
    for i, (path, var) in enumerate(flat):
        name = str(path[-1])
        kind = name if name in ("kernel", "weight") else "other"
        leaves.append((path, gen(jax.random.fold_in(key, i), tuple(var.get_value().shape), kind)))
    new_state = nnx.from_flat_state(leaves)
    jax.block_until_ready([v for _, v in leaves])
    n_params = sum(int(np.prod(v.shape)) for _, v in leaves)
    on = {str(d) for _, v in leaves for d in v.devices()}
    res["params"] = n_params
    res["init_s"] = time.perf_counter() - t0
    print(f"[jax] {n_params / 1e9:.3f}B params generated on {sorted(on)} in {res['init_s']:.1f}s", flush=True)

    rng = np.random.default_rng(0)

    def inputs(batch: int) -> tuple[dict, jax.Array]:
        x = [rng.standard_normal((16, 1, side, side)).astype(np.float32) for _ in range(batch)]
        cap = [rng.standard_normal((cap_len, kw["cap_feat_dim"])).astype(np.float32) for _ in range(batch)]
        lay = make_layout(cfg, x, cap)
        assert lay.dense, "equal-size samples must give a dense layout (no key mask)"
        arrs = {k: jnp.asarray(v, jnp.bfloat16 if v.dtype == np.float32 else None) for k, v in lay.arrays.items()}
        t = jnp.full((batch,), 0.5, jnp.float32)
        return arrs, t

    def make_fwd(gdef):  # a new function object per variant: jit caches traces per function
        def fwd(st, arrs, t):
            m = nnx.merge(gdef, st)
            return m.forward_padded(arrs, t, "2-1", dense=True)  # equal sizes: unmasked attention

        return jax.jit(fwd)

    fused: tuple | None = None  # (graphdef, state) of the fuse_projections inference layout, built on first use

    variants = [(impl, bsz) for impl in args.attn for bsz in args.batches]  # first kernel at every size first
    ref_out: dict = {}
    fixed: dict = {b: inputs(b) for b in args.batches}  # same inputs for every attention kernel
    for impl, bsz in variants:
        if time.time() > deadline:
            res["runs"].append({"impl": impl, "batch": bsz, "skipped": "time budget"})
            print(f"[jax] skip attn={impl} b={bsz}: time budget", flush=True)
            continue
        kernel, _, layout = impl.partition("+")  # "cudnn+fused": cuDNN attention, fused projections
        set_attention_implementation(kernel)
        arrs, t = fixed[bsz]
        gdef, st_run = graphdef, new_state
        if layout == "fused":
            if fused is None:
                fused = nnx.split(fuse_projections(nnx.merge(graphdef, new_state)))
            gdef, st_run = fused
        f = make_fwd(gdef)
        try:
            t0 = time.perf_counter()
            lowered = f.lower(st_run, arrs, t)
            hlo = lowered.as_text()
            cudnn_in_hlo = "cudnn" in hlo.lower()
            del hlo
            compiled = lowered.compile()
            compile_s = time.perf_counter() - t0
            out = compiled(st_run, arrs, t)
            for _ in range(2):
                compiled(st_run, arrs, t).block_until_ready()
            ts = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                compiled(st_run, arrs, t).block_until_ready()
                ts.append(time.perf_counter() - t0)
            # back-to-back launches, one sync: excludes host dispatch gaps between calls
            t0 = time.perf_counter()
            for _ in range(args.iters):
                o2 = compiled(st_run, arrs, t)
            o2.block_until_ready()
            pipelined_ms = 1e3 * (time.perf_counter() - t0) / args.iters
            del o2
            finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
            if bsz not in ref_out:
                ref_out[bsz] = (impl, out)
            else:  # same weights and inputs, other attention kernel: relative L2 difference
                o0 = ref_out[bsz][1].astype(jnp.float32)
                rel = float(jnp.linalg.norm(out.astype(jnp.float32) - o0) / jnp.linalg.norm(o0))
                res.setdefault("attn_rel_diff", {})[f"b{bsz} {impl} vs {ref_out[bsz][0]}"] = rel
                print(f"[jax] b={bsz}: rel L2 diff {impl} vs {ref_out[bsz][0]} = {rel:.2e}", flush=True)
            r = {
                "impl": impl,
                "batch": bsz,
                "ms": med_ms(ts),
                "min_ms": 1e3 * min(ts),
                "max_ms": 1e3 * max(ts),
                "pipelined_ms": pipelined_ms,
                "compile_s": compile_s,
                "finite": finite,
                "tokens": int(out.shape[1]),
                "cudnn_in_hlo": cudnn_in_hlo,
            }
            res["runs"].append(r)
            print(
                f"[jax] attn={impl} b={bsz}: {r['ms']:.2f} ms (min {r['min_ms']:.2f}, max {r['max_ms']:.2f}, "
                f"back-to-back {pipelined_ms:.2f}; compile {compile_s:.1f}s; finite={finite}; "
                f"tokens={r['tokens']}; cudnn in HLO={cudnn_in_hlo})",
                flush=True,
            )
            del out
        except Exception as e:  # noqa: BLE001 - report and go on with the other variants
            res["runs"].append({"impl": impl, "batch": bsz, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            print(f"[jax] attn={impl} b={bsz} FAILED: {type(e).__name__}: {str(e)[:400]}", flush=True)
        f = compiled = lowered = None
    ref_out.clear()
    if args.breakdown and time.time() < deadline + 60:
        try:
            res["breakdown"] = block_breakdown(nnx.merge(graphdef, new_state), cfg, side, cap_len, args)
        except Exception as e:  # noqa: BLE001
            res["breakdown"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            print(f"[jax] breakdown FAILED: {type(e).__name__}: {str(e)[:400]}", flush=True)
    set_attention_implementation("auto")
    return res


def _time_pipelined(f, *xs, reps: int = 20) -> float:
    """ms per call: warm-up, then `reps` back-to-back launches and one sync (median of 3 such batches)."""
    import jax

    jax.block_until_ready(f(*xs))
    jax.block_until_ready(f(*xs))
    out = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            y = f(*xs)
        jax.block_until_ready(y)
        out.append((time.perf_counter() - t0) / reps)
    return 1e3 * statistics.median(out)


def random_block(cfg, ffn: int | None = None, seed: int = 0):  # noqa: ANN001, ANN201 - bench helper
    """One modulated main block (``ffn`` wide, default the config's), random bf16 weights born on the first
    device by :func:`tmp_jax.sharding.random_on_mesh` (norms 1 +- 0.1, kernels N(0, 1/fan_in))."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tmp_jax.models.z_image import model as zm
    from tmp_jax.models.z_image.config import BlockSpec
    from tmp_jax.sharding import make_mesh, random_on_mesh

    spec = BlockSpec(0, cfg.n_heads, cfg.ffn_dim if ffn is None else ffn)
    abstract = nnx.eval_shape(
        lambda: zm.ZImageTransformerBlock(cfg, spec, modulation=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    )
    return random_on_mesh(abstract, make_mesh("data:1", jax.devices()[:1]), seed)


def block_inputs(cfg, T: int) -> tuple:  # noqa: ANN001 - bench helper
    """(x, c, cos, sin) of one main block at batch 1 on a ``T``-token sequence: random bf16 ``x`` [1, T, dim]
    and adaLN input ``c`` [1, adaln], RoPE tables of synthetic 3-axis positions."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tmp_jax.models.z_image import model as zm

    ks = jax.random.split(jax.random.key(7), 2)
    x = jax.random.normal(ks[0], (1, T, cfg.dim), jnp.bfloat16)
    c = jax.random.normal(ks[1], (1, cfg.adaln_dim), jnp.bfloat16)
    pos = np.stack([np.arange(T) % 600, np.arange(T) % 64, (np.arange(T) // 64) % 64], -1)[None].astype(np.int32)
    cos, sin = zm.rope_cos_sin(cfg, jnp.asarray(pos))
    return x, c, cos, sin


def block_breakdown(model, cfg, side: int, cap_len: int, args: argparse.Namespace) -> dict:
    """One main block at batch 1 on the unified sequence: whole block vs its 7 GEMMs alone vs attention."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tmp_jax.models.z_image.kernels import attention, set_attention_implementation

    T = (side // 2) ** 2 + cap_len + (-cap_len) % 32
    hd, nh = cfg.head_dim, cfg.n_heads
    ks = jax.random.split(jax.random.key(8), 4)
    x, c, cos, sin = block_inputs(cfg, T)
    mask = None  # batch 1: the dense layout, unmasked attention (as forward_padded(dense=True))
    kernels = list(dict.fromkeys(v.partition("+")[0] for v in args.attn))  # "cudnn+fused" -> "cudnn"
    first = kernels[0]
    blk = model.layers[0]
    gd, st = nnx.split(blk)
    out: dict = {"tokens": T}
    set_attention_implementation(first)

    def run_block(st, x, cos, sin, c):
        return nnx.merge(gd, st)(x, mask, cos, sin, c)

    out["block_ms"] = _time_pipelined(jax.jit(run_block), st, x, cos, sin, c)
    if args.profile:  # per-kernel GPU time of the block, from a jax.profiler trace
        from bench.kernel_profile import format_table, kernel_table

        for impl in kernels:
            set_attention_implementation(impl)
            rows = kernel_table(jax.jit(run_block), st, x, cos, sin, c, reps=5)
            out[f"profile_{impl}"] = rows
            print(f"[jax] block kernels, attention={impl}:\n" + format_table(rows, 40), flush=True)
            print(format_table(rows, 40, line="XLA Ops"), flush=True)
        set_attention_implementation(first)
    a, ff = blk.attention, blk.feed_forward
    ws = [
        a.to_q.kernel[...],
        a.to_k.kernel[...],
        a.to_v.kernel[...],
        a.to_out[0].kernel[...],
        ff.w1.kernel[...],
        ff.w3.kernel[...],
        ff.w2.kernel[...],
    ]

    def gemms(x, h, wq, wk, wv, wo, w1, w3, w2):  # the block's 7 GEMMs with their real shapes
        return (x @ wq, x @ wk, x @ wv, x @ wo, x @ w1, x @ w3, h @ w2)

    h = jax.random.normal(ks[0], (1, T, ws[-1].shape[0]), jnp.bfloat16)
    out["gemms_ms"] = _time_pipelined(jax.jit(gemms), x, h, *ws)
    gemm_flops = 2 * T * sum(int(w.shape[0]) * int(w.shape[1]) for w in ws)
    out["gemms_tflops"] = gemm_flops / (out["gemms_ms"] / 1e3) / 1e12
    q, k, v = (jax.random.normal(kk, (1, T, nh, hd), jnp.bfloat16) for kk in ks[1:4])
    attn_flops = 4 * T * T * nh * hd
    for impl in kernels:
        set_attention_implementation(impl)
        ms = _time_pipelined(jax.jit(lambda q, k, v, m: attention(q, k, v, m)), q, k, v, mask)
        out[f"attn_{impl}_ms"] = ms
        out[f"attn_{impl}_tflops"] = attn_flops / (ms / 1e3) / 1e12
    set_attention_implementation("auto")
    out["rest_ms"] = out["block_ms"] - out["gemms_ms"] - out[f"attn_{first}_ms"]
    attn = ", ".join(f"{k}={v:.3f}" for k, v in out.items() if k.startswith("attn_"))
    print(
        f"[jax] one main block, batch 1, T={T}: block {out['block_ms']:.3f} ms = GEMMs {out['gemms_ms']:.3f} ms "
        f"({out['gemms_tflops']:.0f} TFLOP/s) + attention({first}) {out[f'attn_{first}_ms']:.3f} ms + rest "
        f"{out['rest_ms']:.3f} ms; {attn}",
        flush=True,
    )
    return out


def part_gemm(args: argparse.Namespace) -> dict:
    """Issue 10 item 1: fused QKV (dim, 3*dim) and fused W1|W3 (dim, 2*ffn) kernels.

    One main block at full width (random weights on the device), batch 1, the unified sequence. The fused
    layout is the model's own ``fuse_projections`` (kernels concatenated along N once). Times (a) the GEMMs
    alone, separate vs fused, and (b) the whole jitted block as stored vs in the fused layout, with the
    outputs compared.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tmp_jax.models.z_image import ZImageConfig
    from tmp_jax.models.z_image.fusion import fuse_projections

    kw, side, cap_len = shapes(args)
    cfg = ZImageConfig(**kw)
    res: dict = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    blk = random_block(cfg, seed=3)
    fused = fuse_projections(nnx.clone(blk))  # the model's inference layout: q|k|v and w1|w3 built once
    gd, st = nnx.split(blk)
    gdf, stf = nnx.split(fused)
    a, ff = blk.attention, blk.feed_forward
    wq, wk, wv = a.to_q.kernel[...], a.to_k.kernel[...], a.to_v.kernel[...]
    w1, w3 = ff.w1.kernel[...], ff.w3.kernel[...]
    wqkv = fused.attention.to_qkv.kernel[...]  # [dim, 3 * inner]
    w13 = fused.feed_forward.w13.kernel[...]  # [dim, 2 * ffn]

    T = (side // 2) ** 2 + cap_len + (-cap_len) % 32
    x, c, cos, sin = block_inputs(cfg, T)
    res["tokens"] = T
    d, ffn = cfg.dim, cfg.ffn_dim

    def tf(ms: float, flop: float) -> float:
        return flop / (ms / 1e3) / 1e12

    # (a) GEMMs alone
    qkv_flop, w13_flop = 2 * T * d * 3 * d, 2 * T * d * 2 * ffn
    g = {
        f"qkv separate (3 x N={d})": (jax.jit(lambda x, a, b, c: (x @ a, x @ b, x @ c)), (x, wq, wk, wv), qkv_flop),
        f"qkv fused (N={3 * d})": (jax.jit(lambda x, w: x @ w), (x, wqkv), qkv_flop),
        f"w1, w3 separate (2 x N={ffn})": (jax.jit(lambda x, a, b: (x @ a, x @ b)), (x, w1, w3), w13_flop),
        f"w1|w3 fused (N={2 * ffn})": (jax.jit(lambda x, w: x @ w), (x, w13), w13_flop),
    }
    res["gemms"] = {}
    for name, (f, xs, flop) in g.items():
        ms = _time_pipelined(f, *xs)
        res["gemms"][name] = {"ms": ms, "tflops": tf(ms, flop)}
        print(f"[gemm] {name}: {ms:.3f} ms = {tf(ms, flop):.0f} TFLOP/s", flush=True)

    # (b) whole block: as stored vs in the fuse_projections layout (same math), unmasked (dense batch 1)
    def plain_block(st, x, cos, sin, c):
        return nnx.merge(gd, st)(x, None, cos, sin, c)

    def fused_block(st, x, cos, sin, c):
        return nnx.merge(gdf, st)(x, None, cos, sin, c)

    y0 = jax.jit(plain_block)(st, x, cos, sin, c)
    y1 = jax.jit(fused_block)(stf, x, cos, sin, c)
    y0f, y1f = y0.astype(jnp.float32), y1.astype(jnp.float32)
    res["block_rel_l2"] = float(jnp.linalg.norm(y1f - y0f) / jnp.linalg.norm(y0f))
    res["block_plain_ms"] = _time_pipelined(jax.jit(plain_block), st, x, cos, sin, c)
    res["block_fused_ms"] = _time_pipelined(jax.jit(fused_block), stf, x, cos, sin, c)
    if args.profile:
        from bench.kernel_profile import format_table, kernel_table

        for name, f, xs in (
            ("as the model", plain_block, (st, x, cos, sin, c)),
            ("fused QKV + W1|W3", fused_block, (stf, x, cos, sin, c)),
        ):
            rows = kernel_table(jax.jit(f), *xs, reps=5)
            res[f"profile {name}"] = rows
            print(f"[gemm] block kernels, {name}:\n" + format_table(rows, 30), flush=True)
    print(
        f"[gemm] one main block, T={T}: as the model {res['block_plain_ms']:.3f} ms, fused QKV + W1|W3 "
        f"{res['block_fused_ms']:.3f} ms ({res['block_plain_ms'] / res['block_fused_ms']:.3f}x); output rel. L2 "
        f"{res['block_rel_l2']:.2e}",
        flush=True,
    )
    return res


def gemm_table(r: dict) -> str:
    lines = [f"device: {r.get('device')}; one main block, batch 1, T = {r.get('tokens')}", "| variant | ms | TFLOP/s |"]
    lines.append("|---|---|---|")
    for name, v in r.get("gemms", {}).items():
        lines.append(f"| {name} | {v['ms']:.3f} | {v['tflops']:.0f} |")
    if "block_fused_ms" in r:
        lines.append(f"| whole block, as the model | {r['block_plain_ms']:.3f} | |")
        lines.append(
            f"| whole block, fused QKV + W1\\|W3 (output rel. L2 {r['block_rel_l2']:.1e}) | "
            f"{r['block_fused_ms']:.3f} | |"
        )
    if "error" in r:
        lines.append(f"| error | {r['error']} | |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# PyTorch / diffusers


def part_torch(args: argparse.Namespace) -> dict:
    import torch
    from diffusers import ZImageTransformer2DModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kw, side, cap_len = shapes(args)
    res: dict = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "runs": [],
    }
    import diffusers

    res["diffusers"] = diffusers.__version__
    deadline = time.time() + args.torch_budget_s

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = ZImageTransformer2DModel(**kw)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pad_token" in name:  # allocated with torch.empty
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
    model = model.eval().requires_grad_(False)
    sync()
    dts = {str(p.dtype) for p in model.parameters()}
    devs = {str(p.device) for p in model.parameters()}
    res["params"] = sum(p.numel() for p in model.parameters())
    res["init_s"] = time.perf_counter() - t0
    print(f"[torch] {res['params'] / 1e9:.3f}B params {dts} on {devs} in {res['init_s']:.1f}s", flush=True)

    g = torch.Generator(device=dev).manual_seed(0)

    def inputs(batch: int):
        x = [torch.randn(16, 1, side, side, generator=g, device=dev, dtype=torch.bfloat16) for _ in range(batch)]
        cap = [
            torch.randn(cap_len, kw["cap_feat_dim"], generator=g, device=dev, dtype=torch.bfloat16)
            for _ in range(batch)
        ]
        t = torch.full((batch,), 0.5, device=dev)
        return x, t, cap

    def bench(fn, label: str, bsz: int) -> None:
        if time.time() > deadline:
            res["runs"].append({"impl": label, "batch": bsz, "skipped": "time budget"})
            print(f"[torch] skip {label} b={bsz}: time budget", flush=True)
            return
        x, t, cap = inputs(bsz)
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = fn(x, t, cap, return_dict=False)[0]
                sync()
                first_s = time.perf_counter() - t0
                for _ in range(2):
                    fn(x, t, cap, return_dict=False)
                sync()
                ts = []
                for _ in range(args.iters):
                    sync()
                    t0 = time.perf_counter()
                    fn(x, t, cap, return_dict=False)
                    sync()
                    ts.append(time.perf_counter() - t0)
            finite = all(bool(torch.isfinite(o).all()) for o in out)
            r = {
                "impl": label,
                "batch": bsz,
                "ms": med_ms(ts),
                "min_ms": 1e3 * min(ts),
                "max_ms": 1e3 * max(ts),
                "compile_s": first_s,
                "finite": finite,
            }
            res["runs"].append(r)
            print(
                f"[torch] {label} b={bsz}: {r['ms']:.2f} ms (min {r['min_ms']:.2f}, max {r['max_ms']:.2f}; "
                f"first call {first_s:.1f}s; finite={finite})",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001
            res["runs"].append({"impl": label, "batch": bsz, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            print(f"[torch] {label} b={bsz} FAILED: {type(e).__name__}: {str(e)[:400]}", flush=True)

    for bsz in args.batches:
        bench(model, "diffusers eager", bsz)
    if not args.no_compile:
        cm = torch.compile(model, dynamic=False)
        for bsz in args.batches:
            bench(cm, "torch.compile", bsz)
    return res


# ------------------------------------------------------------------------------------------------
# Driver


def table(results: dict, args: argparse.Namespace) -> str:
    kw, side, cap_len = shapes(args)
    peak = results.get("jax", {}).get("matmul", {}).get("tflops")
    rows = []
    for part in ("jax", "torch", "jax_extra"):
        for r in results.get(part, {}).get("runs", []):
            rows.append((part, r))
    comp = {r["batch"]: r["ms"] for p, r in rows if p == "torch" and r.get("impl") == "torch.compile" and "ms" in r}
    eager = {r["batch"]: r["ms"] for p, r in rows if p == "torch" and r.get("impl") == "diffusers eager" and "ms" in r}
    lines = [
        f"device: {results.get('jax', {}).get('device')} / {results.get('torch', {}).get('device')}; "
        f"tokens/sample: {(side // 2) ** 2} image + {cap_len} caption; "
        f"bf16 matmul ceiling {peak if peak is None else round(peak, 1)} TFLOP/s",
        "| impl | batch | median ms | min ms | back-to-back ms | TFLOP/s | MFU | floor ms | vs eager | vs compile "
        "| first call s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for part, r in rows:
        name = r["impl"] if part == "torch" else f"JAX ({r['impl']} attention)"
        if part == "jax_extra":
            name += f" {results[part].get('xla_flags', '')}"
        if "ms" not in r:
            lines.append(f"| {name} | {r['batch']} | {r.get('error') or r.get('skipped')} | | | | | | | | |")
            continue
        fl = flops(kw, side, cap_len, r["batch"])
        tf = fl / (r["ms"] / 1e3) / 1e12
        mfu = f"{100 * tf / peak:.1f}%" if peak else "-"
        floor = f"{fl / (peak * 1e12) * 1e3:.1f}" if peak else "-"
        ve = f"{eager[r['batch']] / r['ms']:.2f}x" if r["batch"] in eager else "-"
        vc = f"{comp[r['batch']] / r['ms']:.2f}x" if r["batch"] in comp else "-"
        b2b = f"{r['pipelined_ms']:.1f}" if "pipelined_ms" in r else "-"
        lines.append(
            f"| {name} | {r['batch']} | {r['ms']:.1f} | {r['min_ms']:.1f} | {b2b} | {tf:.0f} | {mfu} | {floor} | "
            f"{ve} | {vc} | {r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small config (CPU smoke test)")
    ap.add_argument("--part", choices=["all", "jax", "torch", "gemm"], default="all")
    ap.add_argument(
        "--gemm-variants-only", action="store_true", help="only the fused-QKV / fused-W1|W3 block variants (JAX)"
    )
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--cap-len", type=int, default=512)
    ap.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4])
    ap.add_argument(
        "--attn",
        type=lambda s: s.split(","),
        default=["cudnn", "cudnn+fused", "xla"],
        help="JAX variants: attention kernel (cudnn, xla), '+fused' = fuse_projections inference layout",
    )
    ap.add_argument("--profile", action="store_true", help="with --breakdown: per-kernel GPU times of one block")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="also time one main block and its parts (JAX)")
    ap.add_argument("--jax-budget-s", type=float, default=240, help="start no new JAX variant after this")
    ap.add_argument("--torch-budget-s", type=float, default=240, help="start no new torch variant after this")
    ap.add_argument("--extra-xla-flags", default="", help="also time JAX under these XLA_FLAGS (subprocess)")
    ap.add_argument("--extra-after-s", type=float, default=330, help="skip the extra run past this many seconds")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    if args.part != "all":
        res = {"jax": part_jax, "torch": part_torch, "gemm": part_gemm}[args.part](args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    results: dict = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    start = time.time()
    plan = [("jax", "jax", [], None), ("torch", "torch", [], None)]
    if args.gemm_variants_only:
        plan = [("gemm", "gemm", [], None)]
    if args.extra_xla_flags:
        # same JAX forward under other XLA flags (first attention kernel, first batch size only)
        plan.append(
            ("jax_extra", "jax", ["--attn", args.attn[0], "--batches", str(args.batches[0])], args.extra_xla_flags)
        )
    for key, part, extra, flags in plan:
        if key == "jax_extra" and time.time() - start > args.extra_after_s:
            print(f"[driver] skip {key}: {time.time() - start:.0f}s elapsed", flush=True)
            continue
        env = dict(os.environ)
        if flags:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        cmd = [sys.executable, __file__] + sys.argv[1:] + ["--part", part] + extra
        t0 = time.perf_counter()
        lines = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as p:
            for line in p.stdout:  # stream: a run cut off by a time limit still shows what it did
                lines.append(line)
                if not line.startswith("RESULT "):
                    print(line, end="", flush=True)
        got = [ln for ln in lines if ln.startswith("RESULT ")]
        results[key] = json.loads(got[-1][7:]) if got else {"error": f"rc={p.returncode}", "runs": []}
        results[key]["wall_s"] = time.perf_counter() - t0
        if flags:
            results[key]["xla_flags"] = flags
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{key}.log").write_text("".join(lines))
            (args.out / "results.json").write_text(json.dumps(results, indent=2))
    tab = gemm_table(results["gemm"]) if args.gemm_variants_only else table(results, args)
    print(tab)
    if args.out:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        (args.out / "table.md").write_text(tab + "\n")


if __name__ == "__main__":
    main()
