"""Inference memory plan for an export: what stays on the GPU, which experts live in CPU RAM, estimated peak.

    python -m converters.memory_plan --model EXPORT_DIR --target-memory 24GB [--resolution 1024] [--out plan.json]

(also written by ``python -m converters.export ... --target-memory 24GB`` as ``memory_plan.json``). Reads only
config.json and the safetensors headers of the export (sizes come from the stored dtypes, so an int8 / fp8
export is planned at its real size). The format is documented in docs/quantized-format.md ("Memory plan").

HunyuanImage-3.0: every tensor the T2I denoising step needs is resident on the GPU (attention, norms, routers,
shared experts, patch_embed / final_layer / timestep embedders) except ``model.wte`` (kept in CPU RAM: a step
needs only its prefix's rows) and the routed experts that do not fit: those are kept in pinned CPU memory and
copied to the GPU when their layer runs (the whole layer's offloaded experts, so the staging buffer is the
largest layer's offloaded bytes). ``lm_head`` and the VAE / ViT tensors are not loaded by the denoiser.
Experts are made resident greedily, one at a time from the layer with the most offloaded bytes (lowest expert
index first), while resident + staging + activations + headroom fit the target, then, smallest first, any
other expert that still fits (:func:`choose_offload`).

Z-Image: everything is resident (no experts); the plan only checks the estimate against the target.

Estimate = resident weights + expert staging + activations (batch 1, compute dtype, an upper bound summing the
live tensors of one block at the given resolution) + dequantisation scratch (the largest quantised weight in
fp32 and compute dtype) + a fixed headroom for the allocator / cuBLAS workspace.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from converters.engine import CheckpointError, SafetensorsReader, read_json, write_json

FORMAT_VERSION = 1
HEADROOM = 768 * 2**20  # allocator fragmentation, cuBLAS workspace, small temporaries
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20}
_UNITS.update({"GIB": 2**30, "TIB": 2**40})
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def parse_bytes(text: str) -> int:
    """``24GB`` -> 24e9, ``24GiB`` -> 24 * 2**30, ``1.5e9`` -> 1.5e9 (one-line error otherwise)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"--target-memory {text!r}: expected a size like 24GB (10^9 B) or 24GiB (2^30 B)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def arch_of(conf: dict[str, Any], where: str) -> str:
    if "num_experts" in conf and "hidden_size" in conf:
        return "hunyuan"
    if "ZImage" in str(conf.get("_class_name", "")):
        return "zimage"
    raise CheckpointError(f"{where}: config.json is neither a HunyuanImage-3.0 nor a Z-Image export")


def per_layer(v: Any, i: int) -> int:
    return int(v[i]) if isinstance(v, list) else int(v)


def _hunyuan_activations(conf: dict[str, Any], seq: int, c: int) -> int:
    """Upper bound on the live activations of one decoder layer (batch 1)."""
    h, hd = conf["hidden_size"], conf["attention_head_dim"]
    n, kv = conf["num_attention_heads"], conf["num_key_value_heads"]
    n_layers = conf["num_hidden_layers"]
    inter = max(per_layer(conf["moe_intermediate_size"], i) for i in range(n_layers))
    shared = max(
        per_layer(conf["moe_intermediate_size"], i) * per_layer(conf["num_shared_expert"], i) for i in range(n_layers)
    )
    experts = max(per_layer(conf["num_experts"], i) for i in range(n_layers))
    b = 0
    b += 4 * seq * h * c + 3 * seq * h * 4  # residual, normed, attention / MoE outputs; fp32 RMSNorm temporaries
    b += seq * (n + 2 * kv) * hd * c  # fused qkv
    b += 3 * (n + kv) * seq * hd * 4  # q, k rotated in fp32 (+ rotate_half temporaries)
    b += 2 * seq * hd * 4  # cos / sin tables
    b += seq * seq * (1 + c)  # boolean joint mask + the additive mask SDPA may build from it
    b += 2 * seq * n * hd * c  # attention output and its transposed copy
    b += 2 * seq * experts * 4 + seq * h * 4  # fp32 router logits / probabilities, fp32 router input
    b += 3 * seq * 2 * inter * c + 2 * seq * h * c + seq * h * 4  # one expert over (at most) every token; fp32 sum
    b += 3 * seq * 2 * shared * c  # shared expert
    return b


def _zimage_activations(conf: dict[str, Any], seq: int, c: int) -> int:
    d = conf["dim"]
    ffn = int(d / 3 * 8)
    for s in ("noise_refiner", "context_refiner", "layers"):
        ffn = max([ffn, *(conf.get(f"{s}_ffn_dims") or [])])
    b = 0
    b += 4 * seq * d * c + 3 * seq * d * 4  # residual / normed / branch outputs, fp32 RMSNorm temporaries
    b += 3 * seq * d * c + 2 * 2 * seq * d * 4  # q, k, v; q / k rotated as complex fp32
    b += 2 * seq * d * c  # attention output (+ copy)
    b += 3 * seq * ffn * c  # w1, w3 outputs and their product
    b += 2 * seq * d * 4  # unified / padded sequences, fp32 modulation temporaries
    return b


def check_resolution(resolution: int) -> int:
    """``resolution`` if it is a positive multiple of 16, else a one-line ValueError."""
    if resolution <= 0 or resolution % 16:
        raise ValueError(f"--resolution {resolution}: expected a positive multiple of 16")
    return resolution


def _tokens(conf: dict[str, Any], arch: str, resolution: int, text_tokens: int) -> tuple[int, int]:
    check_resolution(resolution)
    if arch == "hunyuan":
        down = conf.get("vae_downsample_factor", [16, 16])
        img = (resolution // down[0] // conf.get("patch_size", 1)) * (
            resolution // down[1] // conf.get("patch_size", 1)
        )
        return img, img + text_tokens + 3  # <timestep>, <boi>/<eoi> style specials
    p = (conf.get("all_patch_size") or [2])[0]
    img = (resolution // 8 // p) ** 2  # the Z-Image VAE downsamples by 8
    return img, img + -(-text_tokens // 32) * 32  # captions are padded to a multiple of 32


def choose_offload(
    experts: dict[tuple[int, int], int], fixed: int, target_bytes: int
) -> tuple[dict[int, list[int]], int]:
    """Which experts stay in CPU RAM: ({layer: [offloaded expert ids]}, bytes of the resident experts).

    Peak = ``fixed`` + resident experts + staging (the largest layer's offloaded bytes, fetched per layer).
    Greedy, from everything offloaded: (1) take experts one at a time from the layer with the most offloaded
    bytes (lowest id first), which lowers the staging buffer as it adds to the resident set, while the peak
    fits; (2) then, smallest first, every other expert that still fits on its own (a pruned model's experts
    differ in width, so one that did not fit in (1) can leave room for smaller ones)."""
    layers = sorted({layer for layer, _ in experts})
    offloaded = {layer: sorted(e for l2, e in experts if l2 == layer) for layer in layers}

    def staging() -> int:
        return max((sum(experts[(la, e)] for e in es) for la, es in offloaded.items()), default=0)

    resident = 0
    while True:  # (1) shrink the largest layer's offloaded set while everything still fits
        cand = [(sum(experts[(la, e)] for e in es), -la) for la, es in offloaded.items() if es]
        if not cand:
            break
        la = -max(cand)[1]
        e = offloaded[la][0]
        offloaded[la] = offloaded[la][1:]
        if fixed + resident + experts[(la, e)] + staging() > target_bytes:
            offloaded[la] = [e, *offloaded[la]]
            break
        resident += experts[(la, e)]
    for n, la, e in sorted((experts[(la, e)], la, e) for la, es in offloaded.items() for e in es):  # (2)
        rest = [x for x in offloaded[la] if x != e]
        before, offloaded[la] = offloaded[la], rest
        if fixed + resident + n + staging() > target_bytes:
            offloaded[la] = before
        else:
            resident += n
    return offloaded, resident


def make_plan(
    folder: Path,
    target_bytes: int,
    *,
    resolution: int = 1024,
    text_tokens: int = 128,
    compute_dtype: str = "bfloat16",
) -> dict[str, Any]:
    """The memory plan of the export in ``folder`` (see the module docstring); CheckpointError if it cannot fit."""
    folder = Path(folder)
    conf = read_json(folder / "config.json", "an export folder needs config.json", CheckpointError)
    arch = arch_of(conf, str(folder / "config.json"))
    reader = SafetensorsReader(folder)
    c = ITEMSIZE[compute_dtype]
    nbytes = {k: i.end - i.start for k, i in reader.infos.items()}
    try:  # the config fields the estimate reads: a missing one is a one-line error naming it
        img_tokens, seq = _tokens(conf, arch, resolution, text_tokens)
        act = _hunyuan_activations(conf, seq, c) if arch == "hunyuan" else _zimage_activations(conf, seq, c)
    except KeyError as e:
        raise CheckpointError(
            f"{folder / 'config.json'}: lacks field {e.args[0]!r} (needed for the memory plan)"
        ) from None
    scratch = max(
        [int(i.shape[0]) * int(i.shape[1]) * (4 + c) for i in reader.infos.values() if i.dtype in ("I8", "F8_E4M3")],
        default=0,
    )
    if arch == "hunyuan":
        not_loaded = [
            k
            for k in nbytes
            if k in ("lm_head.weight", "model.ln_f.weight")
            or k.startswith(("vae.", "vision_model.", "vision_aligner."))
        ]
        cpu = [k for k in nbytes if k == "model.wte.weight"]
        experts: dict[tuple[int, int], int] = {}
        for k, n in nbytes.items():
            m = _EXPERT.match(k)
            if m:
                key = (int(m.group(1)), int(m.group(2)))
                experts[key] = experts.get(key, 0) + n
        skip = set(not_loaded) | set(cpu)
        resident_fixed = sum(n for k, n in nbytes.items() if k not in skip and not _EXPERT.match(k))
    else:
        not_loaded, cpu, experts = [], [], {}
        resident_fixed = sum(nbytes.values())
    fixed = resident_fixed + act + scratch + HEADROOM
    layers = sorted({layer for layer, _ in experts})
    offloaded = {layer: sorted(e for l2, e in experts if l2 == layer) for layer in layers}

    def staging() -> int:
        return max((sum(experts[(la, e)] for e in es) for la, es in offloaded.items()), default=0)

    hint = "" if "quantization_config" in conf else "--quantize int8, "
    if fixed + staging() > target_bytes:
        raise CheckpointError(
            f"{folder}: cannot fit in {target_bytes / 2**30:.2f} GiB at {resolution}px: resident weights "
            f"{resident_fixed / 2**30:.2f} GiB + one layer's experts {staging() / 2**30:.2f} GiB + activations "
            f"{act / 2**30:.2f} GiB + dequant scratch {scratch / 2**30:.2f} GiB + headroom "
            f"{HEADROOM / 2**30:.2f} GiB = {(fixed + staging()) / 2**30:.2f} GiB "
            f"(try {hint}a lower --resolution, or a smaller plan)"
        )
    offloaded, resident_experts = choose_offload(experts, fixed, target_bytes)
    stage = staging()
    peak = fixed + resident_experts + stage
    n_off = sum(len(v) for v in offloaded.values())
    off_bytes = sum(experts[(la, e)] for la, es in offloaded.items() for e in es)
    summary = (
        f"{len(experts) - n_off} of {len(experts)} experts resident, {n_off} offloaded to CPU "
        f"({off_bytes / 2**30:.2f} GiB)"
        if experts
        else "all weights resident"
    )
    return {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "target_bytes": int(target_bytes),
        "resolution": int(resolution),
        "batch": 1,
        "image_tokens": int(img_tokens),
        "text_tokens": int(text_tokens),
        "sequence_tokens": int(seq),
        "compute_dtype": compute_dtype,
        "fetch": "per layer: all offloaded experts of the layer, pinned CPU -> GPU on a copy stream at layer start",
        "not_loaded": sorted(not_loaded),
        "cpu_resident": sorted(cpu),
        "offloaded_experts": {str(la): es for la, es in offloaded.items() if es},
        "estimate": {
            "resident_weight_bytes": int(resident_fixed + resident_experts),
            "resident_expert_bytes": int(resident_experts),
            "expert_staging_bytes": int(stage),
            "activation_bytes": int(act),
            "dequant_scratch_bytes": int(scratch),
            "headroom_bytes": HEADROOM,
            "peak_bytes": int(peak),
            "offloaded_bytes": int(off_bytes),
        },
        "summary": summary,
    }


def read_plan(path: Path) -> dict[str, Any]:
    """A memory plan JSON (one-line errors for a missing file, bad JSON or an unknown version)."""
    plan = read_json(Path(path), "--memory-plan", ValueError)
    if not isinstance(plan, dict) or plan.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a memory plan of format_version {FORMAT_VERSION}")
    for k in ("arch", "offloaded_experts", "cpu_resident", "compute_dtype"):
        if k not in plan:
            raise ValueError(f"{path}: memory plan lacks {k!r}")
    return plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m converters.memory_plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="an export folder (python -m converters.export)")
    p.add_argument("--target-memory", required=True, help="GPU memory, e.g. 24GB (10^9 B) or 24GiB")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--text-tokens", type=int, default=128, help="prompt tokens the plan assumes (128)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(ITEMSIZE), help="compute dtype (bfloat16)")
    p.add_argument("--out", type=Path, help="write the plan here (default: print it)")
    a = p.parse_args(argv)
    try:
        plan = make_plan(
            a.model,
            parse_bytes(a.target_memory),
            resolution=a.resolution,
            text_tokens=a.text_tokens,
            compute_dtype=a.dtype,
        )
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.out:
        write_json(a.out, plan)
    else:
        print(json.dumps(plan, indent=2))
    print(f"estimated peak {plan['estimate']['peak_bytes'] / 2**30:.2f} GiB; {plan['summary']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
