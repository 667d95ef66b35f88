"""Z-Image attention head importance statistic: the sown Gram-matrix form equals its definition.

``unit_stat`` of an attention = per head ``n``: ``sum_{b,t} ||o_{btn} @ W_out[n]||^2`` (the energy of the head's
contribution through ``to_out``). The module computes it as ``o G_n o^T`` with ``G_n = W_n W_n^T`` so that no
``[B, T, heads, dim]`` tensor is built (calibration at full width); here it is checked against the direct form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax.models.z_image import TINY
from tmp_jax.models.z_image.kernels import attention
from tmp_jax.models.z_image.model import Attention, apply_rope


def test_head_energy_equals_direct_contribution():
    attn = Attention(TINY, TINY.n_heads, dtype=jnp.float32, rngs=nnx.Rngs(3))
    b, t, hd = 2, 7, TINY.head_dim
    x = jax.random.normal(jax.random.key(0), (b, t, TINY.dim), jnp.float32)
    ang = jax.random.uniform(jax.random.key(1), (b, t, hd // 2))
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    attn.collect_stats = True
    attn(x, None, cos, sin)
    got = np.asarray(nnx.pop(attn, nnx.Intermediate)["unit_stat"][0])
    # direct: the per-head contributions through to_out, squared and summed
    q = attn.to_q(x).reshape(b, t, -1, hd)
    k = attn.to_k(x).reshape(b, t, -1, hd)
    v = attn.to_v(x).reshape(b, t, -1, hd)
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, None)
    w = attn.to_out[0].kernel[...].reshape(TINY.n_heads, hd, -1)
    want = np.sum(
        np.square(np.einsum("btnd,nde->btne", np.asarray(o, np.float64), np.asarray(w, np.float64))), (0, 1, 3)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
