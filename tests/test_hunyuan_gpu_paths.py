"""HunyuanImage-3.0 GPU paths, checked where they can be on the CPU.

* The query-block split of the joint-mask attention (:func:`t2i_attention_split`: image queries with per-row
  key lengths, the other queries with their dense-mask rows, put back in order) equals masked attention
  exactly, on rows whose image spans sit at different offsets, with right padding, and so do its gradients
  (its sequences are padded to a multiple of 64 for cuDNN, whose differentiated flash attention takes only even
  lengths). On the GPU the image part runs in cuDNN; here the same split runs through XLA.
* The kernel choice: on the CPU "auto" keeps ``jax.lax.ragged_dot`` (and the XLA attention), forcing the
  Mosaic-GPU kernel fails with a one-line reason, and bad settings are rejected.

The GPU kernels themselves are measured and compared with the XLA path in ``bench/hunyuan_forward.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmp_jax.models.hunyuan_image3 import kernels as hk
from tmp_jax.models.hunyuan_image3.layout import T2IMask, joint_attention_mask


def test_split_attention_equals_masked_attention():
    b, s, n, kv, hd, n_img = 3, 29, 4, 2, 16, 12
    starts = jnp.array([3, 9, 5], jnp.int32)
    valid = jnp.array([29, 25, 18], jnp.int32)  # image spans end at 15, 21, 17: inside the valid tokens
    mask = T2IMask(joint_attention_mask(s, starts, n_img, valid), starts, n_img)
    kq, kk, kv_ = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, s, n, hd), jnp.float32)
    k = jax.random.normal(kk, (b, s, kv, hd), jnp.float32)
    v = jax.random.normal(kv_, (b, s, kv, hd), jnp.float32)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask.dense, scale=hd**-0.5)
    got = jax.jit(lambda q, k, v, m: hk.t2i_attention_split(q, k, v, m, hd**-0.5, implementation="xla"))(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # and its gradients (reconstruction and distillation differentiate it): the sequences are padded for cuDNN
    # (odd key length 29, 12 image queries -> 64 each), the padding must not leak into q, k or v's gradients
    cot = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
    split = lambda q, k, v: jnp.sum(hk.t2i_attention_split(q, k, v, mask, hd**-0.5, implementation="xla") * cot)  # noqa: E731
    dense = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=mask.dense, scale=hd**-0.5) * cot)  # noqa: E731
    for g_split, g_dense in zip(jax.grad(split, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(g_split), np.asarray(g_dense), rtol=1e-4, atol=1e-5)


def test_kernel_choice_on_cpu():
    lhs = jnp.ones((8, 64), jnp.bfloat16)
    rhs = jnp.ones((2, 64, 128), jnp.bfloat16)
    gs = jnp.array([5, 3], jnp.int32)
    assert hk.MOE_KERNEL == "auto" and not hk._use_mosaic(lhs, rhs)
    np.testing.assert_array_equal(
        np.asarray(hk.grouped_matmul(lhs, rhs, gs), np.float32),
        np.asarray(jax.lax.ragged_dot(lhs, rhs, gs), np.float32),
    )
    # "auto" sizes the dense buffers by max(K, N): a pruned student's up/gate projection at full width (one 1024^2
    # row's 34,072 pairs, 32 experts, 4096 -> 1536, bf16) has a 3.3 GB forward output but a 8.9 GB input gradient
    sds = jax.ShapeDtypeStruct
    assert hk._use_tiled(sds((34072, 4096), jnp.bfloat16), sds((32, 4096, 1536), jnp.bfloat16))
    assert hk._use_tiled(sds((34072, 1536), jnp.bfloat16), sds((32, 1536, 4096), jnp.bfloat16))
    assert not hk._use_tiled(sds((9600, 128), jnp.float32), sds((8, 128, 192), jnp.float32))  # the embedded MoE
    mask = T2IMask(jnp.ones((1, 1, 4, 4), bool), jnp.array([1]), 2)
    assert hk._attention_impl(lhs.reshape(1, 8, 4, 16), mask) == "xla"
    try:
        hk.set_moe_kernel("mosaic")
        with pytest.raises(ValueError, match="TMP_JAX_MOE_KERNEL=mosaic: not a Hopper GPU"):
            hk.grouped_matmul(lhs, rhs, gs)
    finally:
        hk.set_moe_kernel("auto")
    with pytest.raises(ValueError, match="auto, xla, mosaic or tiled"):
        hk.set_moe_kernel("triton")
    with pytest.raises(ValueError, match="auto, xla or cudnn"):
        hk.set_attention_implementation("flash")


@pytest.mark.parametrize(
    "sizes,tile",
    [((5, 0, 13, 9), 4), ((0, 0, 64, 0), 8), ((10, 7, 1, 0, 2), 16)],  # empty groups; rows past the sum (padding)
)
def test_tiled_grouped_matmul_equals_ragged_dot_with_gradients(sizes, tile):
    """The tiled grouped matmul (``TMP_JAX_MOE_KERNEL=tiled``; "auto" on a GPU where ragged_dot's dense output
    would be large) is ragged_dot, forward and both gradients, on the valid rows; padding rows give 0."""
    from tmp_jax.models.hunyuan_image3.tiled_gmm import tiled_ragged_dot

    m, k, n = 64, 16, 12
    ka, kb, kc = jax.random.split(jax.random.key(1), 3)
    lhs = jax.random.normal(ka, (m, k), jnp.float32)
    rhs = jax.random.normal(kb, (len(sizes), k, n), jnp.float32)
    ct = jax.random.normal(kc, (m, n), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    valid = (jnp.arange(m) < sum(sizes))[:, None]
    ref = lambda a, b: jnp.where(valid, jax.lax.ragged_dot(a, b, gs), 0)  # noqa: E731
    got = jax.jit(lambda a, b: tiled_ragged_dot(a, b, gs, tile))
    np.testing.assert_allclose(np.asarray(got(lhs, rhs)), np.asarray(ref(lhs, rhs)), rtol=1e-5, atol=1e-5)
    g_ref = jax.grad(lambda a, b: jnp.sum(ref(a, b) * ct), (0, 1))(lhs, rhs)
    g_got = jax.jit(jax.grad(lambda a, b: jnp.sum(tiled_ragged_dot(a, b, gs, tile) * ct), (0, 1)))(lhs, rhs)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    try:  # the setting routes grouped_matmul there
        hk.set_moe_kernel("tiled")
        np.testing.assert_allclose(
            np.asarray(hk.grouped_matmul(lhs, rhs, gs)), np.asarray(ref(lhs, rhs)), rtol=1e-5, atol=1e-5
        )
    finally:
        hk.set_moe_kernel("auto")
