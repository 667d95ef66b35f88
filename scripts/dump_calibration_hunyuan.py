"""Dump a HunyuanImage-3.0 calibration set from the REAL model (PyTorch; run where you have the checkpoint).

Each prompt becomes the official text-to-image token sequence (the release's own ``gen_image`` chat template,
through the checkpoint's remote-code tokenizer wrapper as nemo-automodel's ``HunyuanImage3PromptTokenizer``
drives it): ``prefix <timestep> <img> * (h*w) suffix``, with the classifier-free-guidance row (prompt replaced
by ``<cfg>`` tokens) next to it. The script then samples each prompt with the release's default sampler (bf16
Gaussian latents, Euler steps on ``linspace(1, 0)`` shifted by ``flow_shift`` from ``generation_config.json``,
CFG ``uncond + scale * (cond - uncond)``) using nemo-automodel's native ``HunyuanImage3ForCausalMM`` and
records the transformer's inputs (token ids, noised latents, ``timestep = sigma * 1000``, valid lengths) at
every ``--every``-th step: a spread of timesteps along real denoising trajectories. Rows are packed into
micro-batches of ``--batch`` rows (with CFG: whole conditional/unconditional pairs, conditional rows first, marked
with the trajectory fitness keys ``cfg_guidance`` and ``sample_weight`` so the search scores the guided output),
right-padded with the pad id to ONE sequence length per latent size (one compile in calibration), and written in
the format of ``docs/calibration-format.md``.

Weights are read from the release's safetensors shards one decoder layer at a time (our strict reader; no
pickles) into a model built on the meta device; ``--device cuda:0,cuda:1,...`` spreads the decoder layers
over several GPUs (the 80B model needs ~170 GB in bf16), the stem and heads staying on the first.

    python scripts/dump_calibration_hunyuan.py --model tencent/HunyuanImage-3.0 --prompts prompts.txt \\
        --out calib/ --height 1024 --width 1024 --steps 50 --every 5 --device cuda:0,cuda:1
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PASSTHROUGH = ("vae.", "vision_model.", "vision_aligner.")  # release modules the denoiser does not use
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


# ----------------------------------------------------------------------------------------------
# Model and prompt format


def load_prompt_tokenizer(model_dir: str | Path) -> Any:
    """The release's prompt format: an object with ``__call__(prompt, height, width)`` -> dict of 1-D id
    tensors ``prompt_input_ids`` / ``uncond_prompt_input_ids`` (up to and including ``<timestep>``) and
    ``prompt_suffix_ids`` (after the image), and ``target_size(width, height)`` (the release resolutions).

    Runs the checkpoint's own remote code (tokenizer wrapper, image processor): read it first."""
    from nemo_automodel.components.models.hunyuan_image3.release import HunyuanImage3PromptTokenizer
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True)
    return HunyuanImage3PromptTokenizer.from_pretrained(str(model_dir), config)


def _to_torch(x: np.ndarray) -> Any:
    import ml_dtypes
    import torch

    if x.dtype == ml_dtypes.bfloat16:  # numpy has no bf16: reinterpret the bits
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def load_transformer(model_dir: str | Path, devices: Sequence[str] = ("cuda",)) -> Any:
    """nemo-automodel's ``HunyuanImage3ForCausalMM`` with the release weights, decoder layers spread over
    ``devices`` (contiguous chunks; stem and heads on the first), streamed one layer at a time."""
    import torch
    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.models.hunyuan_image3.config import HunyuanImage3Config
    from nemo_automodel.components.models.hunyuan_image3.model import HunyuanImage3ForCausalMM

    from converters.engine import SafetensorsReader, read_json

    model_dir = Path(model_dir)
    cfg = HunyuanImage3Config.from_dict(read_json(model_dir / "config.json", "the checkpoint needs config.json"))
    backend = BackendConfig(
        attn="sdpa", linear="torch", experts="torch", dispatcher="torch", gate_precision=torch.float32
    )
    with torch.device("meta"):
        model = HunyuanImage3ForCausalMM(cfg, backend=backend)
    devs = [torch.device(d) for d in devices]
    layers = model.model.layers
    n = len(layers)
    for i, layer in enumerate(layers.values()):
        layer.to_empty(device=devs[i * len(devs) // n])
    for child in (model.model.embed_tokens, model.model.norm, model.lm_head):
        child.to_empty(device=devs[0])
    for name, child in model.named_children():
        if name != "model":
            child.to_empty(device=devs[0])
    _add_device_hooks(model, devs[0])

    reader = SafetensorsReader(model_dir)
    groups: dict[str, list[str]] = {}
    for k in reader.keys():
        if k.startswith(PASSTHROUGH):
            continue
        m = _LAYER.match(k)
        groups.setdefault(m.group(1) if m else "stem", []).append(k)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    from tmp_jax.progress import progress_bar

    with torch.no_grad():
        for g in progress_bar(sorted(groups, key=lambda s: (s != "stem", int(s) if s.isdigit() else 0)), desc="load"):
            native = model.state_dict_adapter.from_hf({k: _to_torch(reader.read(k)) for k in groups[g]})
            for name, t in native.items():
                if name not in params:
                    raise ValueError(f"{model_dir}: checkpoint tensor maps to {name!r}, which the model does not have")
                p = params[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{model_dir}: {name}: checkpoint shape {tuple(t.shape)}, model {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{model_dir}: no checkpoint tensor for {missing[0]} ({len(missing)} parameters missing)")
    return model.eval()


def _add_device_hooks(model: Any, first: Any) -> None:
    """Move every decoder layer's inputs to its own device and the backbone's output back to ``first``
    (naive pipeline placement: one device works at a time, which is enough for recording inputs)."""
    import torch

    def move(x: Any, dev: Any) -> Any:
        return x.to(dev) if isinstance(x, torch.Tensor) else x

    def pre(module: Any, args: tuple, kwargs: dict) -> tuple:
        dev = next(module.parameters()).device
        return tuple(move(a, dev) for a in args), {k: move(v, dev) for k, v in kwargs.items()}

    for layer in model.model.layers.values():
        layer.register_forward_pre_hook(pre, with_kwargs=True)
    model.model.register_forward_hook(lambda mod, args, out: move(out, first))


def flow_sigmas(steps: int, shift: float) -> Any:
    """The release sampler's sigma schedule: ``linspace(1, 0, steps + 1)`` shifted, fp32."""
    import torch

    s = torch.linspace(1, 0, steps + 1)
    return shift * s / (1 + (shift - 1) * s)


# ----------------------------------------------------------------------------------------------
# Recording


def record_prompt(
    transformer: Any,
    tokens: dict[str, Any],
    latent_shape: tuple[int, int, int],
    *,
    steps: int,
    every: int,
    guidance: float,
    shift: float,
    seed: int,
) -> list[dict[str, np.ndarray]]:
    """Sample one prompt and return the recorded rows: ``{"ids", "latents", "timestep", "cond"}`` per fed row
    (``cond``: True for the conditional row, False for its unconditional partner right after it, None without
    CFG)."""
    import torch

    cfg = transformer.config
    c, h, w = latent_shape
    device = next(transformer.parameters()).device
    dtype = next(transformer.parameters()).dtype
    with_uncond = guidance > 1.0
    image = torch.full((h * w,), cfg.image_token_id, dtype=torch.long)
    prefixes = [tokens["prompt_input_ids"], tokens["uncond_prompt_input_ids"]][: 1 + with_uncond]
    ids = torch.stack([torch.cat([p.long(), image, tokens["prompt_suffix_ids"].long()]) for p in prefixes]).to(device)
    g = torch.Generator(device).manual_seed(seed)
    latents = torch.randn((1, c, h, w), generator=g, device=device, dtype=torch.bfloat16).float()
    sigmas = flow_sigmas(steps, shift).to(device)
    rows = []
    with torch.no_grad():
        for k in range(steps):
            t = (sigmas[k] * 1000).repeat(ids.shape[0])
            fed = latents.expand(ids.shape[0], -1, -1, -1).to(dtype)
            (v,) = transformer(ids, fed, t)
            if k % every == 0:
                for r in range(ids.shape[0]):
                    rows.append(
                        {
                            "ids": ids[r].cpu().numpy().astype(np.int32),
                            "latents": fed[r].float().cpu().numpy(),
                            "timestep": np.float32(t[r].item()),
                            "cond": (r == 0) if with_uncond else None,
                        }
                    )
            v = v.float()
            if with_uncond:
                cond, uncond = v.chunk(2)
                v = uncond + guidance * (cond - uncond)
            latents = latents + v * (sigmas[k + 1] - sigmas[k])
    return rows


def pack(
    rows: list[dict[str, Any]], batch: int, pad_id: int, guidance: float | None = None
) -> list[dict[str, np.ndarray]]:
    """Rows -> calibration micro-batches of up to ``batch`` rows (same latent size), right-padded with
    ``pad_id`` to one length per latent size.

    With CFG (rows in (conditional, unconditional) pairs) a micro-batch holds ``batch // 2`` whole pairs, its
    conditional rows first and their partners in the same order after them, and carries the trajectory fitness
    keys (:func:`tmp_jax.trajectory.mark_recorded`): ``cfg_guidance`` = ``guidance`` (the release combines
    ``u + scale (c - u)``) and ``sample_weight`` per pair by noise level, so the search scores the guided output
    at each recorded step, early steps weighted more, as on the embedded teachers' shipped trajectories."""
    from tmp_jax.trajectory import mark_recorded

    paired = guidance is not None and any(r.get("cond") is not None for r in rows)
    pairs_ok = len(rows) % 2 == 0 and all(
        rows[i].get("cond") is True and rows[i + 1].get("cond") is False for i in range(0, len(rows), 2)
    )
    if paired and not pairs_ok:
        raise ValueError("CFG rows must come in (conditional, unconditional) pairs")
    units = [rows[i : i + 2] for i in range(0, len(rows), 2)] if paired else [[r] for r in rows]
    per = max(1, batch // 2) if paired else batch  # units per micro-batch
    by_shape: dict[tuple, list[list[dict]]] = {}
    for u in units:
        by_shape.setdefault(u[0]["latents"].shape, []).append(u)
    out, sigmas = [], []
    for group_units in by_shape.values():
        length = max(len(r["ids"]) for u in group_units for r in u)
        for i in range(0, len(group_units), per):
            us = group_units[i : i + per]
            # [c_1..c_k, u_1..u_k] with CFG (the halves the guided fitness compares), else the rows in order
            chunk = [u[0] for u in us] + [u[1] for u in us] if paired else [u[0] for u in us]
            sigmas.append(np.array([u[0]["timestep"] / 1000.0 for u in us], np.float64))
            ids = np.full((len(chunk), length), pad_id, np.int32)
            for j, r in enumerate(chunk):
                ids[j, : len(r["ids"])] = r["ids"]
            out.append(
                {
                    "input_ids": ids,
                    "latents": np.stack([r["latents"] for r in chunk]).astype(np.float32),
                    "timestep": np.array([r["timestep"] for r in chunk], np.float32),
                    "valid_lengths": np.array([len(r["ids"]) for r in chunk], np.int32),
                }
            )
    mark_recorded(out, sigmas, [guidance if paired else None] * len(out))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="release checkpoint folder (config, shards, remote code)")
    p.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per line")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50, help="sampler steps (the release default is 50)")
    p.add_argument("--every", type=int, default=5, help="record every N-th step (a spread of timesteps)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale; <= 1 records no unconditional rows")
    p.add_argument(
        "--batch",
        type=int,
        default=4,
        help="rows per calibration micro-batch (with CFG: batch // 2 conditional/unconditional pairs, at least one)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="device, or a comma list to spread the decoder layers")
    args = p.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.batch < 1:
        raise SystemExit("--steps, --every and --batch must be >= 1")
    if not args.prompts.is_file():
        raise SystemExit(f"{args.prompts}: no such file")

    from converters.engine import read_json
    from tmp_jax.calibration import write_calib

    prompts = [x.strip() for x in args.prompts.read_text().splitlines() if x.strip()]
    if not prompts:
        raise SystemExit(f"{args.prompts}: no prompts")
    gen = args.model / "generation_config.json"
    shift = (
        float(read_json(gen, "the release sampler reads flow_shift").get("flow_shift", 3.0)) if gen.is_file() else 3.0
    )
    tok = load_prompt_tokenizer(args.model)
    model = load_transformer(args.model, args.device.split(","))
    width, height = tok.target_size(args.width, args.height)
    channels = int(model.config.vae["latent_channels"])
    shape = (channels, height // 16, width // 16)  # the release VAE downsamples by 16
    rows = []
    from tmp_jax.progress import progress_bar

    for j, prompt in enumerate(progress_bar(prompts, desc="prompts")):
        rows += record_prompt(
            model,
            tok(prompt, height, width),
            shape,
            steps=args.steps,
            every=args.every,
            guidance=args.guidance,
            shift=shift,
            seed=args.seed + j,
        )
    pad = model.config.pad_token_id
    batches = pack(rows, args.batch, 0 if pad is None else int(pad), args.guidance if args.guidance > 1.0 else None)
    write_calib(args.out, batches, "hunyuan")
    meta = {
        "prompts": len(prompts),
        "rows": len(rows),
        "steps": args.steps,
        "every": args.every,
        "size": [height, width],
    }
    print(f"wrote {len(batches)} micro-batches ({json.dumps(meta)}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
