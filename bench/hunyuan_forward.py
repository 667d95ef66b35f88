"""HunyuanImage-3.0 decoder-layer forward benchmark: our JAX layers vs nemo-automodel, one machine.

Four full-width decoder layers of the released model (hidden 4096, 32 query / 8 KV heads of 128, 64
routed experts top-8 of width 3072 plus one shared expert of 3072), bf16 (router fp32), on ONE T2I
sequence of 4195 tokens: a 98-token text prefix ending in ``<timestep>``, a 64x64 latent grid = 4096 image
tokens, ``<eoi>``. The attention mask is the model's own: causal text, bidirectional image block. Only
the layer stack is timed (no embeddings, no UNet heads).

Random weights are generated ON THE DEVICE: JAX through one jitted generator per parameter shape on
``nnx.eval_shape`` metadata; nemo's ``HunyuanImage3ForCausalMM`` is built on the meta device and only
its decoder layers are materialised on the GPU (``to_empty``) and drawn there, then every parameter
but the router (``mlp.gate``) is cast to bf16. Each framework runs in its own subprocess.

    python bench/hunyuan_forward.py --out DIR            # everything (GPU)
    python bench/hunyuan_forward.py --tiny --out DIR     # small config on the CPU: smoke test

The GPU image has no nemo-automodel: install the carried wheel first (docs/benchmarks.md, section 3)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/nemo_automodel-0.7.0-py3-none-any.whl && export PYTHONPATH=$PWD:/tmp/site

JAX variants of the same layers, weights and input (fresh jit each):

* ``model``: the model as it is (``moe_impl="ragged"`` -> ``jax.lax.ragged_dot``, XLA attention with
  the boolean mask);
* ragged experts with another grouped-matmul kernel (the fastest in a micro-benchmark of the real
  expert shapes: XLA's ``ragged_dot``, the Pallas-Triton lowering, or the Pallas Mosaic-GPU Hopper kernel
  ``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu``), un-permuting by a gather instead of a scatter;
* the same with cuDNN flash attention, either the mask passed as a bias (general), or split by query
  block (exact for this layout: image queries see keys [0, image end) with no mask, the few text
  queries use the masked XLA path).

These variants are monkeypatches inside this script only; the model code is unchanged.

Timing: warm-up (compile + 2 calls), then the median of ``--iters`` synchronised runs
(``block_until_ready`` / ``torch.cuda.synchronize``). MFU = active FLOPs / time / a bf16 8192^3 matmul
measured in JAX in the same run. Active FLOPs (2 per MAC) per layer: q/k/v/o projections, router,
shared expert, top-8 routed experts, and QK^T + PV over the ALLOWED (query, key) pairs of the mask.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FULL_KW = dict(
    vocab_size=133120,
    hidden_size=4096,
    intermediate_size=3072,
    moe_intermediate_size=3072,
    num_hidden_layers=4,
    num_attention_heads=32,
    num_key_value_heads=8,
    attention_head_dim=128,
    num_experts=64,
    moe_topk=8,
    num_shared_expert=1,
)
TINY_KW = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=32,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    attention_head_dim=16,
    num_experts=8,
    moe_topk=2,
    num_shared_expert=1,
    patch_embed_hidden_dim=32,
    image_token_id=100,
    timestep_token_id=101,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def shapes(args: argparse.Namespace) -> tuple[dict, int, int]:
    """(config kwargs, latent grid side, text prefix length incl. <timestep>); sequence = prefix + side^2 + 1."""
    if args.tiny:
        return TINY_KW, 8, 10
    return FULL_KW, args.grid, args.prefix


def allowed_pairs(seq: int, prefix: int, n_img: int) -> int:
    """(query, key) pairs the joint mask allows: causal, plus the image block in full."""
    causal = seq * (seq + 1) // 2
    return causal + n_img * (n_img - 1) // 2  # the image block's upper triangle


def flops(kw: dict, side: int, prefix: int) -> float:
    """Active forward FLOPs of the layer stack (2 per MAC); norms, RoPE, softmax, gathers not counted."""
    h, hd = kw["hidden_size"], kw["attention_head_dim"]
    nq, nkv = kw["num_attention_heads"], kw["num_key_value_heads"]
    e, k, inter = kw["num_experts"], kw["moe_topk"], kw["moe_intermediate_size"]
    n_img = side * side
    seq = prefix + n_img + 1
    per_tok = 2 * h * (2 * nq * hd + 2 * nkv * hd)  # q, o + k, v
    per_tok += 2 * h * e  # router
    per_tok += (k + kw["num_shared_expert"]) * 2 * 3 * h * inter  # routed top-k + shared SwiGLU
    attn = 4 * nq * hd * allowed_pairs(seq, prefix, n_img)  # QK^T + PV
    return kw["num_hidden_layers"] * (seq * per_tok + attn)


def med_ms(ts: list[float]) -> float:
    return 1e3 * statistics.median(ts)


def _time_pipelined(f, *xs, reps: int = 10) -> float:
    """ms per call: warm-up, then ``reps`` back-to-back launches and one sync (median of 3 such batches)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(f(*xs))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(f(*xs))
    once = time.perf_counter() - t0
    if once > 0.05:  # slow path: fewer repetitions
        reps = 2
    out = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            y = f(*xs)
        jax.block_until_ready(y)
        out.append((time.perf_counter() - t0) / reps)
    del first
    return 1e3 * statistics.median(out)


# ------------------------------------------------------------------------------------------------
# JAX


def _custom_calls(compiled_text: str) -> list[str]:
    names = set(re.findall(r'custom_call_target="([^"]+)"', compiled_text))
    if re.search(r"\sragged-dot\(", compiled_text):  # the HLO op itself, not op_name metadata
        names.add("<ragged-dot op in HLO>")
    return sorted(names)


def part_jax(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import tmp_jax.models.hunyuan_image3.model as hm
    from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config

    kw, side, prefix = shapes(args)
    n_img = side * side
    seq = prefix + n_img + 1
    gpu = jax.default_backend() == "gpu"
    res: dict = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "runs": [], "ragged_dot": []}
    try:
        from jax._src.lib import cuda_versions

        res["cudnn"] = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception:  # noqa: BLE001
        res["cudnn"] = None
    deadline = time.time() + args.jax_budget_s

    # -- bf16 matmul ceiling ----------------------------------------------------------------------
    n = 1024 if args.tiny else 8192
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm_ms = _time_pipelined(jax.jit(lambda x, y: x @ y), a, b, reps=5 if args.tiny else 50)
    res["matmul"] = {"n": n, "ms": mm_ms, "tflops": 2 * n**3 / (mm_ms / 1e3) / 1e12}
    print(f"[jax] bf16 matmul {n}^3: {mm_ms:.3f} ms = {res['matmul']['tflops']:.1f} TFLOP/s", flush=True)
    del a, b

    # -- random weights generated on the device -----------------------------------------------------
    cfg = HunyuanImage3Config(**kw)
    t0 = time.perf_counter()
    abstract = nnx.eval_shape(
        lambda: hm.HunyuanImage3Model(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), moe_impl="ragged")
    )
    graphdef, state = nnx.split(abstract)

    @partial(jax.jit, static_argnums=(1, 2, 3))
    def gen(key: jax.Array, shape: tuple, dtype: str, kind: str) -> jax.Array:
        z = jax.random.normal(key, shape, jnp.float32)
        if kind == "weight":  # RMSNorm / QK-norm scales around 1
            z = 1.0 + 0.1 * z
        elif kind == "kernel":  # Linear (in, out), router included
            z = z / np.sqrt(shape[0])
        elif kind == "experts":  # stacked experts (E, in, out)
            z = z / np.sqrt(shape[1])
        else:  # token embedding (unused by the layers)
            z = 0.02 * z
        return z.astype(dtype)

    key = jax.random.key(0)
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        name = str(path[-1])
        kind = {"weight": "weight", "kernel": "kernel"}.get(name, "experts" if name.endswith("_proj") else "other")
        v = var.get_value()
        leaves.append((path, gen(jax.random.fold_in(key, i), tuple(v.shape), str(v.dtype), kind)))
    params = nnx.from_flat_state(leaves)
    jax.block_until_ready([v for _, v in leaves])
    layer_params = sum(int(np.prod(v.shape)) for p, v in leaves if "layers" in [str(x) for x in p])
    res["layer_params"] = layer_params
    res["param_devices"] = sorted({str(d) for _, v in leaves for d in v.devices()})
    res["param_dtypes"] = sorted({str(v.dtype) for _, v in leaves})
    res["init_s"] = time.perf_counter() - t0
    print(
        f"[jax] {layer_params / 1e9:.3f}B layer params ({res['param_dtypes']}) generated on {res['param_devices']} "
        f"in {res['init_s']:.1f}s",
        flush=True,
    )

    # -- inputs: hidden states, RoPE tables, joint mask (the model's own helpers) -----------------------
    x = jax.random.normal(jax.random.key(2), (1, seq, cfg.hidden_size), jnp.bfloat16)
    starts = jnp.array([prefix], jnp.int32)
    cos, sin = hm.rope_cos_sin(hm.t2i_positions(seq, starts, side, side), cfg.head_dim, cfg.rope_theta)
    mask = hm.joint_attention_mask(seq, starts, n_img, jnp.array([seq], jnp.int32))
    token_mask = jnp.ones((1, seq), bool)
    pairs = int(jnp.sum(mask))
    assert pairs == allowed_pairs(seq, prefix, n_img), (pairs, allowed_pairs(seq, prefix, n_img))
    res["tokens"], res["allowed_pairs"] = seq, pairs

    # -- ragged_dot implementations, micro-benchmarked on layer 0's real routing --------------------
    model = nnx.merge(graphdef, params)
    layer0 = model.layers[0]
    e, k = cfg.num_experts[0], cfg.moe_topk[0]
    gd_r, st_r = nnx.split(layer0.mlp.gate)
    gd_l, st_l = nnx.split(layer0.post_attention_layernorm)

    @jax.jit
    def routed_rows(st_r, st_l, x):
        h = nnx.merge(gd_l, st_l)(x).reshape(-1, cfg.hidden_size)
        _, idx = jax.lax.top_k(nnx.merge(gd_r, st_r)(h), k)  # same top-k as softmax-then-top-k
        flat = idx.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        return jnp.take(h, order // k, axis=0), jnp.bincount(flat, length=e).astype(jnp.int32)

    xs, gs = routed_rows(st_r, st_l, x)
    gsn = np.asarray(gs)
    res["group_sizes"] = {"min": int(gsn.min()), "max": int(gsn.max()), "mean": float(gsn.mean())}
    print(f"[jax] layer-0 routing: {xs.shape[0]} rows, tokens per expert {res['group_sizes']}", flush=True)
    up_w = layer0.mlp.experts.up_proj[...]
    down_w = layer0.mlp.experts.down_proj[...]
    hid = jax.random.normal(jax.random.key(3), (xs.shape[0], up_w.shape[2]), jnp.bfloat16)

    impls: dict = {"xla": (jax.lax.ragged_dot, None)}
    triton_flag = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
    if gpu and hasattr(jax.config, triton_flag) and not args.lite:
        impls["pallas_triton"] = (jax.lax.ragged_dot, triton_flag)
    if gpu and not args.lite:
        try:
            from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

            for bm, bn, steps, gbn in ((128, 128, 4, 8), (64, 256, 4, 4)):
                name = f"mosaic_gpu[bm{bm},bn{bn},bk64,s{steps},g{gbn}]"
                fn = partial(
                    ragged_dot_mgpu.ragged_dot,
                    block_m=bm,
                    block_n=bn,
                    block_k=64,
                    max_concurrent_steps=steps,
                    grid_block_n=gbn,
                )
                impls[name] = (lambda lhs, rhs, group_sizes, _fn=fn: _fn(lhs, rhs, group_sizes=group_sizes), None)
        except Exception as ex:  # noqa: BLE001
            res["mosaic_gpu_import_error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
            print(f"[jax] Mosaic GPU ragged_dot unavailable: {res['mosaic_gpu_import_error']}", flush=True)

    def set_flag(flag: str | None, on: bool) -> None:
        if flag:
            jax.config.update(flag, on)

    # dense reference: the same FLOPs as one plain GEMM (what a perfect grouped GEMM could reach)
    dense_up = _time_pipelined(jax.jit(lambda a, b: a @ b), xs, up_w[0])
    dense_down = _time_pipelined(jax.jit(lambda a, b: a @ b), hid, down_w[0])
    fl_up = 2 * xs.shape[0] * up_w.shape[1] * up_w.shape[2]
    res["dense_gemm_ms"] = {"up": dense_up, "down": dense_down}
    print(
        f"[jax] plain GEMM of the same size: up {dense_up:.3f} ms ({fl_up / dense_up / 1e9:.0f} TFLOP/s), "
        f"down {dense_down:.3f} ms",
        flush=True,
    )
    ref_out = None
    for name, (fn, flag) in impls.items():
        if time.time() > deadline - 60:
            res["ragged_dot"].append({"impl": name, "skipped": "time budget"})
            continue
        set_flag(flag, True)
        try:
            f = jax.jit(lambda a, w, g, _fn=fn: _fn(a, w, group_sizes=g))
            t0 = time.perf_counter()
            compiled = f.lower(xs, up_w, gs).compile()
            compile_s = time.perf_counter() - t0
            targets = _custom_calls(compiled.as_text())
            out = compiled(xs, up_w, gs)
            up_ms = _time_pipelined(compiled, xs, up_w, gs)
            down_ms = _time_pipelined(f, hid, down_w, gs)
            of = out.astype(jnp.float32)
            if ref_out is None:
                ref_out, rel = of, 0.0
            else:
                rel = float(jnp.linalg.norm(of - ref_out) / jnp.linalg.norm(ref_out))
            r = {
                "impl": name,
                "up_ms": up_ms,
                "down_ms": down_ms,
                "up_tflops": fl_up / up_ms / 1e9,
                "compile_s": compile_s,
                "rel_vs_xla": rel,
                "custom_calls": targets,
            }
            res["ragged_dot"].append(r)
            print(
                f"[jax] ragged_dot {name}: up {up_ms:.3f} ms ({r['up_tflops']:.0f} TFLOP/s), down {down_ms:.3f} ms, "
                f"rel vs xla {rel:.1e}, compile {compile_s:.1f}s, custom calls {targets}",
                flush=True,
            )
        except Exception as ex:  # noqa: BLE001
            res["ragged_dot"].append({"impl": name, "error": f"{type(ex).__name__}: {str(ex)[:300]}"})
            print(f"[jax] ragged_dot {name} FAILED: {type(ex).__name__}: {str(ex)[:300]}", flush=True)
        finally:
            set_flag(flag, False)
    ok = [r for r in res["ragged_dot"] if "up_ms" in r]
    best = min(ok, key=lambda r: r["up_ms"] + r["down_ms"])["impl"] if ok else "xla"
    res["best_ragged"] = best
    del xs, hid, ref_out

    # -- full 4-layer forward variants ---------------------------------------------------------------
    orig_ragged = hm.RoutedExperts.ragged
    orig_dpa = jax.nn.dot_product_attention

    def ragged_gather(rdot):
        """RoutedExperts.ragged with ``rdot`` as the grouped matmul and a gather to un-permute."""

        def ragged(self, x, weights, indices, stats=False):
            assert not stats
            n, kk = indices.shape
            up_w, gate_w, down_w = self.up_proj[...], self.gate_proj[...], self.down_proj[...]
            flat = indices.reshape(-1)
            order = jnp.argsort(flat, stable=True)
            xs = jnp.take(x, order // kk, axis=0).astype(up_w.dtype)
            group_sizes = jnp.bincount(flat, length=up_w.shape[0]).astype(jnp.int32)
            up = rdot(xs, up_w, group_sizes=group_sizes)
            gate = rdot(xs, gate_w, group_sizes=group_sizes)
            y = rdot(up * jax.nn.silu(gate), down_w, group_sizes=group_sizes)
            y = y * jnp.take(weights.reshape(-1), order)[:, None].astype(y.dtype)
            inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
            return jnp.take(y, inverse, axis=0).reshape(n, kk, -1).sum(axis=1)

        return ragged

    def dpa_cudnn_bias(q, k, v, bias=None, mask=None, *, scale=None, **kws):
        return orig_dpa(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn", **kws)

    def dpa_cudnn_split(q, k, v, bias=None, mask=None, *, scale=None, **kws):
        """Exact for this layout: image queries see keys [0, image end) unmasked; others use the mask."""
        end = prefix + n_img
        img = orig_dpa(q[:, prefix:end], k[:, :end], v[:, :end], scale=scale, implementation="cudnn")
        rows = jnp.concatenate([mask[:, :, :prefix], mask[:, :, end:]], axis=2)
        qt = jnp.concatenate([q[:, :prefix], q[:, end:]], axis=1)
        txt = orig_dpa(qt, k, v, mask=rows, scale=scale)
        return jnp.concatenate([txt[:, :prefix], img, txt[:, prefix:]], axis=1)

    best_fn, best_flag = impls[best]
    split, bias_ = "attention cuDNN split by query block", "attention cuDNN (mask as bias)"
    variants = [
        ("model (ragged_dot XLA, attention XLA)", None, None, orig_dpa),
        (f"ragged={best}+gather, {split}", best_fn, best_flag, dpa_cudnn_split),
        (f"ragged={best}+gather, {bias_}", best_fn, best_flag, dpa_cudnn_bias),
        (f"ragged={best}+gather, attention XLA", best_fn, best_flag, orig_dpa),
    ]
    if best != "xla":
        variants.append((f"ragged=xla+gather, {split}", jax.lax.ragged_dot, None, dpa_cudnn_split))
    if args.lite:  # extra run under other XLA flags: the model as is, and with cuDNN attention
        variants = variants[:2]

    def make_fwd():  # a new function object per variant: jit caches traces per function
        def fwd(st, x, cos, sin, mask, tm):
            return nnx.merge(graphdef, st)(x, cos, sin, mask, tm)

        return jax.jit(fwd)

    args_fwd = (params, x, cos, sin, mask, token_mask)
    ref = None
    best_run = None
    for label, rdot, flag, dpa in variants:
        if time.time() > deadline:
            res["runs"].append({"impl": label, "skipped": "time budget"})
            print(f"[jax] skip {label}: time budget", flush=True)
            continue
        hm.RoutedExperts.ragged = orig_ragged if rdot is None else ragged_gather(rdot)
        jax.nn.dot_product_attention = dpa
        set_flag(flag, True)
        try:
            f = make_fwd()
            t0 = time.perf_counter()
            compiled = f.lower(*args_fwd).compile()
            compile_s = time.perf_counter() - t0
            targets = _custom_calls(compiled.as_text())
            out = compiled(*args_fwd)
            t0 = time.perf_counter()
            for _ in range(2):
                compiled(*args_fwd).block_until_ready()
            warm = (time.perf_counter() - t0) / 2
            iters = args.iters if warm < 0.3 else max(10, min(args.iters, 10))
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                compiled(*args_fwd).block_until_ready()
                ts.append(time.perf_counter() - t0)
            pipelined_ms = None
            if warm < 0.3:  # back-to-back launches, one sync (skipped for very slow variants)
                t0 = time.perf_counter()
                for _ in range(iters):
                    o2 = compiled(*args_fwd)
                o2.block_until_ready()
                pipelined_ms = 1e3 * (time.perf_counter() - t0) / iters
                del o2
            of = out.astype(jnp.float32)
            finite = bool(jnp.isfinite(of).all())
            if ref is None:
                ref, rel = of, 0.0
            else:
                rel = float(jnp.linalg.norm(of - ref) / jnp.linalg.norm(ref))
            r = {
                "impl": label,
                "ms": med_ms(ts),
                "min_ms": 1e3 * min(ts),
                "max_ms": 1e3 * max(ts),
                "pipelined_ms": pipelined_ms,
                "iters": iters,
                "compile_s": compile_s,
                "finite": finite,
                "rel_vs_model": rel,
                "custom_calls": targets,
            }
            res["runs"].append(r)
            b2b = "-" if pipelined_ms is None else f"{pipelined_ms:.2f}"
            print(
                f"[jax] {label}: {r['ms']:.2f} ms (min {r['min_ms']:.2f}, max {r['max_ms']:.2f}, back-to-back {b2b}, "
                f"n={iters}; compile {compile_s:.1f}s; finite={finite}; rel vs model {rel:.1e}; "
                f"custom calls {targets})",
                flush=True,
            )
            if best_run is None or r["ms"] < best_run[1]["ms"]:
                best_run = ((label, rdot, flag, dpa), r)
        except Exception as ex:  # noqa: BLE001
            res["runs"].append({"impl": label, "error": f"{type(ex).__name__}: {str(ex)[:400]}"})
            print(f"[jax] {label} FAILED: {type(ex).__name__}: {str(ex)[:400]}", flush=True)
        finally:
            set_flag(flag, False)
            hm.RoutedExperts.ragged = orig_ragged
            jax.nn.dot_product_attention = orig_dpa
        f = compiled = None

    # -- where the time goes: one layer's halves, fastest variant -----------------------------------
    if best_run is not None and time.time() < deadline + 30:
        (label, rdot, flag, dpa), _ = best_run
        hm.RoutedExperts.ragged = orig_ragged if rdot is None else ragged_gather(rdot)
        jax.nn.dot_product_attention = dpa
        set_flag(flag, True)
        try:
            layer = model.layers[0]
            gd_a, st_a = nnx.split(layer.self_attn)
            gd_n, st_n = nnx.split(layer.input_layernorm)
            gd_m, st_m = nnx.split(layer.mlp)
            gd_p, st_p = nnx.split(layer.post_attention_layernorm)
            attn = jax.jit(
                lambda sa, sn, x, c, s, m, tm: hm.attn_branch(nnx.merge(gd_a, sa), nnx.merge(gd_n, sn), x, c, s, m, tm)
            )
            moe = jax.jit(lambda sm, sp, x, tm: hm.moe_branch(nnx.merge(gd_m, sm), nnx.merge(gd_p, sp), x, tm))
            res["breakdown"] = {
                "variant": label,
                "attn_ms": _time_pipelined(attn, st_a, st_n, x, cos, sin, mask, token_mask),
                "moe_ms": _time_pipelined(moe, st_m, st_p, x, token_mask),
            }
            b = res["breakdown"]
            print(f"[jax] one layer of '{label}': attention half {b['attn_ms']:.3f} ms, MoE half {b['moe_ms']:.3f} ms")
        except Exception as ex:  # noqa: BLE001
            res["breakdown"] = {"error": f"{type(ex).__name__}: {str(ex)[:300]}"}
            print(f"[jax] breakdown FAILED: {res['breakdown']['error']}", flush=True)
        finally:
            set_flag(flag, False)
            hm.RoutedExperts.ragged = orig_ragged
            jax.nn.dot_product_attention = orig_dpa
    return res


# ------------------------------------------------------------------------------------------------
# PyTorch / nemo-automodel


def part_torch(args: argparse.Namespace) -> dict:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kw, side, prefix = shapes(args)
    n_img = side * side
    seq = prefix + n_img + 1
    res: dict = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "runs": [],
    }
    deadline = time.time() + args.torch_budget_s
    t0 = time.perf_counter()
    import nemo_automodel
    import transformers
    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.models.hunyuan_image3.config import HunyuanImage3Config as NemoConfig
    from nemo_automodel.components.models.hunyuan_image3.model import (
        HunyuanImage3ForCausalMM,
        build_joint_attention_mask,
    )
    from nemo_automodel.components.models.hunyuan_image3.rope import image_grid_positions_batched, rope_cos_sin

    res["transformers"] = transformers.__version__
    res["nemo_automodel"] = getattr(nemo_automodel, "__version__", "?")
    res["import_s"] = time.perf_counter() - t0
    res["dynamo_disabled"] = os.environ.get("TORCHDYNAMO_DISABLE", "") == "1"

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    cfg = NemoConfig(**kw, vae={"latent_channels": 32}, torch_dtype="bfloat16")
    backend = BackendConfig(
        attn="sdpa", linear="torch", experts="torch_mm", dispatcher="torch", gate_precision=torch.float32
    )
    with torch.device("meta"):
        model = HunyuanImage3ForCausalMM(cfg, backend=backend)
    layers = model.model.layers.to_empty(device=dev)  # only the decoder layers are materialised
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layers.parameters():
            if p.ndim == 1:  # RMSNorm / QK-norm scales
                p.normal_(1.0, 0.1)
            else:  # Linear (out, in), router (E, in), experts (E, in, out): fan_in is dim 1
                p.normal_(0.0, p.shape[1] ** -0.5)
        for _, buf in layers.named_buffers():
            if buf.is_floating_point():
                buf.zero_()
        for name, p in layers.named_parameters():
            if ".mlp.gate." not in name:  # the router stays fp32 (as in the release)
                p.data = p.data.to(torch.bfloat16)
    layers.eval().requires_grad_(False)
    sync()
    res["layer_params"] = sum(p.numel() for p in layers.parameters())
    res["param_dtypes"] = sorted(
        {f"{n.split('.', 1)[1]}:{p.dtype}" for n, p in layers.named_parameters() if n.startswith("0.")}
    )
    res["param_devices"] = sorted({str(p.device) for p in layers.parameters()})
    res["init_s"] = time.perf_counter() - t0
    print(
        f"[torch] {res['layer_params'] / 1e9:.3f}B layer params on {res['param_devices']} in {res['init_s']:.1f}s; "
        f"transformers {res['transformers']}, nemo_automodel {res['nemo_automodel']}",
        flush=True,
    )

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(1, seq, kw["hidden_size"], generator=g, device=dev, dtype=torch.bfloat16)
    starts = torch.tensor([prefix], device=dev)
    cos, sin = rope_cos_sin(
        image_grid_positions_batched(seq, starts, side, side), kw["attention_head_dim"], cfg.rope_theta
    )
    mask = build_joint_attention_mask(seq, starts, n_img, torch.tensor([seq], device=dev))

    def run() -> torch.Tensor:
        h = x
        for layer in layers.values():
            h = layer(h, cos, sin, mask, None)
        return h

    def bench(label: str) -> None:
        if time.time() > deadline:
            res["runs"].append({"impl": label, "skipped": "time budget"})
            print(f"[torch] skip {label}: time budget", flush=True)
            return
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = run()
                sync()
                first_s = time.perf_counter() - t0
                for _ in range(2):
                    run()
                sync()
                ts = []
                for _ in range(args.iters):
                    sync()
                    t0 = time.perf_counter()
                    run()
                    sync()
                    ts.append(time.perf_counter() - t0)
            finite = bool(torch.isfinite(out).all())
            r = {
                "impl": label,
                "ms": med_ms(ts),
                "min_ms": 1e3 * min(ts),
                "max_ms": 1e3 * max(ts),
                "iters": args.iters,
                "compile_s": first_s,
                "finite": finite,
            }
            res["runs"].append(r)
            print(
                f"[torch] {label}: {r['ms']:.2f} ms (min {r['min_ms']:.2f}, max {r['max_ms']:.2f}, n={args.iters}; "
                f"first call {first_s:.1f}s; finite={finite})",
                flush=True,
            )
        except Exception as ex:  # noqa: BLE001
            res["runs"].append({"impl": label, "error": f"{type(ex).__name__}: {str(ex)[:400]}"})
            print(f"[torch] {label} FAILED: {type(ex).__name__}: {str(ex)[:400]}", flush=True)

    bench("nemo experts=torch_mm")
    if res["runs"][-1].get("error") and not res["dynamo_disabled"]:
        import torch._dynamo

        torch._dynamo.config.disable = True  # nemo's weighted SwiGLU is torch.compile'd; retry eager
        res["dynamo_disabled"] = True
        bench("nemo experts=torch_mm (dynamo off)")
    # experts="torch": the same modules with GroupedExperts' per-expert loop (all that backend changes)
    for layer in layers.values():
        layer.mlp.experts.use_torch_mm = False
    bench("nemo experts=torch")
    return res


# ------------------------------------------------------------------------------------------------
# Driver


def table(results: dict, args: argparse.Namespace) -> str:
    kw, side, prefix = shapes(args)
    seq = prefix + side * side + 1
    fl = flops(kw, side, prefix)
    peak = results.get("jax", {}).get("matmul", {}).get("tflops")
    rows = [(p, r) for p in ("jax", "torch", "jax_flags") for r in results.get(p, {}).get("runs", [])]
    ref = {r["impl"]: r["ms"] for p, r in rows if p == "torch" and "ms" in r}
    mm = next((v for k, v in ref.items() if k.startswith("nemo experts=torch_mm")), None)
    loop = ref.get("nemo experts=torch")
    lines = [
        f"device: {results.get('jax', {}).get('device')} / {results.get('torch', {}).get('device')}; "
        f"{kw['num_hidden_layers']} layers, {seq} tokens ({side * side} image); active {fl / 1e12:.2f} TFLOP; "
        f"bf16 matmul ceiling {peak if peak is None else round(peak, 1)} TFLOP/s"
        + (f" -> floor {fl / (peak * 1e12) * 1e3:.1f} ms" if peak else ""),
        "| impl | median ms | min ms | back-to-back ms | tokens/s | TFLOP/s | MFU | vs nemo torch_mm | vs nemo torch "
        "| first call / compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for part, r in rows:
        name = r["impl"] if part == "torch" else f"JAX: {r['impl']}"
        if part == "jax_flags":
            name = f"JAX, XLA_FLAGS={results[part].get('xla_flags')}: {r['impl']}"
        if "ms" not in r:
            lines.append(f"| {name} | {r.get('error') or r.get('skipped')} | | | | | | | | |")
            continue
        tf = fl / (r["ms"] / 1e3) / 1e12
        mfu = f"{100 * tf / peak:.1f}%" if peak else "-"
        vm = f"{mm / r['ms']:.2f}x" if mm else "-"
        vl = f"{loop / r['ms']:.2f}x" if loop else "-"
        b2b = f"{r['pipelined_ms']:.1f}" if r.get("pipelined_ms") else "-"
        lines.append(
            f"| {name} | {r['ms']:.1f} | {r['min_ms']:.1f} | {b2b} | {seq / (r['ms'] / 1e3):,.0f} | {tf:.0f} | {mfu} "
            f"| {vm} | {vl} | {r['compile_s']:.1f} |"
        )
    rd = [
        dict(r, impl=f"{r['impl']} ({p})")
        for p in ("jax", "jax_flags")
        for r in results.get(p, {}).get("ragged_dot", [])
    ]
    if rd:
        lines += [
            "",
            "| ragged_dot impl (layer 0 routing) | up ms | down ms | up TFLOP/s | rel vs xla | custom calls |",
        ]
        lines.append("|---|---|---|---|---|---|")
        for r in rd:
            if "up_ms" not in r:
                lines.append(f"| {r['impl']} | {r.get('error') or r.get('skipped')} | | | | |")
                continue
            lines.append(
                f"| {r['impl']} | {r['up_ms']:.3f} | {r['down_ms']:.3f} | {r['up_tflops']:.0f} | {r['rel_vs_xla']:.1e} "
                f"| {', '.join(r['custom_calls'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small config (CPU smoke test)")
    ap.add_argument("--part", choices=["all", "jax", "torch"], default="all")
    ap.add_argument("--grid", type=int, default=64, help="latent grid side (64 = a 1024^2 image)")
    ap.add_argument("--prefix", type=int, default=98, help="tokens before the image span, <timestep> included")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--jax-budget-s", type=float, default=180, help="start no new JAX variant after this")
    ap.add_argument("--torch-budget-s", type=float, default=80, help="start no new torch variant after this")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--lite", action="store_true", help="(internal) JAX: XLA ragged_dot only, first two variants")
    ap.add_argument(
        "--extra-xla-flags",
        default="--xla_gpu_experimental_use_ragged_dot_fusion=true",
        help="if XLA's ragged_dot ran below --slow-tflops, rerun the model under these XLA_FLAGS (lite)",
    )
    ap.add_argument("--slow-tflops", type=float, default=150.0)
    ap.add_argument("--extra-after-s", type=float, default=260, help="skip the extra run past this many seconds")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    if args.part != "all":
        res = part_jax(args) if args.part == "jax" else part_torch(args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    results: dict = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    kw, side, prefix = shapes(args)
    results["active_tflop"] = flops(kw, side, prefix) / 1e12
    start = time.time()
    plan = [("jax", [], None)] + ([] if args.skip_torch else [("torch", [], None)])
    plan.append(("jax_flags", ["--lite"], args.extra_xla_flags))
    for key, extra, flags in plan:
        if key == "jax_flags":
            xla = next((r for r in results["jax"].get("ragged_dot", []) if r["impl"] == "xla"), {})
            if not flags or args.tiny or xla.get("up_tflops", 0.0) >= args.slow_tflops:
                continue
            if time.time() - start > args.extra_after_s:
                print(f"[driver] skip {key}: {time.time() - start:.0f}s elapsed", flush=True)
                continue
        env = dict(os.environ)
        if flags:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        part = "torch" if key == "torch" else "jax"
        cmd = [sys.executable, __file__] + sys.argv[1:] + ["--part", part] + extra
        t0 = time.perf_counter()
        lines = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as p:
            for line in p.stdout:  # stream: a run cut off by a time limit still shows what it did
                lines.append(line)
                if not line.startswith("RESULT "):
                    print(line, end="", flush=True)
        got = [ln for ln in lines if ln.startswith("RESULT ")]
        results[key] = json.loads(got[-1][7:]) if got else {"error": f"rc={p.returncode}", "runs": []}
        results[key]["wall_s"] = time.perf_counter() - t0
        if flags:
            results[key]["xla_flags"] = flags
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{key}.log").write_text("".join(lines)[-2_000_000:])
            (args.out / "results.json").write_text(json.dumps(results, indent=2))
    tab = table(results, args)
    print(tab)
    if args.out:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        (args.out / "table.md").write_text(tab + "\n")


if __name__ == "__main__":
    main()
