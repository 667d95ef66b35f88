"""GPU kernel dispatch of HunyuanImage-3.0: the grouped expert GEMMs, the joint-mask attention, expert parallelism.

The model code in ``model.py`` calls :func:`attention` and :func:`ragged_experts` and never names a backend;
what runs is decided here at trace time, from settings read from the environment or set by the ``set_*``
functions below (they affect functions traced after the call):

* routed experts: the (token, slot) pairs are sorted by expert and run as grouped matmuls
  (:func:`grouped_matmul`: the Pallas Mosaic-GPU Hopper kernel or ``jax.lax.ragged_dot``), on one device or,
  with :func:`set_expert_parallel`, under ``shard_map`` with each device computing its own experts;
* attention on the T2I joint mask: cuDNN flash attention for the image queries on GPU
  (:func:`t2i_attention_split`), XLA's attention with the dense mask otherwise.

Every path computes the same function; only speed differs.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from tmp_jax.models.hunyuan_image3.layout import T2IMask

# ----------------------------------------------------------------------------------------------------------
# Settings, read at trace time
#
# Grouped matmul of the routed experts (``TMP_JAX_MOE_KERNEL``): "auto" = the Pallas Mosaic-GPU Hopper kernel
# (``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu``) on a single-device Hopper GPU process for bf16 operands
# whose shapes it supports, ``jax.lax.ragged_dot`` otherwise (CPU, fp32, several devices: XLA partitions
# ragged_dot over an expert-sharded mesh, the Mosaic kernel has no sharding rule; with expert parallelism on,
# :func:`set_expert_parallel`, each device runs the kernel on its own experts under shard_map). XLA on this GPU stack
# lowers ragged_dot to a dense GEMM over every expert (docs/benchmarks.md, section 3), hence the kernel. Where the
# kernel does not apply (CPU, fp32, its backward) and that dense GEMM's [M, G, max(K, N)] buffers (forward output or
# input gradient) would exceed DENSE_LIMIT_BYTES, "auto" takes the tiled grouped matmul (:mod:`tiled_gmm`: plain
# XLA, memory linear in M).
# "xla" / "mosaic" / "tiled" force one ("mosaic" raises where the kernel cannot run).
#
# Attention on the T2I joint mask (``TMP_JAX_ATTENTION``, the same setting as Z-Image's): "auto" = cuDNN flash
# attention on GPU for bf16/fp16 with head_dim <= 128, split by query block (image queries see every key before
# the end of the image span, unmasked, as cuDNN key lengths; the few text queries use XLA with their mask rows),
# XLA attention with the boolean mask otherwise. The text-only causal path always uses XLA.
MOE_KERNEL: str = os.environ.get("TMP_JAX_MOE_KERNEL", "auto")
ATTENTION_IMPLEMENTATION: str = os.environ.get("TMP_JAX_ATTENTION", "auto")
MOSAIC_BLOCK = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4)  # best of 2 tried on H100
DENSE_LIMIT_BYTES = 4 * 2**30  # a dense ragged_dot buffer above this takes the tiled path ("auto")


#: (mesh, axis) of expert parallelism, or None. While set, the ``ragged`` routed experts run under
#: ``shard_map``: each device holds E / P experts and computes only the (token, slot) pairs routed to
#: them (with the Mosaic kernel on Hopper), then the partial outputs are summed over the axis.
EXPERT_PARALLEL: tuple[jax.sharding.Mesh, str] | None = None


def _expert_parallel_unsupported(mesh: jax.sharding.Mesh, axis: str) -> str | None:
    """Why expert parallelism cannot run on ``mesh`` (None: it can): no ``axis``, or another model-parallel axis."""
    if axis not in mesh.shape:
        return f"mesh axes {tuple(mesh.shape)} have no {axis!r} axis"
    others = [a for a, n in mesh.shape.items() if n > 1 and a not in (axis, "data")]
    if others:
        return f"mesh axes {others} of size > 1 are not supported (only data, {axis})"
    return None


def set_expert_parallel(mesh: jax.sharding.Mesh | None, axis: str = "expert") -> None:
    """Run routed experts expert-parallel over ``mesh`` axis ``axis`` (None: off); for functions traced after.

    The experts' parameters must be sharded over that axis on their expert dimension (the ``exp`` logical
    axis of ``configs/sharding_rules.json`` maps to ``expert``). Tokens may be sharded over a ``data`` axis;
    any other mesh axis of size > 1 (tensor-parallel ``model``) is not supported by this path.
    """
    global EXPERT_PARALLEL
    why = None if mesh is None else _expert_parallel_unsupported(mesh, axis)
    if why:
        raise ValueError(f"expert parallelism: {why}")
    EXPERT_PARALLEL = None if mesh is None else (mesh, axis)


def maybe_expert_parallel(mesh: jax.sharding.Mesh | None, axis: str = "expert") -> bool:
    """Expert parallelism on for ``mesh`` where it applies (an ``axis`` of size > 1, no other model-parallel
    axis), off otherwise (so a later run without a mesh does not inherit an earlier one); returns whether it
    is on. Forward passes only (calibration, candidate evaluation): both paths compute the same function, so
    this is a speed setting, and a function traced without it is still correct."""
    ok = mesh is not None and mesh.shape.get(axis, 1) > 1 and _expert_parallel_unsupported(mesh, axis) is None
    set_expert_parallel(mesh if ok else None, axis)
    return ok


def set_moe_kernel(name: str) -> None:
    """'auto', 'xla', 'mosaic' or 'tiled'; affects functions traced after the call."""
    if name not in ("auto", "xla", "mosaic", "tiled"):
        raise ValueError(f"MoE kernel must be auto, xla, mosaic or tiled, got {name!r}")
    global MOE_KERNEL
    MOE_KERNEL = name


def set_attention_implementation(name: str) -> None:
    """'auto', 'xla' or 'cudnn'; affects functions traced after the call."""
    if name not in ("auto", "xla", "cudnn"):
        raise ValueError(f"attention implementation must be auto, xla or cudnn, got {name!r}")
    global ATTENTION_IMPLEMENTATION
    ATTENTION_IMPLEMENTATION = name


# ----------------------------------------------------------------------------------------------------------
# Grouped matmul: the Mosaic-GPU Hopper kernel or jax.lax.ragged_dot
# ----------------------------------------------------------------------------------------------------------
def _is_hopper() -> bool:
    """sm_90 (H100 / H200 / H800 / GH200): the Mosaic kernel uses Hopper's wgmma and TMA (and assumes 132 SMs)."""
    d = jax.devices()[0]
    if d.platform != "gpu":
        return False
    cc = str(getattr(d, "compute_capability", ""))
    return cc.startswith("9") if cc else any(h in d.device_kind for h in ("H100", "H200", "H800"))


def _mosaic_unsupported(lhs: jax.Array, rhs: jax.Array) -> str | None:
    """Why the Mosaic-GPU grouped matmul cannot run ``lhs [M, K] x rhs [G, K, N]`` here (None: it can)."""
    k, n = lhs.shape[1], rhs.shape[2]
    if jax.default_backend() != "gpu" or not _is_hopper():
        return "not a Hopper GPU"
    if lhs.dtype != jnp.bfloat16 or rhs.dtype != jnp.bfloat16:
        return f"operands {lhs.dtype} x {rhs.dtype}, the kernel path takes bf16"
    if k % MOSAIC_BLOCK["block_k"] or n % MOSAIC_BLOCK["block_n"]:
        return f"K={k} / N={n} not multiples of {MOSAIC_BLOCK['block_k']} / {MOSAIC_BLOCK['block_n']}"
    return None


def _use_mosaic(lhs: jax.Array, rhs: jax.Array, per_device: bool = False) -> bool:
    why = _mosaic_unsupported(lhs, rhs)
    if MOE_KERNEL == "mosaic":
        if why:
            raise ValueError(f"TMP_JAX_MOE_KERNEL=mosaic: {why}")
        return True
    return MOE_KERNEL == "auto" and why is None and (per_device or jax.device_count() == 1)


def _mosaic_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    n_blocks = rhs.shape[2] // MOSAIC_BLOCK["block_n"]
    grid_block_n = next(g for g in (8, 4, 2, 1) if n_blocks % g == 0)
    return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes, grid_block_n=grid_block_n, **MOSAIC_BLOCK)


@jax.custom_vjp
def _mosaic_grouped(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return _mosaic_ragged_dot(lhs, rhs, group_sizes)


def _mosaic_fwd(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> tuple:
    return _mosaic_ragged_dot(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _mosaic_bwd(res: tuple, g: jax.Array) -> tuple:
    # The kernel is forward-only: gradients (distillation, reconstruction) go through the XLA paths, exact
    lhs, rhs, group_sizes = res
    _, vjp = jax.vjp(lambda a, b: _xla_grouped(a, b, group_sizes), lhs, rhs)
    return (*vjp(g), None)


def _use_tiled(lhs: jax.Array, rhs: jax.Array) -> bool:
    """The tiled grouped matmul instead of ``ragged_dot``: forced, or where a dense [M, G, max(K, N)] buffer would
    exceed :data:`DENSE_LIMIT_BYTES` (XLA lowers ragged_dot densely on the CPU as well as on our GPU stack). The
    forward's dense output is [M, G, N], but its gradient for ``lhs`` is ``ragged_dot(g, rhs^T)``, dense over
    [M, G, K]: a pruned student's up/gate projection (N = 1536 of K = 4096, 32 experts) passed the forward test
    and its backward asked for 16.6 GiB buffers (fp32; compiled memory analysis at full width, one 1024^2 row)."""
    if MOE_KERNEL == "tiled":
        return True
    m, k = lhs.shape
    g, _, n = rhs.shape
    dense = m * g * max(k, n) * jnp.dtype(lhs.dtype).itemsize
    return MOE_KERNEL == "auto" and dense > DENSE_LIMIT_BYTES


def _xla_grouped(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The grouped matmul without the Mosaic kernel: tiled (:func:`_use_tiled`) or ``jax.lax.ragged_dot``."""
    if _use_tiled(lhs, rhs):
        from tmp_jax.models.hunyuan_image3.tiled_gmm import tiled_ragged_dot

        return tiled_ragged_dot(lhs, rhs, group_sizes)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


_mosaic_grouped.defvjp(_mosaic_fwd, _mosaic_bwd)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, per_device: bool = False) -> jax.Array:
    """``lhs`` [M, K] rows sorted by group x ``rhs`` [G, K, N] -> [M, N] (``jax.lax.ragged_dot`` semantics).

    ``per_device``: called inside ``shard_map`` on one device's shards, where the Mosaic kernel applies even in
    a multi-device process. Rows past ``sum(group_sizes)`` are unspecified on the Mosaic path: callers mask them.
    """
    if _use_mosaic(lhs, rhs, per_device):
        return _mosaic_grouped(lhs, rhs, group_sizes)
    return _xla_grouped(lhs, rhs, group_sizes)


# ----------------------------------------------------------------------------------------------------------
# Attention on the T2I joint mask
# ----------------------------------------------------------------------------------------------------------
def _attention_impl(q: jax.Array, mask: object) -> str:
    impl = ATTENTION_IMPLEMENTATION
    if not isinstance(mask, T2IMask):
        return "xla"
    if impl == "auto":
        ok = (
            jax.default_backend() == "gpu"
            and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] <= 128
            and q.shape[-1] % 8 == 0
        )
        impl = "cudnn" if ok else "xla"
    return impl


SEQ_ALIGN = 64  # sequence lengths handed to cuDNN attention are padded to a multiple of this (even is required)


def _pad_seq(x: jax.Array) -> jax.Array:
    """``x`` [B, L, ...] with zero rows appended along axis 1 up to a multiple of :data:`SEQ_ALIGN` (as is if it
    is one)."""
    extra = -x.shape[1] % SEQ_ALIGN
    if not extra:
        return x
    return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def t2i_attention_split(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: T2IMask, scale: float, implementation: str = "cudnn"
) -> jax.Array:
    """Exact joint-mask attention as cuDNN flash attention for the image queries + XLA for the rest.

    q [B, S, N, hd], k / v [B, S, K, hd] -> [B, S, N, hd]. Image queries of row b see keys
    ``[0, image_start[b] + num_image)`` with no other mask (causal text before, the image block in full), which
    cuDNN takes as per-row key lengths; the ``S - num_image`` other queries (text, padding) are gathered and
    run through XLA with their rows of the dense mask. (``implementation="xla"`` runs the image part through
    XLA too: the same split, testable on the CPU.)
    """
    b, s = q.shape[:2]
    n_img = mask.num_image
    start = mask.image_start.astype(jnp.int32)[:, None]  # [B, 1]
    idx_img = start + jnp.arange(n_img, dtype=jnp.int32)[None]  # [B, n_img]
    q_img = jnp.take_along_axis(q, idx_img[:, :, None, None], axis=1)  # [B, n_img, N, hd]
    end = (start[:, 0] + n_img).astype(jnp.int32)  # [B]
    # cuDNN's flash attention under differentiation takes only even query / key lengths (a 1024^2 row: 4096 image
    # queries over 4259 keys): both padded with zero rows to a multiple of SEQ_ALIGN. The padded keys lie past
    # every row's key length, so they are masked out; the padded queries' outputs are dropped. Exact.
    o_img = jax.nn.dot_product_attention(
        _pad_seq(q_img), _pad_seq(k), _pad_seq(v), scale=scale, key_value_seq_lengths=end, implementation=implementation
    )[:, :n_img]  # [B, n_img, N, hd]
    n_txt = s - n_img
    if n_txt == 0:
        return o_img
    j = jnp.arange(n_txt, dtype=jnp.int32)[None]
    idx_txt = jnp.where(j < start, j, j + n_img)  # [B, n_txt] the non-image positions, in order
    q_txt = jnp.take_along_axis(q, idx_txt[:, :, None, None], axis=1)  # [B, n_txt, N, hd]
    m_txt = jnp.take_along_axis(mask.dense, idx_txt[:, None, :, None], axis=2)  # [B, 1, n_txt, S]
    o_txt = jax.nn.dot_product_attention(q_txt, k, v, mask=m_txt, scale=scale)  # [B, n_txt, N, hd]
    both = jnp.concatenate([o_txt, o_img], axis=1)  # [B, S, N, hd]: text rows, then image rows
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    rel = pos - start
    inv = jnp.where((rel >= 0) & (rel < n_img), n_txt + rel, jnp.where(pos < start, pos, pos - n_img))  # [B, S]
    return jnp.take_along_axis(both, inv[:, :, None, None], axis=1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | T2IMask, scale: float) -> jax.Array:
    """GQA softmax attention, q [B, S, N, hd], k / v [B, S, K, hd] -> [B, S, N, hd] (query head ``h`` uses KV
    head ``h // (N / K)``).

    ``mask``: a boolean [B, 1, S, S] array (XLA attention) or a :class:`T2IMask` (cuDNN split on GPU, see
    :func:`t2i_attention_split`; XLA with its dense mask elsewhere).
    """
    if _attention_impl(q, mask) == "cudnn":
        return t2i_attention_split(q, k, v, mask, scale)
    dense = mask.dense if isinstance(mask, T2IMask) else mask
    return jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale)


# ----------------------------------------------------------------------------------------------------------
# Routed experts over expert-sorted (token, slot) pairs, on one device or expert-parallel
# ----------------------------------------------------------------------------------------------------------
def ragged_experts(
    x: jax.Array,
    weights: jax.Array,
    indices: jax.Array,
    up_w: jax.Array,
    gate_w: jax.Array,
    down_w: jax.Array,
    *,
    stats: bool = False,
    grams: bool = False,
    gram_weight: jax.Array | None = None,
    channel_mask: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """The routed SwiGLU experts ``up_w`` / ``gate_w`` [E, H, I], ``down_w`` [E, I, H] on their (token, slot) pairs.

    ``x`` [N, H], ``weights`` / ``indices`` [N, k] -> [N, H] (+ the statistics of
    :meth:`tmp_jax.models.hunyuan_image3.model.RoutedExperts.ragged` with ``stats`` / ``grams``). Expert-parallel
    under ``shard_map`` while :func:`set_expert_parallel` has set a mesh and the expert count splits evenly over
    its axis, on this device otherwise.
    """
    ep = EXPERT_PARALLEL
    if ep is None or up_w.shape[0] % ep[0].shape[ep[1]]:  # off, or experts (a pruned count) don't split evenly
        n_e = up_w.shape[0]
        return _routed_pairs(
            x,
            weights,
            indices,
            up_w,
            gate_w,
            down_w,
            0,
            n_e,
            stats,
            False,
            grams,
            gram_weight=gram_weight,
            channel_mask=channel_mask,
        )
    if channel_mask is not None:  # zero down_proj rows: the same product, and nothing new to shard
        down_w = down_w * channel_mask.astype(down_w.dtype)[None, :, None]
    return _routed_pairs_expert_parallel(
        x, weights, indices, up_w, gate_w, down_w, stats, *ep, grams=grams, gram_weight=gram_weight
    )


def _routed_pairs(
    x: jax.Array,
    weights: jax.Array,
    indices: jax.Array,
    up_w: jax.Array,
    gate_w: jax.Array,
    down_w: jax.Array,
    e0: jax.Array | int,
    num_experts: int,
    stats: bool,
    per_device: bool,
    grams: bool = False,
    gram_weight: jax.Array | None = None,
    channel_mask: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """The routed experts ``e0 .. e0 + E_loc`` (``up_w`` etc. [E_loc, ...]) applied to their (token, slot) pairs.

    ``x`` [N, H], ``weights`` / ``indices`` [N, k] over all ``num_experts``. Pairs routed to other experts
    contribute 0, so summing the outputs of disjoint expert ranges gives the full layer (expert
    parallelism); with ``e0 = 0`` and every expert local this is the whole routed MoE. Returns [N, H]
    (+ ``mass`` [E_loc], ``channel`` [E_loc, I] with ``stats``; see :meth:`RoutedExperts.ragged`).
    ``channel_mask`` [I]: 0/1 weights of the hidden channels before ``down_proj`` (masked evaluation).
    """
    n, k = indices.shape
    m, e_loc = n * k, up_w.shape[0]
    flat = indices.reshape(-1)  # [N*k]
    order = jnp.argsort(flat, stable=True)  # [N*k], expert-major order of the (token, slot) pairs
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E] pairs per expert
    group_sizes = jax.lax.dynamic_slice_in_dim(sizes, e0, e_loc)  # [E_loc]
    start = jnp.sum(jnp.where(jnp.arange(num_experts) < e0, sizes, 0))  # first sorted row of expert e0
    # rows of the local experts first: sorted position (i + start) mod M  -> local row i
    pick = jnp.take(order, (jnp.arange(m) + start) % m)  # [N*k] pair index per local row
    valid = jnp.arange(m) < jnp.sum(group_sizes)  # [N*k] rows that belong to a local expert
    xs = jnp.take(x, pick // k, axis=0).astype(up_w.dtype)  # [N*k, H]
    up = grouped_matmul(xs, up_w, group_sizes, per_device)  # [N*k, I]
    gate = grouped_matmul(xs, gate_w, group_sizes, per_device)  # [N*k, I]
    hidden = up * jax.nn.silu(gate)  # [N*k, I]
    if channel_mask is not None:
        hidden = hidden * channel_mask.astype(hidden.dtype)
    # rows past the local groups are unspecified on the Mosaic path (may be NaN): select them away, don't multiply
    y = jnp.where(valid[:, None], grouped_matmul(hidden, down_w, group_sizes, per_device), 0)  # [N*k, H]
    ws = jnp.where(valid, jnp.take(weights.reshape(-1), pick), 0)  # [N*k] weights, 0 off the local experts
    if stats:
        wf = ws.astype(jnp.float32)
        local_ids = jnp.where(valid, jnp.take(flat, pick) - e0, e_loc)  # [N*k]; e_loc = dropped
        norms = jnp.linalg.norm(y.astype(jnp.float32), axis=-1)  # [N*k]
        mass = jax.ops.segment_sum(wf * norms, local_ids, e_loc, indices_are_sorted=True)  # [E_loc]
        act = wf[:, None] * jnp.abs(jnp.where(valid[:, None], hidden, 0).astype(jnp.float32))  # [N*k, I]
        channel = jax.ops.segment_sum(act, local_ids, e_loc, indices_are_sorted=True)  # [E_loc, I]
        if grams:  # per local expert sum (w h)^T (w h): a ragged contraction over its expert-sorted rows
            hw = wf[:, None] * jnp.where(valid[:, None], hidden, 0).astype(jnp.float32)  # [N*k, I]
            dn = jax.lax.RaggedDotDimensionNumbers(
                dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
            )
            hp = jax.lax.Precision.HIGHEST
            lhs = hw if gram_weight is None else hw * jnp.take(gram_weight.astype(jnp.float32), pick // k)[:, None]
            gram_e = jax.lax.ragged_dot_general(lhs, hw, group_sizes, dn, precision=hp)  # [E_loc, I, I]
    y = y * ws[:, None].astype(y.dtype)
    # back to (token, slot) order by a gather (a scatter of [N*k, H] rows is far slower on GPU): the pair at
    # sorted position j sits at local row (j - start) mod M
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(m, dtype=order.dtype))  # [N*k] sorted position
    y = jnp.take(y, (inverse - start) % m, axis=0)
    out = y.reshape(n, k, -1).sum(axis=1)  # [N, H], summed over slots like the official code
    if stats and grams:
        return out, mass, channel, gram_e
    return (out, mass, channel) if stats else out


def _routed_pairs_expert_parallel(
    x: jax.Array,
    weights: jax.Array,
    indices: jax.Array,
    up_w: jax.Array,
    gate_w: jax.Array,
    down_w: jax.Array,
    stats: bool,
    mesh: jax.sharding.Mesh,
    axis: str,
    grams: bool = False,
    gram_weight: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """:func:`_routed_pairs` under ``shard_map``: experts split over ``axis``, partial outputs summed (psum).

    Tokens stay where they are (sharded over ``data`` when the mesh has it, else replicated): each device
    routes its tokens' pairs to its own E / P experts only, so its grouped-matmul work is its share of the
    routed pairs; the [N, H] partial outputs are all-reduced over the expert axis.
    """
    from jax.sharding import PartitionSpec as P

    num_e = up_w.shape[0]  # a multiple of the axis size (RoutedExperts.ragged checks)
    data = "data" if mesh.shape.get("data", 1) > 1 and x.shape[0] % mesh.shape["data"] == 0 else None
    tok, exp = P(data), P(axis)

    def local(x, weights, indices, up_w, gate_w, down_w, *gw):  # one device: its tokens, its E / P experts
        e0 = jax.lax.axis_index(axis) * up_w.shape[0]
        res = _routed_pairs(x, weights, indices, up_w, gate_w, down_w, e0, num_e, stats, True, grams, *gw)
        if not stats:
            return jax.lax.psum(res, axis)
        out, *st = res
        if data is not None:  # statistics are over every token: sum the data shards
            st = [jax.lax.psum(v, data) for v in st]
        return (jax.lax.psum(out, axis), *st)

    out_specs = (tok, exp, exp, exp)[: 4 if grams else 3] if stats else tok
    gw = () if gram_weight is None else (gram_weight,)  # per-token Gram weights: sharded like the tokens
    in_specs = (tok, tok, tok, exp, exp, exp) + (tok,) * len(gw)
    f = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return f(x, weights, indices, up_w, gate_w, down_w, *gw)
