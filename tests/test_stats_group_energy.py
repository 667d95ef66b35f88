"""``stats.group_output_energy`` (the Gram form of the attention importance statistic) equals its direct formula.

Direct: per group g, ``sum_{b,t valid} ||o[b, t, g] @ W_g||^2`` in float64. Checked for the shared helper (fp32 and
bf16 operands, with and without a token mask) and for HunyuanImage's attention ``unit_stat`` (KV groups of query
heads, padding tokens excluded) on a tiny config with every parameter randomised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmp_jax.models.hunyuan_image3 import TINY
from tmp_jax.models.hunyuan_image3 import model as hm
from tmp_jax.models.hunyuan_image3.layout import causal_mask
from tmp_jax.stats import group_output_energy


def _direct(o: np.ndarray, w: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    g, c = o.shape[-2:]
    y = np.einsum("btgc,gce->btge", o.astype(np.float64), w.astype(np.float64).reshape(g, c, -1))
    e = np.sum(np.square(y), axis=-1)  # [B, T, G]
    if mask is not None:
        e = np.where(mask[..., None], e, 0.0)
    return e.sum(axis=(0, 1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_group_output_energy(dtype, masked):
    ko, kw, km = jax.random.split(jax.random.key(0), 3)
    o = jax.random.normal(ko, (2, 37, 3, 24), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (72, 40), jnp.float32) / 8).astype(dtype)
    mask = np.asarray(jax.random.uniform(km, (2, 37)) < 0.7) if masked else None
    got = np.asarray(group_output_energy(o, w, None if mask is None else jnp.asarray(mask)))
    assert got.dtype == np.float32 and got.shape == (3,)
    want = _direct(np.asarray(o, np.float64), np.asarray(w, np.float64), mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    if masked:  # the mask matters (a test that cannot fail otherwise)
        assert not np.allclose(got, _direct(np.asarray(o, np.float64), np.asarray(w, np.float64), None), rtol=1e-3)


def test_hunyuan_attention_unit_stat_equals_direct():
    attn = hm.Attention(TINY, dtype=jnp.float32, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(2)
    for _, v in nnx.to_flat_state(nnx.state(attn, nnx.Param)):
        x = v.get_value()
        v.set_value(jnp.asarray(rng.standard_normal(x.shape) * 0.3 + (1.0 if x.ndim == 1 else 0.0), x.dtype))
    b, s, hd = 2, 11, attn.head_dim
    x = jnp.asarray(rng.standard_normal((b, s, TINY.hidden_size)), jnp.float32)
    ang = jnp.asarray(rng.uniform(0, 3, (b, s, hd)), jnp.float32)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    mask = jnp.broadcast_to(causal_mask(s), (b, 1, s, s))
    token_mask = jnp.asarray(np.arange(s)[None, :] < np.array([[s], [7]]))  # sample 1: 4 padding tokens
    attn.collect_stats = True
    attn(x, cos, sin, mask, token_mask)
    got = np.asarray(nnx.pop(attn, nnx.Intermediate)["unit_stat"][0])
    # direct: the attention output before o_proj, per KV group's query heads, through o_proj, squared, masked
    q = attn.q_proj(x).reshape(b, s, attn.num_heads, hd)
    k = attn.k_proj(x).reshape(b, s, attn.num_kv_heads, hd)
    v = attn.v_proj(x).reshape(b, s, attn.num_kv_heads, hd)
    q, k = hm.apply_rope(q, cos, sin), hm.apply_rope(k, cos, sin)
    if attn.query_layernorm is not None:
        q, k = attn.query_layernorm(q), attn.key_layernorm(k)
    o = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=hd**-0.5)  # [B, S, N, hd]
    groups = np.asarray(o, np.float64).reshape(b, s, attn.num_kv_heads, -1)
    want = _direct(groups, np.asarray(attn.o_proj.kernel[...], np.float64), np.asarray(token_mask))
    assert got.shape == (attn.num_kv_heads,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
