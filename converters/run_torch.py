"""Run denoising steps of an export in PyTorch, quantised or not, optionally under a 24 GB memory plan.

    python -m converters.run_torch --model EXPORT_DIR [--steps N] [--resolution 1024] [--memory-plan plan.json]
        [--device cuda] [--dtype bf16|fp32] [--cap-memory 24GiB] [--out latents.safetensors]

Reads only config.json, safetensors and the memory plan JSON. Quantised Linear weights (``X.weight`` int8 /
float8_e4m3fn + ``X.weight_scale``, docs/quantized-format.md) stay quantised in memory and are dequantised per
Linear at forward time (:class:`QLinear`: ``float32(q) * scale`` cast to the compute dtype, then ``F.linear``).

Modules: each architecture's PyTorch reference (``ConverterHooks.torch_reference`` in
:mod:`converters.registry`) builds its module on the meta device, swaps every quantised ``nn.Linear`` for a
:class:`QLinear` and loads strictly (:func:`load_strict`). Z-Image (:mod:`converters.zimage_torch`): diffusers'
``ZImageTransformer2DModel`` (stock configs) or our per-block subclass (``converters.remote``). HunyuanImage-3.0
(:mod:`converters.hunyuan_torch`): ``HunyuanDenoiser``, nemo-automodel's building blocks with our own
routed-expert layer so that experts can be quantised and offloaded; it equals nemo's full model on tiny configs
(tests/test_run_torch.py). Names that moved there (``build_hunyuan``, ``hunyuan_inputs``, ``ExpertWeights``,
``check_plan``, ...) still resolve as ``converters.run_torch.NAME``.

Memory plan (``converters.memory_plan``): tensors listed in ``cpu_resident`` stay in CPU RAM, the experts in
``offloaded_experts`` are kept in pinned CPU memory and copied to the GPU on a side stream when their layer starts
(see :mod:`converters.hunyuan_torch`); everything else is resident. Offloading changes where a tensor lives, not
the arithmetic: outputs equal the non-offloaded run exactly.

Sampling: flow-matching Euler over ``sigma_schedule(steps, shift)``, each step in the architecture's own
convention (its reference's ``euler``). Prompts are synthetic (the text encoder and VAE are not part of an
export's denoiser): seeded token ids (HunyuanImage) or seeded caption features (Z-Image). ``--out`` writes the
final latents.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from converters import quantize as qz
from converters.engine import CheckpointError, SafetensorsReader, read_json

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
_VIEW = {"BF16": (np.uint16, torch.bfloat16), "F8_E4M3": (np.uint8, torch.float8_e4m3fn)}


def to_torch(reader: SafetensorsReader, key: str) -> torch.Tensor:
    """One stored tensor as a CPU torch tensor of its stored dtype (bf16 / fp8 through a bit view)."""
    arr = reader.read(key)
    tag = reader.infos[key].dtype
    if tag in _VIEW:
        bits, dt = _VIEW[tag]
        return torch.from_numpy(arr.view(bits)).view(dt)
    return torch.from_numpy(arr)


class QLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored weight-only quantised (or plain); dequantised at each call.

    State dict keys are those of the export: ``weight`` (int8 / float8_e4m3fn / float), ``weight_scale`` (fp32
    ``[out]``, absent for a plain weight), ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, quantized: bool, qdtype: Any = torch.int8):
        super().__init__()
        self.in_features, self.out_features, self.quantized = in_features, out_features, quantized
        dev = torch.device("meta")
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=qdtype, device=dev))
        if quantized:
            self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=dev))
        self.bias = nn.Parameter(torch.empty(out_features, device=dev), requires_grad=False) if bias else None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self.quantized:
            return qz.dequantize_torch(self.weight, self.weight_scale, dtype)
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), b)


def swap_linears(module: nn.Module, quantized_keys: set[str], prefix: str = "") -> int:
    """Replace every ``nn.Linear`` whose ``{name}.weight`` is quantised in the export by a :class:`QLinear`."""
    n = 0
    for name, child in list(module.named_children()):
        full = f"{prefix}{name}"
        if isinstance(child, nn.Linear) and f"{full}.weight" in quantized_keys:
            setattr(module, name, QLinear(child.in_features, child.out_features, child.bias is not None, True))
            n += 1
        else:
            n += swap_linears(child, quantized_keys, f"{full}.")
    return n


@dataclass
class Export:
    """An export folder: config, reader, quantisation method and the set of quantised keys."""

    folder: Path
    conf: dict[str, Any]
    reader: SafetensorsReader
    method: str
    quantized: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, folder: Path) -> Export:
        folder = Path(folder)
        conf = read_json(folder / "config.json", "an export folder needs config.json", CheckpointError)
        method = qz.read_quantization(conf, str(folder / "config.json"))
        reader = SafetensorsReader(folder)
        quantized = {k[: -len(qz.SCALE_SUFFIX)] for k in reader.keys() if k.endswith(".weight" + qz.SCALE_SUFFIX)}
        if quantized and method == "none":
            raise CheckpointError(
                f"{folder}: has {len(quantized)} '*{qz.SCALE_SUFFIX}' tensors (e.g. {qz.scale_key(min(quantized))!r}) "
                "but config.json has no quantization_config"
            )
        for k in quantized:
            if k not in reader:
                raise CheckpointError(f"{folder}: scale {qz.scale_key(k)!r} has no weight {k!r}")
            want = qz.TAGS.get(method)
            if reader.infos[k].dtype != want:
                raise CheckpointError(f"{reader.infos[k].file}: {k!r} is {reader.infos[k].dtype}, config says {want}")
        # a quantised value tensor without its scale would be loaded as raw integers / fp8 codes
        for k, info in reader.infos.items():
            if info.dtype in qz.TAGS.values() and k not in quantized:
                raise CheckpointError(f"{info.file}: {k!r} is {info.dtype} but has no {qz.scale_key(k)!r}")
        return cls(folder, conf, reader, method, quantized)

    def tensor(self, key: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """A tensor ready for the module: quantised values / scales as stored, floats cast to ``dtype``."""
        t = to_torch(self.reader, key)
        if key not in self.quantized and t.is_floating_point() and not key.endswith(qz.SCALE_SUFFIX):
            t = t.to(dtype)
        return t.to(device)


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], where: Path) -> None:
    """``model.load_state_dict(sd, strict=True, assign=True)``; a key or shape mismatch is a one-line
    CheckpointError naming the export folder and the first missing / unexpected key (not torch's traceback)."""
    want = set(model.state_dict())
    missing, unexpected = sorted(want - set(sd)), sorted(set(sd) - want)
    if missing or unexpected:
        parts = [f"{len(missing)} missing (e.g. {missing[0]!r})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})"] if unexpected else []
        raise CheckpointError(f"{where}: tensors do not match {type(model).__name__}: {', '.join(parts)}")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:  # size mismatches
        raise CheckpointError(f"{where}: {' '.join(str(e).split())}") from None


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    latents: torch.Tensor
    seconds_per_step: list[float]
    peak_bytes: int | None


def reference(name: str, where: str) -> Any:
    """The PyTorch reference module of architecture ``name`` (its ``ConverterHooks.torch_reference``)."""
    from converters.registry import find

    conv = find(name)
    if conv is None or conv.torch_reference is None:
        raise CheckpointError(f"{where}: architecture {name!r} has no PyTorch reference to run")
    return conv.torch_reference()


def load(
    folder: Path, *, device: str = "cpu", dtype: str = "fp32", memory_plan: dict[str, Any] | None = None
) -> tuple[Export, nn.Module]:
    ex = Export.open(folder)
    dev, dt = torch.device(device), TORCH_DTYPES[dtype]
    from converters.memory_plan import arch_of

    arch = arch_of(ex.conf, str(ex.folder / "config.json"))
    if memory_plan is not None and memory_plan["arch"] != arch:
        raise ValueError(f"memory plan is for {memory_plan['arch']}, the export is {arch}")
    return ex, reference(arch, str(ex.folder)).build(ex, dt, dev, memory_plan)


def sample(
    ex: Export,
    model: nn.Module,
    *,
    steps: int = 1,
    resolution: int = 1024,
    text_tokens: int = 32,
    seed: int = 0,
    shift: float = 3.0,
    device: str = "cpu",
) -> RunResult:
    """Flow-matching Euler from seeded noise; returns the final latents and seconds per step."""
    from converters.memory_plan import arch_of
    from tmp_jax.sampling import sigma_schedule

    ref = reference(arch_of(ex.conf, str(ex.folder / "config.json")), str(ex.folder))
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    sig = [float(s) for s in sigma_schedule(steps, shift)]
    times: list[float] = []
    with torch.no_grad():
        x, step = ref.euler(
            ex, model, resolution=resolution, text_tokens=text_tokens, seed=seed, generator=g, device=dev
        )  # the initial latents and the arch's Euler step
        for s, s_next in zip(sig[:-1], sig[1:]):
            t0 = time.perf_counter()
            x = step(x, s, s_next)
            _sync(dev)
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return RunResult(x.cpu(), times, peak)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv: list[str] | None = None) -> int:
    from converters.memory_plan import check_resolution, parse_bytes, read_plan

    p = argparse.ArgumentParser(
        prog="python -m converters.run_torch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, type=Path, help="an export folder (plain, int8 or fp8)")
    p.add_argument("--steps", type=int, default=1, help="denoising steps (default 1)")
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--memory-plan", type=Path, help="memory_plan.json (python -m converters.memory_plan)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(TORCH_DTYPES), help="compute dtype (plan's, else bf16)")
    p.add_argument("--text-tokens", type=int, default=32, help="synthetic prompt length (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, default=3.0, help="flow-matching schedule shift (default 3)")
    p.add_argument("--cap-memory", help="cap this process's CUDA allocator, e.g. 24GiB (emulates a smaller card)")
    p.add_argument("--out", type=Path, help="write the final latents (safetensors)")
    a = p.parse_args(argv)
    try:
        check_resolution(a.resolution)  # else a reshape error deep in the model's patchify
        if a.steps < 1:
            raise ValueError(f"--steps {a.steps}: expected >= 1")
        plan = read_plan(a.memory_plan) if a.memory_plan else None
        if plan is not None and a.resolution > int(plan.get("resolution", a.resolution)):
            # the plan's activation estimate was made for its resolution: larger images void its guarantee
            raise ValueError(
                f"--resolution {a.resolution} exceeds the {plan['resolution']}px the memory plan "
                f"{a.memory_plan} was made for; re-plan with python -m converters.memory_plan --resolution"
            )
        if a.out is not None and not a.out.parent.is_dir():
            raise ValueError(f"--out {a.out}: folder {a.out.parent} does not exist")
        dtype = (
            a.dtype
            or {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[plan["compute_dtype"] if plan else "bfloat16"]
        )
        if a.cap_memory:
            cap_memory(parse_bytes(a.cap_memory), torch.device(a.device))
        t0 = time.perf_counter()
        ex, model = load(a.model, device=a.device, dtype=dtype, memory_plan=plan)
        load_s = time.perf_counter() - t0
        res = sample(
            ex,
            model,
            steps=a.steps,
            resolution=a.resolution,
            text_tokens=a.text_tokens,
            seed=a.seed,
            shift=a.shift,
            device=a.device,
        )
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.out:
        from safetensors.torch import save_file

        tmp = a.out.with_name(f".{a.out.name}.tmp")
        save_file({"latents": res.latents.contiguous()}, str(tmp))
        os.replace(tmp, a.out)
    peak = f", peak {res.peak_bytes / 2**30:.2f} GiB allocated" if res.peak_bytes is not None else ""
    print(json.dumps({"load_s": round(load_s, 2), "seconds_per_step": [round(t, 3) for t in res.seconds_per_step]}))
    print(f"{len(res.seconds_per_step)} step(s) at {a.resolution}px on {a.device}{peak}", file=sys.stderr)
    return 0


def cap_memory(nbytes: int, device: torch.device) -> None:
    """Cap the CUDA caching allocator of this process at ``nbytes`` (``set_per_process_memory_fraction``)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, nbytes / total), index)


def _references() -> list[Any]:
    """The PyTorch reference modules of every registered architecture that has one (imported)."""
    from converters.registry import find
    from tmp_jax import arch

    return [c.torch_reference() for c in map(find, arch.names()) if c is not None and c.torch_reference is not None]


def __getattr__(name: str) -> Any:
    """Names that moved to an architecture's PyTorch reference module (its builder, modules, input helpers) still
    resolve here, from the first reference module that defines them."""
    if not name.startswith("__"):
        for ref in _references():
            if hasattr(ref, name):
                return getattr(ref, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    raise SystemExit(main())
