"""24 GB inference check: a ~20B pruned HunyuanImage-3.0 and a ~4B Z-Image export, one 1024^2 denoising step
each, with the CUDA allocator of this process capped at 24 GiB (the paper's RTX 4090 claim).

    python bench/run_24gb.py --out DIR [--tiny] [--workdir /tmp/bench24] [--models hunyuan,zimage]

What it does, per model:
1. writes an int8 export folder in the exporter's format (docs/quantized-format.md): config.json with per-layer
   MoE lists (HunyuanImage) / per-block widths (Z-Image) and a ``quantization_config`` block, sharded
   safetensors + index, keys and shapes from the same key tables the exporter uses. Weights are random,
   GENERATED ON THE DEVICE tensor by tensor (``torch.randn`` on the GPU, scaled 1/sqrt(fan_in), quantised there
   with ``converters.quantize.quantize_torch``) and streamed to the device's disk (a full-size source checkpoint
   to export from does not exist here);
2. plans the memory with ``converters.memory_plan.make_plan`` at ``--target-memory`` (24GB = 24e9 B);
3. caps the allocator (``torch.cuda.set_per_process_memory_fraction(24 GiB / total)``), loads the export with
   ``converters.run_torch`` under the plan and runs ``--steps`` flow-matching Euler steps (the first includes
   cuBLAS / kernel warm-up); records ``torch.cuda.max_memory_allocated()`` (load + steps) and seconds per step.

HunyuanImage plan: hidden 4096, 32 layers, 32/8 heads, expert width 3072, top-8, one shared expert, uneven
per-layer expert counts summing to 424 (10..17 per layer; ~20.0B parameters incl. wte and lm_head).
Z-Image plan: dim 3840, 2+2 full refiners, 30 main blocks with heads cycling 30/24/18 and FFN widths
6144/4096/5120 (~4.0B parameters).

``--tiny`` runs tiny shapes on the CPU (no cap; a target small enough to force expert offload) to check the
script before spending device time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # jax is imported (configs) but never used here
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from converters import quantize as qz  # noqa: E402
from converters.engine import AtomicDir, PlannedTensor, StreamingWriter, write_json  # noqa: E402

# 424 experts over 32 layers (mean 13.25): fewer at the ends, more in the middle, as a real plan would keep
HY_EXPERTS = [10, 11, 12, 12, 13, 13, 14, 14, 15, 15, 16, 16, 17, 17, 16, 15] + [
    15,
    14,
    14,
    14,
    13,
    13,
    13,
    12,
    12,
    12,
    12,
    11,
    11,
    11,
    11,
    10,
]


def hunyuan_conf(tiny: bool) -> dict:
    from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config

    if tiny:
        c = HunyuanImage3Config(
            vocab_size=256, hidden_size=64, intermediate_size=32, moe_intermediate_size=(32, 16, 32),
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, attention_head_dim=16,
            num_experts=(3, 5, 4), moe_topk=(2, 2, 1), num_shared_expert=(1, 2, 1), patch_embed_hidden_dim=32,
            image_token_id=200, timestep_token_id=201, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    else:
        n = len(HY_EXPERTS)
        c = HunyuanImage3Config(
            num_experts=tuple(HY_EXPERTS), moe_topk=(8,) * n, moe_intermediate_size=(3072,) * n,
            num_shared_expert=(1,) * n,
        )  # fmt: skip
    conf = {"architectures": ["HunyuanImage3ForCausalMM"], "model_type": "hunyuan_image_3_moe", **c.to_hf_config()}
    conf["torch_dtype"] = "bfloat16"
    return conf


def zimage_conf(tiny: bool) -> dict:
    from tmp_jax.models.z_image.config import TINY, TURBO

    base = TINY if tiny else TURBO
    n = base.n_layers
    heads = [base.n_heads, base.n_heads * 4 // 5, base.n_heads * 3 // 5] if not tiny else [2, 1, 2]
    ffn = [6144, 4096, 5120] if not tiny else [96, 64, 32]
    c = base.replace(
        layers_heads=tuple(heads[i % 3] for i in range(n)), layers_ffn_dims=tuple(ffn[i % 3] for i in range(n))
    )
    from converters.zimage import DIFFUSERS_VERSION

    mod = "transformer_z_image_pruned"
    return {
        "_class_name": "ZImagePrunedTransformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "auto_map": {"AutoModel": f"{mod}.ZImagePrunedTransformer2DModel"},
        **c.to_hf_config(include_pruning=True),
    }


def key_shapes(arch: str, conf: dict) -> list[tuple[str, tuple[int, ...]]]:
    if arch == "hunyuan":
        from converters.hunyuan import hunyuan_key_table
        from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config

        table = hunyuan_key_table(HunyuanImage3Config.from_hf_config(conf))
    else:
        from converters.zimage import zimage_key_table
        from tmp_jax.models.z_image.config import ZImageConfig

        stock = {k: v for k, v in conf.items() if not k.startswith("_") and k != "auto_map"}
        table = zimage_key_table(ZImageConfig.from_hf_config(stock))
    return [(k, tuple(s)) for e in table.entries for k, s in zip(e.torch_keys, e.torch_shapes)]


def host(t: torch.Tensor) -> np.ndarray:
    """A device tensor as a host numpy array of the same stored dtype."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).cpu().numpy().view(ml_dtypes.float8_e4m3fn)
    return t.cpu().numpy()


def generate_export(arch: str, conf: dict, folder: Path, method: str, dev: torch.device, seed: int) -> dict:
    """Write a random export (see the module docstring) tensor by tensor; returns params / bytes / seconds."""
    t0 = time.perf_counter()
    shapes = key_shapes(arch, conf)
    planned, quantized = [], []
    for k, s in shapes:
        if qz.quantizable(arch, k, s):
            planned += [PlannedTensor(k, s, qz.TAGS[method]), PlannedTensor(qz.scale_key(k), (s[0],), "F32")]
            quantized.append(k)
        else:
            router = k.endswith("mlp.gate.wg.weight")
            planned.append(PlannedTensor(k, s, "F32" if router else "BF16"))
    conf = {**conf, "quantization_config": qz.quantization_config(method, arch, quantized)}
    g = torch.Generator(dev).manual_seed(seed)
    qset = set(quantized)
    prefix = "model" if arch == "hunyuan" else "diffusion_pytorch_model"
    with AtomicDir(folder, overwrite=True) as tmp:
        writer = StreamingWriter(tmp, planned, prefix=prefix, max_shard_bytes=5 * 10**9)
        for k, s in shapes:
            fan_in = int(np.prod(s[1:])) if len(s) > 1 else 1
            if len(s) == 1:  # norm scales near 1, biases near 0
                w = (1.0 if k.endswith(".weight") else 0.0) + 0.05 * torch.randn(s, generator=g, device=dev)
            else:
                w = torch.randn(s, generator=g, device=dev, dtype=torch.bfloat16) * fan_in**-0.5
            if k in qset:
                q, scale = qz.quantize_torch(w, method)
                writer.write(k, host(q))
                writer.write(qz.scale_key(k), host(scale))
            else:
                writer.write(k, host(w.float() if k.endswith("mlp.gate.wg.weight") else w.to(torch.bfloat16)))
            del w
        writer.finish()
        if arch == "zimage":
            shutil.copy2(Path(__file__).resolve().parents[1] / "converters/remote/transformer_z_image_pruned.py", tmp)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    params = sum(int(np.prod(s)) for _, s in shapes)
    size = sum(f.stat().st_size for f in folder.iterdir())
    return {"params": params, "disk_bytes": size, "write_s": time.perf_counter() - t0, "quantized": len(quantized)}


def run_one(arch: str, args: argparse.Namespace, dev: torch.device) -> list[dict]:
    """Generate one export, then load + run it under each (target, cap) setting of ``--runs``."""
    from converters import run_torch as rt
    from converters.memory_plan import make_plan, parse_bytes

    conf = hunyuan_conf(args.tiny) if arch == "hunyuan" else zimage_conf(args.tiny)
    folder = Path(args.workdir) / f"{arch}-int8"
    gen = generate_export(arch, conf, folder, "int8", dev, seed=1 if arch == "hunyuan" else 2)
    gb, secs = gen["disk_bytes"] / 1e9, gen["write_s"]
    print(f"{arch}: wrote {gen['params'] / 1e9:.2f}B params, {gb:.2f} GB in {secs:.1f} s", flush=True)
    rows = []
    runs = args.runs if arch == "hunyuan" else args.runs[:1]
    for target_text, cap_text in runs:
        row: dict = {"model": arch, "method": "int8", "resolution": args.resolution, **gen}
        target, cap = parse_bytes(target_text), parse_bytes(cap_text)
        if args.tiny and arch == "hunyuan" and len(rows):  # tiny: force offload (target below all-resident)
            full = make_plan(folder, 10**15, resolution=args.resolution, text_tokens=args.text_tokens)
            target = full["estimate"]["peak_bytes"] - full["estimate"]["resident_expert_bytes"] // 2
        plan = make_plan(folder, target, resolution=args.resolution, text_tokens=args.text_tokens)
        write_json(Path(args.out) / f"memory_plan_{arch}_{target_text}.json", plan)
        row.update(plan_summary=plan["summary"], plan_peak_bytes=plan["estimate"]["peak_bytes"], target_bytes=target)
        row["cap_bytes"] = cap
        if dev.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(dev).total_memory, dev)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        model = None
        try:
            t0 = time.perf_counter()
            dtype = "bf16" if dev.type == "cuda" else "fp32"
            ex, model = rt.load(folder, device=str(dev), dtype=dtype, memory_plan=plan)
            row["load_s"] = time.perf_counter() - t0
            res = rt.sample(ex, model, steps=args.steps, resolution=args.resolution, text_tokens=args.text_tokens,
                            device=str(dev))  # fmt: skip
            row["seconds_per_step"] = res.seconds_per_step
            row["finite"] = bool(torch.isfinite(res.latents).all())
            row["ok"] = True
        except torch.cuda.OutOfMemoryError as e:
            row["ok"], row["error"] = False, f"OOM: {str(e).splitlines()[0][:300]}"
        if dev.type == "cuda":
            row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
            row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
            row["within_cap"] = row["peak_allocated_bytes"] <= cap
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (check the script)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench24"))
    p.add_argument("--models", default="hunyuan,zimage")
    p.add_argument(
        "--runs",
        default="24GB:24GiB,16GB:16GiB",
        help="memory-plan target:allocator cap pairs; HunyuanImage runs each, Z-Image the first "
        "(default 24GB:24GiB,16GB:16GiB: the second forces expert offload)",
    )
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--text-tokens", type=int, default=64)
    args = p.parse_args()

    args.resolution = args.resolution or (128 if args.tiny else 1024)
    args.runs = [tuple(r.split(":")) for r in args.runs.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu") if args.tiny else torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cuda":
        card = torch.cuda.get_device_name(dev)
    else:
        torch.set_num_threads(1)
        card = "cpu"
    rows = []
    for arch in args.models.split(","):
        for row in run_one(arch, args, dev):
            row["card"] = card
            rows.append(row)
        shutil.rmtree(args.workdir / f"{arch}-int8", ignore_errors=True)  # free the device disk
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    write_json(args.out / "results.json", {"rows": rows, "torch": torch.__version__, "date": time.strftime("%F")})
    print(f"\n{'model':8} {'params':>8} {'disk GB':>8} {'write s':>8} {'cap GiB':>7} {'load s':>7} {'s/step':>16} "
          f"{'peak GiB':>9} {'plan GiB':>9} plan")  # fmt: skip
    for r in rows:
        steps = ",".join(f"{s:.2f}" for s in r.get("seconds_per_step", []))
        peak = (r.get("peak_allocated_bytes") or 0) / 2**30
        cols = [
            f"{r['model']:8}",
            f"{r['params'] / 1e9:7.2f}B",
            f"{r['disk_bytes'] / 1e9:8.2f}",
            f"{r['write_s']:8.1f}",
        ]
        cols += [f"{r['cap_bytes'] / 2**30:7.1f}", f"{r.get('load_s', float('nan')):7.1f}", f"{steps:>16}"]
        cols += [f"{peak:9.2f}", f"{r['plan_peak_bytes'] / 2**30:9.2f}", r["plan_summary"], r.get("error", "")]
        print(" ".join(cols))
    bad = [r for r in rows if not r["ok"] or not r.get("within_cap", True) or not r.get("finite", True)]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
