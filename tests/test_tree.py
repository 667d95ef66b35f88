"""The pruning tree on Z-Image (and, with the same code path, HunyuanImage-3.0): accounting,
materialisation == masked full model (function-preserving permutation, for every architecture:
tests/test_contract.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmp_jax import arch
from tmp_jax.materialize import count_params, kept_units, materialize
from tmp_jax.models.z_image import TINY, TURBO
from tmp_jax.tree import Tree, parse_count

ZCFG = TINY.replace(n_layers=3, n_heads=4, axes_dims=(4, 6, 6))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def ztree():
    return Tree(arch.get("zimage").build_spec(ZCFG))


@pytest.fixture(scope="module")
def zmodel():
    return arch.get("zimage").init_random(ZCFG, jnp.float32, 0)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = [rng.standard_normal((16, 1, 8, 8)).astype(np.float32) for _ in range(2)]
    cap = [rng.standard_normal((n, 32)).astype(np.float32) for n in (5, 12)]
    return x, np.array([0.3, 0.8], np.float32), cap


def _zimage_masked(model, tree, a, order):
    """Oracle: the full model with pruned units zeroed (exact-emulation rules from the reference notes)."""
    m = nnx.clone(model)
    kept = kept_units(tree, a, order)
    cfg = m.config
    hd, d = cfg.head_dim, cfg.dim
    for stack in ("noise_refiner", "context_refiner", "layers"):
        for b in cfg.stack(stack):
            blk = getattr(m, stack)[b.index]
            name = f"{stack}.{b.index}"
            if name in a.dropped:
                if blk.adaLN_modulation is not None:  # zero the tanh gates
                    lin = blk.adaLN_modulation[0]
                    for c in (1, 3):
                        lin.kernel[...] = lin.kernel[...].at[:, c * d : (c + 1) * d].set(0)
                        lin.bias[...] = lin.bias[...].at[c * d : (c + 1) * d].set(0)
                else:
                    blk.attention_norm2.weight[...] = jnp.zeros(d)
                    blk.ffn_norm2.weight[...] = jnp.zeros(d)
                continue
            if f"{name}.attention" in a.dropped:
                blk.attention_norm2.weight[...] = jnp.zeros(d)
            else:
                keep = kept[(f"{name}.attention", "heads")]
                o = blk.attention.to_out[0].kernel
                for h in set(range(cfg.n_heads)) - set(keep.tolist()):
                    o[...] = o[...].at[h * hd : (h + 1) * hd].set(0)
            if f"{name}.feed_forward" in a.dropped:
                blk.ffn_norm2.weight[...] = jnp.zeros(d)
            else:
                keep = kept[(f"{name}.feed_forward", "ffn")]
                w2 = blk.feed_forward.w2.kernel
                drop = np.setdiff1d(np.arange(cfg.ffn_dim), keep)
                w2[...] = w2[...].at[drop].set(0)
    return m


def test_tree_structure_and_full_count(ztree, zmodel):
    kinds = {n.kind for n in ztree.spec.nodes()}
    assert kinds == {"model", "stage", "block", "attn", "ffn"}
    assert ztree.full["params"] == count_params(zmodel)
    # gene per block keep + per sub-layer width (incl. level 0 = skip)
    assert ztree.n_genes == 5 * 3
    assert ztree.floor()["params"] < ztree.full["params"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_materialized_equals_masked_full_model(ztree, zmodel, seed):
    rng = np.random.default_rng(seed)
    genome = rng.integers(0, ztree.max_levels() + 1)
    if seed == 0:
        genome = ztree.max_levels().copy()
        genome[[0, 4]] = 0  # drop a whole block and skip a sub-layer elsewhere
    a = ztree.decode(genome)
    # a random importance order, so kept sets are not prefixes in original numbering
    order = {(n.name, u.kind): rng.permutation(u.n) for n in ztree.spec.nodes() for u in n.units}
    small = materialize(zmodel, ztree, a, order)
    assert count_params(small) == ztree.count(a)["params"]
    x, t, cap = _inputs(seed)
    want = _zimage_masked(zmodel, ztree, a, order)(x, t, cap)
    for g, w in zip(small(x, t, cap), want):
        assert rel(g, w) <= 1e-5


def test_turbo_accounting_matches_reference():
    tree = Tree(arch.get("zimage").build_spec(TURBO))
    assert tree.full["params"] == 6_154_908_736
    g = tree.full_genome()
    names = [x.name for x in tree.genes]
    # drop 12 main layers -> 3.984B (reference notes)
    for i in range(18, 30):
        g[names.index(f"layers.{i}:keep")] = 0
    assert round(tree.count(tree.decode(g))["params"] / 1e9, 3) == 3.984
    # FFN 10240 -> 5120 everywhere -> 4.150B
    g = tree.full_genome()
    for i, gene in enumerate(tree.genes):
        if gene.kind == "ffn":
            g[i] = gene.counts.index(5120)
    assert round(tree.count(tree.decode(g))["params"] / 1e9, 3) == 4.150
    assert all(c % 128 == 0 for gene in tree.genes if gene.kind == "ffn" for c in gene.counts)


def test_parse_budget():
    assert parse_count("20B", 10**11) == 20_000_000_000
    assert parse_count("350M", 10**11) == 350_000_000
    assert parse_count("1.5e6", 10**11) == 1_500_000
    assert parse_count("25%", 1000) == 250
    assert parse_count("0.25", 1000) == 250
    with pytest.raises(ValueError, match="expected e.g. 20B"):
        parse_count("lots", 1000)


def test_blockwise_forward_equals_dense_forward(zmodel):
    """The candidate evaluator (sub-layers compiled separately) computes the same function."""
    from tmp_jax.models.z_image import runner

    inputs = runner.prepare_batch(ZCFG, arch.get("zimage").synthetic_calib(ZCFG, 2, 2, 0)[0])
    want = zmodel.forward_padded(inputs["arrays"], jnp.asarray(inputs["t"]), inputs["patch_key"])
    got = runner.forward_blockwise(zmodel, inputs)
    assert rel(np.asarray(got)[inputs["mask"]], np.asarray(want)[inputs["mask"]]) <= 1e-6
