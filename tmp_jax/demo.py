"""`make demo`: the main job on the embedded default, end to end, writing ``demo-out/``.

Today: the converter round trip on the built-in tiny Z-Image model (diffusers folder -> Flax ->
diffusers folder, bit-identical), plus a forward in diffusers vs JAX when the torch extra is present.
Later issues extend it with search, distillation and export.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from flax import nnx

from converters.engine import SafetensorsReader
from tmp_jax.models.z_image import TINY, ZImageTransformer


def run(out: Path) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    src = out / "tiny-zimage"
    if not src.exists():
        ZImageTransformer(TINY, rngs=nnx.Rngs(0)).save_pretrained(str(src))
    model = ZImageTransformer.from_pretrained(str(src), progress=True)
    rt = out / "tiny-zimage-roundtrip"
    model.save_pretrained(str(rt), overwrite=True, progress=True)
    a, b = SafetensorsReader(src), SafetensorsReader(rt)
    identical = all(a.read(k).tobytes() == b.read(k).tobytes() for k in a.keys())
    rng = np.random.default_rng(0)
    x = [rng.standard_normal((16, 1, 8, 8)).astype(np.float32)]
    cap = [rng.standard_normal((7, TINY.cap_feat_dim)).astype(np.float32)]
    t = np.array([0.5], np.float32)
    jax_out = np.asarray(model(x, t, cap)[0])
    result = {"tensors": float(len(a.keys())), "bit_identical": float(identical), "seconds": 0.0}
    try:
        import torch
        from diffusers import ZImageTransformer2DModel

        ref = ZImageTransformer2DModel.from_pretrained(str(rt)).eval()
        with torch.no_grad():
            want = ref([torch.from_numpy(x[0])], torch.from_numpy(t), [torch.from_numpy(cap[0])]).sample[0].numpy()
        result["rel_err_vs_diffusers"] = float(np.linalg.norm(jax_out - want) / np.linalg.norm(want))
    except ImportError:
        print("torch/diffusers not installed: skipping the PyTorch comparison", file=sys.stderr)
    result["seconds"] = time.time() - t0
    lines = ["# tmp-jax demo", "", "Converter round trip on the built-in tiny Z-Image model.", ""]
    lines += [f"- {k}: {v:.3g}" for k, v in result.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tmp_jax.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default: demo-out)")
    args = p.parse_args(argv)
    res = run(args.out)
    for k, v in res.items():
        print(f"{k:>22}: {v:.4g}")
    if not res["bit_identical"]:
        print("round trip was NOT bit-identical", file=sys.stderr)
        return 1
    print(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
