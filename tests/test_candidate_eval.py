"""Candidate evaluation without materialisation (``hooks.forward_pruned``) == the materialised candidate.

For both architectures, a real :class:`PruningProblem` (random importance statistics, so the teacher is
permuted by a non-trivial order) evaluates random genomes covering every policy kind — block / layer drop,
sub-layer skip, head / KV-group widths, FFN widths, experts, expert widths — by slicing prefixes of the
permuted teacher inside the jitted sub-layers. Its fitness must equal the fitness of the materialised
candidate run through the blockwise forward (``PruningProblem.fitness_materialized``), and re-evaluating
compiles nothing. Tiny configs, CPU, one input shape per model.
"""

from __future__ import annotations

import numpy as np
import pytest
from problem_ref import random_problem

from tmp_jax import arch
from tmp_jax.materialize import prefix_shapes, slice_plan
from tmp_jax.models.hunyuan_image3 import TINY as H_TINY
from tmp_jax.models.z_image import TINY as Z_TINY
from tmp_jax.problem import PruningProblem
from tmp_jax.tree import Tree

# HunyuanImage: 4 KV groups of 2 query heads, 6 experts of width 16 (top-2), shared width 32.
H_CFG = H_TINY.replace(
    num_attention_heads=8,
    num_key_value_heads=4,
    num_experts=6,
    moe_topk=2,
    moe_intermediate_size=16,
    num_shared_expert=2,
    vae={"latent_channels": 4},
)
LEVELS = {"fractions": [0.5, 1.0]}  # two width levels per gene (plus skip / drop): few shapes to compile


def _problem(name: str, cfg, seed: int = 0) -> PruningProblem:
    # this file tests forward_pruned (tests/test_masked_eval.py: the masked mode)
    prob = random_problem(name, cfg, LEVELS, seed=seed, fingerprint=name, eval_mode="sliced")
    assert any(not np.array_equal(o, np.arange(len(o))) for o in prob.order.values())  # a real permutation
    return prob


def _genomes(tree: Tree, n: int, seed: int) -> np.ndarray:
    """Random genomes; every gene kind takes each of its levels in some genome (drops and skips included)."""
    rng = np.random.default_rng(seed)
    mx = tree.max_levels()
    gs = rng.integers(0, mx + 1, size=(max(n, int(mx.max()) + 1), len(mx)))
    for j, m in enumerate(mx):  # cover every level of every gene at least once
        gs[: m + 1, j] = rng.permutation(m + 1)
    return gs


@pytest.fixture(scope="module", params=["zimage", "hunyuan"])
def prob(request):
    return _problem(request.param, Z_TINY if request.param == "zimage" else H_CFG)


def test_prefix_shapes_match_slice_plan(prob):
    tree = prob.tree
    for g in _genomes(tree, 4, 1):
        a = tree.decode(g)
        plan, shapes = slice_plan(tree, a), prefix_shapes(tree, a)
        assert set(plan) == set(shapes)
        for path, cuts in plan.items():
            for axis, idx in cuts:
                np.testing.assert_array_equal(idx, np.arange(shapes[path][axis]))  # identity order: prefixes


def test_fitness_equals_materialised_candidate(prob):
    tree = prob.tree
    gs = _genomes(tree, 6, 2)
    kinds = {g.kind for g in tree.genes}
    assert kinds >= ({"keep", "heads", "ffn"} if prob.arch == "zimage" else {"keep", "kv_groups", "experts"})
    decoded = [tree.decode(g) for g in gs]
    assert any(a.dropped for a in decoded)  # drops / skips are exercised
    fast = prob.fitness(gs)
    slow = prob.fitness_materialized(gs)
    assert np.all(fast > 0) and np.all(np.isfinite(fast))
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-9)
    assert prob.fitness(tree.full_genome())[0] <= 1e-10
    # re-evaluating compiles nothing and gives the same numbers
    c = prob.compile_count()
    np.testing.assert_array_equal(prob.fitness(gs[::-1]), fast[::-1])
    assert prob.compile_count() == c


def test_warmup_genomes_cover_every_level_combination_per_node():
    from tmp_jax.problem import warmup_genomes

    tree = Tree(arch.get("hunyuan").build_spec(H_CFG), LEVELS)
    gs = np.stack(warmup_genomes(tree))
    mx = tree.max_levels()
    groups: dict[str, list[int]] = {}
    for i, g in enumerate(tree.genes):
        if g.kind != "keep":
            for n in dict.fromkeys((g.node, *g.members)):  # a tied gene lists its own node again
                groups.setdefault(n, []).append(i)
    moe = [ix for ix in groups.values() if len(ix) > 1]
    assert moe  # the MoE sub-layers carry two genes (experts, expert widths)
    for ix in groups.values():
        seen = {tuple(row) for row in gs[:, ix]}
        assert len(seen) == int(np.prod([mx[i] + 1 for i in ix]))  # the full Cartesian product
    keep = [i for i, g in enumerate(tree.genes) if g.kind == "keep"]
    assert np.all(gs[:, keep] == mx[keep])


def test_no_compiles_for_new_candidates_after_warmup(prob):
    prob.warmup()
    c = prob.compile_count()
    gs = _genomes(prob.tree, 8, 7)  # genomes the fixture has not evaluated
    assert np.all(np.isfinite(prob.fitness(gs)))
    assert prob.compile_count() == c
