"""Dump a calibration set from the REAL diffusers Z-Image pipelines (run where you have the model).

T2I (``--prompts``): samples each prompt with the stock ``ZImagePipeline`` and records the transformer's
inputs (latents, caption features, timestep) at every ``--every``-th denoising step.

Editing / TI2I (``--edits``, Z-Image Omni/Edit): samples each edit with the stock ``ZImageOmniPipeline``
(reference image(s) -> clean VAE condition latents and SigLIP2 features, the instruction -> the pipeline's
chat-template caption segments) and records what its transformer is fed (``x`` = conditions + noisy
target, ``cap_feats`` segments, ``siglip_feats``, ``image_noise_mask``, ``t``) as TI2I micro-batches
(``docs/calibration-format.md``, "TI2I micro-batches"; ``tmp_jax.models.z_image.ti2i.batch_from_args``).
With classifier-free guidance each step's micro-batch holds the conditional and the unconditional rows.

Both flags together give one mixed set (every micro-batch tagged with its task); search it with
``--task t2i,ti2i``. T2I prompts go through ``ZImagePipeline`` (the transformer's basic mode): the Omni
pipeline runs a prompt without an image in the omni layout, which is a different forward.
Formats: ``--prompts`` one prompt per line; ``--edits`` one edit per line,
``IMAGE[|IMAGE...]<TAB>instruction`` (image paths relative to the file). PyTorch only; nothing is unpickled.

    python scripts/dump_calibration.py --pipeline Tongyi-MAI/Z-Image-Turbo --prompts prompts.txt \\
        --out calib/ --height 1024 --width 1024 --steps 8
    python scripts/dump_calibration.py --omni-pipeline Z-Image-Omni/ --edits edits.tsv --out calib-edit/ \\
        --steps 8 --guidance 4.0
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np


def _np(v: Any) -> np.ndarray | None:
    return None if v is None else v.float().cpu().numpy()


def record_t2i(pipe: Any, prompts: list[str], *, height: int, width: int, steps: int, every: int, seed: int,
               device: str = "cpu", **call: Any) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """Sample ``prompts`` with a ``ZImagePipeline``; T2I micro-batches of the transformer's inputs at every
    ``every``-th step (one micro-batch per recorded call: the CFG rows of one step together).

    The micro-batches are the teacher's own sampling trajectory, so they carry the trajectory fitness's keys
    (:func:`tmp_jax.trajectory.mark_recorded`): ``sample_weight`` by noise level, and for a call with CFG
    ``cfg_guidance`` = 1 + the pipeline's ``guidance_scale`` (diffusers' Z-Image combines ``c + s (c - u)``,
    i.e. ``u + (1 + s)(c - u)``, conditional rows first). The pipeline's optional CFG renormalisation is not
    modelled: the score compares the un-normalised guided output."""
    import torch

    from tmp_jax.trajectory import mark_recorded

    batches: list[dict[str, Any]] = []
    sigmas: list[np.ndarray] = []
    guidance: list[float | None] = []
    step = {"i": 0}
    real_forward = pipe.transformer.forward

    def recording_forward(x, t, cap_feats, *a, **kw):  # noqa: ANN001, ANN202
        if step["i"] % every == 0:
            # CFG doubles the rows of the call (one prompt per call here): conditional first, then unconditional
            cfg = len(x) == 2
            sigma = 1.0 - t.float().cpu().numpy().reshape(-1)  # the transformer's t is 1 - sigma
            sigmas.append(sigma[: len(x) // 2] if cfg else sigma)
            guidance.append(1.0 + float(pipe.guidance_scale) if cfg else None)
            L = max(c.shape[0] for c in cap_feats)
            feats = np.zeros((len(cap_feats), L, cap_feats[0].shape[1]), np.float32)
            for i, c in enumerate(cap_feats):
                feats[i, : c.shape[0]] = _np(c)
            batches.append(
                {
                    "latents": torch.stack([v.float() for v in x]).cpu().numpy(),
                    "cap_feats": feats,
                    "cap_lens": np.array([c.shape[0] for c in cap_feats], np.int32),
                    "t": t.float().cpu().numpy().reshape(-1),
                    "task": "t2i",
                }
            )
        step["i"] += 1
        return real_forward(x, t, cap_feats, *a, **kw)

    pipe.transformer.forward = recording_forward
    try:
        for j, prompt in enumerate(prompts):
            step["i"] = 0
            g = torch.Generator(device).manual_seed(seed + j)
            pipe(prompt, height=height, width=width, num_inference_steps=steps, generator=g, **call)
    finally:
        pipe.transformer.forward = real_forward
    mark_recorded(batches, sigmas, guidance)
    return batches


def omni_call_to_batch(x: list, t: Any, cap_feats: list, siglip_feats: list | None, image_noise_mask: list) -> dict:
    """One call of the Omni transformer (torch tensors, diffusers' nested lists) -> one TI2I micro-batch
    (``ti2i.batch_from_args``). Every row needs a condition image: a prompt without one runs the Omni path
    with the omni RoPE layout and clean/noisy modulation, which is NOT the T2I (basic-mode) forward that
    ``ZImagePipeline`` runs, so it cannot be recorded as a T2I micro-batch (dump T2I prompts with
    ``--pipeline``)."""
    from tmp_jax.models.z_image import ti2i

    xs = [[_np(v) for v in row] for row in x]
    if any(len(row) < 2 for row in xs):
        raise ValueError(
            "an Omni transformer call has a row without condition images (the omni layout of a T2I prompt); "
            "record T2I prompts with the T2I ZImagePipeline (--pipeline)"
        )
    caps = [[_np(c) for c in row] for row in cap_feats]
    tt = t.float().cpu().numpy().reshape(-1)
    sig = None
    if siglip_feats is not None and any(s is not None for s in siglip_feats):
        sig = [None if s is None else [_np(v) for v in s] for s in siglip_feats]
    return {**ti2i.batch_from_args(xs, tt, caps, sig, [list(m) for m in image_noise_mask]), "task": "ti2i"}


def record_omni(pipe: Any, edits: list[tuple[list[Any], str]], *, steps: int, every: int, seed: int,
                height: int | None = None, width: int | None = None, device: str = "cpu",
                **call: Any) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """Sample ``edits`` (``(condition images, instruction)``, at least one image each) with a
    ``ZImageOmniPipeline``; one TI2I micro-batch per recorded transformer call (every ``every``-th step)."""
    import torch

    for images, instruction in edits:
        if not images:
            raise ValueError(f"edit {instruction!r} has no reference image (T2I prompts go through --pipeline)")

    batches: list[dict[str, Any]] = []
    step = {"i": 0}
    real_forward = pipe.transformer.forward

    def recording_forward(x=None, t=None, cap_feats=None, *a, **kw):  # noqa: ANN001, ANN202
        if step["i"] % every == 0:
            batches.append(omni_call_to_batch(x, t, cap_feats, kw.get("siglip_feats"), kw.get("image_noise_mask")))
        step["i"] += 1
        return real_forward(x, t, cap_feats, *a, **kw)

    pipe.transformer.forward = recording_forward
    try:
        for j, (images, instruction) in enumerate(edits):
            step["i"] = 0
            g = torch.Generator(device).manual_seed(seed + j)
            pipe(
                image=list(images),
                prompt=instruction,
                height=height,
                width=width,
                num_inference_steps=steps,
                generator=g,
                **call,
            )
    finally:
        pipe.transformer.forward = real_forward
    return batches


def read_edits(path: Path) -> list[tuple[list[Any], str]]:
    """``IMAGE[|IMAGE...]<TAB>instruction`` lines -> (PIL images, instruction); clear errors on bad lines."""
    from PIL import Image

    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise SystemExit(f"{path}:{n}: expected IMAGE[|IMAGE...]<TAB>instruction")
        imgs, text = line.split("\t", 1)
        paths = [path.parent / p.strip() for p in imgs.split("|") if p.strip()]
        for p in paths:
            if not p.is_file():
                raise SystemExit(f"{path}:{n}: image {p} not found")
        out.append(([Image.open(p).convert("RGB") for p in paths], text.strip()))
    if not out:
        raise SystemExit(f"{path}: no edits")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", help="diffusers ZImagePipeline folder or hub id (for --prompts)")
    p.add_argument("--omni-pipeline", help="diffusers ZImageOmniPipeline folder or hub id (for --edits)")
    p.add_argument("--prompts", type=Path, help="text file, one T2I prompt per line")
    p.add_argument("--edits", type=Path, help="editing prompts: IMAGE[|IMAGE...]<TAB>instruction per line")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--every", type=int, default=2, help="record every N-th step (a spread of timesteps)")
    p.add_argument("--guidance", type=float, default=None, help="Omni guidance scale (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.prompts is None and args.edits is None:
        p.error("give --prompts (T2I) and/or --edits (TI2I)")
    if args.prompts is not None and args.pipeline is None:
        p.error("--prompts needs --pipeline (a ZImagePipeline; an Omni checkpoint's transformer works there too)")
    if args.edits is not None and args.omni_pipeline is None:
        p.error("--edits needs --omni-pipeline (a ZImageOmniPipeline)")
    if args.steps < 1 or args.every < 1:  # --every 0 divided by zero after the pipeline had loaded
        raise SystemExit("--steps and --every must be >= 1")
    for f in (args.prompts, args.edits):
        if f is not None and not f.is_file():
            raise SystemExit(f"{f}: no such file")

    import torch

    from tmp_jax.calibration import write_calib

    batches: list[dict[str, Any]] = []
    kw = dict(steps=args.steps, every=args.every, seed=args.seed, device=args.device)
    if args.prompts is not None:
        prompts = [x.strip() for x in args.prompts.read_text().splitlines() if x.strip()]
        if not prompts:
            raise SystemExit(f"{args.prompts}: no prompts")
        from diffusers import ZImagePipeline

        pipe = ZImagePipeline.from_pretrained(args.pipeline, torch_dtype=torch.bfloat16).to(args.device)
        batches += record_t2i(pipe, prompts, height=args.height, width=args.width, **kw)
        del pipe
    if args.edits is not None:
        from diffusers import ZImageOmniPipeline

        omni = ZImageOmniPipeline.from_pretrained(args.omni_pipeline, torch_dtype=torch.bfloat16).to(args.device)
        call = {} if args.guidance is None else {"guidance_scale": args.guidance}
        # the output size follows the (first) reference image, as the pipeline does by default
        batches += record_omni(omni, read_edits(args.edits), **kw, **call)
    write_calib(args.out, batches, "zimage")
    n_ti2i = sum(b["task"] == "ti2i" for b in batches)
    print(f"wrote {len(batches)} micro-batches ({n_ti2i} TI2I) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
