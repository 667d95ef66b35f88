"""Calibration: set format round trip, sharded statistics == single-device, resume, importance order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmp_jax import arch
from tmp_jax.calibration import calibrate, importance, load_calib, order_from_scores, write_calib
from tmp_jax.models.z_image import TINY
from tmp_jax.sharding import make_mesh, shard_module
from tmp_jax.tree import Tree

H = arch.get("zimage")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = write_calib(tmp_path_factory.mktemp("cal") / "set", H.synthetic_calib(TINY, 8, 4, 0), "zimage")
    model = H.init_random(TINY, jnp.float32, 0)
    return folder, model, calibrate(model, load_calib(folder, "zimage"))


def test_format_errors(tmp_path, setup):
    folder, _, _ = setup
    with pytest.raises(ValueError, match="calib.json: missing"):
        load_calib(tmp_path)
    with pytest.raises(ValueError, match="is for arch 'zimage', model is 'hunyuan'"):
        load_calib(folder, "hunyuan")


def test_sharded_stats_equal_single_device(setup):
    folder, _, ref = setup
    mesh = make_mesh("data:4,model:2", jax.devices()[:8])
    model = shard_module(H.init_random(TINY, jnp.float32, 0), mesh)
    cal = calibrate(model, load_calib(folder), mesh=mesh)
    assert cal.inputs[0]["arrays"]["img"].sharding.spec[0] == "data"
    for k, v in ref.stats.items():
        np.testing.assert_allclose(cal.stats[k], v, rtol=2e-5, atol=1e-6)
    for a, b in zip(cal.teacher, ref.teacher):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_resume_from_last_finished_batch(tmp_path, setup, monkeypatch):
    folder, model, ref = setup
    batches = load_calib(folder)
    calls = {"n": 0}
    real = H.collect_stats

    def boom(m, x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # interrupted during the 2nd micro-batch
        return real(m, x)

    import dataclasses

    monkeypatch.setattr(
        "tmp_jax.arch._REGISTRY",
        {**__import__("tmp_jax.arch").arch._REGISTRY, "zimage": dataclasses.replace(H, collect_stats=boom)},
    )
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, batches, out=tmp_path)
    monkeypatch.undo()
    seen = {"n": 0}

    def counting(m, x):
        seen["n"] += 1
        return real(m, x)

    monkeypatch.setattr(
        "tmp_jax.arch._REGISTRY",
        {**__import__("tmp_jax.arch").arch._REGISTRY, "zimage": dataclasses.replace(H, collect_stats=counting)},
    )
    cal = calibrate(model, batches, out=tmp_path)
    assert seen["n"] == 1  # only the unfinished micro-batch was recomputed
    for k, v in ref.stats.items():
        np.testing.assert_allclose(cal.stats[k], v, rtol=1e-6)


def test_importance_scores_and_order(setup):
    _, _, cal = setup
    tree = Tree(H.build_spec(TINY))
    units, blocks = importance(tree, cal.stats)
    assert set(units) == {(n.name, u.kind) for n in tree.spec.nodes() for u in n.units}
    assert all(np.all(v >= 0) for v in units.values())
    assert set(blocks) >= {"layers.0", "layers.1", "noise_refiner.0"}
    order = order_from_scores(units)
    k = ("layers.0.feed_forward", "ffn")
    assert units[k][order[k][0]] == units[k].max()
