"""Z-Image calibration statistics, fast path: every sown statistic equals its definition.

``runner.collect_stats`` (``stats.run_collecting``: model as a pytree, one cached program per structure, one
fp32 vector copied to the host) must give the same statistics as the reference path
(``split_collecting`` + a jitted forward + ``flatten_intermediates``), and each statistic must equal its direct
formula (float64 on the host, fp32 model, every parameter randomised):

* attention ``unit_stat``: per head ``sum_bt ||o_btn W_n||^2`` (the Gram form ``<O^T O, W W^T>``; also bf16);
* FFN ``unit_stat``: per channel ``sum_bt |h_btc| * ||w2[c]||``;
* block ``block_stat``: ``[sum ||out - in||^2, sum ||in||^2]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmp_jax import stats as st
from tmp_jax.models.z_image import TINY, ZImageConfig, runner
from tmp_jax.models.z_image import model as zm
from tmp_jax.models.z_image.kernels import attention
from tmp_jax.models.z_image.layout import key_mask


def _randomise(m: nnx.Module, seed: int) -> nnx.Module:
    rng = np.random.default_rng(seed)
    for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        x = v.get_value()
        v.set_value(jnp.asarray(rng.standard_normal(x.shape) * 0.3 + (1.0 if x.ndim == 1 else 0.0), x.dtype))
    return m


def _batch(cfg: ZImageConfig) -> dict:
    rng = np.random.default_rng(1)
    b = {
        "latents": rng.standard_normal((2, cfg.in_channels, 1, 16, 12)).astype(np.float32),
        "cap_feats": rng.standard_normal((2, 20, cfg.cap_feat_dim)).astype(np.float32),
        "cap_lens": np.array([20, 13], np.int32),  # ragged: padding and pad tokens in the sequence
        "t": np.array([0.3, 0.7], np.float32),
    }
    return runner.prepare_batch(cfg, b)


@pytest.fixture(scope="module")
def tiny():
    return _randomise(zm.ZImageTransformer(TINY, dtype=jnp.float32, rngs=nnx.Rngs(0)), 2), _batch(TINY)


def _assert_same(a: dict, b: dict, rtol: float) -> None:
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=0, err_msg=str(k))


def test_fast_path_equals_reference_path_and_caches(tiny):
    m, inp = tiny
    y, s = runner.collect_stats(m, inp)
    y0, s0 = runner.collect_stats_reference(m, inp)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
    _assert_same(s, s0, rtol=1e-6)
    # per block: block_stat + per sub-layer unit_stat, out_energy, res_energy (no Grams unless asked for)
    n_stats = 7 * len(TINY.stack("layers")) + 7 * 2 * TINY.n_refiner_layers
    assert len(s) == n_stats
    assert not any(k[-1].startswith("gram_") for k in s)
    st.set_grams(m, True)
    try:
        _, sg = runner.collect_stats(m, inp)
    finally:
        st.set_grams(m, False)
    grams = {k: v for k, v in sg.items() if k[-1].startswith("gram_")}
    assert len(grams) == 2 * (len(TINY.stack("layers")) + 2 * TINY.n_refiner_layers)
    g = grams[("layers", 0, "feed_forward", "gram_ffn")]
    assert g.shape == (TINY.ffn_dim, TINY.ffn_dim) and np.allclose(g, g.T, rtol=1e-5, atol=1e-3)
    # second call: same program, no retrace; a weight updated in place is seen (values are read per call)
    # (other tests in the same process may own programs too: compare per-program cache sizes, not totals)
    n_prog = len(st._PROGRAMS)
    sizes = {key: p.fn._cache_size() for key, p in st._PROGRAMS.items()}
    k = m.layers[1].feed_forward.w2.kernel
    k.set_value(k.get_value() * 2.0)
    _, s2 = runner.collect_stats(m, inp)
    assert len(st._PROGRAMS) == n_prog
    assert {key: p.fn._cache_size() for key, p in st._PROGRAMS.items()} == sizes
    path = ("layers", 1, "feed_forward", "unit_stat")
    np.testing.assert_allclose(s2[path], 2.0 * s[path], rtol=1e-6)
    _assert_same(s2, runner.collect_stats_reference(m, inp)[1], rtol=1e-6)
    k.set_value(k.get_value() * 0.5)
    # flags are left off on the model
    assert not any(getattr(n, "collect_stats", False) for _, n in nnx.iter_graph(m))


def test_pruned_structure_gets_its_own_program():
    cfg = ZImageConfig(**{**TINY.__dict__, "layers_heads": (1, 2), "layers_ffn_dims": (48, 0)})
    m = _randomise(zm.ZImageTransformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(1)), 3)
    inp = _batch(cfg)
    _, s = runner.collect_stats(m, inp)
    _assert_same(s, runner.collect_stats_reference(m, inp)[1], rtol=1e-6)
    assert s[("layers", 0, "attention", "unit_stat")].shape == (1,)
    assert s[("layers", 0, "feed_forward", "unit_stat")].shape == (48,)
    assert ("layers", 1, "feed_forward", "unit_stat") not in s


def test_each_statistic_equals_its_direct_formula(tiny):
    m, inp = tiny
    _, s = runner.collect_stats(m, inp)
    # the main blocks' inputs, from the plain forward (features = each block's output)
    a, t, pk = inp["arrays"], jnp.asarray(inp["t"]), inp["patch_key"]
    e = m.embed(a, t, pk)
    img, cap = e["img"], e["cap"]
    for blk in m.noise_refiner:
        img = blk(img, key_mask(a["img_valid"]), *e["img_cs"], e["c"])
    for blk in m.context_refiner:
        cap = blk(cap, key_mask(a["cap_valid"]), *e["cap_cs"])
    x, cos, sin, mask = m.unify(a, img, cap, e)
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    for i, blk in enumerate(m.layers):
        s_msa, g_msa, s_mlp, g_mlp = blk.modulation_terms(e["c"])
        # attention: direct per-head contribution through to_out
        att = blk.attention
        h = blk.attention_norm1(x) * s_msa
        B, T, _ = h.shape
        q = att.norm_q(att.to_q(h).reshape(B, T, att.heads, att.head_dim))
        k = att.norm_k(att.to_k(h).reshape(B, T, att.heads, att.head_dim))
        v = att.to_v(h).reshape(B, T, att.heads, att.head_dim)
        o = attention(zm.apply_rope(q, cos, sin), zm.apply_rope(k, cos, sin), v, mask)
        w = f64(att.to_out[0].kernel[...]).reshape(att.heads, att.head_dim, -1)
        want = np.sum(np.square(np.einsum("btnd,nde->btne", f64(o), w)), axis=(0, 1, 3))
        np.testing.assert_allclose(s[("layers", i, "attention", "unit_stat")], want, rtol=1e-5)
        x_mid = x + g_msa * blk.attention_norm2(att.to_out[0](o.reshape(B, T, -1)))
        # FFN: sum_bt |h| * ||w2 row||
        ff = blk.feed_forward
        hf = blk.ffn_norm1(x_mid) * s_mlp
        act = f64(jax.nn.silu(ff.w1(hf)) * ff.w3(hf))
        want = np.abs(act).sum(axis=(0, 1)) * np.linalg.norm(f64(ff.w2.kernel[...]), axis=1)
        np.testing.assert_allclose(s[("layers", i, "feed_forward", "unit_stat")], want, rtol=1e-5)
        # block: relative change of its input
        x_out = blk(x, mask, cos, sin, e["c"])
        want = [np.sum(np.square(f64(x_out) - f64(x))), np.sum(np.square(f64(x)))]
        np.testing.assert_allclose(s[("layers", i, "block_stat")], want, rtol=1e-5)
        x = x_out


def test_head_energy_bf16_operands():
    """bf16 o and w (the full-size case): the fp32-accumulated Gram form vs float64 on the same bf16 values."""
    ko, kw = jax.random.split(jax.random.key(4))
    o = jax.random.normal(ko, (2, 300, 3, 16), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (48, 40), jnp.float32) / 7).astype(jnp.bfloat16)
    got = np.asarray(zm.head_output_energy(o, w))
    want = np.sum(
        np.square(np.einsum("btnd,nde->btne", np.asarray(o, np.float64), np.asarray(w, np.float64).reshape(3, 16, 40))),
        axis=(0, 1, 3),
    )
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)
