"""The warm-up compile law (issue 19): programs grow with the SUM of the levels of each gene kind, not their
product, checked with JAX's own compile log.

A tiny HunyuanImage whose MoE sub-layers have several expert-count AND expert-width levels: the expert count
is runtime data in candidate evaluation (a router mask over the full expert axis), so the MoE program is
compiled once per expert width, not once per (count, width) pair. After the warm-up no candidate compiles
anything (every "Compiling ..." line of ``jax_log_compiles`` is counted, persistent-cache hits included).
The warm-up also compiles on several threads: the fitness afterwards equals a single-threaded problem's.
The masked evaluation mode (:mod:`tmp_jax.masked_eval`) goes further: ONE program, whatever the levels.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from contextlib import contextmanager

import jax
import numpy as np
import pytest
from problem_ref import random_problem

from tmp_jax import arch
from tmp_jax.models.hunyuan_image3 import TINY as H_TINY
from tmp_jax.problem import PruningProblem, warmup_genomes
from tmp_jax.tree import Tree

# 8 experts (top-2) of width 32, 2 layers; 4 fractions -> several count AND width levels per MoE node
CFG = H_TINY.replace(
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=8,
    moe_topk=2,
    moe_intermediate_size=32,
    num_shared_expert=1,
    vae={"latent_channels": 4},
)
LEVELS = {"fractions": [0.25, 0.5, 0.75, 1.0]}


@contextmanager
def compile_log():
    """Names of the programs JAX lowers for compilation inside the block (``jax_log_compiles``), in order."""
    names: list[str] = []

    class H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            m = re.match(r"Compiling (\S+) with global shapes", record.getMessage())
            if m:
                names.append(m.group(1))

    log = logging.getLogger("jax._src.interpreters.pxla")
    h, old, was = H(level=logging.WARNING), log.level, jax.config.jax_log_compiles
    log.addHandler(h)
    log.setLevel(logging.WARNING)
    # the global flag, not the jax.log_compiles context: that one is thread-local and the warm-up compiles on
    # worker threads
    jax.config.update("jax_log_compiles", True)
    try:
        yield names
    finally:
        jax.config.update("jax_log_compiles", was)
        log.removeHandler(h)
        log.setLevel(old)


def _problem(eval_mode: str = "sliced") -> PruningProblem:
    return random_problem("hunyuan", CFG, LEVELS, n=2, fingerprint="law", eval_mode=eval_mode)


@pytest.fixture(scope="module")
def prob() -> PruningProblem:
    return _problem()  # sliced: the per-width-level programs


def _levels(tree: Tree, kind: str) -> int:
    """The top level of the genes of ``kind`` (levels are 0..top; all layers share one ladder here)."""
    return max(int(tree.max_levels()[i]) for i, g in enumerate(tree.genes) if g.kind == kind)


def test_warmup_genomes_walk_shape_kinds_only():
    tree = Tree(arch.get("hunyuan").build_spec(CFG), LEVELS)
    ne, nw = _levels(tree, "experts"), _levels(tree, "expert_ffn")
    assert ne >= 3 and nw >= 3  # a real product to avoid
    product = warmup_genomes(tree)
    law = warmup_genomes(tree, arch.get("hunyuan").data_kinds)
    assert len(product) == (ne + 1) * (nw + 1)  # every (count, width) level pair
    assert len(law) == nw + 1
    ex = [i for i, g in enumerate(tree.genes) if g.kind == "experts"]
    mx = tree.max_levels()
    assert all(np.all(g[ex] == mx[ex]) for g in law)  # the data kind stays at full size


def test_compiles_grow_with_the_sum_of_levels(prob):
    tree = prob.tree
    ne, nw = _levels(tree, "experts"), _levels(tree, "expert_ffn")
    nkv = _levels(tree, "kv_groups")
    with compile_log() as names:
        prob.warmup(workers=2)
    per = Counter(names)
    # one MoE program per expert-width level (every level of this ladder is a width); one attention program
    # per KV-group level
    assert per["jit(_moe_cut)"] == nw + 1, per
    assert per["jit(_attn_cut)"] == nkv + 1, per
    assert (ne + 1) * (nw + 1) >= 4 * per["jit(_moe_cut)"]  # the product law: every (count, width) pair
    # afterwards: random candidates over every level of every gene compile nothing at all
    rng = np.random.default_rng(1)
    mx = tree.max_levels()
    gs = rng.integers(0, mx + 1, size=(12, len(mx)))
    for j, m in enumerate(mx):
        gs[: m + 1, j] = rng.permutation(m + 1)
    with compile_log() as after:
        f = prob.fitness(gs)
    assert after == [] and np.all(np.isfinite(f))
    # the expert count as a mask gives the materialised candidate's numbers (sliced experts, sliced router)
    np.testing.assert_allclose(f[:4], prob.fitness_materialized(gs[:4]), rtol=1e-5, atol=1e-9)


def test_masked_mode_compiles_one_program_whatever_the_levels(prob):
    masked = _problem("masked")
    with compile_log() as names:
        masked.warmup(workers=2)
    per = Counter(names)
    assert per["jit(masked_program)"] == 1, per  # one (task, input shape): one program, no per-level programs
    assert not any(n in per for n in ("jit(_moe_cut)", "jit(_attn_cut)")), per
    rng = np.random.default_rng(2)
    mx = masked.tree.max_levels()
    gs = rng.integers(0, mx + 1, size=(12, len(mx)))
    for j, m in enumerate(mx):
        gs[: m + 1, j] = rng.permutation(m + 1)
    with compile_log() as after:
        f = masked.fitness(gs)
    assert after == []
    np.testing.assert_allclose(f, prob.fitness(gs), rtol=1e-5, atol=1e-9)  # = the sliced evaluation
