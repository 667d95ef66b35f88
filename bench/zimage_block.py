"""One full-width Z-Image-Turbo main block: where its time goes, and what XLA flags / kernels change it.

Issue 10 item 1 is GEMM-bound (7 GEMMs + flash attention + norms per block, x34 blocks), so this script
answers the per-block questions in one call, each variant in a fresh subprocess (XLA flags are per
process):

* ``block``: the jitted block (batch 1, T = 4608 = the dense 1024^2 layout, unmasked attention) under
  each ``--flag-variants`` entry, plus per-kernel GPU times of the block from a ``jax.profiler`` trace;
* ``gemm``: the block's GEMM shapes (M = T * batch; K x N = 3840x3840, 3840x10240, 10240x3840) and an
  8192^3 product through XLA's dot and through PyTorch's ``F.linear`` (cuBLAS) in the same call.

Weights are random, generated on the device. Timing: warm-up, then the median of 3 batches of ``--reps``
back-to-back calls, one sync per batch.

    python bench/zimage_block.py --out DIR            # GPU
    python bench/zimage_block.py --tiny               # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.driver import run_part, write_outputs  # noqa: E402
from bench.zimage_forward import block_inputs, random_block  # noqa: E402

#: name -> XLA_FLAGS added for that variant ("" = the defaults)
FLAG_VARIANTS = {
    "default": "",
    "no dot merger": "--xla_gpu_dot_merger_threshold_mb=0",
    "cudnn gemm fusion 2": "--xla_gpu_cudnn_gemm_fusion_level=2",
    "cudnn gemm fusion 3": "--xla_gpu_cudnn_gemm_fusion_level=3",
    "triton gemm any": "--xla_gpu_triton_gemm_any=true",
    "cublaslt": "--xla_gpu_enable_cublaslt=true",
}


def _median_ms(f, *xs, reps: int) -> float:
    import jax

    jax.block_until_ready(f(*xs))
    jax.block_until_ready(f(*xs))
    per = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            y = f(*xs)
        jax.block_until_ready(y)
        per.append((time.perf_counter() - t0) / reps)
    return 1e3 * statistics.median(per)


def _dims(args: argparse.Namespace) -> tuple[int, int, int, int]:
    """(T, dim, ffn, heads)."""
    return (320, 256, 512, 2) if args.tiny else (4608, 3840, 10240, 30)


def part_block(args: argparse.Namespace) -> dict:
    import jax
    from flax import nnx

    from bench.kernel_profile import format_table, kernel_table
    from tmp_jax.models.z_image import ZImageConfig

    T, dim, ffn, heads = _dims(args)
    cfg = ZImageConfig(dim=dim, n_heads=heads, n_kv_heads=heads, n_layers=1, n_refiner_layers=1, cap_feat_dim=64)
    gd, st = nnx.split(random_block(cfg, ffn))
    x, c, cos, sin = block_inputs(cfg, T)

    def run_block(st, x, cos, sin, c):
        return nnx.merge(gd, st)(x, None, cos, sin, c)  # dense layout: no key mask

    res: dict = {"device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""), "T": T}
    f = jax.jit(run_block)
    res["block_ms"] = _median_ms(f, st, x, cos, sin, c, reps=args.reps)
    hlo = f.lower(st, x, cos, sin, c).compile().as_text()
    res["n_custom_calls"] = hlo.count("custom-call(") + hlo.count("custom_call_target")
    res["cudnn_in_hlo"] = "cudnn" in hlo.lower()
    print(f"[block] {res['xla_flags'] or 'default flags'}: {res['block_ms']:.3f} ms", flush=True)
    if args.profile:
        rows = kernel_table(f, st, x, cos, sin, c, reps=5)
        res["profile"] = rows
        print(format_table(rows, 40), flush=True)
        print(format_table(rows, 40, line="XLA Ops"), flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "block_hlo.txt").write_text(hlo)
    return res


def _gemm_shapes(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """(M, K, N) of the block's GEMMs at batch 1 and 4, plus the square ceiling probe."""
    T, dim, ffn, _ = _dims(args)
    out = [(b * T, k, n) for b in (1, 4) for k, n in ((dim, dim), (dim, ffn), (ffn, dim))]
    return out + [(1024, 1024, 1024)] if args.tiny else out + [(8192, 8192, 8192)]


def part_gemm_jax(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    res: dict = {"device": jax.devices()[0].device_kind, "runs": []}
    for m, k, n in _gemm_shapes(args):
        ka, kb = jax.random.split(jax.random.key(m + k + n))
        a = jax.random.normal(ka, (m, k), jnp.bfloat16)
        w = (jax.random.normal(kb, (k, n), jnp.float32) / k**0.5).astype(jnp.bfloat16)
        ms = _median_ms(jax.jit(lambda a, w: a @ w), a, w, reps=args.reps)
        res["runs"].append({"impl": "jax xla dot", "mkn": [m, k, n], "ms": ms, "tflops": 2 * m * k * n / ms / 1e9})
        print(f"[gemm jax] {m}x{k}x{n}: {ms:.3f} ms {2 * m * k * n / ms / 1e9:.0f} TFLOP/s", flush=True)
    return res


def part_gemm_torch(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "runs": []}

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    for m, k, n in _gemm_shapes(args):
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5  # nn.Linear layout (out, in)
        with torch.inference_mode():
            for _ in range(2):
                F.linear(a, w)
            per = []
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    F.linear(a, w)
                sync()
                per.append((time.perf_counter() - t0) / args.reps)
        ms = 1e3 * statistics.median(per)
        res["runs"].append({"impl": "torch F.linear", "mkn": [m, k, n], "ms": ms, "tflops": 2 * m * k * n / ms / 1e9})
        print(f"[gemm torch] {m}x{k}x{n}: {ms:.3f} ms {2 * m * k * n / ms / 1e9:.0f} TFLOP/s", flush=True)
    return res


def _child(args: argparse.Namespace, part: str, flags: str = "") -> dict:
    return run_part(__file__, part, flags, args.child_timeout_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small block (CPU smoke test)")
    ap.add_argument("--part", choices=["all", "block", "gemm_jax", "gemm_torch"], default="all")
    ap.add_argument("--variants", default=",".join(FLAG_VARIANTS), help="comma list of FLAG_VARIANTS names")
    ap.add_argument("--profile", action="store_true", help="per-kernel GPU times of the block (default flags)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-gemm", action="store_true", help="skip the GEMM shape table")
    ap.add_argument("--repeat", type=int, default=1, help="run every block variant this many times, interleaved")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--child-timeout-s", type=float, default=120)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.part != "all":
        fn = {"block": part_block, "gemm_jax": part_gemm_jax, "gemm_torch": part_gemm_torch}[args.part]
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return
    results: dict = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S"), "block": {}}
    names = [v for v in args.variants.split(",") if v]
    for name in names:
        if name not in FLAG_VARIANTS:
            raise SystemExit(f"--variants: unknown {name!r}; known: {', '.join(FLAG_VARIANTS)}")
    for rep in range(args.repeat):  # variants interleaved: A B C A B C, so drift hits all alike
        for i, name in enumerate(names):
            if (rep or i) and "--profile" in sys.argv:
                sys.argv.remove("--profile")  # profile the first (default) variant once
            r = _child(args, "block", FLAG_VARIANTS[name])
            results["block"].setdefault(name, {"runs": []})["runs"].append(r)
    results["gemm_jax"] = {} if args.no_gemm else _child(args, "gemm_jax")
    if not args.no_torch and not args.no_gemm:
        results["gemm_torch"] = _child(args, "gemm_torch")
    lines = ["| block variant | XLA_FLAGS | ms (each process, in run order) |", "|---|---|---|"]
    for name, v in results["block"].items():
        ms = " ".join(f"{r['block_ms']:.3f}" if "block_ms" in r else r.get("error", "")[-80:] for r in v["runs"])
        lines.append(f"| {name} | `{FLAG_VARIANTS[name]}` | {ms} |")
    lines += ["", "| GEMM M x K x N | JAX ms | JAX TFLOP/s | torch ms | torch TFLOP/s |", "|---|---|---|---|---|"]
    tor = {tuple(r["mkn"]): r for r in results.get("gemm_torch", {}).get("runs", [])}
    for r in results["gemm_jax"].get("runs", []):
        t = tor.get(tuple(r["mkn"]))
        tt = f"{t['ms']:.3f} | {t['tflops']:.0f}" if t else "- | -"
        lines.append(f"| {' x '.join(map(str, r['mkn']))} | {r['ms']:.3f} | {r['tflops']:.0f} | {tt} |")
    write_outputs(args.out, "block", results, "\n".join(lines))


if __name__ == "__main__":
    main()
