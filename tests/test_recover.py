"""Recoverability (``--recover-steps``, issue 17 item 3): the final candidates are ranked after distillation.

* Engine: each budget's ``recover_top`` best distinct full-fidelity candidates are distilled, the best
  RECOVERED one becomes the plan (here the worst pruned one of them, by construction), and the plan records
  every candidate's pruned and recovered fitness. A problem that cannot distil is a one-line error.
* Problem: a few in-memory distillation steps of a cut embedded DiT lower its teacher-output error; its sampler
  rollout (``--rollout-steps``) ends away from the teacher's latents, the uncut one on them.
* Engine, rollout: the candidate whose rollout ends closest to the teacher's wins, recorded in the plan.
* Engine, reconstruction (``--reconstruct-steps``): the candidate with the least error after its block-by-block
  re-fit wins; with ``--recover-steps`` too, the recovered ranking (applied last) picks the plan; the candidates
  are the best of each structure first. Problem: the re-fit lowers a cut DiT's fitness and leaves the teacher as
  it was.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_search import ZCFG, FakeProblem, cfg

from search.budget import SearchError
from search.engine import run
from tmp_jax import arch
from tmp_jax.tree import Tree


class RecoveringProblem(FakeProblem):
    """Recovery reverses the ranking: the worse a candidate is pruned, the better it recovers."""

    def __init__(self, tree):
        super().__init__(tree)
        self.recovered: list[tuple[tuple[int, ...], int]] = []

    def recovered_fitness(self, genome, steps, calib=None, seed=0):
        self.recovered.append((tuple(int(x) for x in genome), steps))
        return -float(self._err(np.asarray(genome)))


def test_best_recovered_candidate_wins(tmp_path):
    tree = Tree(arch.get("zimage").build_spec(ZCFG))
    prob = RecoveringProblem(tree)
    res = run(cfg(tmp_path, recover_steps=7, recover_top=3), prob)
    plan = res.plans[0]
    rec = plan["recovery"]
    assert rec["steps"] == 7 and len(rec["candidates"]) == 3 and len(prob.recovered) == 3
    assert all(steps == 7 for _, steps in prob.recovered)
    fits = [c["fitness"] for c in rec["candidates"]]
    assert fits == sorted(fits) and len({tuple(c["genome"]) for c in rec["candidates"]}) == 3
    best = min(rec["candidates"], key=lambda c: c["recovered_fitness"])
    assert best is rec["candidates"][-1]  # the worst pruned of the three recovers best here
    assert plan["genome"]["levels"] == best["genome"] and plan["fitness"]["value"] == pytest.approx(best["fitness"])
    assert plan["search"]["recover"] == {"steps": 7, "top": 3}


def test_recover_needs_a_problem_that_distils(tmp_path):
    tree = Tree(arch.get("zimage").build_spec(ZCFG))
    with pytest.raises(SearchError, match="--recover-steps needs a problem"):
        run(cfg(tmp_path, recover_steps=3), FakeProblem(tree))


def test_a_few_steps_lower_the_error_of_a_cut_dit():
    from tmp_jax.calibration import calibrate
    from tmp_jax.problem import PruningProblem, _load_model
    from tmp_jax.trajectory import trajectory_calib

    model, _, _ = _load_model("zimage-fmnist", "fp32")
    cal = calibrate(model, trajectory_calib(model, n_labels=2, steps=3, pairs_per_batch=3, seed=5))
    prob = PruningProblem(
        model,
        cal,
        source={"path": None, "fingerprint": "r", "config": {}},
        levels={"fractions": [0.5, 1.0]},
        eval_mode="sliced",
    )
    g = prob.tree.full_genome()
    for i, gene in enumerate(prob.tree.genes):
        if gene.kind == "ffn":
            g[i] = 1 if gene.counts[0] == 0 else 0  # every FFN at half width
    pruned = float(prob.fitness(g[None])[0])
    recovered = prob.recovered_fitness(g, 12)
    assert np.isfinite(recovered) and recovered < pruned, (recovered, pruned)
    rebuilt = prob.reconstructed_fitness(g, 6)
    assert np.isfinite(rebuilt) and rebuilt < 0.95 * pruned, (rebuilt, pruned)
    assert prob.fitness(g[None])[0] == pytest.approx(pruned)  # the re-fit changed a copy, not the teacher
    # the rollout of the same cut: a sampler run from the teacher's noise ends away from the teacher's latents,
    # the uncut genome ends on them (the permuted teacher is the same function)
    err = prob.rollout_fitness(g, 2, n=4, seed=3)
    assert np.isfinite(err) and err > 1e-4, err
    assert prob.rollout_fitness(prob.tree.full_genome(), 2, n=4, seed=3) < 1e-8


class RollingProblem(FakeProblem):
    """The rollout reverses the ranking: the worse a candidate is pruned, the closer its samples end."""

    def __init__(self, tree):
        super().__init__(tree)
        self.rolled: list[tuple[int, int, int]] = []

    def rollout_fitness(self, genome, steps, n=40, seed=0):
        self.rolled.append((steps, n, seed))
        return 1.0 / (1.0 + float(self._err(np.asarray(genome))))


def test_rollout_picks_the_candidate_whose_samples_end_closest(tmp_path, capsys):
    tree = Tree(arch.get("zimage").build_spec(ZCFG))
    prob = RollingProblem(tree)
    res = run(cfg(tmp_path, rollout_steps=3, rollout_top=3, rollout_samples=5, seed=2, summary=True), prob)
    plan = res.plans[0]
    rol = plan["rollout"]
    assert rol["steps"] == 3 and rol["samples"] == 5 and len(rol["candidates"]) == 3
    assert prob.rolled == [(3, 5, 2)] * 3
    best = min(rol["candidates"], key=lambda c: c["rollout_error"])
    assert best is rol["candidates"][-1] and plan["genome"]["levels"] == best["genome"]
    assert plan["search"]["rollout"] == {"steps": 3, "top": 3, "samples": 5}
    assert "rollout error" in capsys.readouterr().out
    with pytest.raises(SearchError, match="--rollout-steps needs a problem"):
        run(cfg(tmp_path / "b", rollout_steps=3), FakeProblem(tree))


class RebuildingProblem(RollingProblem, RecoveringProblem):
    """Reconstruction reverses the ranking too; recovery (when also asked) prefers the best pruned one."""

    def __init__(self, tree):
        super().__init__(tree)
        self.rebuilt: list[int] = []

    def reconstructed_fitness(self, genome, steps, progress=False):
        self.rebuilt.append(steps)
        return 1.0 / (1.0 + float(self._err(np.asarray(genome))))

    def recovered_fitness(self, genome, steps, calib=None, seed=0):
        return float(self._err(np.asarray(genome)))


def test_reconstruction_picks_the_candidate_it_refits_best(tmp_path, capsys):
    tree = Tree(arch.get("zimage").build_spec(ZCFG))
    prob = RebuildingProblem(tree)
    res = run(cfg(tmp_path, reconstruct_steps=5, reconstruct_top=3, summary=True), prob)
    plan = res.plans[0]
    rec = plan["reconstruction"]
    assert rec["steps"] == 5 and len(rec["candidates"]) == 3 and prob.rebuilt == [5] * 3
    fits = [c["fitness"] for c in rec["candidates"]]
    assert fits == sorted(fits)
    best = min(rec["candidates"], key=lambda c: c["reconstructed_fitness"])
    assert best is rec["candidates"][-1] and plan["genome"]["levels"] == best["genome"]
    assert plan["fitness"]["value"] == pytest.approx(best["fitness"])  # the plan keeps its pruned fitness
    assert plan["search"]["reconstruct"] == {"steps": 5, "top": 3}
    assert "after reconstruction (5 Adam steps per block)" in capsys.readouterr().out
    # with --recover-steps as well, the recovered ranking is applied last and picks the plan (the best pruned)
    res = run(cfg(tmp_path / "b", reconstruct_steps=5, reconstruct_top=3, recover_steps=2, recover_top=3), prob)
    plan = res.plans[0]
    assert plan["genome"]["levels"] == plan["recovery"]["candidates"][0]["genome"]
    assert len(plan["reconstruction"]["candidates"]) == 3
    with pytest.raises(SearchError, match="--reconstruct-steps needs a problem"):
        run(cfg(tmp_path / "c", reconstruct_steps=3), FakeProblem(tree))


def test_reconstruction_ranks_one_candidate_per_structure_first():
    """The candidates the reconstruction re-ranking takes: the best of each structure (set of dropped nodes) first,
    so a plan that keeps every block is re-fitted beside better-pruned plans that drop one; without the tree, the
    plain top k."""
    from types import SimpleNamespace

    from search.budget import Budget
    from search.engine import _top_candidates

    tree = Tree(arch.get("zimage").build_spec(ZCFG))
    full = tree.full_genome()
    drop = full.copy()
    gene = next(i for i, g in enumerate(tree.genes) if g.kind == "keep")
    drop[gene] = 0  # one block dropped
    assert tree.decode(drop).dropped and not tree.decode(full).dropped
    narrow = [drop.copy() for _ in range(3)]
    width = next(i for i, g in enumerate(tree.genes) if g.kind != "keep" and g.n_levels > 3)
    for j, g in enumerate(narrow):
        g[width] = j + 1  # three genomes of the same structure (level 0 may drop the node)
    assert len({frozenset(tree.decode(g).dropped) for g in narrow}) == 1
    genomes = [*narrow, full]
    ev = SimpleNamespace(arch_fitness=[0.1, 0.2, 0.3, 0.5], arch_cost=[1, 1, 1, 1], arch_genomes=genomes)
    b = Budget(text="x", kind="params", value=2)
    plain = _top_candidates(ev, b, 3)
    assert [f for _, f in plain] == [0.1, 0.2, 0.3]
    diverse = _top_candidates(ev, b, 3, tree)
    assert [f for _, f in diverse] == [0.1, 0.2, 0.5]  # the best of each structure, then the next best
    assert any((g == full).all() for g, _ in diverse)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--reconstruct-steps", "-1"], "--reconstruct-steps must be >= 0"),
        (["--reconstruct-steps", "5", "--reconstruct-top", "0"], "--reconstruct-top >= 1"),
        (["--recover-steps", "-2"], "--recover-steps must be >= 0"),
    ],
)
def test_rerank_options_are_checked(argv, msg, capsys):
    from tmp_jax.search import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--budget", "50%", *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err
