"""Candidate evaluation cost at full Z-Image-Turbo width (issue 5).

Measures, in one run on one device:

(a) a ~4B candidate materialised as a real smaller model: its own jitted ``forward_padded``;
(b) the same candidate evaluated the way the search does it: ``PruningProblem.fitness`` =
    ``runner.forward_pruned`` on the (permuted) full model, prefixes sliced inside the per-sub-layer jitted
    functions (no candidate is built) + the normalised error against a cached teacher output; after a
    warm-up; ratio (b)/(a), target <= 1.2x; also checked against the materialised candidate's fitness;
(c) compilations during the evaluation of several new random candidates whose width levels were
    warmed before (``runner.compile_count()`` and every XLA backend compile, eager slices included);
(d) evaluations per GPU-hour;
(e) the embedded tiny teacher (``build_problem(None)``) on the CPU: evaluations per second;
(f) with ``--calib-stats``: calibration statistics collection (``runner.collect_stats``, output and
    statistics copied to the host, as ``calibrate`` does per micro-batch) vs the plain jitted forward of the
    FULL model on the same sample (target <= 1.3x).

Full size: the Turbo config in bf16 with random weights generated ON THE DEVICE (one jitted generator
per parameter shape), an identity importance order (the model counts as already permuted), one
calibration sample at 1024^2 (latent 16x1x128x128, 512 caption tokens). The PruningProblem is built
from these pieces directly (``build_problem`` would calibrate on the host).

    python bench/candidate_eval.py --out DIR          # full size on the accelerator, then (e) on CPU
    python bench/candidate_eval.py --tiny             # small config, CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_COMPILES = [0]


def _count_compiles() -> None:
    import jax

    def cb(event: str, *_a, **_k) -> None:
        if "backend_compile" in event:
            _COMPILES[0] += 1

    jax.monitoring.register_event_duration_secs_listener(cb)


def _median_ms(f, n: int) -> tuple[float, list[float]]:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts), [1e3 * t for t in ts]


def pick_genome(tree, target: float):
    """Uniform (heads level, FFN level) over every block, all blocks kept, closest to ``target`` params."""
    import numpy as np

    keep = np.array([g.kind == "keep" for g in tree.genes])
    heads = np.array([g.kind == "heads" for g in tree.genes])
    mx = tree.max_levels()
    best = None
    for h in range(1, int(mx[heads].max()) + 1):
        for f in range(1, int(mx[~keep & ~heads].max()) + 1):
            g = np.where(keep, mx, np.where(heads, h, f))
            n = tree.count(tree.decode(g))["params"]
            key = (abs(n - target), -h)
            if best is None or key < best[0]:
                best = (key, g, n)
    return best[1], best[2]


def _legacy_head_energy(o, w_out):  # noqa: ANN001, ANN202
    """The attention statistic as committed before the <O^T O, W W^T> form (commit 5a3a9ac): fp32 operands,
    ``o G o^T`` through a (B, T, N, D) fp32 GEMM output. Used only to time the "before" path."""
    import jax.numpy as jnp

    n, d = o.shape[-2], o.shape[-1]
    w = w_out.astype(jnp.float32).reshape(n, d, -1)  # [N, D, dim]
    gram = jnp.einsum("nde,nfe->ndf", w, w)  # [N, D, D]
    of = o.astype(jnp.float32)
    return jnp.sum(jnp.einsum("btnd,ndf->btnf", of, gram) * of, axis=(0, 1, 3))


class _Patched:
    """Temporarily replace ``obj.name`` (bench-only: the "before" formulas, active while a function traces)."""

    def __init__(self, obj, name: str, value):  # noqa: ANN001
        self.obj, self.name, self.value = obj, name, value

    def __enter__(self) -> None:
        self.old = getattr(self.obj, self.name)
        setattr(self.obj, self.name, self.value)

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        setattr(self.obj, self.name, self.old)


def _stats_block_breakdown(model, iters: int, log, out_dir) -> dict:  # noqa: ANN001
    """One main block at full width (batch 1, the unified sequence): the jitted block without statistics, with
    all of them in the old and the new form, and each new statistic alone; whether cuDNN attention is kept."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from tmp_jax.models.z_image import model as zm

    cfg = model.config
    blk = model.layers[0]
    T = 4608 if cfg.dim == 3840 else 256
    ks = jax.random.split(jax.random.key(7), 2)
    dt = blk.attention.to_q.kernel[...].dtype
    x = jax.random.normal(ks[0], (1, T, cfg.dim), jnp.float32).astype(dt)
    c = jax.random.normal(ks[1], (1, cfg.adaln_dim), jnp.float32).astype(dt)
    pos = np.stack([np.arange(T) % 600, np.arange(T) % 64, (np.arange(T) // 64) % 64], -1)[None].astype(np.int32)
    cos, sin = zm.rope_cos_sin(cfg, jnp.asarray(pos))
    mask = jnp.ones((1, 1, 1, T), bool)
    subs = {"block": blk, "attention": blk.attention, "feed_forward": blk.feed_forward}
    variants = [
        ("none", (), False),
        ("all, old form", tuple(subs), True),
        ("all, new form", tuple(subs), False),
        ("attention only (new)", ("attention",), False),
        ("FFN only", ("feed_forward",), False),
        ("block change only", ("block",), False),
    ]
    res: dict = {"tokens": T}
    hlo_txt = []
    for name, on, legacy in variants:
        for k in on:
            subs[k].collect_stats = True
        try:
            gd, st_b = nnx.split(blk)
        finally:
            for k in on:
                subs[k].collect_stats = False

        def make(gd):  # noqa: ANN001, ANN202
            def run(st, x, cos, sin, c):  # noqa: ANN001, ANN202
                m = nnx.merge(gd, st)
                y = m(x, mask, cos, sin, c)
                return y, nnx.pop(m, nnx.Intermediate)

            return run

        f = jax.jit(make(gd))
        with _Patched(zm, "head_output_energy", _legacy_head_energy if legacy else zm.head_output_energy):
            lowered = f.lower(st_b, x, cos, sin, c)
        n_cudnn = lowered.as_text().count("__cudnn$fmha")
        comp = lowered.compile()
        if name in ("all, old form", "all, new form"):
            hlo_txt.append(f"===== {name} =====\n{comp.as_text()}")
        jax.block_until_ready(comp(st_b, x, cos, sin, c))
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(max(iters, 10)):
                y = comp(st_b, x, cos, sin, c)
            jax.block_until_ready(y)
            ts.append((time.perf_counter() - t0) / max(iters, 10))
        res[name] = {"ms": 1e3 * statistics.median(ts), "cudnn_calls": n_cudnn}
    base = res["none"]["ms"]
    for name, *_ in variants:
        res[name]["extra_ms"] = res[name]["ms"] - base
    log(
        "(f) one main block, T="
        + str(T)
        + ": "
        + "; ".join(
            f"{n} {r['ms']:.3f} ms (+{r['extra_ms']:.3f}, cuDNN calls {r['cudnn_calls']})"
            for n, r in res.items()
            if n != "tokens"
        )
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "stats_block_hlo.txt").write_text("\n".join(hlo_txt))
    return res


def calib_stats(model, inputs: dict, iters: int, log, out_dir=None, breakdown: bool = True) -> dict:  # noqa: ANN001
    """(f): what ``calibrate`` does per micro-batch (``runner.collect_stats``, output and statistics copied to
    the host) vs the plain jitted ``forward_padded`` of the same FULL model, inputs on the device.

    Before/after in one run: "old" = the statistic formulas and host path as committed before this change
    (graph-mode ``split_collecting`` per call, graphdef as a static jit argument, the sown tree copied with one
    ``device_get``; the per-array-copy variant measured at 1.96x is timed too); "new" = ``runner.collect_stats``
    (``stats.run_collecting``). Device-only times (inputs prepared, no host work) split device from host cost.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from tmp_jax import stats as tstats
    from tmp_jax.models.z_image import model as zm
    from tmp_jax.models.z_image import runner

    res: dict = {}
    try:
        dev_arrays = {k: jnp.asarray(v) for k, v in inputs["arrays"].items()}
        t_dev, pk = jnp.asarray(inputs["t"]), inputs["patch_key"]
        dev_inputs = dict(inputs, arrays=dev_arrays, t=t_dev)
        gd_full, st_full = nnx.split(model)

        @jax.jit
        def plain(st, arrs, t):
            return nnx.merge(gd_full, st).forward_padded(arrs, t, pk)

        t0 = time.perf_counter()
        lowered = plain.lower(st_full, dev_arrays, t_dev)
        res["plain_cudnn_calls"] = lowered.as_text().count("__cudnn$fmha")
        plain_c = lowered.compile()
        plain_c(st_full, dev_arrays, t_dev).block_until_ready()
        res["plain_compile_s"] = time.perf_counter() - t0
        res["plain_ms"], _ = _median_ms(lambda: plain_c(st_full, dev_arrays, t_dev).block_until_ready(), iters)
        log(f"(f) plain forward {res['plain_ms']:.2f} ms (cuDNN calls {res['plain_cudnn_calls']})")

        # -- old: legacy formulas (traced under the patch) + the old host path ------------------------
        @partial(jax.jit, static_argnums=(0, 4))
        def old_jit(gd, state, arrays, t, pk):  # noqa: ANN001, ANN202
            m = nnx.merge(gd, state)
            return m.forward_padded(arrays, t, pk), nnx.pop(m, nnx.Intermediate)

        def old_collect(copy_tree: bool = True):  # noqa: ANN202
            gd, st = tstats.split_collecting(model)
            out, inter = old_jit(gd, st, dev_arrays, t_dev, pk)
            s = tstats.flatten_intermediates(jax.device_get(inter) if copy_tree else inter)
            np.asarray(out)
            return s

        t0 = time.perf_counter()
        with _Patched(zm, "head_output_energy", _legacy_head_energy):
            s_old = old_collect()
        res["stats_old_compile_s"] = time.perf_counter() - t0
        res["stats_old_ms"], _ = _median_ms(old_collect, iters)
        res["stats_old_percopy_ms"], _ = _median_ms(lambda: old_collect(False), iters)
        gd_c, st_c = tstats.split_collecting(model)
        res["stats_old_device_ms"], _ = _median_ms(
            lambda: jax.block_until_ready(old_jit(gd_c, st_c, dev_arrays, t_dev, pk)), iters
        )
        res["host_split_collecting_ms"], _ = _median_ms(lambda: tstats.split_collecting(model), iters)
        _, inter = old_jit(gd_c, st_c, dev_arrays, t_dev, pk)
        jax.block_until_ready(inter)
        res["host_tree_copy_ms"], _ = _median_ms(lambda: tstats.flatten_intermediates(jax.device_get(inter)), iters)
        res["n_stats"] = len(s_old)
        inter = gd_c = st_c = None  # free the tree
        log(
            f"(f) old: {res['stats_old_ms']:.2f} ms ({res['stats_old_ms'] / res['plain_ms']:.3f}x; per-array copies "
            f"{res['stats_old_percopy_ms']:.2f} ms); device only {res['stats_old_device_ms']:.2f} ms; host: "
            f"split_collecting {res['host_split_collecting_ms']:.2f} ms, tree copy {res['host_tree_copy_ms']:.2f} ms"
        )

        # -- new: runner.collect_stats (stats.run_collecting) --------------------------------------------
        def stats() -> dict:
            y, s = runner.collect_stats(model, dev_inputs)
            np.asarray(y)
            return s

        t0 = time.perf_counter()
        s_new = stats()
        res["stats_compile_s"] = time.perf_counter() - t0
        res["stats_ms"], _ = _median_ms(stats, iters)
        res["stats_ratio"] = res["stats_ms"] / res["plain_ms"]
        res["stats_old_ratio"] = res["stats_old_ms"] / res["plain_ms"]
        prog = next(p for k, p in tstats._PROGRAMS.items() if k[1] is runner._stats_body)
        leaves = jax.tree.leaves(model)
        res["stats_device_ms"], _ = _median_ms(lambda: jax.block_until_ready(prog.fn(leaves, dev_arrays, t_dev)), iters)
        res["host_tree_flatten_ms"], _ = _median_ms(lambda: jax.tree.flatten(model), iters)
        res["stats_cudnn_calls"] = prog.fn.lower(leaves, dev_arrays, t_dev).as_text().count("__cudnn$fmha")
        # old and new statistics agree (bf16 model: the old form rounds through fp32 GEMMs, the new one
        # accumulates bf16 products in fp32)
        rel = {k: float(np.max(np.abs(s_new[k] - s_old[k]) / np.maximum(np.abs(s_old[k]), 1e-30))) for k in s_old}
        res["old_vs_new_max_rel"] = max(rel.values()) if rel else None
        res["old_vs_new_same_keys"] = sorted(s_new) == sorted(s_old)
        log(
            f"(f) new: {res['stats_ms']:.2f} ms = {res['stats_ratio']:.3f}x (old {res['stats_old_ratio']:.3f}x); "
            f"device only {res['stats_device_ms']:.2f} ms; tree flatten {res['host_tree_flatten_ms']:.2f} ms; "
            f"cuDNN calls {res['stats_cudnn_calls']} (plain {res['plain_cudnn_calls']}); old vs new stats max rel "
            f"{res['old_vs_new_max_rel']:.2e}, same keys {res['old_vs_new_same_keys']}; compiles "
            f"{res['plain_compile_s']:.1f}s / {res['stats_old_compile_s']:.1f}s / {res['stats_compile_s']:.1f}s"
        )
    except Exception as ex:  # noqa: BLE001
        res["stats_error"] = f"{type(ex).__name__}: {str(ex)[:400]}"
        log(f"(f) FAILED: {res['stats_error']}")
    if breakdown and "stats_error" not in res:
        try:
            res["stats_block"] = _stats_block_breakdown(model, iters, log, out_dir)
        except Exception as ex:  # noqa: BLE001
            res["stats_block"] = {"error": f"{type(ex).__name__}: {str(ex)[:400]}"}
            log(f"(f) block breakdown FAILED: {res['stats_block']['error']}")
    return res


# ------------------------------------------------------------------------------------------------
# full size (or --tiny) on the default device


def part_full(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from tmp_jax import arch
    from tmp_jax.calibration import Calibration
    from tmp_jax.materialize import count_params, materialize
    from tmp_jax.models.z_image import TURBO, ZImageConfig, runner
    from tmp_jax.models.z_image import model as zm
    from tmp_jax.models.z_image.structure import build_spec
    from tmp_jax.problem import PruningProblem
    from tmp_jax.tree import Tree

    _count_compiles()
    t_start = time.time()
    deadline = t_start + args.budget_s
    res: dict = {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform}
    res["jax"] = jax.__version__
    if args.tiny:
        cfg = ZImageConfig(
            dim=256,
            n_layers=4,
            n_refiner_layers=1,
            n_heads=4,
            n_kv_heads=4,
            cap_feat_dim=64,
            axes_dims=(16, 24, 24),
            axes_lens=(256, 64, 64),
        )
        side, cap_len = 32, 40
    else:
        cfg, side, cap_len = TURBO, 128, 512
    res["config"] = "tiny" if args.tiny else "TURBO"
    res["tokens"] = {"image": (side // 2) ** 2, "caption": cap_len}

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    # -- tree and the candidate ----------------------------------------------------------------
    tree = Tree(build_spec(cfg))
    target = args.target_params * tree.full["params"] / 6_154_908_736 if args.tiny else args.target_params
    genome, n_cand = pick_genome(tree, target)
    a = tree.decode(genome)
    heads_g = [i for i, g in enumerate(tree.genes) if g.kind == "heads"][0]
    ffn_g = [i for i, g in enumerate(tree.genes) if g.kind == "ffn"][0]
    res["full_params"] = tree.full["params"]
    res["candidate"] = {
        "params": n_cand,
        "heads": tree.genes[heads_g].counts[genome[heads_g]],
        "ffn": tree.genes[ffn_g].counts[genome[ffn_g]],
        "heads_level": int(genome[heads_g]),
        "ffn_level": int(genome[ffn_g]),
    }
    log(f"full {tree.full['params'] / 1e9:.3f}B; candidate {n_cand / 1e9:.3f}B: {res['candidate']}")

    # -- random weights generated on the device ----------------------------------------------------
    t0 = time.perf_counter()
    abstract = zm.init_abstract(cfg, jnp.bfloat16)
    graphdef, state = nnx.split(abstract)

    @partial(jax.jit, static_argnums=(1, 2))
    def gen(key: jax.Array, shape: tuple, kind: str) -> jax.Array:
        z = jax.random.normal(key, shape, jnp.float32)
        if kind == "kernel":
            z = z / np.sqrt(shape[0])
        elif kind == "weight":
            z = 1.0 + 0.1 * z
        else:
            z = 0.1 * z
        return z.astype(jnp.bfloat16)

    key = jax.random.key(0)
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        name = str(path[-1])
        kind = name if name in ("kernel", "weight") else "other"
        leaves.append((path, gen(jax.random.fold_in(key, i), tuple(var.get_value().shape), kind)))
    jax.block_until_ready([v for _, v in leaves])
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    del leaves, state, abstract
    res["init_s"] = time.perf_counter() - t0
    res["model_params"] = count_params(model)
    log(f"{res['model_params'] / 1e9:.3f}B params on {jax.devices()[0]} in {res['init_s']:.1f}s")

    # -- calibration sample and teacher output ----------------------------------------------------
    rng = np.random.default_rng(0)
    batch = {
        "latents": rng.standard_normal((1, cfg.in_channels, 1, side, side)).astype(np.float32),
        "cap_feats": rng.standard_normal((1, cap_len, cfg.cap_feat_dim)).astype(np.float32),
        "cap_lens": np.array([cap_len], np.int32),
        "t": np.array([0.5], np.float32),
    }
    inputs = runner.prepare_batch(cfg, batch)  # host arrays, as calibrate() keeps them (no mesh)
    if args.only_calib_stats:
        res.update(calib_stats(model, inputs, args.iters, log, args.out))
        res["wall_s"] = time.time() - t_start
        return res
    t0 = time.perf_counter()
    yt = np.asarray(runner.forward_blockwise(model, inputs))
    res["teacher_s"] = time.perf_counter() - t0
    res["teacher_finite"] = bool(np.isfinite(yt.astype(np.float32)).all())
    log(f"teacher output {yt.shape} {yt.dtype} in {res['teacher_s']:.1f}s (compiles included)")

    prob = object.__new__(PruningProblem)  # the search's own fitness, without host calibration
    prob.arch, prob.hooks, prob.tree = "zimage", arch.get("zimage"), tree
    prob.model, prob.teacher_model = model, model
    prob.calib = Calibration([inputs], [yt], {})
    prob.n_evals, prob.source = 0, {}

    # -- (a) the materialised candidate's own forward -------------------------------------------
    t0 = time.perf_counter()
    cand = materialize(model, tree, a)
    jax.block_until_ready(nnx.state(cand))
    res["materialize_first_s"] = time.perf_counter() - t0
    res["candidate_model_params"] = count_params(cand)
    cgd, cst = nnx.split(cand)
    dev_arrays = {k: jnp.asarray(v) for k, v in inputs["arrays"].items()}
    t_dev = jnp.asarray(inputs["t"])
    pk = inputs["patch_key"]

    @jax.jit
    def fwd(st, arrs, t):
        return nnx.merge(cgd, st).forward_padded(arrs, t, pk)

    t0 = time.perf_counter()
    y_own = fwd(cst, dev_arrays, t_dev).block_until_ready()
    res["own_compile_s"] = time.perf_counter() - t0
    fwd(cst, dev_arrays, t_dev).block_until_ready()
    res["own_ms"], _ = _median_ms(lambda: fwd(cst, dev_arrays, t_dev).block_until_ready(), args.iters)
    log(f"(a) own forward_padded: {res['own_ms']:.2f} ms (compile {res['own_compile_s']:.1f}s)")

    # -- (b) the search's evaluation of the same candidate ----------------------------------------
    t0 = time.perf_counter()
    f_first = float(prob.fitness(genome[None])[0])
    res["fitness_first_s"] = time.perf_counter() - t0
    prob.fitness(genome[None])
    fits = []

    def one() -> None:
        fits.append(float(prob.fitness(genome[None])[0]))

    res["fitness_ms"], res["fitness_all_ms"] = _median_ms(one, args.iters)
    res["fitness_value"] = fits[-1]
    res["fitness_deterministic"] = all(f == f_first for f in fits)
    res["ratio"] = res["fitness_ms"] / res["own_ms"]
    log(f"(b) fitness {res['fitness_ms']:.2f} ms (value {res['fitness_value']:.4g}); ratio {res['ratio']:.3f}x")

    # breakdown of (b): the prefix-sliced forward alone (device inputs and output), and its output vs the
    # materialised candidate's fused forward; the old path (materialise per candidate) once, for reference
    dev_inputs = dict(inputs, arrays=dev_arrays, t=t_dev)
    res["pruned_fwd_dev_ms"], _ = _median_ms(
        lambda: runner.forward_pruned(model, tree, a, dev_inputs).block_until_ready(), args.iters
    )
    y_pr = np.asarray(runner.forward_pruned(model, tree, a, dev_inputs), np.float32)
    y_own = np.asarray(y_own, np.float32)
    res["pruned_vs_fused_rel"] = float(np.linalg.norm(y_pr - y_own) / max(np.linalg.norm(y_own), 1e-30))
    t0 = time.perf_counter()
    res["fitness_materialized_value"] = float(prob.fitness_materialized(genome[None])[0])
    res["fitness_materialized_first_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(nnx.state(materialize(model, tree, a)))
    res["materialize_ms"] = 1e3 * (time.perf_counter() - t0)
    cand = cst = y_own = y_pr = None  # free the candidate copy
    log(
        f"    prefix-sliced forward (device in/out) {res['pruned_fwd_dev_ms']:.2f} ms; rel. L2 vs the materialised "
        f"candidate's fused forward {res['pruned_vs_fused_rel']:.2e}; fitness via materialise "
        f"{res['fitness_materialized_value']:.6g} vs {res['fitness_value']:.6g}; materialise alone (old path, once) "
        f"{res['materialize_ms']:.0f} ms"
    )

    # -- (c) warm the width levels, then new random candidates over those levels ------------------
    mx = tree.max_levels()
    keep = np.array([g.kind == "keep" for g in tree.genes])
    warm = sorted(set(args.warm_levels) | {int(genome[heads_g]), int(genome[ffn_g])})
    warm = [lv for lv in warm if lv <= int(mx.max())]
    res["warm_levels"] = warm
    t0 = time.perf_counter()
    c0 = runner.compile_count()
    for lv in warm:
        if time.time() > deadline:
            res["warm_skipped"] = f"time budget after level {lv}"
            break
        prob.fitness(np.where(keep, mx, np.minimum(lv, mx))[None])
    res["warmup_s"] = time.perf_counter() - t0
    res["warmup_compiles"] = runner.compile_count() - c0
    log(f"warm-up over levels {warm}: {res['warmup_s']:.1f}s, {res['warmup_compiles']} new blockwise variants")

    grng = np.random.default_rng(1)
    n_keep = (args.n_random + 1) // 2  # these keep every block; the others drop ~10% of the blocks

    def random_genome(i: int) -> np.ndarray:
        g = np.array([grng.choice([lv for lv in warm if lv <= m] or [m]) for m in mx])
        drop = grng.random(len(mx)) < (0.0 if i < n_keep else 0.1)
        return np.where(keep, (~drop).astype(int), g)

    gs = [random_genome(i) for i in range(args.n_random)]
    ts, vals, sizes, per = [], [], [], []
    for g in gs:
        if time.time() > deadline:
            res["random_skipped"] = "time budget"
            break
        c_runner, c_all = runner.compile_count(), _COMPILES[0]
        t0 = time.perf_counter()
        vals.append(float(prob.fitness(g[None])[0]))
        ts.append(time.perf_counter() - t0)
        per.append((runner.compile_count() - c_runner, _COMPILES[0] - c_all))
        sizes.append(tree.count(tree.decode(g))["params"])
    kept_ts = ts[:n_keep]
    res["random"] = {
        "n": len(ts),
        "n_all_blocks_kept": min(n_keep, len(ts)),
        "ms": [1e3 * t for t in ts],
        "params": sizes,
        "fitness": vals,
        "compiles_per_candidate": per,
        "runner_compiles": sum(c for c, _ in per),
        "xla_compiles": sum(c for _, c in per),
        "runner_compiles_all_kept": sum(c for c, _ in per[:n_keep]),
        "xla_compiles_all_kept": sum(c for _, c in per[:n_keep]),
        "median_ms": 1e3 * statistics.median(kept_ts) if kept_ts else None,
    }
    log(
        f"(c) {len(ts)} new random candidates: (runner, all-XLA) compiles per candidate {per} "
        f"(first {n_keep} keep every block); eval ms {[round(1e3 * t, 1) for t in ts]}; "
        f"sizes {[round(s / 1e9, 2) for s in sizes]}B"
    )
    # (d)
    res["evals_per_hour_candidate"] = 3.6e6 / res["fitness_ms"]
    if ts:
        res["evals_per_hour_random"] = 3.6e6 / res["random"]["median_ms"]

    # -- (f) calibration statistics collection vs the plain forward of the FULL model ------------------
    if args.calib_stats and time.time() < deadline + args.calib_extra_s:
        res.update(calib_stats(model, inputs, args.iters, log, args.out))
    res["wall_s"] = time.time() - t_start
    return res


# ------------------------------------------------------------------------------------------------
# (e) the embedded tiny teacher on the CPU


def part_embedded(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from tmp_jax.problem import build_problem

    _count_compiles()
    res: dict = {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform}
    res["cpus"] = os.cpu_count()
    t0 = time.perf_counter()
    p = build_problem(None)
    res["build_s"] = time.perf_counter() - t0
    res["source"] = p.source["path"]
    res["params"] = p.tree.full["params"]
    res["samples"] = p.n_samples_total()
    t0 = time.perf_counter()
    res["warmup_variants"] = p.warmup()
    res["warmup_s"] = time.perf_counter() - t0
    rng = np.random.default_rng(2)
    mx = p.tree.max_levels()
    gs = [rng.integers(0, mx + 1) for _ in range(args.n_embedded)]
    c_runner, c_all = p.compile_count(), _COMPILES[0]
    t0 = time.perf_counter()
    for g in gs:
        p.fitness(g[None])
    dt = time.perf_counter() - t0
    res.update(
        n=len(gs),
        eval_ms=1e3 * dt / len(gs),
        evals_per_s=len(gs) / dt,
        runner_compiles=p.compile_count() - c_runner,
        xla_compiles=_COMPILES[0] - c_all,
    )
    print(
        f"[embedded/{res['platform']}] {res['params'] / 1e6:.2f}M params, {res['samples']} samples: warm-up "
        f"{res['warmup_s']:.1f}s; {len(gs)} random candidates {res['eval_ms']:.1f} ms each = "
        f"{res['evals_per_s']:.1f} evals/s; compiles runner {res['runner_compiles']}, XLA {res['xla_compiles']}",
        flush=True,
    )
    return res


# ------------------------------------------------------------------------------------------------


def stats_rows(f: dict) -> list[str]:
    """Table rows of (f): plain forward, statistics old/new (whole path and device only), host parts, block."""
    rows = [
        f"| (f) full model: plain jitted forward_padded | {f['plain_ms']:.2f} ms "
        f"(cuDNN calls {f['plain_cudnn_calls']}) |",
        f"| (f) statistics, OLD (formulas + host path before this change), to host | {f['stats_old_ms']:.2f} ms = "
        f"{f['stats_old_ratio']:.3f}x (per-array copies: {f['stats_old_percopy_ms']:.2f} ms) |",
        f"| (f) &nbsp; OLD device only (pre-split, no host copy) | {f['stats_old_device_ms']:.2f} ms |",
        f"| (f) &nbsp; OLD host parts: split_collecting / tree copy of {f['n_stats']} stats | "
        f"{f['host_split_collecting_ms']:.2f} ms / {f['host_tree_copy_ms']:.2f} ms |",
        f"| (f) statistics, NEW `runner.collect_stats`, to host (target <= 1.3x) | {f['stats_ms']:.2f} ms = "
        f"**{f['stats_ratio']:.3f}x** |",
        f"| (f) &nbsp; NEW device only | {f['stats_device_ms']:.2f} ms (cuDNN calls {f['stats_cudnn_calls']}) |",
        f"| (f) &nbsp; NEW host part: jax.tree.flatten of the model | {f['host_tree_flatten_ms']:.2f} ms |",
        f"| (f) old vs new statistics: same keys / max rel. diff | {f['old_vs_new_same_keys']} / "
        f"{f['old_vs_new_max_rel']:.2e} |",
    ]
    b = f.get("stats_block", {})
    for name, r in b.items():
        if isinstance(r, dict) and "ms" in r:
            rows.append(
                f"| (f) one main block (T={b['tokens']}), stats: {name} | {r['ms']:.3f} ms (+{r['extra_ms']:.3f}; "
                f"cuDNN calls {r['cudnn_calls']}) |"
            )
    if "error" in b:
        rows.append(f"| (f) block breakdown | {b['error']} |")
    return rows


def table(r: dict) -> str:
    f, e = r.get("full", {}), r.get("embedded", {})
    rows = ["| quantity | value |", "|---|---|"]
    if "own_ms" in f:
        c = f["candidate"]
        rand = f.get("random", {})
        rows += [
            f"| device | {f['device']} ({f['config']}, bf16, tokens {f['tokens']}) |",
            f"| full / candidate params | {f['full_params']:,} / {c['params']:,} "
            f"(heads {c['heads']}, FFN {c['ffn']}, every block) |",
            f"| (a) candidate's own jitted forward_padded | {f['own_ms']:.2f} ms |",
            f"| (b) search evaluation (`fitness`: prefix-sliced forward + error), median | {f['fitness_ms']:.2f} ms |",
            f"| (b)/(a) ratio (target <= 1.2) | **{f['ratio']:.3f}x** |",
            f"| &nbsp; prefix-sliced forward alone, device inputs and output | {f['pruned_fwd_dev_ms']:.2f} ms |",
            f"| prefix-sliced vs materialised fused output, rel. L2 | {f['pruned_vs_fused_rel']:.2e} |",
            f"| fitness: prefix-sliced / materialised candidate | {f['fitness_value']:.6g} / "
            f"{f['fitness_materialized_value']:.6g} |",
            f"| old path: `materialize` alone (once) | {f['materialize_ms']:.0f} ms |",
            f"| warm-up over levels {f['warm_levels']} | {f['warmup_s']:.1f} s, "
            f"{f['warmup_compiles']} blockwise variants |",
        ]
        if rand.get("n"):
            rows += [
                f"| (c) compiles, {rand['n_all_blocks_kept']} new random candidates keeping every block | "
                f"runner {rand['runner_compiles_all_kept']}, all XLA {rand['xla_compiles_all_kept']} |",
                f"| (c) compiles, all {rand['n']} (the rest drop ~10% of blocks) | runner {rand['runner_compiles']}, "
                f"all XLA {rand['xla_compiles']} |",
                f"| random candidates keeping every block: median eval | {rand['median_ms']:.2f} ms "
                f"({min(rand['params']) / 1e9:.2f}-{max(rand['params']) / 1e9:.2f}B) |",
                f"| (d) evals per GPU-hour (the candidate / random candidates) | "
                f"{f['evals_per_hour_candidate']:,.0f} / {f.get('evals_per_hour_random', 0):,.0f} |",
            ]
        if "stats_ratio" in f:
            rows += stats_rows(f)
        elif "stats_error" in f:
            rows.append(f"| (f) calibration statistics | {f['stats_error']} |")
    elif "stats_ratio" in f:
        rows += [f"| device | {f['device']} ({f['config']}, bf16, tokens {f['tokens']}) |", *stats_rows(f)]
    elif "stats_error" in f:
        rows.append(f"| (f) calibration statistics | {f['stats_error']} |")
    elif "full" in r:
        rows.append(f"| full-size part | {f.get('error', 'incomplete')} |")
    if "evals_per_s" in e:
        rows += [
            f"| (e) embedded teacher on {e['platform']} ({e['cpus']} cores), {e['samples']} samples | "
            f"{e['eval_ms']:.1f} ms/eval = **{e['evals_per_s']:.1f} evals/s** "
            f"(compiles: runner {e['runner_compiles']}, XLA {e['xla_compiles']}; warm-up {e['warmup_s']:.1f} s) |",
        ]
    elif "embedded" in r:
        rows.append(f"| (e) embedded | {e.get('error', 'incomplete')} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small config (CPU smoke test)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--target-params", type=float, default=4.0e9)
    ap.add_argument("--warm-levels", type=int, nargs="+", default=[4, 5, 6, 7, 8])
    ap.add_argument("--n-random", type=int, default=6)
    ap.add_argument("--n-embedded", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=300, help="skip warm-up/random steps past this")
    ap.add_argument("--embedded-timeout-s", type=float, default=150)
    ap.add_argument("--skip-embedded", action="store_true")
    ap.add_argument("--calib-stats", action="store_true", help="(f) statistics collection vs the full forward")
    ap.add_argument("--calib-extra-s", type=float, default=60, help="(f) may start this long past --budget-s")
    ap.add_argument("--only-calib-stats", action="store_true", help="only (f), on the full model")
    ap.add_argument("--part", choices=["all", "full", "embedded"], default="all")
    args = ap.parse_args()

    if args.part != "all":
        res = part_full(args) if args.part == "full" else part_embedded(args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    results: dict = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    plan = [("full", {})]
    if not args.skip_embedded:
        plan.append(("embedded", {"JAX_PLATFORMS": "cpu"}))
    for key, env_extra in plan:
        env = dict(os.environ, **env_extra)
        cmd = [sys.executable, __file__, *sys.argv[1:], "--part", key]
        lines = []
        try:
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as p:
                t_end = time.time() + (args.embedded_timeout_s if key == "embedded" else 1e9)
                for line in p.stdout:
                    lines.append(line)
                    if not line.startswith("RESULT "):
                        print(line, end="", flush=True)
                    if time.time() > t_end:
                        p.kill()
                        break
        except OSError as ex:
            lines.append(f"{ex}\n")
        got = [ln for ln in lines if ln.startswith("RESULT ")]
        results[key] = json.loads(got[-1][7:]) if got else {"error": f"no result (rc={p.returncode})"}
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{key}.log").write_text("".join(lines))
            (args.out / "results.json").write_text(json.dumps(results, indent=2))
    tab = table(results)
    print(tab)
    if args.out:
        (args.out / "table.md").write_text(tab + "\n")


if __name__ == "__main__":
    main()
