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
