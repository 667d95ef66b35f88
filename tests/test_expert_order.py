"""One channel order per expert (``Units.batch``): each HunyuanImage expert keeps its own hidden channels.

* Planted: every expert has its own half of dead channels (zero ``down_proj`` rows, a different half per
  expert). At half the expert width the per-expert order drops exactly them: the pruned model equals the
  teacher, with and without compensation. One order shared by all experts (what a plan from before
  per-expert orders says) cannot, and loses clearly.
* The per-row OBS (one greedy pass per expert) on the device equals the host path's, and each row equals
  the single-Gram OBS of that expert; its snapshots are each expert's own re-fit.
* Plans: per-expert kept lists round-trip through ``kept_first_order``; a flat list for a per-expert group
  means the same channels in every expert; malformed lists are one-line errors naming the group.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from test_candidate_eval import H_CFG  # 4 KV groups of 2 heads, 6 experts of width 16, top-2

from tmp_jax import arch
from tmp_jax.calibration import calibrate
from tmp_jax.compensate import CompensationConfig, obs_order, obs_order_rows, refit
from tmp_jax.materialize import kept_first_order, kept_units
from tmp_jax.problem import PruningProblem
from tmp_jax.tree import Tree

LEVELS = {"fractions": [0.5, 1.0]}
EXPERTS, WIDTH = H_CFG.num_experts[0], H_CFG.moe_intermediate_size[0]


def _dead_channels() -> np.ndarray:
    """Per expert, the half of its channels that is dead (a different half for every expert)."""
    rng = np.random.default_rng(7)
    return np.stack([np.sort(rng.permutation(WIDTH)[: WIDTH // 2]) for _ in range(EXPERTS)])  # [E, I/2]


@pytest.fixture(scope="module")
def planted():
    hooks = arch.get("hunyuan")
    model = hooks.init_random(H_CFG, jnp.float32, 0)
    dead = _dead_channels()
    for layer in model.model.layers:
        down = layer.mlp.experts.down_proj  # [E, I, H]
        a = np.array(down[...])
        for e in range(EXPERTS):
            a[e, dead[e]] = 0.0
        down[...] = jnp.asarray(a)
    cal = calibrate(model, hooks.synthetic_calib(H_CFG, 8, 4, 0), grams=True)
    src = {"path": None, "fingerprint": "planted", "config": {}}
    probs = {
        c: PruningProblem(
            model,
            cal,
            source=src,
            levels=LEVELS,
            compensation=CompensationConfig(damp=1e-6) if c else None,
            eval_mode="sliced",
        )
        for c in (False, True)
    }
    return model, dead, probs


def _half_expert_width(tree: Tree) -> np.ndarray:
    g = tree.full_genome()
    for i, gene in enumerate(tree.genes):
        if gene.kind == "expert_ffn":
            g[i] = gene.counts.index(WIDTH // 2)
    return g


@pytest.mark.parametrize("compensate", [False, True])
def test_each_expert_drops_its_own_dead_channels(planted, compensate):
    _, dead, probs = planted
    prob = probs[compensate]
    tree = prob.tree
    g = _half_expert_width(tree)
    kept = kept_units(tree, tree.decode(g), prob.order)
    for key, ids in kept.items():
        if key[1] == "expert_ffn":
            assert ids.shape == (EXPERTS, WIDTH // 2)
            for e in range(EXPERTS):  # exactly the live half of every expert
                np.testing.assert_array_equal(ids[e], np.setdiff1d(np.arange(WIDTH), dead[e]))
    err = prob.fitness(g[None])[0]
    assert err < 1e-9, err
    # the same cut with ONE channel order for every expert (a flat kept list, the old plan format)
    plan = {"policy": {"dropped": [], "keep": {}, "kept_units": {}}}
    a = tree.decode(g)
    plan["policy"]["keep"] = {f"{n}/{k}": int(v) for (n, k), v in a.keep.items()}
    for (n, k), ids in kept.items():
        if k == "expert_ffn":  # the channels most experts keep: the best one set can do
            live = np.zeros(WIDTH)
            np.add.at(live, ids.ravel(), 1.0)
            ids = np.sort(np.argsort(-live, kind="stable")[: WIDTH // 2])
        plan["policy"]["kept_units"][f"{n}/{k}"] = np.asarray(ids).tolist()
    shared = prob.plan_fitness(plan, prob.compensation)
    per_expert = prob.plan_fitness({**plan, "policy": {**plan["policy"], "kept_units": _json(kept)}}, prob.compensation)
    assert per_expert < 1e-9 and shared > 1e-3, (per_expert, shared)


def _json(kept: dict) -> dict:
    return {f"{n}/{k}": np.asarray(v).tolist() for (n, k), v in kept.items()}


def test_per_expert_scores_and_refits_are_the_experts_own(planted):
    _, dead, probs = planted
    prob = probs[True]
    for (_, kind), s in prob.importance.items():
        if kind == "expert_ffn":
            assert s.shape == (EXPERTS, WIDTH)
            for e in range(EXPERTS):  # a dead channel costs nothing to remove
                assert np.all(s[e, dead[e]] <= 1e-9 * max(1.0, s[e].max()))
    # the precomputed re-fit at half width: each expert's kept prefix is its live half, which needs no change
    # (the dead rows carried nothing), and the rows past the prefix are zero
    for layer_i, layer in enumerate(prob.model.model.layers):
        r = np.asarray(prob.refits[(("model", "layers", layer_i, "mlp", "experts", "down_proj"), WIDTH // 2)])
        down = np.asarray(layer.mlp.experts.down_proj[...])  # the permuted teacher's: live rows first per expert
        np.testing.assert_allclose(r[:, : WIDTH // 2], down[:, : WIDTH // 2], rtol=1e-4, atol=1e-6)
        assert not r[:, WIDTH // 2 :].any() and not down[:, WIDTH // 2 :].any()


@pytest.mark.parametrize("group", [1, 2])
def test_rows_obs_device_equals_host_and_single_expert(monkeypatch, group):
    import tmp_jax.compensate as cm

    rng = np.random.default_rng(3)
    b, n = 3, 12
    xs = [rng.standard_normal((150, n * group)) * rng.uniform(0.2, 3.0, n * group) for _ in range(b)]
    g = np.stack([x.T @ x for x in xs])
    w = rng.standard_normal((b, n * group, 4))
    o_host, s_host, sn_host = obs_order_rows(g, w, group, 1, 1e-3, chunk=4, snapshots=(5,))
    assert o_host.shape == s_host.shape == (b, n)
    assert len({tuple(r) for r in o_host}) > 1  # the experts' orders differ
    for e in range(b):  # row e is the single-Gram OBS of expert e alone
        o_e, s_e = obs_order(g[e], w[e], group, 0, 1e-3, chunk=4)
        np.testing.assert_array_equal(o_host[e], o_e)
        np.testing.assert_allclose(s_host[e], s_e, rtol=1e-10)
    # the snapshot at 5 holds each expert's own re-fit of its own first 5 units (refit with per-row ids)
    want = refit(g, w, o_host[:, :5], group, 1, 1e-3)  # [B, 5*group, D]
    el = (o_host[:, :5, None] * group + np.arange(group)).reshape(b, -1)
    np.testing.assert_allclose(np.take_along_axis(sn_host[5], el[:, :, None], 1), want, rtol=1e-8, atol=1e-10)
    monkeypatch.setattr(cm, "ACCELERATE_ABOVE", 0)  # the vmapped device path, float32
    o_dev, s_dev, sn_dev = obs_order_rows(g, w, group, 1, 1e-3, chunk=4, snapshots=(5,))
    assert o_dev.shape == (b, n)
    for e in range(b):  # the same removal error per expert (orders may swap near-ties)
        np.testing.assert_allclose(s_dev[e][o_dev[e][5:]].sum(), s_host[e][o_host[e][5:]].sum(), rtol=2e-2)
    el = (o_dev[:, :5, None] * group + np.arange(group)).reshape(b, -1)
    r_dev = refit(g, w, o_dev[:, :5], group, 1, 1e-3)
    np.testing.assert_allclose(np.take_along_axis(sn_dev[5], el[:, :, None], 1), r_dev, rtol=1e-3, atol=1e-4)


def test_kept_first_order_per_expert_and_errors():
    tree = Tree(arch.get("hunyuan").build_spec(H_CFG), LEVELS)
    key = "model.layers.0.mlp/expert_ffn"
    rows = [[e, (e + 3) % WIDTH] for e in range(EXPERTS)]
    o = kept_first_order(tree, {key: rows})[("model.layers.0.mlp", "expert_ffn")]
    assert o.shape == (EXPERTS, WIDTH)
    for e in range(EXPERTS):
        assert list(o[e, :2]) == rows[e] and sorted(o[e]) == list(range(WIDTH))
    flat = kept_first_order(tree, {key: [1, 2]})[("model.layers.0.mlp", "expert_ffn")]
    assert flat.shape == (WIDTH,)  # the same channels in every expert (plans before per-expert orders)
    with pytest.raises(ValueError, match="expert_ffn.*rows, expected one per experts"):
        kept_first_order(tree, {key: rows[:-1]})
    with pytest.raises(ValueError, match="expert_ffn.*repeated"):
        kept_first_order(tree, {key: [[1, 1]] * EXPERTS})
    with pytest.raises(ValueError, match="expert_ffn.*outside"):
        kept_first_order(tree, {key: [[0, WIDTH]] * EXPERTS})
    with pytest.raises(ValueError, match="kv_groups.*flat list"):
        kept_first_order(tree, {"model.layers.0.self_attn/kv_groups": [[0, 1]]})


def test_export_of_per_expert_plan_equals_materialised(planted, tmp_path):
    """Covered with the official layout and nemo in tests/test_export_hunyuan.py / test_compensate_export.py;
    here: the materialised per-expert model keeps each expert's live channels (no dead row survives)."""
    from tmp_jax.materialize import materialize

    model, dead, probs = planted
    prob = probs[False]
    a = prob.tree.decode(_half_expert_width(prob.tree))
    small = materialize(model, prob.tree, a, prob.order)
    for layer in small.model.layers:
        down = np.asarray(layer.mlp.experts.down_proj[...])  # [E, I/2, H]
        assert down.shape[1] == WIDTH // 2
        assert np.all(np.abs(down).sum(-1) > 0)  # every kept channel of every expert is live


@pytest.mark.parametrize("compensate", [False, True])
def test_plan_fitness_without_the_unpermuted_teacher(planted, compensate):
    """keep_teacher=False (the search CLI: one permuted copy of the teacher, half the memory) scores a plan
    exactly as the problem that keeps the teacher: the plan's per-expert units mapped into the permuted numbering."""
    from flax import nnx

    model, _, probs = planted
    prob = probs[compensate]
    lean = PruningProblem(
        nnx.clone(model),
        prob.calib,
        source=prob.source,
        levels=LEVELS,
        compensation=CompensationConfig(damp=1e-6) if compensate else None,
        eval_mode="sliced",
        keep_teacher=False,
    )
    assert lean.teacher_model is None
    rng = np.random.default_rng(0)
    tree = prob.tree
    for _ in range(2):
        g = rng.integers(0, tree.max_levels() + 1)
        a = tree.decode(g)
        plan = {
            "policy": {
                "dropped": sorted(a.dropped),
                "keep": {f"{n}/{k}": int(v) for (n, k), v in a.keep.items()},
                "kept_units": _json(kept_units(tree, a, prob.order)),
            }
        }
        want = prob.plan_fitness(plan, prob.compensation)
        np.testing.assert_allclose(lean.plan_fitness(plan, lean.compensation), want, rtol=1e-5)
        np.testing.assert_allclose(lean.fitness(g[None])[0], prob.fitness(g[None])[0], rtol=1e-5)
