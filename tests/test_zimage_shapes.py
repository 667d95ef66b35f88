"""Full-size Z-Image-Turbo shapes (abstract, no weights), partition specs and a sharded tiny forward."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from converters.engine import flat_variables
from converters.zimage import zimage_key_table
from tmp_jax.models.z_image import TINY, TURBO, ZImageTransformer, init_abstract
from tmp_jax.sharding import make_mesh, shard_module, state_shardings


def test_turbo_parameter_count_exact():
    model = init_abstract(TURBO)
    leaves = flat_variables(model)
    assert len(leaves) == 521
    assert sum(int(np.prod(v.get_value().shape)) for v in leaves.values()) == 6_154_908_736
    # the key table describes exactly the same tensors (same count, same total)
    table = zimage_key_table(TURBO)
    assert len(table.by_key) == 521 and table.num_params() == 6_154_908_736
    blk = model.layers[0]
    assert blk.attention.to_q.kernel.get_value().shape == (3840, 3840)
    assert blk.feed_forward.w1.kernel.get_value().shape == (3840, 10240)
    assert blk.adaLN_modulation[0].kernel.get_value().shape == (256, 15360)


def test_turbo_partition_specs_on_8_devices():
    assert jax.device_count() >= 8, "conftest sets --xla_force_host_platform_device_count=8"
    mesh = make_mesh("data:2,model:4", jax.devices()[:8])
    model = init_abstract(TURBO)
    specs = {p: s.spec for p, s in nnx.to_flat_state(state_shardings(nnx.state(model, nnx.Param), mesh))}
    assert specs[("layers", 0, "attention", "to_q", "kernel")] == P(None, "model")
    assert specs[("layers", 0, "attention", "to_out", 0, "kernel")] == P("model", None)
    assert specs[("layers", 0, "feed_forward", "w1", "kernel")] == P(None, "model")
    assert specs[("layers", 0, "feed_forward", "w2", "kernel")] == P("model", None)
    assert specs[("x_pad_token",)] == P(None, None)
    leaves = flat_variables(model)
    for path, spec in specs.items():
        shape = leaves[tuple(path)].get_value().shape
        for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
            if ax is not None:
                assert dim % mesh.shape[ax] == 0, (path, shape, spec)


def test_sharded_tiny_forward_equals_unsharded():
    rng = np.random.default_rng(0)
    model = ZImageTransformer(TINY, rngs=nnx.Rngs(3))
    # randomise every parameter (zeros / ones would hide layout bugs)
    state = nnx.state(model, nnx.Param)
    state = jax.tree.map(lambda v: v + 0.1 * rng.standard_normal(v.shape).astype(v.dtype), state)
    nnx.update(model, state)
    x = [rng.standard_normal((16, 1, 8, 8)).astype(np.float32) for _ in range(2)]
    cap = [rng.standard_normal((n, 32)).astype(np.float32) for n in (5, 33)]
    t = np.array([0.2, 0.7], np.float32)
    want = model(x, t, cap)
    mesh = make_mesh("data:2,model:4", jax.devices()[:8])
    sharded = ZImageTransformer(TINY, rngs=nnx.Rngs(3))
    nnx.update(sharded, state)
    shard_module(sharded, mesh)
    q = sharded.layers[0].attention.to_q.kernel.get_value()
    assert q.sharding.spec == P(None, "model") and len(q.sharding.device_set) == 8
    got = sharded(x, t, cap)
    for g, w in zip(got, want):
        # sharded contractions sum in a different order: compare by relative norm (fp32 rounding only)
        err = np.linalg.norm(np.asarray(g) - np.asarray(w)) / np.linalg.norm(np.asarray(w))
        assert err <= 1e-5
