"""Sharded tiny HunyuanImage-3.0 T2I forward == the unsharded forward (8 fake CPU devices, conftest).

Mesh ``data:2,expert:4``: the routed experts are split over 4 devices along their expert axis (2 experts
each), the batch over 2. Parameters are placed by ``tmp_jax.sharding.shard_module`` through the rules
table, inputs are batch-sharded, and one jitted whole-model forward (ragged MoE path) runs on the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tmp_jax import arch
from tmp_jax.models.hunyuan_image3 import TINY
from tmp_jax.sharding import make_mesh, shard_module

H = arch.get("hunyuan")
# 8 routed experts (2 per expert shard), top-2, 4 latent channels, 2 layers.
CFG = TINY.replace(num_experts=8, moe_topk=2, vae={"latent_channels": 4})
BATCH = 4


def _forward(model):
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, ids, lat, t, vl: nnx.merge(graphdef, st)(ids, lat, t, vl))
    return lambda inputs: fwd(
        state, inputs["input_ids"], inputs["latents"], inputs["timestep"], inputs["valid_lengths"]
    )


def test_sharded_forward_equals_unsharded():
    batch = H.prepare_batch(CFG, H.synthetic_calib(CFG, BATCH, BATCH, seed=3)[0])
    inputs = {k: batch[k] for k in ("input_ids", "latents", "timestep", "valid_lengths")}
    assert len(set(batch["valid_lengths"].tolist())) > 1  # padded rows: image spans at different offsets

    want = np.asarray(_forward(H.init_random(CFG, jnp.float32, 0))(inputs), np.float64)

    mesh = make_mesh("data:2,expert:4", jax.devices()[:8])
    model = shard_module(H.init_random(CFG, jnp.float32, 0), mesh)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for w in (experts.up_proj[...], experts.gate_proj[...], experts.down_proj[...]):
            assert w.sharding.spec[0] == "expert", w.sharding
            assert w.sharding.shard_shape(w.shape)[0] == CFG.num_experts[0] // 4
            assert len({s.index[0].start for s in w.addressable_shards}) == 4  # 4 distinct expert slices
    sharded = {}
    for k, v in inputs.items():
        spec = PartitionSpec("data", *([None] * (v.ndim - 1)))
        sharded[k] = jax.device_put(v, NamedSharding(mesh, spec))
    assert sharded["latents"].sharding.shard_shape(sharded["latents"].shape)[0] == BATCH // 2

    out = _forward(model)(sharded)
    assert len(out.sharding.device_set) == 8
    got = np.asarray(out, np.float64)
    assert got.shape == want.shape == inputs["latents"].shape
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert rel <= 1e-5, rel


def _stats_forward(model, inputs):
    from tmp_jax.stats import run_collecting

    def body(m, ids, lat, t, vl):
        return m(ids, lat, t, vl)

    args = (inputs["input_ids"], inputs["latents"], inputs["timestep"], inputs["valid_lengths"])
    return run_collecting(model, body, *args)


def test_expert_parallel_shard_map_equals_unsharded():
    """``set_expert_parallel``: routed experts under shard_map (each device its 2 experts, psum) == unsharded.

    Output and the calibration statistics (per-expert mass, per-expert-channel activations) on a
    ``data:2,expert:4`` mesh, padded rows included; the lowered program really contains the manual
    (shard_map) computation and its all-reduce.
    """
    from tmp_jax.models.hunyuan_image3 import kernels as hk

    batch = H.prepare_batch(CFG, H.synthetic_calib(CFG, BATCH, BATCH, seed=5)[0])
    inputs = {k: batch[k] for k in ("input_ids", "latents", "timestep", "valid_lengths")}
    from tmp_jax.stats import set_grams

    plain = H.init_random(CFG, jnp.float32, 1)
    set_grams(plain, True)  # the compensation Grams (per-expert, gate-weighted) are sharded like the rest
    want_out, want_stats = _stats_forward(plain, inputs)
    assert any(k[-1] == "gram_expert_ffn" for k in want_stats)
    want = np.asarray(_forward(H.init_random(CFG, jnp.float32, 1))(inputs), np.float64)

    mesh = make_mesh("data:2,expert:4", jax.devices()[:8])
    model = shard_module(H.init_random(CFG, jnp.float32, 1), mesh)
    set_grams(model, True)
    sharded = {
        k: jax.device_put(v, NamedSharding(mesh, PartitionSpec("data", *([None] * (v.ndim - 1)))))
        for k, v in inputs.items()
    }
    hk.set_expert_parallel(mesh)
    try:
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda st, ids, lat, t, vl: nnx.merge(graphdef, st)(ids, lat, t, vl))
        args = (sharded["input_ids"], sharded["latents"], sharded["timestep"], sharded["valid_lengths"])
        text = fwd.lower(state, *args).as_text()
        assert "manual_computation" in text or "shard_map" in text
        assert "all_reduce" in text or "all-reduce" in text
        got = np.asarray(fwd(state, *args), np.float64)
        got_out, got_stats = _stats_forward(model, sharded)
    finally:
        hk.set_expert_parallel(None)
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert rel <= 1e-5, rel
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), rtol=1e-5, atol=1e-5)
    assert set(got_stats) == set(want_stats)
    moe_keys = [k for k in want_stats if "expert" in str(k[-1])]
    assert moe_keys, sorted(want_stats)[:5]
    for k in want_stats:
        # a Gram's off-diagonal entries cancel: their error is relative to the Gram's scale, not their own
        atol = 1e-5 * float(np.max(np.abs(want_stats[k]))) if k[-1].startswith("gram_") else 1e-6
        np.testing.assert_allclose(got_stats[k], want_stats[k], rtol=2e-5, atol=atol, err_msg=str(k))


def test_expert_parallel_bad_mesh_and_auto_choice():
    from tmp_jax.models.hunyuan_image3 import kernels as hk

    for spec, why in (("data:2,model:4", "no 'expert' axis"), ("model:2,expert:4", "['model']")):
        try:
            hk.set_expert_parallel(make_mesh(spec, jax.devices()[:8]))
            raise AssertionError("expected ValueError")
        except ValueError as e:
            assert why in str(e)
    assert hk.EXPERT_PARALLEL is None
    try:  # maybe_expert_parallel: on only for an expert axis > 1 without a model axis
        assert not hk.maybe_expert_parallel(None)
        assert not hk.maybe_expert_parallel(make_mesh("data:8", jax.devices()[:8]))
        assert not hk.maybe_expert_parallel(make_mesh("data:2,expert:2,model:2", jax.devices()[:8]))
        assert hk.EXPERT_PARALLEL is None
        mesh = make_mesh("data:2,expert:4", jax.devices()[:8])
        assert hk.maybe_expert_parallel(mesh) and hk.EXPERT_PARALLEL == (mesh, "expert")
        assert not hk.maybe_expert_parallel(None) and hk.EXPERT_PARALLEL is None  # a later run without a mesh
    finally:
        hk.set_expert_parallel(None)


def test_expert_parallel_uneven_expert_count_falls_back():
    """6 experts over a 4-way expert axis (a pruned count, say): the plain ragged path, same output."""
    from tmp_jax.models.hunyuan_image3 import kernels as hk

    cfg6 = TINY.replace(num_experts=6, moe_topk=2, vae={"latent_channels": 4})
    batch = H.prepare_batch(cfg6, H.synthetic_calib(cfg6, BATCH, BATCH, seed=6)[0])
    inputs = {k: batch[k] for k in ("input_ids", "latents", "timestep", "valid_lengths")}
    want = np.asarray(_forward(H.init_random(cfg6, jnp.float32, 2))(inputs), np.float64)
    mesh = make_mesh("data:2,expert:4", jax.devices()[:8])
    model = shard_module(H.init_random(cfg6, jnp.float32, 2), mesh)
    hk.set_expert_parallel(mesh)
    try:
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda st, ids, lat, t, vl: nnx.merge(graphdef, st)(ids, lat, t, vl))
        args = tuple(inputs[k] for k in ("input_ids", "latents", "timestep", "valid_lengths"))
        assert "manual_computation" not in fwd.lower(state, *args).as_text()
        got = np.asarray(fwd(state, *args), np.float64)
    finally:
        hk.set_expert_parallel(None)
    assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) <= 1e-5
