"""A grouped matmul in plain XLA whose memory grows with the rows, not with rows x groups (``jax.lax.ragged_dot``
semantics, forward and backward).

Why: XLA on our GPU stack lowers ``jax.lax.ragged_dot`` to a dense GEMM over every group, so its buffers are
[M, G, N]: at HunyuanImage-3.0 width (64 experts, N = 3072-4096) one micro-batch of four 1024^2 rows (134k
(token, slot) pairs) asked for 133 GiB in fp32 on an H200 (``tmp_jax.reconstruct``, 2026-12-07). The Mosaic
kernel (``kernels.py``) covers the bf16 forward on one Hopper GPU only; gradients (reconstruction, distillation)
still went through the dense ``ragged_dot``.

How: the rows are sorted by group (``group_sizes[g]`` rows of group g, in order; rows past the sum are padding).
Each group is padded to a multiple of ``tile`` rows in a static layout of ``M + G * (tile - 1)`` rows (rounded up to
a tile), so that every tile belongs to ONE group; a ``lax.scan`` over the tiles multiplies each [tile, K] block by
its group's [K, N] matrix. The backward is its own pair of scans (``jax.custom_vjp``): d_lhs is the same tiled
product with the transposed matrices, d_rhs accumulates ``lhs_tile^T @ g_tile`` into its group's slot (float32),
so no per-tile copy of ``rhs`` is kept for the backward. Padding rows are zero and produce zero; output rows past
``sum(group_sizes)`` are zero.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _layout(group_sizes: jax.Array, m: int, tile: int) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """(source row of every padded row [M_pad] (M for padding), padded row of every source row [M], group of
    every tile [n_tiles], M_pad)."""
    g = group_sizes.shape[0]
    m_pad = -(-(m + g * (tile - 1)) // tile) * tile  # static bound: every group padded by < tile rows
    sizes = group_sizes.astype(jnp.int32)
    padded = (sizes + tile - 1) // tile * tile  # [G]
    start = jnp.cumsum(sizes) - sizes  # [G] first source row of each group
    pstart = jnp.cumsum(padded) - padded  # [G] first padded row of each group
    q = jnp.arange(m_pad)
    grp = jnp.clip(jnp.searchsorted(jnp.cumsum(padded), q, side="right"), 0, g - 1)  # [M_pad] group of padded row
    r = q - pstart[grp]  # offset within its group
    src = jnp.where((r < sizes[grp]) & (q < jnp.sum(padded)), start[grp] + r, m)  # [M_pad]; m = padding
    i = jnp.arange(m)
    rgrp = jnp.clip(jnp.searchsorted(jnp.cumsum(sizes), i, side="right"), 0, g - 1)  # [M] group of source row
    dst = jnp.where(i < jnp.sum(sizes), pstart[rgrp] + i - start[rgrp], m_pad)  # [M]; m_pad = past the groups
    tile_group = grp[::tile]  # [n_tiles]
    return src, dst, tile_group, m_pad


def _tiles(x: jax.Array, src: jax.Array, tile: int) -> jax.Array:
    """Rows of ``x`` [M, K] in the padded layout, as [n_tiles, tile, K] (zeros in the padding)."""
    xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)  # [M_pad, K]
    return xp.reshape(-1, tile, x.shape[1])  # [n_tiles, tile, K]


def _scan_product(xt: jax.Array, rhs: jax.Array, tile_group: jax.Array) -> jax.Array:
    """[n_tiles, tile, K] x rhs [G, K, N] (each tile by its group's matrix) -> [n_tiles, tile, N]."""

    def body(_, args):
        x, gi = args
        w = jax.lax.dynamic_index_in_dim(rhs, gi, axis=0, keepdims=False)  # [K, N]
        return None, jnp.dot(x, w, preferred_element_type=jnp.float32).astype(xt.dtype)

    return jax.lax.scan(body, None, (xt, tile_group))[1]


def _untile(yt: jax.Array, dst: jax.Array) -> jax.Array:
    """[n_tiles, tile, N] in the padded layout -> [M, N] in source row order (zeros past the groups)."""
    return jnp.take(yt.reshape(-1, yt.shape[-1]), dst, axis=0, mode="fill", fill_value=0)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def tiled_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tile: int = 128) -> jax.Array:
    """``lhs`` [M, K] rows sorted by group x ``rhs`` [G, K, N] -> [M, N], as ``jax.lax.ragged_dot`` (see the module
    doc); rows past ``sum(group_sizes)`` give 0. Memory: about 2 (M + G * tile) x max(K, N) elements, no [M, G, N]."""
    return _fwd(lhs, rhs, group_sizes, tile)[0]


def _fwd(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tile: int) -> tuple[jax.Array, tuple]:
    """The product and the backward's residuals: the operands and the layout (computed once, here)."""
    src, dst, tile_group, _ = _layout(group_sizes, lhs.shape[0], tile)
    out = _untile(_scan_product(_tiles(lhs, src, tile), rhs, tile_group), dst)
    return out.astype(jnp.result_type(lhs.dtype, rhs.dtype)), (lhs, rhs, src, dst, tile_group)


def _bwd(tile: int, res: tuple, g: jax.Array) -> tuple:
    lhs, rhs, src, dst, tile_group = res
    gt = _tiles(g.astype(lhs.dtype), src, tile)  # [n_tiles, tile, N]
    d_lhs = _untile(_scan_product(gt, jnp.swapaxes(rhs, 1, 2), tile_group), dst)  # [M, K]
    xt = _tiles(lhs, src, tile)  # [n_tiles, tile, K]

    def acc(d, args):  # d [G, K, N] float32: each tile adds x^T g to its group's matrix
        x, gg, gi = args
        upd = jnp.dot(x.T, gg, preferred_element_type=jnp.float32)  # [K, N]
        cur = jax.lax.dynamic_index_in_dim(d, gi, axis=0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(d, cur + upd, gi, axis=0), None

    d_rhs = jax.lax.scan(acc, jnp.zeros(rhs.shape, jnp.float32), (xt, gt, tile_group))[0]
    return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype), None  # group sizes are integers: no cotangent


tiled_ragged_dot.defvjp(_fwd, _bwd)
