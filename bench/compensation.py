"""Compensated pruning at full Z-Image-Turbo size: what the extra statistics and the re-fit cost.

One run on one device, random bf16 Turbo weights generated ON THE DEVICE (``random_on_mesh``), one 1024^2
calibration sample (latent 16x1x128x128, 512 caption tokens), as ``bench/candidate_eval.py`` uses:

(a) calibration per micro-batch, as ``calibrate`` runs it (``runner.collect_stats``: output and importance
    statistics copied to the host): plain vs with the consumer Grams (``grams=True``: the to_out input Gram
    per attention, 3840^2, and the w2 input Gram per FFN, 10240^2, accumulated ON THE DEVICE), median ms and
    the ratio; the plain jitted forward for scale; the Grams' device memory and the device's peak memory;
(b) the compensation itself for one main block, as ``PruningProblem`` runs it (the 30 heads on the host in
    float64; the 10240 FFN channels, a wide group, on the device in float32): greedy structured-OBS order
    and the least-squares re-fit of every level;
(c) the two ways a search can evaluate re-fitted candidates without a new compile, sized for the whole
    model: precomputed re-fits per (consumer, level) (what ``Compensation.level_refits`` holds) vs the
    Gram factors a jitted cut would solve from per candidate.

    python bench/compensation.py --out DIR      # full size on the accelerator
    python bench/compensation.py --tiny         # tiny config on the CPU (a smoke run of the script)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _median_ms(f, n: int) -> float:  # noqa: ANN001
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="samples per calibration micro-batch")
    ap.add_argument("--skip-host", action="store_true", help="skip (b)")
    ap.add_argument("--strides", default="1,2,4", help="Gram token strides to time (the first feeds (b))")
    args = ap.parse_args()
    args.strides = [int(s) for s in args.strides.split(",")]

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from tmp_jax.compensate import obs_order, refit
    from tmp_jax.models.z_image import TINY, TURBO, runner
    from tmp_jax.models.z_image import model as zm
    from tmp_jax.models.z_image.structure import build_spec
    from tmp_jax.sharding import make_mesh, random_on_mesh
    from tmp_jax.stats import set_grams
    from tmp_jax.tree import Tree

    t_start = time.time()
    res: dict = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(jax.devices()[0])}

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    cfg, side, cap_len = (TINY, 32, 40) if args.tiny else (TURBO, 128, 512)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    mesh = make_mesh("data:1", jax.devices()[:1])
    model = random_on_mesh(zm.init_abstract(cfg, dtype), mesh, seed=0)
    log(f"model {'TINY' if args.tiny else 'TURBO'} {dtype.__name__} on {jax.devices()[0]}")
    rng = np.random.default_rng(0)
    b = args.batch
    batch = {
        "latents": rng.standard_normal((b, cfg.in_channels, 1, side, side)).astype(np.float32),
        "cap_feats": rng.standard_normal((b, cap_len, cfg.cap_feat_dim)).astype(np.float32),
        "cap_lens": np.full(b, cap_len, np.int32),
        "t": np.full(b, 0.5, np.float32),
    }
    inputs = runner.prepare_batch(cfg, batch)
    dev = dict(inputs, arrays={k: jnp.asarray(v) for k, v in inputs["arrays"].items()}, t=jnp.asarray(inputs["t"]))

    # -- (a) calibration per micro-batch: plain vs with Grams ----------------------------------------
    gd, st = nnx.split(model)
    pk = inputs["patch_key"]

    @jax.jit
    def plain(s, arrs, t):  # noqa: ANN001, ANN202
        return nnx.merge(gd, s).forward_padded(arrs, t, pk)

    plain(st, dev["arrays"], dev["t"]).block_until_ready()
    res["forward_ms"] = _median_ms(lambda: plain(st, dev["arrays"], dev["t"]).block_until_ready(), args.iters)

    def collect() -> dict:
        y, s = runner.collect_stats(model, dev)
        np.asarray(y)
        jax.block_until_ready([v for v in s.values() if isinstance(v, jax.Array)])
        return s

    set_grams(model, False)
    t0 = time.perf_counter()
    s_plain = collect()
    res["stats_compile_s"] = time.perf_counter() - t0
    res["stats_ms"] = _median_ms(collect, args.iters)
    res["strides"] = {}
    for stride in args.strides:
        set_grams(model, True, stride)
        t0 = time.perf_counter()
        s_grams = collect()
        r = {"compile_s": time.perf_counter() - t0, "ms": _median_ms(collect, args.iters)}
        r["ratio_vs_stats"], r["ratio_vs_forward"] = r["ms"] / res["stats_ms"], r["ms"] / res["forward_ms"]
        res["strides"][stride] = r
        log(f"(a) Grams at token stride {stride}: {r['ms']:.1f} ms = {r['ratio_vs_stats']:.3f}x the plain statistics")
        if stride != args.strides[0]:
            del s_grams
        else:
            grams = {k: v for k, v in s_grams.items() if k[-1].startswith("gram_")}
    first = res["strides"][args.strides[0]]
    res["grams_ms"], res["ratio_grams_vs_stats"] = first["ms"], first["ratio_vs_stats"]
    res["ratio_grams_vs_forward"] = first["ratio_vs_forward"]
    res["n_stats_plain"], res["n_grams"] = len(s_plain), len(grams)
    res["grams_gb"] = sum(int(np.prod(v.shape)) * 4 for v in grams.values()) / 1e9
    ms = jax.devices()[0].memory_stats() or {}
    res["device_peak_gb"] = ms.get("peak_bytes_in_use", 0) / 1e9
    res["device_in_use_gb"] = ms.get("bytes_in_use", 0) / 1e9
    log(
        f"(a) forward {res['forward_ms']:.1f} ms; stats {res['stats_ms']:.1f} ms; stats+Grams {res['grams_ms']:.1f} ms "
        f"= {res['ratio_grams_vs_stats']:.3f}x stats ({res['ratio_grams_vs_forward']:.3f}x forward); "
        f"{res['n_grams']} Grams, {res['grams_gb']:.2f} GB fp32 on the device; peak {res['device_peak_gb']:.1f} GB"
    )

    # -- (b) host side for one main block ---------------------------------------------------------------
    tree = Tree(build_spec(cfg))
    if not args.skip_host:
        params = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        host = {}
        for sub, kind, w_path, group in (
            ("attention", "heads", ("to_out", 0, "kernel"), cfg.head_dim),
            ("feed_forward", "ffn", ("w2", "kernel"), 1),
        ):
            g = np.asarray(grams[("layers", 0, sub, f"gram_{kind}")], np.float64)
            w = np.asarray(params[("layers", 0, sub, *w_path)], np.float32).astype(np.float64)
            gene = next(x for x in tree.genes if x.node == f"layers.0.{sub}" and x.kind == kind)
            levels = tuple(k for k in gene.counts if 0 < k < g.shape[0] // group)
            t0 = time.perf_counter()
            order, _, snaps = obs_order(g, w, group, 0, 0.01, snapshots=levels)
            t_obs = time.perf_counter() - t0
            t0 = time.perf_counter()
            k = levels[len(levels) // 2]
            r = refit(g, w, order[:k], group, 0, 0.01)  # what export solves, once per consumer
            t_fit = time.perf_counter() - t0
            el = (order[:k, None] * group + np.arange(group)).ravel()
            gap = float(np.max(np.abs(snaps[k][el] - r)) / np.max(np.abs(r)))
            host[kind] = {"units": len(order), "obs_with_level_refits_s": t_obs, "one_refit_s": t_fit, "levels": levels}
            host[kind]["snapshot_vs_refit_max_rel"] = gap
            log(
                f"(b) layers.0 {kind}: OBS of {len(order)} units + re-fits of its {len(levels)} levels {t_obs:.1f} s; "
                f"one re-fit (export) {t_fit:.1f} s; OBS snapshot vs re-fit max rel. {gap:.1e}"
            )
        res["host_one_block"] = host
        n_blocks = sum(1 for n in tree.spec.nodes() if n.kind == "block")
        res["search_compensation_s_est"] = n_blocks * sum(v["obs_with_level_refits_s"] for v in host.values())
        log(f"(b) whole model (x{n_blocks} blocks, estimated): {res['search_compensation_s_est']:.0f} s")

    # -- (c) candidate-evaluation storage, whole model ------------------------------------------------------
    per_level = per_factor = 0
    for n in tree.spec.nodes():
        for u in n.units:
            s = next((x for x in u.slices if x.consumer), None)
            if s is None:
                continue
            shape = tree.spec.shapes[s.path]
            gene = next(x for x in tree.genes if (x.node == n.name or n.name in x.members) and x.kind == u.kind)
            levels = sum(1 for c in gene.counts if 0 < c < u.n)
            per_level += levels * int(np.prod(shape)) * 2  # bf16 copies of the consumer, one per level below full
            per_factor += (u.n * s.group) ** 2 * 4  # the fp32 Gram (its Cholesky factor) per consumer
    res["precomputed_refits_gb_bf16"] = per_level / 1e9
    res["gram_factors_gb_fp32"] = per_factor / 1e9
    log(
        f"(c) precomputed re-fits {res['precomputed_refits_gb_bf16']:.1f} GB (bf16) vs Gram factors "
        f"{res['gram_factors_gb_fp32']:.1f} GB (fp32)"
    )
    res["wall_s"] = time.time() - t_start
    print("RESULT " + json.dumps(res), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compensation.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
