"""Grouped matmul of the routed experts: XLA's ``ragged_dot`` (dense over every group on our stacks) against the
tiled grouped matmul (``tmp_jax/models/hunyuan_image3/tiled_gmm.py``), forward and gradient.

For each shape: the compiled program's temporary memory (XLA's memory analysis; nothing is allocated for it) and,
with ``--time``, the wall time per call on the default device (random operands, groups of random sizes). A
program whose memory exceeds the device is reported as such, not run.

    python bench/grouped_matmul.py                       # CPU: memory only, two shapes
    python bench/grouped_matmul.py --time --full         # GPU: HunyuanImage-3.0 shapes (64 experts, 4096 x 3072)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time", action="store_true", help="also run and time each program that fits")
    p.add_argument("--full", action="store_true", help="HunyuanImage-3.0 expert shapes (one 1024^2 row, bf16)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tmp_jax.models.hunyuan_image3.tiled_gmm import tiled_ragged_dot

    if a.full:  # rows = one 1024^2 row's (token, slot) pairs: 4195 tokens x top-8
        shapes = [(33560, 4096, 3072, 64, "bfloat16"), (33560, 3072, 4096, 64, "bfloat16")]
    else:
        shapes = [(16384, 1024, 768, 64, "float32"), (4096, 512, 384, 16, "float32")]
    fns = {"ragged_dot": jax.lax.ragged_dot, "tiled": lambda x, w, g: tiled_ragged_dot(x, w, g, 128)}
    rows = []
    for m, k, n, g, dt in shapes:
        args = (
            jax.ShapeDtypeStruct((m, k), dt),
            jax.ShapeDtypeStruct((g, k, n), dt),
            jax.ShapeDtypeStruct((g,), jnp.int32),
        )
        for name, f in fns.items():
            loss = lambda x, w, gs, f=f: jnp.sum(f(x, w, gs).astype(jnp.float32) ** 2)  # noqa: E731
            for what, fn in (("forward", f), ("gradient", jax.grad(loss, (0, 1)))):
                row = {"m": m, "k": k, "n": n, "groups": g, "dtype": dt, "path": name, "what": what}
                try:
                    c = jax.jit(fn).lower(*args).compile()
                    row["temp_gb"] = round(c.memory_analysis().temp_size_in_bytes / 1e9, 3)
                except Exception as e:  # noqa: BLE001 (an out-of-memory compile is a result here)
                    row["error"] = str(e).splitlines()[0][:200]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                if a.time:
                    rng = np.random.default_rng(0)
                    sizes = rng.multinomial(m, np.ones(g) / g).astype(np.int32)
                    x = jnp.asarray(rng.standard_normal((m, k)), dt)
                    w = jnp.asarray(rng.standard_normal((g, k, n)) / k**0.5, dt)
                    gs = jnp.asarray(sizes)
                    try:
                        jax.block_until_ready(c(x, w, gs))
                        t0 = time.perf_counter()
                        for _ in range(a.iters):
                            out = c(x, w, gs)
                        jax.block_until_ready(out)
                        row["ms"] = round((time.perf_counter() - t0) / a.iters * 1e3, 2)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = str(e).splitlines()[0][:200]
                rows.append(row)
                print(json.dumps(row), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"device": str(jax.devices()[0].device_kind), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
