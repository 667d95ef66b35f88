"""Timestep weighting of the compensation Grams (issue 16): each calibration sample's rows enter the consumer
Grams with the weight ``w(sigma)`` of its noise level (``--gram-timestep-weight high-noise``: ``w = sigma``).

The reference is independent of the weighting code: with sigmas 1/4, 2/4, 3/4, 4/4 the weighted Gram is
``1/4 sum_b (b + 1) G_b``, the UNWEIGHTED Gram of the micro-batch with sample ``b`` repeated ``b + 1`` times,
divided by 4 (no sample interacts with another in either model). Both architectures, every Gram the model
sows (Z-Image heads / FFN, HunyuanImage KV groups and the per-expert gate-weighted expert-channel Grams).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_candidate_eval import H_CFG  # 4 KV groups of 2 heads, 6 experts of width 16, top-2

from tmp_jax import arch
from tmp_jax.calibration import calibrate, gram_signature
from tmp_jax.compensate import CompensationConfig, from_plan, sample_sigmas, timestep_weights
from tmp_jax.models.z_image import TINY as Z_TINY

SIGMAS = np.array([0.25, 0.5, 0.75, 1.0])
REPEATS = [1, 2, 3, 4]  # = SIGMAS * 4


def _with_sigmas(name: str, batch: dict, sigmas: np.ndarray) -> dict:
    b = dict(batch)
    if name == "zimage":
        b["t"] = (1.0 - sigmas).astype(np.float32)  # Z-Image's t is 1 - sigma (1 = clean)
    else:
        b["timestep"] = (1000.0 * sigmas).astype(np.float32)  # HunyuanImage's timestep is sigma * 1000
    return b


def _grams(stats: dict) -> dict:
    return {k: np.asarray(v, np.float64) for k, v in stats.items() if str(k[-1]).startswith("gram_")}


@pytest.mark.parametrize("name,cfg", [("zimage", Z_TINY), ("hunyuan", H_CFG)])
def test_weighted_grams_equal_weighted_sum_of_per_sample_grams(name, cfg):
    hooks = arch.get(name)
    model = hooks.init_random(cfg, jnp.float32, 0)
    batch = _with_sigmas(name, hooks.synthetic_calib(cfg, 4, 4, 0)[0], SIGMAS)
    np.testing.assert_allclose(sample_sigmas(name, batch), SIGMAS, rtol=1e-6)
    weighted = _grams(calibrate(model, [batch], grams=True, gram_timestep_weight="high-noise").stats)
    repeated = {k: np.repeat(v, REPEATS, axis=0) for k, v in batch.items()}
    reference = _grams(calibrate(model, [repeated], grams=True).stats)
    uniform = _grams(calibrate(model, [batch], grams=True).stats)
    kinds = {k[-1] for k in weighted}
    assert kinds == ({"gram_heads", "gram_ffn"} if name == "zimage" else {"gram_kv_groups", "gram_expert_ffn"})
    assert set(weighted) == set(reference) == set(uniform)
    for k, v in weighted.items():
        scale = float(np.abs(reference[k]).max())
        np.testing.assert_allclose(v, reference[k] / 4, rtol=1e-5, atol=1e-6 * scale, err_msg=str(k))
        assert not np.allclose(v, uniform[k] * SIGMAS.mean(), rtol=1e-3), k  # the weights did something
    # every sample at sigma = 1 (weight 1): the weighted program gives the uniform Grams
    ones = _grams(
        calibrate(model, [_with_sigmas(name, batch, np.ones(4))], grams=True, gram_timestep_weight="high-noise").stats
    )
    ref1 = _grams(calibrate(model, [_with_sigmas(name, batch, np.ones(4))], grams=True).stats)
    for k, v in ones.items():
        np.testing.assert_allclose(v, ref1[k], rtol=1e-6, atol=1e-7 * float(np.abs(ref1[k]).max()), err_msg=str(k))
    # the weights are set only during calibration: the model's structure afterwards is what it was
    assert not any(hasattr(n, "gram_weight") for _, n in nnx.iter_graph(model))


def test_expert_gram_weight_ragged_dense_expert_parallel():
    """The per-expert Gram with per-token weights: ragged == dense == the direct sum of s_n (w h)(w h)^T, and
    the expert-parallel (shard_map) path equals the single-device one."""
    from tmp_jax.models.hunyuan_image3 import kernels as hk
    from tmp_jax.models.hunyuan_image3 import model as hm
    from tmp_jax.sharding import make_mesh

    rng = np.random.default_rng(0)
    ex = hm.RoutedExperts(4, 8, 6, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((12, 8)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(4, 2, replace=False) for _ in range(12)]), jnp.int32)
    w = jnp.asarray(rng.uniform(0.1, 1.0, (12, 2)), jnp.float32)
    s = jnp.asarray(rng.uniform(0.0, 1.0, 12), jnp.float32)
    *_, g_r = ex.ragged(x, w, idx, stats=True, grams=True, gram_weight=s)
    *_, g_d = ex.dense(x, w, idx, stats=True, grams=True, gram_weight=s)
    up, gate = np.asarray(ex.up_proj[...]), np.asarray(ex.gate_proj[...])
    want = np.zeros((4, 6, 6))
    for n in range(12):
        xn = np.asarray(x[n], np.float64)
        for j in range(2):
            e = int(idx[n, j])
            h = (xn @ up[e]) * (xn @ gate[e]) / (1 + np.exp(-(xn @ gate[e])))
            want[e] += float(s[n]) * np.outer(float(w[n, j]) * h, float(w[n, j]) * h)
    np.testing.assert_allclose(np.asarray(g_r), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_d), want, rtol=1e-4, atol=1e-5)
    hk.set_expert_parallel(make_mesh("data:2,expert:4", jax.devices()[:8]))
    try:
        *_, g_ep = ex.ragged(x, w, idx, stats=True, grams=True, gram_weight=s)
    finally:
        hk.set_expert_parallel(None)
    np.testing.assert_allclose(np.asarray(g_ep), want, rtol=1e-4, atol=1e-5)


def test_weighting_is_recorded_and_read_tolerantly(tmp_path):
    from search.engine import _compensation_record
    from tmp_jax.search import parse_args

    assert parse_args(["--budget", "50%"]).gram_timestep_weight == "uniform"
    assert parse_args(["--budget", "50%", "--gram-timestep-weight", "high-noise"]).gram_timestep_weight == "high-noise"
    with pytest.raises(SystemExit):
        parse_args(["--budget", "50%", "--gram-timestep-weight", "late"])
    with pytest.raises(ValueError, match="timestep weight"):
        CompensationConfig(timestep_weight="late")
    assert timestep_weights("uniform", SIGMAS) is None
    np.testing.assert_array_equal(timestep_weights("high-noise", SIGMAS), SIGMAS)

    class _P:  # what _compensation_record reads of a problem
        compensation = type("C", (), {"config": CompensationConfig(timestep_weight="high-noise")})()
        calib_fingerprint = "sha256:x"

    rec = _compensation_record(_P())
    assert rec["timestep_weight"] == "high-noise" and rec["method"] == "obs-lsq"
    # plans before the field read as uniform; the field is read back; a bad value is a one-line error
    from safetensors.numpy import save_file

    save_file({"n/heads": np.eye(2, dtype=np.float32)}, str(tmp_path / "g.safetensors"))
    old = {"compensation": {"method": "obs-lsq", "damp": 0.01, "stats": "g.safetensors"}}
    assert from_plan(old, tmp_path / "plan.json").config.timestep_weight == "uniform"
    new = {"compensation": {**old["compensation"], "timestep_weight": "high-noise"}}
    assert from_plan(new, tmp_path / "plan.json").config.timestep_weight == "high-noise"
    with pytest.raises(ValueError, match="plan.json.*timestep_weight"):
        from_plan({"compensation": {**old["compensation"], "timestep_weight": "late"}}, tmp_path / "plan.json")
    # the resume signature: uniform is what it was before the weighting existed, high-noise differs
    assert gram_signature(True, 2) == gram_signature(True, 2, "uniform") == ":grams2"
    assert gram_signature(True, 2, "high-noise") != ":grams2" and gram_signature(False, 2, "high-noise") == ""


def test_resume_state_is_per_weighting(tmp_path):
    hooks = arch.get("zimage")
    model = hooks.init_random(Z_TINY, jnp.float32, 0)
    batches = hooks.synthetic_calib(Z_TINY, 4, 4, 0)
    calibrate(model, batches, out=tmp_path, grams=True)
    with pytest.raises(ValueError, match="resume state"):
        calibrate(model, batches, out=tmp_path, grams=True, gram_timestep_weight="high-noise")
