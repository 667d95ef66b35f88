"""Inference memory plan for an export: what stays on the GPU, which experts live in CPU RAM, estimated peak.

    python -m converters.memory_plan --model EXPORT_DIR --target-memory 24GB [--resolution 1024] [--out plan.json]

(also written by ``python -m converters.export ... --target-memory 24GB`` as ``memory_plan.json``). Reads only
config.json and the safetensors headers of the export (sizes come from the stored dtypes, so an int8 / fp8
export is planned at its real size). The format is documented in docs/quantized-format.md ("Memory plan").

Each architecture states its own memory model (``tmp_jax/models/<arch>/memory.py``, registered as
``ArchHooks.memory_model``). HunyuanImage-3.0: every tensor the T2I denoising step needs is resident on the GPU
(attention, norms, routers, shared experts, patch_embed / final_layer / timestep embedders) except ``model.wte``
(kept in CPU RAM: a step needs only its prefix's rows) and the routed experts that do not fit: those are kept in
pinned CPU memory and copied to the GPU when their layer runs (the whole layer's offloaded experts, so the staging
buffer is the largest layer's offloaded bytes). ``lm_head`` and the VAE / ViT tensors are not loaded by the
denoiser. Experts are made resident greedily, one at a time from the layer with the most offloaded bytes (lowest
expert index first), while resident + staging + activations + headroom fit the target, then, smallest first, any
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


def parse_bytes(text: str) -> int:
    """``24GB`` -> 24e9, ``24GiB`` -> 24 * 2**30, ``1.5e9`` -> 1.5e9 (one-line error otherwise)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"--target-memory {text!r}: expected a size like 24GB (10^9 B) or 24GiB (2^30 B)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def arch_of(conf: dict[str, Any], where: str) -> str:
    """The registered architecture an export's config.json belongs to (one-line CheckpointError if none)."""
    from tmp_jax import arch

    try:
        return arch.detect(conf).name
    except ValueError:
        raise CheckpointError(
            f"{where}: config.json is an export of none of the architectures {', '.join(arch.names())}"
        ) from None


def memory_model(arch_name: str) -> Any:
    """The arch's memory model module (``ArchHooks.memory_model``); CheckpointError if it has none."""
    from tmp_jax import arch

    mm = arch.get(arch_name).memory_model
    if mm is None:
        raise CheckpointError(f"architecture {arch_name!r} has no inference memory model")
    return mm()


def check_resolution(resolution: int) -> int:
    """``resolution`` if it is a positive multiple of 16, else a one-line ValueError."""
    if resolution <= 0 or resolution % 16:
        raise ValueError(f"--resolution {resolution}: expected a positive multiple of 16")
    return resolution


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
    mm = memory_model(arch)
    try:  # the config fields the estimate reads: a missing one is a one-line error naming it
        check_resolution(resolution)
        img_tokens, seq = mm.tokens(conf, resolution, text_tokens)
        act = mm.activation_bytes(conf, seq, c)
    except KeyError as e:
        raise CheckpointError(
            f"{folder / 'config.json'}: lacks field {e.args[0]!r} (needed for the memory plan)"
        ) from None
    scratch = max(
        [int(i.shape[0]) * int(i.shape[1]) * (4 + c) for i in reader.infos.values() if i.dtype in ("I8", "F8_E4M3")],
        default=0,
    )
    not_loaded = [k for k in nbytes if mm.not_loaded(k)]
    cpu = [k for k in nbytes if mm.cpu_resident(k)]
    experts: dict[tuple[int, int], int] = {}
    for k, n in nbytes.items():
        le = mm.expert_of(k)
        if le is not None:
            experts[le] = experts.get(le, 0) + n
    skip = set(not_loaded) | set(cpu)
    resident_fixed = sum(n for k, n in nbytes.items() if k not in skip and mm.expert_of(k) is None)
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
