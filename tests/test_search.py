"""Search: exact budgets, budget-keeping operators, every strategy, plan.json, resume, the CLI.

Most tests use a fake problem (the tiny Z-Image tree with a synthetic fitness of the decoded
assignment), so they do not depend on calibration; the last test uses ``tmp_jax.problem`` if present.
"""

from __future__ import annotations

import json
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from search import engine
from search.budget import BudgetError, CostModel, SearchError, parse_budgets
from search.engine import SearchConfig, load_plan, plan_assignment, run
from search.genome import GeneLoss, fill, gene_kinds, level_changes, level_switch, random_genome, repair, uniform_genome
from search.hierarchy import error_table, error_table_genomes, tree_dp
from search.strategies import STRATEGIES, fidelity_stages
from tmp_jax import arch
from tmp_jax.materialize import count_params, materialize
from tmp_jax.models.z_image import TINY
from tmp_jax.tree import Node, Slice, Spec, Tree, Units

ZCFG = TINY.replace(n_layers=3, n_heads=4, axes_dims=(4, 6, 6))


@pytest.fixture(scope="module")
def ztree():
    return Tree(arch.get("zimage").build_spec(ZCFG))


def fast_random_model(cfg, seed=0):
    """Like ``init_random`` but filled from numpy into an abstract model: no eager jax init (~10 s on CI)."""
    m = arch.get("zimage").init_abstract(cfg, jnp.float32)
    rng = np.random.default_rng(seed)
    state = nnx.state(m, nnx.Param)
    for path, v in nnx.to_flat_state(state):
        shape = v.get_value().shape
        r = rng.standard_normal(shape).astype(np.float32)
        val = 1.0 + 0.2 * r if path[-1] == "weight" else r / np.sqrt(shape[0]) if path[-1] == "kernel" else 0.5 * r
        v.set_value(jnp.asarray(val))
    nnx.update(m, state)
    return m


@pytest.fixture(scope="module")
def zmodel():
    return fast_random_model(ZCFG)


class FakeProblem:
    """Fitness of the decoded assignment: each dropped block costs its weight, each sub-layer its
    weight times the fraction of units removed; ``free`` nodes cost nothing. A small deterministic
    noise shrinking with the sample count stands in for calibration noise (multi-fidelity)."""

    arch = "zimage"

    def __init__(self, tree, free=(), n_samples=8, importance=True, seed=0, fail_after=None):
        self.tree, self.free = tree, set(free)
        self.starts: list[tuple[int, int]] = []  # (n_samples, start) of every call
        self.source = {"path": None, "fingerprint": "fake-0123", "config": {"dim": ZCFG.dim}}
        rng = np.random.default_rng(seed)
        self.order = {(n.name, u.kind): rng.permutation(u.n) for n in tree.spec.nodes() for u in n.units}
        self.w = {n.name: (0.0 if n.name in self.free else float(rng.uniform(0.5, 1.5))) for n in tree.spec.nodes()}
        self.n = n_samples
        self.calls, self.fail_after = 0, fail_after
        if importance:
            self.unit_scores = {
                k: np.sort(rng.uniform(size=len(o)))[::-1][np.argsort(o)] * self.w[k[0]] for k, o in self.order.items()
            }
            self.block_scores = {
                n.name: (0.0 if n.name in self.free else 3.0) for n in tree.spec.nodes() if n.kind == "block"
            }

    def n_samples_total(self):
        return self.n

    def compile_count(self):
        return 0

    def _err(self, g):
        a = self.tree.decode(g)
        err = 0.0
        for n in self.tree.spec.nodes():
            if (
                n.kind == "block"
                and n.name in a.dropped
                and not self.tree._under_dropped(self.tree.parent[n.name], a.dropped)
            ):
                err += 0.0 if n.name in self.free else 3.0
            if n.kind in ("attn", "ffn") and not self.tree._under_dropped(self.tree.parent[n.name], a.dropped):
                if n.name in a.dropped:
                    err += self.w[n.name]
                else:
                    u = n.units[0]
                    err += self.w[n.name] * (1 - self.tree.kept_count(a, n.name, u.kind) / u.n)
        return err

    def fitness(self, genomes, n_samples=None, start=0):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        n = n_samples or self.n
        self.starts.append((n, start))
        out = []
        for g in np.asarray(genomes):
            # the noise depends on which samples are read (n, and the first micro-batch: start)
            h = zlib.crc32(np.asarray(g, np.int32).tobytes() + bytes([n]) + str(start % 4).encode()) / 2**32
            out.append(self._err(g) + 0.002 * (h - 0.5) / np.sqrt(n))
        return np.array(out, np.float32)


def cfg(tmp_path, **kw):
    base = dict(budget="80%", out=str(tmp_path), population=6, generations=3, progress=False, summary=False)
    return SearchConfig(**{**base, **kw})


# --------------------------------------------------------------------------------------------------


def _moe_tree():
    """A hand-made MoE tree: tied heads, experts (top-2 active) and expert channels on one node."""
    shapes = {("emb",): (10, 8)}
    blocks = []
    for b in range(3):
        p = lambda *s, b=b: (f"b{b}", *s)  # noqa: E731
        shapes.update(
            {
                p("q"): (8, 4 * 2),
                p("o"): (4 * 2, 8),
                p("gate"): (8, 6),
                p("up"): (6, 8, 16),
                p("down"): (6, 16, 8),
                p("norm"): (8,),
            }
        )
        attn = Node(
            f"b{b}.attn",
            "attn",
            (p("q"), p("o")),
            (Units("heads", 4, (Slice(p("q"), 1, 2), Slice(p("o"), 0, 2)), tie="heads"),),
            droppable=True,
        )
        moe = Node(
            f"b{b}.moe",
            "moe",
            (p("gate"), p("up"), p("down")),
            (
                Units(
                    "experts", 6, (Slice(p("gate"), 1), Slice(p("up"), 0), Slice(p("down"), 0)), min_keep=2, active=2
                ),
                Units("expert_ffn", 16, (Slice(p("up"), 2), Slice(p("down"), 1))),
            ),
            droppable=True,
        )
        blocks.append(Node(f"b{b}", "block", (p("norm"),), children=(attn, moe), droppable=True))
    root = Node("m", "model", (("emb",),), children=(Node("s", "stage", children=tuple(blocks), tokens="all"),))
    return Tree(Spec("toy", root, shapes, dtype_bytes=2))


@pytest.mark.parametrize("which", ["zimage", "moe", "hunyuan"])
def test_cost_model_is_exact(ztree, which):
    if which == "hunyuan":
        from tmp_jax.models.hunyuan_image3.config import TINY as HTINY

        tree = Tree(arch.get("hunyuan").build_spec(HTINY))
    else:
        tree = ztree if which == "zimage" else _moe_tree()
    rng = np.random.default_rng(0)
    gs = rng.integers(0, tree.max_levels() + 1, size=(40, tree.n_genes))
    tokens = {"image": 64, "caption": 16, "all": 80}
    for kind, key in (("params", "params"), ("active", "active"), ("memory", "bytes"), ("flops", None)):
        cm = CostModel(tree, kind, tokens)
        want = [tree.flops(tree.decode(g), tokens) if key is None else tree.count(tree.decode(g))[key] for g in gs]
        assert cm(gs).tolist() == want
    cm = CostModel(tree)
    for g, c in zip(gs, cm.canonical(gs)):  # canonical genomes decode to the same assignment
        a, b = tree.decode(g), tree.decode(c)
        assert (a.dropped, a.keep) == (b.dropped, b.keep)
    if which == "moe":
        assert cm.full != CostModel(tree, "active").full  # top-k makes active < total


def test_budget_parsing_and_floor(ztree):
    cm = CostModel(ztree)
    full, floor = cm.full, cm.floor
    bs = parse_budgets("80%,0.9, 500K,600000", cm)
    assert [b.value for b in bs] == [int(0.8 * full), int(0.9 * full), 500_000, 600_000]
    with pytest.raises(BudgetError) as e:
        parse_budgets("1K", cm)
    msg = str(e.value)
    assert "\n" not in msg and f"{floor:,}" in msg and "floor" in msg
    with pytest.raises(BudgetError, match="expected e.g. 20B"):
        parse_budgets("lots", cm)
    mem = CostModel(ztree, "memory")
    assert parse_budgets("1MB", mem)[0].value == 1_000_000
    assert parse_budgets("1MiB", mem)[0].value == 2**20


def test_operators_keep_budget(ztree):
    cm, rng = CostModel(ztree), np.random.default_rng(1)
    prob = FakeProblem(ztree)
    loss = GeneLoss(ztree, cm, prob.unit_scores, prob.block_scores, prob.order)
    for frac in (0.55, 0.7, 0.9):
        b = int(cm.floor + frac * (cm.full - cm.floor))
        for _ in range(10):
            g = random_genome(cm, b, rng)
            assert cm(g)[0] <= b
            # filled: no single raise fits any more
            assert (fill(g, cm, b, rng) == g).all()
            child = level_switch(g, cm, b, rng, n_switch=2)
            assert cm(child)[0] <= b
        greedy = repair(ztree.full_genome(), cm, b, loss=loss)
        assert cm(greedy)[0] <= b
    assert cm(uniform_genome(ztree, 1.0))[0] == cm.full
    assert fidelity_stages(8, 16) == [(1, 16), (4, 4), (8, 1)]
    assert fidelity_stages(1, 16) == [(1, 16)]
    assert fidelity_stages(8, 4) == [(1, 4), (8, 1)]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_plans_within_budget(tmp_path, ztree, zmodel, strategy):
    prob = FakeProblem(ztree)
    res = run(cfg(tmp_path, strategy=strategy, budget="75%,85%", population=4, generations=2), prob)
    cm = CostModel(ztree)
    for i, (text, plan) in enumerate(zip(("75%", "85%"), res.plans)):
        assert plan["budget"]["text"] == text
        a = plan_assignment(plan)
        n = ztree.count(a)["params"]
        assert n <= plan["budget"]["value"] and n == plan["counts"]["after"]["params"]
        assert cm(np.array(plan["genome"]["levels"]))[0] == n
        # the materialised model has exactly the plan's parameter count (each new shape compiles a
        # slice on CPU, so only the first plan of the baselines is materialised)
        if i == 0 or strategy == "levelswitch":
            assert count_params(materialize(zmodel, ztree, a, prob.order)) == n
        assert plan["fitness"]["value"] == pytest.approx(float(prob.fitness(np.array([plan["genome"]["levels"]]))[0]))
    # every history line's winners are within budget; files exist
    hist = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert len(hist) == res.generations + 1
    assert all(h["budgets"][0]["cost"] <= res.plans[0]["budget"]["value"] for h in hist)
    assert (tmp_path / "pareto.png").stat().st_size > 0
    assert (tmp_path / "plan.json").exists() and (tmp_path / "plan-85pct.json").exists()


def test_plan_format_and_load_plan(tmp_path, ztree):
    prob = FakeProblem(ztree)
    run(cfg(tmp_path, generations=1), prob)
    plan = load_plan(tmp_path / "plan.json")
    assert plan["format_version"] == 2 and plan["arch"] == "zimage"
    assert plan["source"]["fingerprint"] == "fake-0123"
    assert set(plan["versions"]) == {"jax", "flax", "evosax", "numpy", "tmp_jax"}
    assert plan["counts"]["before"]["params"] == ztree.full["params"]
    # kept indices are in ORIGINAL numbering: the first k of the importance order, sorted
    for key, ids in plan["policy"]["kept_units"].items():
        node, kind = key.rsplit("/", 1)
        k = plan["policy"]["keep"].get(key, len(prob.order[(node, kind)]))
        assert ids == sorted(prob.order[(node, kind)][:k].tolist())
    bad = dict(plan, format_version=99)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        load_plan(tmp_path / "bad.json")
    (tmp_path / "foreign.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tmp-jax plan"):
        load_plan(tmp_path / "foreign.json")


def _essence(plan):
    return plan["policy"], plan["genome"], plan["fitness"], plan["search"]["evals"]


@pytest.mark.parametrize("strategy", ["levelswitch", "cmaes"])
def test_resume_equals_uninterrupted(tmp_path, ztree, strategy):
    kw = dict(strategy=strategy, budget="70%,85%", population=4)
    full = run(cfg(tmp_path / "a", generations=5, **kw), FakeProblem(ztree))
    # stopped after 2 generations, resumed to 5
    run(cfg(tmp_path / "b", generations=2, **kw), FakeProblem(ztree))
    resumed = run(cfg(tmp_path / "b", generations=5, resume=True, **kw), FakeProblem(ztree))
    # killed in the middle of a generation (after a few fitness calls), resumed
    with pytest.raises(KeyboardInterrupt):
        run(
            cfg(tmp_path / "c", generations=5, **kw),
            FakeProblem(ztree, fail_after=7 if strategy == "levelswitch" else 3),
        )
    killed = run(cfg(tmp_path / "c", generations=5, resume=True, **kw), FakeProblem(ztree))
    for a, b, c in zip(full.plans, resumed.plans, killed.plans):
        assert _essence(a) == _essence(b) == _essence(c)
    hist = (tmp_path / "c" / "history.jsonl").read_text().splitlines()
    assert [json.loads(h)["gen"] for h in hist] == list(range(6))
    with pytest.raises(SearchError, match="different search"):
        run(cfg(tmp_path / "c", generations=5, resume=True, **{**kw, "budget": "60%"}), FakeProblem(ztree))


def test_planted_redundancy_is_found(tmp_path, ztree):
    free = ("layers.1", "context_refiner.0.feed_forward")
    cm = CostModel(ztree)
    names = [g.name for g in ztree.genes]
    target = ztree.full_genome()
    target[names.index("layers.1:keep")] = 0
    target[names.index("context_refiner.0.feed_forward:ffn")] = 0
    budget = int(cm(target)[0])
    # no importance scores: the search must find the free decisions from fitness alone. A search this short can end
    # at a plan dropping another block (fitness 0.24); at 80 generations seeds 0-7 found the planted pair in 4 of 8
    # (2 of 8 with single-level cross-kind switches), so this pins seed 0 of a stochastic search
    prob = FakeProblem(ztree, free=free, importance=False)
    res = run(cfg(tmp_path, budget=str(budget), population=8, generations=80), prob)
    plan = res.plans[0]
    assert {"layers.1", "context_refiner.0.feed_forward"} <= set(plan["policy"]["dropped"])
    assert plan["fitness"]["value"] < 0.01
    # start auto: a search this long starts from the tree DP too (its tables cost <= 1/4 of the evaluations)
    prob = FakeProblem(ztree, free=free, importance=False)
    res = run(cfg(tmp_path / "dp", budget=str(budget), population=8, generations=24, start="auto"), prob)
    meta = json.loads((tmp_path / "dp" / "checkpoint.json").read_text())["strategy"]
    assert meta["used_dp"] is True and set(meta["start_fitness"][0]) == {"uniform", "uniform_filled", "dp"}
    assert {"layers.1", "context_refiner.0.feed_forward"} <= set(res.plans[0]["policy"]["dropped"])


def test_cli_floor_error_is_one_line(tmp_path, ztree, monkeypatch, capsys):
    from tmp_jax.search import main

    monkeypatch.setattr(engine, "_build_problem", lambda c: FakeProblem(ztree))
    rc = main(["--budget", "1K", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "floor" in err and "Traceback" not in err
    rc = main(["--budget", "80%", "--out", str(tmp_path), "--no-progress", "--generations", "1", "--population", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and "budget 80%" in out and (tmp_path / "plan.json").exists()


def test_search_config_reaches_the_problem_it_builds(monkeypatch):
    """run(SearchConfig) without a problem builds one with the config's model, evaluation mode, calibration source,
    compensation and dtype (most end-to-end tests pass a problem they built, to share it)."""
    import tmp_jax.problem as pm

    seen = {}
    monkeypatch.setattr(pm, "build_problem", lambda *a, **kw: seen.update(args=a, **kw) or "problem")
    cfg = SearchConfig(
        budget="50%", model="hunyuan-fmnist", compensate=False, eval_mode="masked", calib_source="noised", dtype="fp32"
    )
    assert engine._build_problem(cfg) == "problem"
    assert seen["args"][0] == "hunyuan-fmnist" and seen["compensation"] is None and seen["keep_teacher"] is False
    assert (seen["eval_mode"], seen["calib_source"], seen["dtype"]) == ("masked", "noised", "fp32")
    engine._build_problem(SearchConfig(budget="50%", damp=0.05))
    assert seen["compensation"].damp == 0.05 and seen["eval_mode"] == "auto" and seen["calib_source"] == "trajectory"


def test_cli_help_says_what_is_counted(capsys):
    from tmp_jax.search import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "Tree.count" in text and "text encoder" in text and "VAE" in text


def _real_problem():
    """A real PruningProblem on tiny Z-Image with a keep-or-skip ladder (few block shapes to compile).

    The calibration statistics are synthetic (running calibration would compile the statistics
    forward: ~20 s on CI); the teacher outputs are real."""
    pytest.importorskip("tmp_jax.problem")
    from problem_ref import random_problem

    # two micro-batches: selection stages below all samples read either one (fresh batches)
    return random_problem("zimage", TINY, {"fractions": [1.0]}, n=4, model=fast_random_model(TINY))


def test_real_problem_second_generation_compiles_nothing(tmp_path):
    """After the warm-up (every sub-layer width level compiled once), generation 2 compiles nothing,
    and re-evaluating every candidate compiles nothing either."""
    prob = _real_problem()
    kw = dict(budget="80%", population=4, out=str(tmp_path))
    run(cfg(tmp_path, generations=1, **kw), prob)
    c1 = prob.compile_count()
    assert c1 > 0
    res = run(cfg(tmp_path, generations=2, resume=True, **kw), prob)
    assert prob.compile_count() == c1
    with np.load(next(tmp_path.glob("checkpoint-*.npz"))) as z:
        seen = z["cache_genomes"]
    prob.fitness(seen)
    assert prob.compile_count() == c1
    # candidates that drop blocks share the stem / final-layer functions too
    g = prob.tree.full_genome()
    keeps = [i for i, gene in enumerate(prob.tree.genes) if gene.kind == "keep" and gene.node.startswith("layers.")]
    g[keeps] = 0  # no main block at all: a depth no search candidate had before
    prob.fitness(g[None])
    assert prob.compile_count() == c1
    # fresh micro-batches: start picks the first micro-batch read (cyclically); all samples ignore it
    two = np.stack([g, prob.tree.full_genome()])
    f0, f1, f2 = (prob.fitness(two[:1], n_samples=2, start=s)[0] for s in (0, 1, 2))
    assert f0 != f1 and f0 == f2
    assert prob.fitness(two[:1], start=1)[0] == pytest.approx(prob.fitness(two[:1])[0], rel=1e-12)
    assert prob.compile_count() == c1
    assert res.plans[0]["counts"]["after"]["params"] <= res.plans[0]["budget"]["value"]


# --------------------------------------------------------------------------------------------------
# Search dynamics (issue 17): same-kind switches, the change cap, raw parents, the tree-DP start, fresh batches


def _mid_genome(tree):
    """Every block kept, every width gene in the middle of its ladder (room to move both ways)."""
    return np.array([1 if g.kind == "keep" else g.n_levels // 2 for g in tree.genes], np.int64)


def test_level_switch_same_kind_equal_cost_and_change_cap(ztree):
    cm, rng = CostModel(ztree), np.random.default_rng(3)
    kinds = gene_kinds(cm)
    parent = _mid_genome(ztree)
    c0 = int(cm(parent)[0])
    exact = 0
    for _ in range(60):  # one switch, nothing left for fill: exactly one gene up and one of its kind down
        child = level_switch(parent, cm, c0, rng, 1, max_changes=2, cross_kind=0.0)
        d = child - parent
        assert sorted(d[d != 0].tolist()) == [-1, 1]
        up, down = int(np.flatnonzero(d == 1)[0]), int(np.flatnonzero(d == -1)[0])
        assert kinds[up] == kinds[down]
        assert cm(child)[0] <= c0  # the down-move saves at least what the up-move added
        exact += int(cm(child)[0] == c0)
    assert exact == 60  # equal unit sizes (heads; FFN steps of 21 channels from the middle): equal cost
    # cross-kind switches pair different kinds where another kind can pay for the up-move, never adding cost
    crossed = 0
    for _ in range(40):
        child = level_switch(parent, cm, c0, rng, 1, max_changes=2, cross_kind=1.0)
        d = child - parent
        assert cm(child)[0] <= c0 and np.abs(d).sum() == 2
        crossed += int(kinds[np.flatnonzero(d == 1)[0]] != kinds[np.flatnonzero(d == -1)[0]])
    assert crossed >= 10
    # the cap holds for any number of switches, with importance-guided fill using what the cap leaves
    prob = FakeProblem(ztree)
    loss = GeneLoss(ztree, cm, prob.unit_scores, prob.block_scores, prob.order)
    b = int(cm.floor + 0.6 * (cm.full - cm.floor))
    for cap in (2, 3, 4, 7):
        for _ in range(15):
            p = random_genome(cm, b, rng)
            child = level_switch(p, cm, b, rng, 3, max_changes=cap, loss=loss, cross_kind=0.5)
            assert cm(child)[0] <= b and level_changes(child, p) <= cap


def test_restored_block_keeps_its_raw_levels(ztree):
    cm, rng = CostModel(ztree), np.random.default_rng(0)
    names = [g.name for g in ztree.genes]
    parent = ztree.full_genome().astype(np.int64)
    parent[names.index("layers.1.attention:heads")] = 2
    parent[names.index("layers.1.feed_forward:ffn")] = 3
    parent[names.index("layers.1:keep")] = 0  # dropped: its sub-layer genes are inert but keep their levels
    assert cm.canonical(parent)[0][names.index("layers.1.attention:heads")] == 0
    restored = 0
    for _ in range(200):
        child = level_switch(parent, cm, int(cm(parent)[0]), rng, 1, max_changes=2, cross_kind=0.0)
        if child[names.index("layers.1:keep")] == 1:
            restored += 1
            # the block comes back with its previous widths (not skipped sub-layers), another block goes
            assert child[names.index("layers.1.attention:heads")] == 2
            assert child[names.index("layers.1.feed_forward:ffn")] == 3
            keeps = [i for i, n in enumerate(names) if n.endswith(":keep")]
            assert child[keeps].sum() == parent[keeps].sum()
    assert restored > 0


def test_levelswitch_keeps_raw_parents_and_fresh_batches(tmp_path, ztree):
    prob = FakeProblem(ztree)
    res = run(cfg(tmp_path, budget="70%", population=8, generations=4), prob)
    with np.load(next(tmp_path.glob("checkpoint-*.npz"))) as z:
        parent = z["strategy/parent0"]
    cm = CostModel(ztree)
    # the parent is the winner (raw; same canonical form as the plan's genome)
    assert (cm.canonical(parent)[0] == cm.canonical(np.array(res.plans[0]["genome"]["levels"]))[0]).all()
    low = [s for n, s in prob.starts if n < prob.n]
    assert len(low) >= 8 and len(set(low)) > 1  # selection stages read different first micro-batches
    assert json.loads((tmp_path / "checkpoint.json").read_text())["strategy"]["used_dp"] is False  # classic
    prob3 = FakeProblem(ztree)  # start auto, 4 generations: the DP's 66 table evaluations would outweigh the search
    run(cfg(tmp_path / "c", budget="70%", population=8, generations=4, start="auto"), prob3)
    assert json.loads((tmp_path / "c" / "checkpoint.json").read_text())["strategy"]["used_dp"] is False
    assert all(s == 0 for n, s in prob.starts if n == prob.n)
    # --no-fresh-batches: always the first micro-batches
    prob2 = FakeProblem(ztree)
    run(cfg(tmp_path / "b", budget="70%", population=8, generations=2, fresh_batches=False), prob2)
    assert {s for _, s in prob2.starts} == {0}


def test_tree_dp_start_meets_budget_and_beats_uniform(ztree):
    cm = CostModel(ztree)
    prob = FakeProblem(ztree, free=("layers.1",))
    rows, pairs = error_table_genomes(ztree)
    assert len(rows) == sum(g.n_levels - 1 for g in ztree.genes)
    full_f = float(prob.fitness(ztree.full_genome()[None], 8)[0])
    err = error_table(ztree, pairs, prob.fitness(rows, 8), full_f)
    rng = np.random.default_rng(0)
    for frac in (0.35, 0.5, 0.7):
        b = int(cm.floor + frac * (cm.full - cm.floor))
        g, pred = tree_dp(ztree, cm, err, b)
        assert cm(g)[0] <= b
        g = fill(g, cm, b, rng)
        uni = [u for u in (uniform_genome(ztree, f) for f in np.linspace(1, 1 / 64, 64)) if cm(u)[0] <= b][0]
        uni = fill(uni, cm, b, rng)
        f_dp, f_uni = prob.fitness(np.stack([g, uni]), 8)
        assert f_dp < f_uni, (frac, f_dp, f_uni)
        assert "layers.1" in ztree.decode(g).dropped  # the free block is the first thing the DP drops
    # a tied gene (MoE tree: global head count) is enumerated outside the DP; budgets always hold, and the DP
    # optimum of the additive model is at least as good as the uniform genome's
    mt = _moe_tree()
    mc = CostModel(mt)
    err = np.random.default_rng(1).uniform(size=(mt.n_genes, int(mc.max_levels.max()) + 1))
    for gi, gene in enumerate(mt.genes):
        err[gi, gene.n_levels - 1 :] = 0.0
    add = lambda g: float(sum(err[i, lv] for i, lv in enumerate(mc.canonical(g)[0]) if lv < mc.max_levels[i]))  # noqa: E731
    for frac in (0.3, 0.5, 0.8):
        b = int(mc.floor + frac * (mc.full - mc.floor))
        g, pred = tree_dp(mt, mc, err, b, bins=1 << 20)
        assert mc(g)[0] <= b
        uni = [u for u in (uniform_genome(mt, f) for f in np.linspace(1, 1 / 64, 64)) if mc(u)[0] <= b]
        if uni:
            assert pred <= add(uni[0]) + 1e-9


def test_cli_dynamics_flags():
    from tmp_jax.search import parse_args

    c = parse_args(
        ["--budget", "50%", "--max-changes", "6", "--cross-kind", "0", "--start", "dp", "--no-fresh-batches"]
    )
    assert (c.max_changes, c.cross_kind, c.start, c.fresh_batches) == (6, 0.0, "dp", False)
    c = parse_args(["--budget", "50%"])
    assert (c.max_changes, c.cross_kind, c.start, c.fresh_batches) == (None, None, None, True)


class FlatProblem(FakeProblem):
    """Every candidate scores the same: no offspring ever improves on its parent (a stalled search)."""

    def fitness(self, genomes, n_samples=None, start=0):
        self.starts.append((n_samples or self.n, start))
        return np.ones(len(np.asarray(genomes)), np.float32)


def test_levelswitch_stall_escape_widens_moves(tmp_path, ztree, monkeypatch):
    """After ``patience`` generations without a better winner the change cap doubles (then 4x, no more); with
    patience 0 offspring always stay within the base cap of 4 level changes."""
    from search import strategies

    seen: list[tuple[int, int]] = []  # (escalation, largest sum |child - parent| of the generation)
    orig = strategies.LevelSwitch._offspring

    def spy(self, parent, b, escalation=0):
        out = orig(self, parent, b, escalation)
        seen.append((escalation, max(int(np.abs(c - parent).sum()) for c in out)))
        return out

    monkeypatch.setattr(strategies.LevelSwitch, "_offspring", spy)
    run(cfg(tmp_path / "a", budget="60%", population=16, generations=9, patience=2), FlatProblem(ztree))
    assert [e for e, _ in seen] == [0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert max(d for e, d in seen if e == 0) <= 4 < max(d for e, d in seen if e == 2) <= 16
    meta = json.loads((tmp_path / "a" / "checkpoint.json").read_text())["strategy"]
    assert meta["stall"] == [9]
    seen.clear()
    run(cfg(tmp_path / "b", budget="60%", population=16, generations=6, patience=0), FlatProblem(ztree))
    assert {e for e, _ in seen} == {0} and max(d for _, d in seen) <= 4


def test_level_switch_partner_goes_down_several_levels_where_one_does_not_pay():
    """On the embedded MoE one expert-width level (for all 8 experts of a layer) costs more than one expert of a
    narrow layer, so "a width level for experts" takes 2-3 expert levels. Single-level partners never proposed it,
    and from the searched MoE 25% plan not one of 1,600 offspring improved on it (docs/quality.md, "Why
    levelswitch stalls on the MoE"). The partner now goes down as many levels as the change cap leaves."""
    from pathlib import Path

    from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config
    from tmp_jax.problem import EMBEDDED

    hf = json.loads((Path(EMBEDDED["hunyuan-fmnist"]) / "config.json").read_text())
    tree = Tree(arch.get("hunyuan").build_spec(HunyuanImage3Config.from_hf_config(hf)))
    cm, rng = CostModel(tree), np.random.default_rng(0)
    names = [g.name for g in tree.genes]
    kinds = gene_kinds(cm)
    # the CPU search's MoE 25% plan: every expert kept, narrow expert widths, block 4 dropped
    parent = np.array([1, 6, 4, 1, 6, 5, 1, 6, 2, 1, 6, 3, 0, 0, 0, 1, 6, 4, 2], np.int64)
    assert names[1].endswith(":experts") and names[2].endswith(":expert_ffn") and len(names) == len(parent)
    c0 = int(cm(parent[None])[0])
    width, expert = names.index("model.layers.0.mlp:expert_ffn"), names.index("model.layers.2.mlp:experts")
    up, down = parent.copy(), parent.copy()
    up[width] += 1
    down[expert] -= 1
    assert int(cm(up[None])[0]) - c0 > c0 - int(cm(down[None])[0])  # one level up outweighs one expert down
    multi = 0
    for _ in range(200):
        child = level_switch(parent, cm, c0, rng, 1, max_changes=4, cross_kind=1.0, kinds=kinds)
        d = child - parent
        assert cm(child[None])[0] <= c0 and level_changes(child, parent) <= 4
        if (d > 0).sum() == 1 and d.min() <= -2:  # one gene up, its partner down several levels
            i, j = int(np.flatnonzero(d > 0)[0]), int(np.argmin(d))
            multi += int(kinds[i] != kinds[j])
    assert multi >= 20, multi
    for _ in range(50):  # a cap of 2 leaves one level for the partner: single-level switches only
        child = level_switch(parent, cm, c0, rng, 1, max_changes=2, cross_kind=1.0, kinds=kinds)
        assert level_changes(child, parent) <= 2
