"""The pruning tree on HunyuanImage-3.0 through the SAME generic code as Z-Image (tree, materialise,
permute, calibration, problem): accounting, materialisation == masked full model for every policy kind
(layer drop, tied KV groups, experts, expert widths), full-size counts, sharded statistics == single-device,
and a PruningProblem that compiles nothing new on re-evaluation (function-preserving permutation and a pruned
checkpoint detected and loaded back, for every architecture: tests/test_contract.py).

Tiny and CPU-only; every model runs through the runner's blockwise functions (compiled once per sub-layer
shape and shared by all tests) on ONE input batch shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_hunyuan_shapes import BACKBONE, FINAL_LAYER, PATCH_EMBED, ROUTED, TIMESTEP

from tmp_jax import arch
from tmp_jax.calibration import calibrate, importance, load_calib, write_calib
from tmp_jax.materialize import count_params, materialize
from tmp_jax.models.hunyuan_image3 import FULL, TINY, HunyuanImage3Config
from tmp_jax.models.hunyuan_image3.runner import collect_stats, forward_blockwise
from tmp_jax.models.hunyuan_image3.structure import masked_model
from tmp_jax.sharding import make_mesh, shard_module
from tmp_jax.tree import Tree

H = arch.get("hunyuan")
# 4 KV groups of 2 query heads; 6 experts of width 16, top-2, 2 shared experts (shared width 32), 4 latent
# channels. Both layers have the same shape so they share compiled functions (the per-layer case is covered
# abstractly in test_heterogeneous_accounting and numerically by the pruned models themselves).
CFG = TINY.replace(
    num_attention_heads=8,
    num_key_value_heads=4,
    num_experts=6,
    moe_topk=2,
    moe_intermediate_size=16,
    num_shared_expert=2,
    vae={"latent_channels": 4},
)
# Per-layer MoE as pruning leaves it (layer 0 top-1 over 4 experts, layer 1 top-2 over 6 narrower experts).
HETERO = CFG.replace(num_experts=(4, 6), moe_topk=(1, 2), moe_intermediate_size=(32, 16), num_shared_expert=(1, 2))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_order(tree, rng):
    return {(n.name, u.kind): rng.permutation(u.n) for n in tree.spec.nodes() for u in n.units}


@pytest.fixture(scope="module")
def tree():
    return Tree(H.build_spec(CFG))


@pytest.fixture(scope="module")
def model():
    return H.init_random(CFG, jnp.float32, 0)


@pytest.fixture(scope="module")
def calib_set(tmp_path_factory):
    # 2 micro-batches of 4 rows, one sequence length: every forward below shares its compiled functions.
    folder = write_calib(tmp_path_factory.mktemp("hcal") / "set", H.synthetic_calib(CFG, 8, 4, 0), "hunyuan")
    return load_calib(folder, "hunyuan")


@pytest.fixture(scope="module")
def inputs(calib_set):
    return H.prepare_batch(CFG, calib_set[0])


@pytest.fixture(scope="module")
def single(model, calib_set):
    return calibrate(model, calib_set)


def test_tree_structure_and_full_count(tree, model, calib_set):
    kinds = {n.kind for n in tree.spec.nodes()}
    assert kinds == {"model", "stage", "block", "attn", "moe"}
    assert tree.full["params"] == count_params(model)
    names = [g.name for g in tree.genes]
    assert names == [
        "model.layers.0:keep",
        "model.layers.0.mlp:experts",
        "model.layers.0.mlp:expert_ffn",
        "model.layers.1:keep",
        "model.layers.1.mlp:experts",
        "model.layers.1.mlp:expert_ffn",
        "tie:kv_groups",
    ]
    genes = {g.name: g for g in tree.genes}
    assert genes["tie:kv_groups"].members == ("model.layers.0.self_attn", "model.layers.1.self_attn")
    assert genes["tie:kv_groups"].counts == (1, 2, 3, 4)
    for i in range(2):
        assert genes[f"model.layers.{i}.mlp:experts"].counts == (2, 3, 4, 5, 6)  # >= top-2
        # expert widths divide the shared width (32) so the shared MLP stays intact
        assert genes[f"model.layers.{i}.mlp:expert_ffn"].counts == (1, 2, 4, 8, 16)
    # active per token: top-k of the experts' weights (and router columns)
    assert tree.full["active"] < tree.full["params"]
    # the synthetic set follows the calibration format and the T2I layout
    b = calib_set[0]
    assert b["input_ids"].dtype == np.int32 and b["valid_lengths"].dtype == np.int32
    assert b["latents"].shape == (4, 4, 4, 4) and np.all((b["timestep"] >= 0) & (b["timestep"] <= 1000))
    assert len({x["input_ids"].shape for x in calib_set}) == 1
    assert np.any(b["valid_lengths"] < b["input_ids"].shape[1])  # right padding is exercised


def test_heterogeneous_accounting():
    """Per-layer MoE shapes (abstract, nothing compiled): exact counts of the full and of pruned models."""
    tree = Tree(H.build_spec(HETERO))
    assert tree.full["params"] == count_params(H.init_abstract(HETERO))
    genes = {g.name: g for g in tree.genes}
    assert genes["model.layers.0.mlp:experts"].counts == (1, 2, 3, 4)  # >= top-1
    assert genes["model.layers.0.mlp:expert_ffn"].counts == (1, 2, 4, 8, 16, 32)
    assert genes["model.layers.1.mlp:expert_ffn"].counts == (1, 2, 4, 8, 16)
    rng = np.random.default_rng(0)
    for _ in range(4):
        a = tree.decode(rng.integers(0, tree.max_levels() + 1))
        cfg = H.pruned_config(HETERO, tree, a)
        assert count_params(H.init_abstract(cfg)) == tree.count(a)["params"]
        for j, i in enumerate(cfg.layers_kept):
            assert cfg.shared_intermediate_size(j) == 32 and cfg.moe_topk[j] == HETERO.moe_topk[i]


def test_blockwise_equals_model_and_stats_shapes(tree, model, inputs, single):
    """forward_blockwise == the model's own forward (collect_stats runs ``model(...)``); every unit group
    and every droppable layer got its statistic, and padding does not leak into them."""
    y, stats = collect_stats(model, inputs)
    assert rel(forward_blockwise(model, inputs), y) <= 1e-6
    units, blocks = importance(tree, single.stats)
    assert set(units) == {(n.name, u.kind) for n in tree.spec.nodes() for u in n.units}
    assert all(np.all(v > 0) for v in units.values())
    assert set(blocks) == {"model.layers.0", "model.layers.1"}
    # padding is excluded: other token ids in the padded slots change nothing (same shapes: no compile)
    ids = inputs["input_ids"].copy()
    padded = np.arange(ids.shape[1])[None, :] >= inputs["valid_lengths"][:, None]
    assert padded.any()
    ids[padded] = np.random.default_rng(0).integers(3, 100, int(padded.sum()))
    y_pad, stats_pad = collect_stats(model, {**inputs, "input_ids": ids})
    np.testing.assert_allclose(y_pad, y, rtol=1e-6, atol=1e-6)
    for k, v in stats.items():
        np.testing.assert_allclose(stats_pad[k], v, rtol=1e-6, err_msg=str(k))


CASES = ["drop_layer", "all_policies", "random"]


def case_genome(tree, case):
    names = [g.name for g in tree.genes]
    genome = tree.full_genome()
    if case in ("drop_layer", "all_policies"):  # 1 of 4 KV groups, 3 of 6 experts, 8 of 16 channels
        genome[names.index("tie:kv_groups")] = 0
        for i in range(2):
            genome[names.index(f"model.layers.{i}.mlp:experts")] = 1
            genome[names.index(f"model.layers.{i}.mlp:expert_ffn")] = 3
        if case == "drop_layer":  # ... and layer 0 dropped (one pruned layer shape for both cases)
            genome[names.index("model.layers.0:keep")] = 0
    else:
        genome = np.random.default_rng(5).integers(0, tree.max_levels() + 1)
    return genome


@pytest.mark.parametrize("case", CASES)
def test_materialized_equals_masked_full_model(tree, model, inputs, case):
    rng = np.random.default_rng(CASES.index(case))
    genome = case_genome(tree, case)
    a = tree.decode(genome)
    order = random_order(tree, rng)  # kept sets are not prefixes in the original numbering
    small = materialize(model, tree, a, order)
    assert count_params(small) == tree.count(a)["params"]
    cfg = small.config
    assert HunyuanImage3Config.from_hf_config(cfg.to_hf_config()) == cfg
    assert cfg.layers_kept == tuple(i for i in range(2) if f"model.layers.{i}" not in a.dropped)
    for j in range(cfg.num_hidden_layers):  # the shared MLP keeps its width
        assert cfg.shared_intermediate_size(j) == 32
    want = forward_blockwise(masked_model(model, tree, a, order), inputs)
    assert rel(forward_blockwise(small, inputs), want) <= 1e-5


def test_full_size_accounting():
    """The released 80B config: exact total, top-8 active count, and the reference's uniform pruning."""
    tree = Tree(H.build_spec(FULL))
    heads = PATCH_EMBED + FINAL_LAYER + 3 * TIMESTEP
    assert tree.full["params"] == BACKBONE + heads
    # active = everything but the routed experts outside the top-8 (the router scores all 64 for every token)
    assert tree.full["active"] == BACKBONE - ROUTED + ROUTED // 8 + heads
    names = [g.name for g in tree.genes]
    assert len(names) == 32 * 3 + 1 and names[-1] == "tie:kv_groups"
    g = tree.full_genome()
    for i, gene in enumerate(tree.genes):
        if gene.kind == "experts":
            assert gene.counts == tuple(range(8, 65, 8))
            g[i] = gene.counts.index(16)
        if gene.kind == "expert_ffn":
            assert gene.counts == (128, 256, 384, 512, 768, 1024, 1536, 3072)
    a = tree.decode(g)
    assert round((tree.count(a)["params"] - heads) / 1e9, 2) == 22.97
    cfg = H.pruned_config(FULL, tree, a)
    assert cfg.num_experts == (16,) * 32 and cfg.moe_topk == (8,) * 32 and cfg.layers_kept == tuple(range(32))
    # expert width 768 -> 4 shared experts of 768: the shared MLP keeps 3072
    g[[i for i, x in enumerate(tree.genes) if x.kind == "expert_ffn"]] = 4
    g[names.index("tie:kv_groups")] = 3  # 4 of 8 KV groups -> 16 heads
    g[names.index("model.layers.5:keep")] = 0
    cfg = H.pruned_config(FULL, tree, tree.decode(g))
    assert cfg.moe_intermediate_size == (768,) * 31 and cfg.num_shared_expert == (4,) * 31
    assert (cfg.num_key_value_heads, cfg.num_attention_heads, cfg.num_hidden_layers) == (4, 16, 31)
    assert 5 not in cfg.layers_kept and cfg.to_hf_config()["layers_kept"][5] == 6


def test_sharded_stats_equal_single_device(single, calib_set):
    mesh = make_mesh("data:2,expert:2,model:2", jax.devices()[:8])
    m = shard_module(H.init_random(CFG, jnp.float32, 0), mesh)
    assert m.model.layers[1].mlp.experts.up_proj[...].sharding.spec[0] == "expert"
    cal = calibrate(m, calib_set, mesh=mesh)
    assert cal.inputs[0]["input_ids"].sharding.spec[0] == "data"
    assert set(cal.stats) == set(single.stats)
    for k, v in single.stats.items():
        np.testing.assert_allclose(cal.stats[k], v, rtol=2e-5, atol=1e-6, err_msg=str(k))
    for a, b in zip(cal.teacher, single.teacher):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_problem_full_fitness_zero_and_no_recompile(model, single, tree):
    from tmp_jax.problem import PruningProblem

    prob = PruningProblem(model, single, source={"path": None, "fingerprint": "tiny", "config": {}})
    assert prob.arch == "hunyuan" and prob.tree.n_genes == tree.n_genes
    full = prob.tree.full_genome()
    assert prob.fitness(full)[0] <= 1e-10
    pop = np.stack([full, *(case_genome(prob.tree, c) for c in CASES)])
    f1 = prob.fitness(pop)
    c = prob.compile_count()
    f2 = prob.fitness(pop)
    assert prob.compile_count() == c
    np.testing.assert_array_equal(f1, f2)
    assert np.all(f1[1:] > f1[0])
