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

JAX: the MODEL AS COMMITTED (``HunyuanImage3Model`` layers, no monkeypatches), with its default kernel
choice ("auto": on a Hopper GPU the Pallas Mosaic-GPU grouped matmul for the routed experts and cuDNN flash
attention split by query block; see ``tmp_jax/models/hunyuan_image3/model.py``), next to the same model with
``TMP_JAX_MOE_KERNEL=xla TMP_JAX_ATTENTION=xla`` (``jax.lax.ragged_dot`` + XLA attention: the CPU / fp32
path) as the numerics reference, switched through the model's public settings. The kernels that ran are
read from the compiled HLO's custom calls.

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


def _run_timed(f, fargs: tuple, iters: int) -> tuple:
    """Compile ``f`` for ``fargs``, run it once (the output), twice more (warm-up), then ``iters`` synced runs.

    Returns (compiled, output, per-run seconds, compile seconds, custom-call targets in the compiled HLO)."""
    t0 = time.perf_counter()
    compiled = f.lower(*fargs).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(*fargs)
    for _ in range(2):
        compiled(*fargs).block_until_ready()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        compiled(*fargs).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return compiled, out, ts, compile_s, _custom_calls(compiled.as_text())


def part_jax(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import tmp_jax.models.hunyuan_image3.model as hm
    from tmp_jax.models.hunyuan_image3 import kernels as hk
    from tmp_jax.models.hunyuan_image3 import layout as hl
    from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config

    kw, side, prefix = shapes(args)
    n_img = side * side
    seq = prefix + n_img + 1
    res: dict = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "runs": []}
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
    cos, sin = hm.rope_cos_sin(hl.t2i_positions(seq, starts, side, side), cfg.head_dim, cfg.rope_theta)
    mask = hl.joint_attention_mask(seq, starts, n_img, jnp.array([seq], jnp.int32))
    token_mask = jnp.ones((1, seq), bool)
    pairs = int(jnp.sum(mask))
    assert pairs == allowed_pairs(seq, prefix, n_img), (pairs, allowed_pairs(seq, prefix, n_img))
    res["tokens"], res["allowed_pairs"] = seq, pairs
    model = nnx.merge(graphdef, params)

    # -- the model as committed: same layers, weights and input, kernel settings switched ----------------
    # Public settings of the model (read at trace time), no monkeypatches. The first variant is the default
    # ("auto": what every user gets); the second forces the XLA path for a numerics reference on this card.
    mask = hl.T2IMask(mask, starts, n_img)
    variants = [
        ("model as committed (auto)", "auto", "auto", args.iters),
        ("model, TMP_JAX_MOE_KERNEL=xla TMP_JAX_ATTENTION=xla (XLA path)", "xla", "xla", args.xla_iters),
    ]
    if args.all_variants:
        variants.append(("model, TMP_JAX_ATTENTION=xla (Mosaic MoE, XLA attention)", "auto", "xla", args.iters))

    def make_fwd():  # a new function object per variant: jit caches traces per function
        def fwd(st, x, cos, sin, mask, tm):
            return nnx.merge(graphdef, st)(x, cos, sin, mask, tm)

        return jax.jit(fwd)

    args_fwd = (params, x, cos, sin, mask, token_mask)
    outs = {}
    for label, moe, attn, iters in variants:  # (the list grows if the default fails: see below)
        if time.time() > deadline:
            res["runs"].append({"impl": label, "skipped": "time budget"})
            print(f"[jax] skip {label}: time budget", flush=True)
            continue
        hk.set_moe_kernel(moe)
        hk.set_attention_implementation(attn)
        try:
            compiled, out, ts, compile_s, targets = _run_timed(make_fwd(), args_fwd, iters)
            pipelined_ms = None
            if statistics.median(ts) < 0.3:  # back-to-back launches, one sync
                t0 = time.perf_counter()
                for _ in range(iters):
                    o2 = compiled(*args_fwd)
                o2.block_until_ready()
                pipelined_ms = 1e3 * (time.perf_counter() - t0) / iters
                del o2
            outs[label] = out.astype(jnp.float32)
            r = {
                "impl": label,
                "moe_kernel": moe,
                "attention": attn,
                "ms": med_ms(ts),
                "min_ms": 1e3 * min(ts),
                "max_ms": 1e3 * max(ts),
                "pipelined_ms": pipelined_ms,
                "iters": iters,
                "compile_s": compile_s,
                "finite": bool(jnp.isfinite(outs[label]).all()),
                "custom_calls": targets,
            }
            res["runs"].append(r)
            b2b = "-" if pipelined_ms is None else f"{pipelined_ms:.2f}"
            print(
                f"[jax] {label}: {r['ms']:.2f} ms (min {r['min_ms']:.2f}, max {r['max_ms']:.2f}, back-to-back {b2b}, "
                f"n={iters}; compile {compile_s:.1f}s; finite={r['finite']}; custom calls {targets})",
                flush=True,
            )
        except Exception as ex:  # noqa: BLE001
            res["runs"].append({"impl": label, "error": f"{type(ex).__name__}: {str(ex)[:600]}"})
            print(f"[jax] {label} FAILED: {type(ex).__name__}: {str(ex)[:600]}", flush=True)
            if moe == attn == "auto":  # which of the two GPU paths failed: try each alone (one device call)
                variants.append(("model, TMP_JAX_ATTENTION=xla (Mosaic MoE only)", "auto", "xla", args.iters))
                variants.append(("model, TMP_JAX_MOE_KERNEL=xla (cuDNN attention only)", "xla", "auto", args.xla_iters))
        finally:
            hk.set_moe_kernel("auto")
            hk.set_attention_implementation("auto")
        compiled = None
    for n_ep in args.ep:  # expert parallelism: routed experts under shard_map over n_ep devices
        if time.time() > deadline:
            break
        from jax.sharding import NamedSharding, PartitionSpec

        from tmp_jax.sharding import make_mesh, state_shardings

        label = f"model, expert-parallel shard_map over expert:{n_ep} (auto kernels)"
        try:
            mesh = make_mesh(f"expert:{n_ep}", jax.devices()[:n_ep])
            shardings = nnx.to_flat_state(state_shardings(state, mesh))  # from the abstract state's axes
            st_ep = nnx.from_flat_state(
                [(path, jax.device_put(v, sh)) for (path, v), (_, sh) in zip(leaves, shardings)]
            )
            rep = NamedSharding(mesh, PartitionSpec())
            ins = jax.device_put((x, cos, sin, mask, token_mask), rep)
            hk.set_expert_parallel(mesh)
            compiled, out, ts, compile_s, targets = _run_timed(make_fwd(), (st_ep, *ins), args.iters)
            outs[label] = out.astype(jnp.float32)
            r = {
                "impl": label,
                "ms": med_ms(ts),
                "min_ms": 1e3 * min(ts),
                "max_ms": 1e3 * max(ts),
                "iters": args.iters,
                "compile_s": compile_s,
                "finite": bool(jnp.isfinite(outs[label]).all()),
                "custom_calls": targets,
                "devices": n_ep,
                "pipelined_ms": None,
            }
            res["runs"].append(r)
            print(
                f"[jax] {label}: {r['ms']:.2f} ms (min {r['min_ms']:.2f}; compile {compile_s:.1f}s; "
                f"finite={r['finite']}; custom calls {targets})",
                flush=True,
            )
        except Exception as ex:  # noqa: BLE001
            res["runs"].append({"impl": label, "error": f"{type(ex).__name__}: {str(ex)[:600]}"})
            print(f"[jax] {label} FAILED: {type(ex).__name__}: {str(ex)[:600]}", flush=True)
        finally:
            hk.set_expert_parallel(None)
        compiled = None
    ref = outs.get(variants[1][0])
    for r in res["runs"]:
        if ref is not None and r["impl"] in outs:
            o = outs[r["impl"]]
            r["rel_vs_xla_path"] = float(jnp.linalg.norm(o - ref) / jnp.linalg.norm(ref))
            print(f"[jax] {r['impl']}: relative L2 vs the XLA path {r['rel_vs_xla_path']:.2e}", flush=True)
    auto = outs.get(variants[0][0])
    for r in res["runs"]:  # the expert-parallel rows against the same kernels without shard_map
        if auto is not None and r["impl"] in outs and "expert-parallel" in r["impl"]:
            o = outs[r["impl"]]
            r["rel_vs_auto"] = float(jnp.linalg.norm(o - auto) / jnp.linalg.norm(auto))
            print(f"[jax] {r['impl']}: relative L2 vs the model as committed {r['rel_vs_auto']:.2e}", flush=True)

    # -- where the time goes: one layer's halves, model as committed ----------------------------------
    if time.time() < deadline:
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
                "attn_ms": _time_pipelined(attn, st_a, st_n, x, cos, sin, mask, token_mask),
                "moe_ms": _time_pipelined(moe, st_m, st_p, x, token_mask),
            }
            b = res["breakdown"]
            print(
                f"[jax] one layer, model as committed: attention half {b['attn_ms']:.3f} ms, "
                f"MoE half {b['moe_ms']:.3f} ms"
            )
        except Exception as ex:  # noqa: BLE001
            res["breakdown"] = {"error": f"{type(ex).__name__}: {str(ex)[:300]}"}
            print(f"[jax] breakdown FAILED: {res['breakdown']['error']}", flush=True)
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
    if args.torch_loop:  # experts="torch": GroupedExperts' per-expert loop (all that backend setting changes)
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
    rows = [(p, r) for p in ("jax", "torch") for r in results.get(p, {}).get("runs", [])]
    ref = {r["impl"]: r["ms"] for p, r in rows if p == "torch" and "ms" in r}
    mm = next((v for k, v in ref.items() if k.startswith("nemo experts=torch_mm")), None)
    lines = [
        f"device: {results.get('jax', {}).get('device')} / {results.get('torch', {}).get('device')}; "
        f"{kw['num_hidden_layers']} layers, {seq} tokens ({side * side} image); active {fl / 1e12:.2f} TFLOP; "
        f"bf16 matmul ceiling {peak if peak is None else round(peak, 1)} TFLOP/s"
        + (f" -> floor {fl / (peak * 1e12) * 1e3:.1f} ms" if peak else ""),
        "| impl | median ms | min ms | back-to-back ms | tokens/s | TFLOP/s | MFU | vs nemo torch_mm "
        "| rel. L2 vs XLA path | first call / compile s | kernels (custom calls) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for part, r in rows:
        name = r["impl"] if part == "torch" else f"JAX: {r['impl']}"
        if "ms" not in r:
            lines.append(f"| {name} | {r.get('error') or r.get('skipped')} | | | | | | | | | |")
            continue
        tf = fl / (r["ms"] / 1e3) / 1e12
        mfu = f"{100 * tf / peak:.1f}%" if peak else "-"
        vm = f"{mm / r['ms']:.2f}x" if mm else "-"
        b2b = f"{r['pipelined_ms']:.1f}" if r.get("pipelined_ms") else "-"
        relx = f"{r['rel_vs_xla_path']:.1e}" if "rel_vs_xla_path" in r else "-"
        kern = ", ".join(r.get("custom_calls", [])) or "-"
        lines.append(
            f"| {name} | {r['ms']:.1f} | {r['min_ms']:.1f} | {b2b} | {seq / (r['ms'] / 1e3):,.0f} | {tf:.0f} | {mfu} "
            f"| {vm} | {relx} | {r['compile_s']:.1f} | {kern} |"
        )
    b = results.get("jax", {}).get("breakdown", {})
    if "attn_ms" in b:
        lines.append(
            f"\none layer, model as committed: attention half {b['attn_ms']:.2f} ms, MoE half {b['moe_ms']:.2f} ms"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small config (CPU smoke test)")
    ap.add_argument("--part", choices=["all", "jax", "torch"], default="all")
    ap.add_argument("--grid", type=int, default=64, help="latent grid side (64 = a 1024^2 image)")
    ap.add_argument("--prefix", type=int, default=98, help="tokens before the image span, <timestep> included")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--xla-iters", type=int, default=3, help="runs of the (slow on GPU) XLA reference path")
    ap.add_argument("--all-variants", action="store_true", help="also time Mosaic MoE with XLA attention")
    ap.add_argument("--torch-loop", action="store_true", help="also time nemo's experts='torch' per-expert loop")
    ap.add_argument("--jax-budget-s", type=float, default=150, help="start no new JAX variant after this")
    ap.add_argument("--torch-budget-s", type=float, default=80, help="start no new torch variant after this")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument(
        "--ep",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[],
        help="also run the expert-parallel (shard_map) path over these device counts, e.g. 1,2 (scaling)",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    if args.part != "all":
        res = part_jax(args) if args.part == "jax" else part_torch(args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    results: dict = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    kw, side, prefix = shapes(args)
    results["active_tflop"] = flops(kw, side, prefix) / 1e12
    for key in ["jax"] + ([] if args.skip_torch else ["torch"]):
        cmd = [sys.executable, __file__] + sys.argv[1:] + ["--part", key]
        t0 = time.perf_counter()
        lines = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
            for line in p.stdout:  # stream: a run cut off by a time limit still shows what it did
                lines.append(line)
                if not line.startswith("RESULT "):
                    print(line, end="", flush=True)
        got = [ln for ln in lines if ln.startswith("RESULT ")]
        results[key] = json.loads(got[-1][7:]) if got else {"error": f"rc={p.returncode}", "runs": []}
        results[key]["wall_s"] = time.perf_counter() - t0
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"hunyuan_{key}.log").write_text("".join(lines)[-2_000_000:])
            (args.out / "hunyuan_results.json").write_text(json.dumps(results, indent=2))
    tab = table(results, args)
    print(tab)
    if args.out:
        (args.out / "hunyuan_results.json").write_text(json.dumps(results, indent=2))
        (args.out / "hunyuan_table.md").write_text(tab + "\n")


if __name__ == "__main__":
    main()
