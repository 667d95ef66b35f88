"""Attention kernels at the full-size model shapes, side by side in one run (issue 10 item 1).

Z-Image-Turbo's unified sequence at 1024x1024 (T = 4096 image + 512 caption tokens, 30 heads of 128) and
batch 1 / 4, bf16, no mask (every sample the same length, as in the forward benchmark). Kernels:

* JAX ``jax.nn.dot_product_attention(implementation="cudnn")`` (the model's GPU default);
* JAX Pallas Mosaic-GPU flash attention (``jax.experimental.pallas.ops.gpu.attention_mgpu``, the Hopper
  warp-specialised kernel shipped with jax), a few tile configurations;
* PyTorch ``scaled_dot_product_attention`` with each backend it has (flash, cuDNN, memory-efficient), in a
  subprocess, so both frameworks are measured in the same call on the same card.

Each output is compared with an fp32 XLA reference on the same inputs (relative L2). Timing: warm-up, then
the median of 3 batches of ``--reps`` back-to-back calls with one sync per batch.

    python bench/attention_kernels.py --out DIR        # GPU
    python bench/attention_kernels.py --tiny           # CPU smoke test (XLA and torch math only)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.driver import run_part, write_outputs  # noqa: E402

#: (block_q, block_kv, max_concurrent_steps) tried for the Mosaic-GPU kernel
MGPU_CONFIGS = [(64, 128, 2), (64, 64, 2), (64, 128, 3), (64, 256, 2)]


def _shapes(args: argparse.Namespace) -> list[tuple[int, int, int, int]]:
    """(B, T, N, D) per workload."""
    if args.tiny:
        return [(1, 256, 2, 64)]
    return [(b, args.tokens, 30, 128) for b in args.batches]


def _flops(b: int, t: int, n: int, d: int) -> float:
    return 4.0 * b * t * t * n * d  # QK^T and PV


def part_jax(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    res: dict = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "runs": []}
    on_gpu = jax.default_backend() == "gpu"

    def timed(f, *xs) -> float:
        jax.block_until_ready(f(*xs))
        jax.block_until_ready(f(*xs))
        per = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(args.reps):
                y = f(*xs)
            jax.block_until_ready(y)
            per.append((time.perf_counter() - t0) / args.reps)
        return 1e3 * statistics.median(per)

    ref_fn = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
        )
    )
    for b, t, n, d in _shapes(args):
        ks = jax.random.split(jax.random.key(b * 7 + t), 3)
        q, k, v = (jax.random.normal(kk, (b, t, n, d), jnp.bfloat16) for kk in ks)
        ref = ref_fn(q[:1], k[:1], v[:1])  # sample 0 in fp32 (the full batch in fp32 is large)
        ref_norm = float(jnp.linalg.norm(ref))

        def rel(out, ref=ref, ref_norm=ref_norm) -> float:
            return float(jnp.linalg.norm(out[:1].astype(jnp.float32) - ref)) / ref_norm

        variants: list[tuple[str, object]] = [("jax xla (bf16)", lambda q, k, v: jax.nn.dot_product_attention(q, k, v))]
        if on_gpu:
            variants.append(
                ("jax cudnn", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
            )
            from jax.experimental.pallas.ops.gpu import attention_mgpu as am

            scale = d**-0.5
            for bq, bkv, steps in MGPU_CONFIGS:
                cfg = am.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=steps)
                variants.append(
                    (
                        f"jax mosaic-gpu fa3 (fp16 cast) q{bq} kv{bkv} s{steps}",
                        # the kernel's shared-memory tiles are fp16: bf16 operands are cast (counted in the time)
                        lambda q, k, v, cfg=cfg, scale=scale: am.attention(
                            (q * scale).astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), cfg
                        ).astype(q.dtype),
                    )
                )
        for name, fn in variants:
            row = {"impl": name, "shape": [b, t, n, d]}
            try:
                f = jax.jit(fn)
                out = f(q, k, v)
                row["rel_l2"] = rel(out)
                row["ms"] = timed(f, q, k, v)
                row["tflops"] = _flops(b, t, n, d) / (row["ms"] / 1e3) / 1e12
                print(
                    f"[jax] {name} {b}x{t}x{n}x{d}: {row['ms']:.3f} ms, {row['tflops']:.0f} TFLOP/s, "
                    f"rel L2 {row['rel_l2']:.2e}",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001 - report and go on with the other kernels
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"[jax] {name} FAILED: {row['error']}", flush=True)
            res["runs"].append(row)
    return res


def part_torch(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "runs": [],
    }
    backends = [("math", SDPBackend.MATH)]
    if dev == "cuda":
        backends = [
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ]
    for b, t, n, d in _shapes(args):
        g = torch.Generator(device=dev).manual_seed(b)
        q, k, v = (torch.randn(b, n, t, d, generator=g, device=dev, dtype=torch.bfloat16) for _ in range(3))
        ref = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float())
        for name, be in backends:
            row = {"impl": f"torch sdpa {name}", "shape": [b, t, n, d]}
            try:
                with sdpa_kernel([be]), torch.inference_mode():
                    out = F.scaled_dot_product_attention(q, k, v)
                    row["rel_l2"] = float((out[:1].float() - ref).norm() / ref.norm())
                    per = []
                    for _ in range(2):
                        F.scaled_dot_product_attention(q, k, v)
                    for _ in range(3):
                        if dev == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        for _ in range(args.reps):
                            F.scaled_dot_product_attention(q, k, v)
                        if dev == "cuda":
                            torch.cuda.synchronize()
                        per.append((time.perf_counter() - t0) / args.reps)
                row["ms"] = 1e3 * statistics.median(per)
                row["tflops"] = _flops(b, t, n, d) / (row["ms"] / 1e3) / 1e12
                print(
                    f"[torch] {name} {b}x{t}x{n}x{d}: {row['ms']:.3f} ms, {row['tflops']:.0f} TFLOP/s, "
                    f"rel L2 {row['rel_l2']:.2e}",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"[torch] {name} FAILED: {row['error']}", flush=True)
            res["runs"].append(row)
    return res


def table(results: dict) -> str:
    lines = [
        f"device: {results.get('jax', {}).get('device')} / {results.get('torch', {}).get('device')}",
        "| kernel | B x T x heads x head_dim | ms | TFLOP/s | rel L2 vs fp32 |",
        "|---|---|---|---|---|",
    ]
    for part in ("jax", "torch"):
        for r in results.get(part, {}).get("runs", []):
            shp = " x ".join(map(str, r["shape"]))
            if "ms" not in r:
                lines.append(f"| {r['impl']} | {shp} | {r.get('error', '')[:120]} | | |")
            else:
                lines.append(f"| {r['impl']} | {shp} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['rel_l2']:.2e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shape (CPU smoke test)")
    ap.add_argument("--part", choices=["all", "jax", "torch"], default="all")
    ap.add_argument("--tokens", type=int, default=4608)
    ap.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.part != "all":
        res = {"jax": part_jax, "torch": part_torch}[args.part](args)
        print("RESULT " + json.dumps(res), flush=True)
        return
    results: dict = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    for part in ["jax"] + ([] if args.no_torch else ["torch"]):
        results[part] = run_part(__file__, part)
    write_outputs(args.out, "attention", results, table(results))


if __name__ == "__main__":
    main()
