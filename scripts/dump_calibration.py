"""Dump a calibration set from the REAL diffusers Z-Image pipeline (run where you have the model).

It samples each prompt with the stock ``ZImagePipeline`` and records the transformer's inputs
(latents, caption features, timestep) at every ``--every``-th denoising step, in the format of
``docs/calibration-format.md``. PyTorch only; nothing is unpickled.

    python scripts/dump_calibration.py --pipeline Tongyi-MAI/Z-Image-Turbo --prompts prompts.txt \
        --out calib/ --height 1024 --width 1024 --steps 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="diffusers ZImagePipeline folder or hub id")
    p.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per line")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--every", type=int, default=2, help="record every N-th step (a spread of timesteps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)

    import torch
    from diffusers import ZImagePipeline

    from tmp_jax.calibration import write_calib

    pipe = ZImagePipeline.from_pretrained(args.pipeline, torch_dtype=torch.bfloat16).to(args.device)
    prompts = [x.strip() for x in args.prompts.read_text().splitlines() if x.strip()]
    if not prompts:
        raise SystemExit(f"{args.prompts}: no prompts")
    batches: list[dict[str, np.ndarray]] = []
    step = {"i": 0}
    real_forward = pipe.transformer.forward

    def recording_forward(x, t, cap_feats, *a, **kw):
        if step["i"] % args.every == 0:
            L = max(c.shape[0] for c in cap_feats)
            feats = np.zeros((len(cap_feats), L, cap_feats[0].shape[1]), np.float32)
            for i, c in enumerate(cap_feats):
                feats[i, : c.shape[0]] = c.float().cpu().numpy()
            batches.append(
                {
                    "latents": torch.stack([v.float() for v in x]).cpu().numpy(),
                    "cap_feats": feats,
                    "cap_lens": np.array([c.shape[0] for c in cap_feats], np.int32),
                    "t": t.float().cpu().numpy().reshape(-1),
                }
            )
        step["i"] += 1
        return real_forward(x, t, cap_feats, *a, **kw)

    pipe.transformer.forward = recording_forward
    for j, prompt in enumerate(prompts):
        step["i"] = 0
        g = torch.Generator(args.device).manual_seed(args.seed + j)
        pipe(prompt, height=args.height, width=args.width, num_inference_steps=args.steps, generator=g)
    write_calib(args.out, batches, "zimage")
    print(f"wrote {len(batches)} micro-batches to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
