"""Search strategies and baselines, by name (``STRATEGIES``).

Every strategy works for one or several budgets at once and only ever hands the evaluator candidates
within their budget (it checks). Results are not kept here: the engine's archive holds every
full-fidelity evaluation, and the winner for a budget is the archive's best candidate within it —
so a candidate found while searching one budget also serves every larger one (the shared Pareto set).

* ``levelswitch`` (default) — EvoPress-style (1+λ) evolution per budget: λ level-switch offspring of
  the budget's parent (its winner, kept as a RAW genome), multi-step selection on growing calibration
  sample counts (all λ on N/8 samples, the best quarter on N/2 — each stage on fresh micro-batches —, the
  best quarter of those, with the parent re-scored, on all N). Offspring switch levels between genes of
  the same kind at equal cost, at most ``max_changes`` level changes each, with importance-guided repair
  and fill; the start is the best of uniform and oneshot, or (``start`` all / dp / auto) also a tree DP over
  measured per-gene error tables (:mod:`search.hierarchy`).
* ``ga`` / ``cmaes`` — evosax ``SimpleGA`` / ``CMA_ES`` over continuous coordinates in [0, 1] per gene,
  rounded to levels and repaired into the budget (GA is told the repaired genomes: Lamarckian).
* ``random`` — random in-budget genomes, ``population`` per generation: the same number of
  candidate evaluations as ``levelswitch`` with the same settings, all at full fidelity.
* ``uniform`` — the same kept fraction in every width decision, all blocks kept; best fitting one.
* ``oneshot`` — global importance ranking: from the full model, repeatedly take the single-level
  move that loses the least importance per unit of cost saved until the budget fits.
* ``depth`` — block dropping only, lowest block score first.

A strategy's mutable state is numpy arrays + JSON (:meth:`Strategy.state`) so runs resume exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from search.budget import Budget, CostModel, SearchError
from search.genome import (
    GeneLoss,
    fill,
    from_unit,
    gene_kinds,
    level_switch,
    random_genome,
    repair,
    to_unit,
    uniform_genome,
)
from search.hierarchy import error_table, error_table_genomes, tree_dp
from tmp_jax.tree import Tree

# evaluate(genomes [P, G], n_samples, budget values [P], start=0) -> fitness [P] (minimised); ``start``: the
# micro-batch the samples are read from (fresh calibration data per selection stage)
EvalFn = Callable[..., np.ndarray]


@dataclass
class Context:
    """What a strategy may use: the tree, exact costs, budgets, the evaluator, randomness, importance."""

    tree: Tree
    cost: CostModel
    budgets: list[Budget]
    evaluate: EvalFn
    n_total: int
    rng: np.random.Generator
    seed: int
    winner: Callable[[int], tuple[np.ndarray, float] | None]  # best archive entry within budget value
    loss: GeneLoss | None = None
    block_scores: dict[str, float] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # strategy knobs (SearchConfig); None: the default


class Strategy:
    """Base: ``init()`` is generation 0, ``step(gen)`` one generation; one-shot strategies only init."""

    name = ""
    iterative = True
    default_population = 16
    default_generations = 50

    def __init__(self, ctx: Context, population: int | None = None):
        self.ctx = ctx
        self.population = int(population or self.default_population)
        if self.population < 1:
            raise SearchError(f"--population must be >= 1, got {self.population}")

    def init(self) -> None:
        raise NotImplementedError

    def step(self, gen: int) -> None:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return {"population": self.population}

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {}

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        pass

    # helpers ------------------------------------------------------------------------------------
    def _eval_full(self, genomes: list[np.ndarray], budget_values: list[int]) -> np.ndarray:
        return self.ctx.evaluate(np.stack(genomes), self.ctx.n_total, np.asarray(budget_values, np.int64))

    def _uniform_best(self, b: Budget) -> list[np.ndarray]:
        """Distinct uniform genomes within ``b``, largest first (empty if none fits)."""
        seen, out = set(), []
        for f in np.linspace(1.0, 1.0 / 64, 64):
            g = uniform_genome(self.ctx.tree, float(f))
            if g.tobytes() in seen:
                continue
            seen.add(g.tobytes())
            if int(self.ctx.cost(g)[0]) <= b.value:
                out.append(g)
        return out


# --------------------------------------------------------------------------------------------------
# Baselines


class Uniform(Strategy):
    name = "uniform"
    iterative = False

    def init(self) -> None:
        gs, bs = [], []
        self.fallback: list[str] = []
        for b in self.ctx.budgets:
            cands = self._uniform_best(b)
            if not cands:  # even the narrowest uniform model with every block is too big: repair it
                self.fallback.append(b.text)
                g0 = uniform_genome(self.ctx.tree, 0.0)
                cands = [repair(g0, self.ctx.cost, b.value, self.ctx.rng, loss=self.ctx.loss)]
            gs += cands
            bs += [b.value] * len(cands)
        self._eval_full(gs, bs)

    def settings(self) -> dict[str, Any]:
        return {"fractions": "1/64 .. 1 (64 steps)", "repaired_budgets": getattr(self, "fallback", [])}


class OneShot(Strategy):
    name = "oneshot"
    iterative = False

    def init(self) -> None:
        if self.ctx.loss is None:
            raise SearchError("strategy oneshot needs importance scores and the problem provides none")
        full = self.ctx.tree.full_genome().astype(np.int64)
        gs = [repair(full, self.ctx.cost, b.value, loss=self.ctx.loss) for b in self.ctx.budgets]
        self._eval_full(gs, [b.value for b in self.ctx.budgets])

    def settings(self) -> dict[str, Any]:
        return {"ranking": "importance lost per unit of cost saved, greedy single-level moves"}


class Depth(Strategy):
    name = "depth"
    iterative = False

    def init(self) -> None:
        tree, cost = self.ctx.tree, self.ctx.cost
        blocks = [i for i, g in enumerate(tree.genes) if g.kind == "keep" and tree.spec.node(g.node).kind == "block"]
        scores = dict(self.ctx.block_scores or {})
        if self.ctx.loss is not None:  # no block score: the block's importance from its units' scores
            for i in blocks:
                scores.setdefault(tree.genes[i].node, float(self.ctx.loss.table[i, 0]))
        missing = [tree.genes[i].node for i in blocks if tree.genes[i].node not in scores]
        if missing:
            raise SearchError(f"strategy depth needs block scores; none for {missing[0]} and {len(missing) - 1} more")
        # least important first; ties broken by position (later blocks first, as depth pruning does)
        ranked = sorted(blocks, key=lambda i: (scores[tree.genes[i].node], -i))
        gs = []
        for b in self.ctx.budgets:
            g = tree.full_genome().astype(np.int64)
            for i in ranked:
                if int(cost(g)[0]) <= b.value:
                    break
                g[i] = 0
            if int(cost(g)[0]) > b.value:
                raise SearchError(f"strategy depth cannot reach budget {b.text} by dropping blocks only")
            gs.append(g)
        self._eval_full(gs, [b.value for b in self.ctx.budgets])

    def settings(self) -> dict[str, Any]:
        return {"ranking": "block score ascending (blocks only, widths full)"}


class RandomSearch(Strategy):
    name = "random"

    def init(self) -> None:
        self.step(0)

    def step(self, gen: int) -> None:
        gs, bs = [], []
        for b in self.ctx.budgets:
            for _ in range(self.population):
                gs.append(random_genome(self.ctx.cost, b.value, self.ctx.rng))
                bs.append(b.value)
        self._eval_full(gs, bs)


# --------------------------------------------------------------------------------------------------
# Level-switch evolution


def fidelity_stages(n_total: int, offspring: int) -> list[tuple[int, int]]:
    """(samples, candidates evaluated) per selection stage: all offspring on N/8 samples, the best
    quarter on N/2, the best quarter of those on N; stages that would repeat a sample count merge,
    and stages that would keep all their candidates are skipped."""
    counts = sorted({max(1, math.ceil(n_total / 8)), max(1, math.ceil(n_total / 2)), n_total})
    out, k = [], offspring
    for n in counts:
        out.append((n, k))
        k = max(1, k // 4)
    # a stage that keeps every candidate it evaluated selects nothing: skip it
    return [s for i, s in enumerate(out) if i + 1 == len(out) or s[1] != out[i + 1][1]]


class LevelSwitch(Strategy):
    name = "levelswitch"
    # level switches per mutation: 1 (p=1/2), 2 (1/4), 3 (1/8), ... up to max_changes // 2 (a switch is 2 changes,
    # more where its partner goes down several levels)
    default_max_changes = 4  # total level changes per offspring
    default_cross_kind = 0.25  # a switch pairs genes of different kinds with this probability
    # classic: on both embedded teachers the DP start is the best start but its search ends worse at the default
    # length (docs/quality.md, "Search dynamics")
    default_start = "classic"
    starts = ("classic", "all", "dp", "auto")
    dp_share = 0.25  # start auto: the DP's error tables may cost at most this share of the search's evaluations
    # stall escape: after this many generations without a better winner in a budget, that budget's offspring may
    # make twice the level changes (and longer switch chains are likelier), up to 2**max_escalation times the
    # cap; any improvement resets it. On the MoE's irregular expert-width ladder a 4-change neighbourhood runs
    # out of improvements (docs/quality.md, "Search dynamics"); larger moves only when local ones stopped paying
    default_patience = 4
    max_escalation = 2

    def __init__(self, ctx: Context, population: int | None = None):
        super().__init__(ctx, population)
        self.stages = fidelity_stages(ctx.n_total, self.population)
        opt = ctx.options
        self.max_changes = int(_opt(opt, "max_changes", self.default_max_changes))
        self.cross_kind = float(_opt(opt, "cross_kind", self.default_cross_kind))
        self.start = str(_opt(opt, "start", self.default_start))
        self.fresh = bool(_opt(opt, "fresh_batches", True))
        self.patience = int(_opt(opt, "patience", self.default_patience))  # 0: no stall escape
        if self.patience < 0:
            raise SearchError(f"--patience must be >= 0 (0: off), got {self.patience}")
        if self.max_changes < 2:
            raise SearchError(f"--max-changes must be >= 2 (one level switch), got {self.max_changes}")
        if not 0.0 <= self.cross_kind <= 1.0:
            raise SearchError(f"--cross-kind must be in [0, 1], got {self.cross_kind}")
        if self.start not in self.starts:
            raise SearchError(f"--start must be one of {', '.join(self.starts)}, got {self.start!r}")
        self.kinds = gene_kinds(ctx.cost)
        self.parents: list[np.ndarray] = []  # raw parent genome per budget
        self.start_fitness: list[dict[str, float]] = []  # per budget: each start's fitness (reported)
        self.used_dp: bool | None = None  # decided at generation 0 (state), from that run's --generations
        self.stall: list[int] = []  # per budget: generations since its winner last improved
        self.best: list[float] = []  # per budget: the winner's fitness the stall count refers to

    def settings(self) -> dict[str, Any]:
        return {
            "offspring": self.population,
            "stages": [{"samples": n, "candidates": k} for n, k in self.stages],
            "max_switch": self.max_changes // 2,
            "max_changes": self.max_changes,
            "cross_kind": self.cross_kind,
            "switch": "same kind: a random down-move saving >= the up-move cost (equal units: equal cost); "
            "cross kind: a random kind that can pay, its partner down the fewest levels, the least such saving",
            "repair_fill": "importance-guided" if self.ctx.loss is not None else "random",
            "fresh_batches": self.fresh,
            "parent": "raw genome, re-scored in the final stage",
            "stall_escape": (
                f"after {self.patience} generations without improvement the change cap doubles (at most "
                f"{2**self.max_escalation}x), reset on improvement"
                if self.patience > 0
                else "off"
            ),
            "start": {
                "auto": f"as all where the DP's error tables cost <= {self.dp_share:g} of the search's evaluations "
                "(decided at generation 0), else as classic",
                "all": "best of uniform / filled uniform / oneshot / tree DP over per-gene error tables",
                "dp": "tree DP over per-gene error tables",
                "classic": "best of uniform / filled uniform / oneshot",
            }[self.start],
        }

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {f"parent{bi}": p for bi, p in enumerate(self.parents)}
        meta = {
            "parents": len(self.parents),
            "start_fitness": self.start_fitness,
            "used_dp": self.used_dp,
            "stall": self.stall,
            "best": self.best,
        }
        return meta, arrays

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.parents = [arrays[f"parent{bi}"].astype(np.int64) for bi in range(int(meta.get("parents", 0)))]
        self.start_fitness = list(meta.get("start_fitness", []))
        self.used_dp = meta.get("used_dp")
        self.stall = [int(x) for x in meta.get("stall", [])]
        self.best = [float(x) for x in meta.get("best", [])]

    def escalation(self, bi: int) -> int:
        """How many times budget ``bi``'s change cap is doubled now (0: the normal local moves)."""
        if self.patience <= 0 or bi >= len(self.stall):
            return 0
        return min(self.stall[bi] // self.patience, self.max_escalation)

    def _track(self) -> None:
        """Update each budget's stall count from its archive winner (after a generation's evaluations)."""
        fits = []
        for b in self.ctx.budgets:
            w = self.ctx.winner(b.value)
            fits.append(float("inf") if w is None else float(w[1]))
        if len(self.best) != len(fits):
            self.best, self.stall = fits, [0] * len(fits)
            return
        for bi, f in enumerate(fits):
            if f < self.best[bi]:
                self.best[bi], self.stall[bi] = f, 0
            else:
                self.stall[bi] += 1

    def _use_dp(self) -> bool:
        """Whether this run starts from the tree DP: always for start all / dp, never for classic; for auto,
        where its error tables (one evaluation per gene level below full) cost at most ``dp_share`` of the
        evaluations the search will make (generations x the candidates of its selection stages)."""
        if self.start != "auto":
            return self.start in ("all", "dp")
        n_table = sum(g.n_levels - 1 for g in self.ctx.tree.genes) + 1
        gens = int(self.ctx.options.get("generations") or self.default_generations)
        per_gen = sum(k for _, k in self.stages) * len(self.ctx.budgets)
        return n_table <= self.dp_share * gens * per_gen

    def _dp_starts(self) -> list[np.ndarray | None]:
        """The tree-DP start per budget, from per-gene error tables measured once through the evaluator (each
        gene's level alone in the full model, on all samples; these near-full candidates are over the budgets,
        so each is checked against its own cost)."""
        ctx = self.ctx
        rows, pairs = error_table_genomes(ctx.tree)
        full = ctx.tree.full_genome().astype(np.int64)[None]
        gs = np.concatenate([full, rows])
        fit = ctx.evaluate(gs, ctx.n_total, ctx.cost(gs))
        err = error_table(ctx.tree, pairs, fit[1:], float(fit[0]))
        out: list[np.ndarray | None] = []
        for b in ctx.budgets:
            res = tree_dp(ctx.tree, ctx.cost, err, b.value)
            if res is None:
                out.append(None)
                continue
            g = res[0]
            if int(ctx.cost(g[None])[0]) > b.value:  # exact costs: never, but a plan is never over budget
                g = repair(g, ctx.cost, b.value, ctx.rng, loss=ctx.loss)
            out.append(fill(g, ctx.cost, b.value, ctx.rng, loss=ctx.loss))
        return out

    def init(self) -> None:
        ctx, gs, bs, names = self.ctx, [], [], []
        self.used_dp = self._use_dp()
        dp = self._dp_starts() if self.used_dp else [None] * len(ctx.budgets)
        per_budget: list[list[tuple[str, np.ndarray]]] = []
        for bi, b in enumerate(ctx.budgets):
            starts: list[tuple[str, np.ndarray]] = []
            if self.start != "dp" or dp[bi] is None:
                first = self._uniform_best(b)[:1]
                if not first:
                    first = [repair(uniform_genome(ctx.tree, 0.0), ctx.cost, b.value, ctx.rng, loss=ctx.loss)]
                starts.append(("uniform", first[0]))
                # the uniform start filled up to the budget: EvoPress starts from a uniform configuration
                starts.append(("uniform_filled", fill(first[0], ctx.cost, b.value, ctx.rng)))
                if ctx.loss is not None:
                    starts.append(("oneshot", repair(ctx.tree.full_genome(), ctx.cost, b.value, loss=ctx.loss)))
            if dp[bi] is not None:
                starts.append(("dp", dp[bi]))
            per_budget.append(starts)
            gs += [g for _, g in starts]
            bs += [b.value] * len(starts)
            names += [n for n, _ in starts]
        fit = self._eval_full(gs, bs)
        k = 0
        self.parents, self.start_fitness = [], []
        for bi, starts in enumerate(per_budget):
            self.start_fitness.append({n: float(fit[k + j]) for j, (n, _) in enumerate(starts)})
            self.parents.append(self._raw_winner(bi, [g for _, g in starts]))
            k += len(starts)

    def _raw_winner(self, bi: int, raws: list[np.ndarray]) -> np.ndarray:
        """The budget's archive winner as a raw genome: the first of ``raws`` with the same canonical form
        (inert genes keep their levels), else the archive's canonical genome."""
        w = self.ctx.winner(self.ctx.budgets[bi].value)
        if w is None:
            raise RuntimeError(f"no evaluated candidate within budget {self.ctx.budgets[bi].text}")
        key = self.ctx.cost.canonical(w[0])[0].tobytes()
        for r in raws:
            if self.ctx.cost.canonical(r)[0].tobytes() == key:
                return np.asarray(r, np.int64).copy()
        return np.asarray(w[0], np.int64).copy()

    def _offspring(self, parent: np.ndarray, b: Budget, escalation: int = 0) -> list[np.ndarray]:
        ctx, out = self.ctx, []
        seen = {ctx.cost.canonical(parent)[0].tobytes()}
        cap = self.max_changes * 2**escalation
        p_stop = 0.5 / 2**escalation  # switch chain length ~ geometric: mean 2, 4, 8 switches
        for _ in range(self.population):
            for _attempt in range(4):  # a few retries so offspring differ from the parent and each other
                n_switch = min(cap // 2, int(ctx.rng.geometric(p_stop)))
                child = level_switch(
                    parent,
                    ctx.cost,
                    b.value,
                    ctx.rng,
                    n_switch,
                    max_changes=cap,
                    loss=ctx.loss,
                    cross_kind=self.cross_kind,
                    kinds=self.kinds,
                )
                key = ctx.cost.canonical(child)[0].tobytes()
                if key not in seen:
                    break
            seen.add(key)
            out.append(child)
        return out

    def step(self, gen: int) -> None:
        ctx = self.ctx
        if len(self.parents) != len(ctx.budgets):  # a state without raw parents: start from the winners
            self.parents = [self._raw_winner(bi, []) for bi in range(len(ctx.budgets))]
        cands: list[tuple[int, np.ndarray]] = []  # (budget index, raw genome)
        if len(self.best) != len(ctx.budgets):
            self._track()  # the starts' winners: the reference of the first stall count
        for bi, b in enumerate(ctx.budgets):
            cands += [(bi, c) for c in self._offspring(self.parents[bi], b, self.escalation(bi))]
        for si, (n, _k) in enumerate(self.stages):
            last = si + 1 == len(self.stages)
            if last:  # the parent competes again in the final stage (on all samples: its cached score)
                cands += [(bi, p) for bi, p in enumerate(self.parents)]
            # below full fidelity each stage reads fresh micro-batches (a random first one per stage)
            start = int(ctx.rng.integers(1 << 30)) if self.fresh and n < ctx.n_total else 0
            genomes = np.stack([g for _, g in cands])
            fit = ctx.evaluate(genomes, n, np.array([ctx.budgets[bi].value for bi, _ in cands]), start=start)
            if last:
                break  # full-fidelity results are in the archive; the winners update through it
            keep = self.stages[si + 1][1]
            nxt = []
            for bi in range(len(ctx.budgets)):
                idx = [i for i, (bj, _) in enumerate(cands) if bj == bi]
                best = sorted(idx, key=lambda i: (fit[i], i))[:keep]  # stable: ties by offspring order
                nxt += [cands[i] for i in best]
            cands = nxt
        # the next parent: each budget's archive winner, raw where it is the parent or one of these candidates
        self.parents = [
            self._raw_winner(bi, [self.parents[bi]] + [g for bj, g in cands if bj == bi])
            for bi in range(len(ctx.budgets))
        ]
        self._track()


def _opt(options: dict[str, Any], key: str, default: Any) -> Any:
    v = options.get(key)
    return default if v is None else v


# --------------------------------------------------------------------------------------------------
# evosax


_ALGOS: dict[tuple[str, int, int], tuple[Any, Any]] = {}


class _Evosax(Strategy):
    """Shared evosax plumbing: one algorithm state per budget, explicit jax keys, flat state leaves."""

    default_population = 16

    def __init__(self, ctx: Context, population: int | None = None):
        super().__init__(ctx, population)
        import jax

        self._jax = jax
        # evosax jits ask/tell with the algorithm object static: reusing one object per shape reuses
        # the compiled functions across runs (and across the budgets of one run)
        key = (type(self).__name__, max(self.population, 2), ctx.cost.n_genes)
        if key not in _ALGOS:
            algo = self._make(key[1])
            self.algo = algo
            # default params are dozens of tiny ops: one jitted program compiles faster than each op
            _ALGOS[key] = (algo, jax.jit(self._params)())
        self.algo, self.params = _ALGOS[key]
        self.key = jax.random.key_data(jax.random.PRNGKey(ctx.seed))
        self.states: list[Any] = []

    def _make(self, pop: int) -> Any:
        raise NotImplementedError

    def _params(self) -> Any:
        return self.algo.default_params

    def _split(self) -> Any:
        jax = self._jax
        k, sub = jax.random.split(jax.random.wrap_key_data(self.key))
        self.key = jax.random.key_data(k)
        return sub

    def _candidates(self, x: np.ndarray, b: Budget) -> np.ndarray:
        cost, rng = self.ctx.cost, self.ctx.rng
        return np.stack([fill(repair(g, cost, b.value, rng), cost, b.value, rng) for g in from_unit(x, cost)])

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"key": np.asarray(self.key)}
        for bi, st in enumerate(self.states):
            for li, leaf in enumerate(self._jax.tree_util.tree_leaves(st)):
                arrays[f"s{bi}_{li}"] = np.asarray(leaf)
        return {"n_states": len(self.states)}, arrays

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        jax = self._jax
        self.key = jax.numpy.asarray(arrays["key"])
        template = self._template()
        leaves0, treedef = jax.tree_util.tree_flatten(template)
        self.states = []
        for bi in range(int(meta["n_states"])):
            leaves = [jax.numpy.asarray(arrays[f"s{bi}_{li}"], dtype=l0.dtype) for li, l0 in enumerate(leaves0)]
            self.states.append(jax.tree_util.tree_unflatten(treedef, leaves))

    def _template(self) -> Any:
        raise NotImplementedError


class GA(_Evosax):
    name = "ga"
    default_population = 32
    mutation_std = 0.1  # in [0, 1] coordinates: ~1 level on an 8-level ladder
    crossover_rate = 0.5

    def _make(self, pop: int) -> Any:
        import optax
        from evosax.algorithms import SimpleGA

        return SimpleGA(pop, np.zeros(self.ctx.cost.n_genes, np.float32), optax.constant_schedule(self.mutation_std))

    def _params(self) -> Any:
        return self.algo.default_params.replace(crossover_rate=self.crossover_rate)

    def settings(self) -> dict[str, Any]:
        return {
            "population": self.algo.population_size,
            "algorithm": "evosax.SimpleGA",
            "mutation_std": self.mutation_std,
            "crossover_rate": self.crossover_rate,
            "coordinates": "level / max level, rounded, repaired + filled (Lamarckian)",
        }

    def _template(self) -> Any:
        jnp = self._jax.numpy
        p, n = self.algo.population_size, self.ctx.cost.n_genes
        return self.algo.init(self._jax.random.PRNGKey(0), jnp.zeros((p, n)), jnp.zeros(p), self.params)

    def init(self) -> None:
        ctx, p = self.ctx, self.algo.population_size
        pops, gs, bs = [], [], []
        for b in ctx.budgets:
            first = self._uniform_best(b)[:1] or [repair(uniform_genome(ctx.tree, 0.0), ctx.cost, b.value, ctx.rng)]
            pop = [fill(first[0], ctx.cost, b.value, ctx.rng)]
            pop += [random_genome(ctx.cost, b.value, ctx.rng) for _ in range(p - 1)]
            pops.append(pop)
            gs += pop
            bs += [b.value] * p
        fit = self._eval_full(gs, bs)
        jnp = self._jax.numpy
        self.states = [
            self.algo.init(
                self._split(),
                jnp.asarray(to_unit(np.stack(pop), ctx.cost), jnp.float32),
                jnp.asarray(fit[bi * p : (bi + 1) * p], jnp.float32),
                self.params,
            )
            for bi, pop in enumerate(pops)
        ]

    def step(self, gen: int) -> None:
        ctx, p, jnp = self.ctx, self.algo.population_size, self._jax.numpy
        cands = []
        for bi, b in enumerate(ctx.budgets):
            x, self.states[bi] = self.algo.ask(self._split(), self.states[bi], self.params)
            cands.append(self._candidates(np.asarray(x), b))
        fit = self._eval_full(list(np.concatenate(cands)), [b.value for b in ctx.budgets for _ in range(p)])
        for bi, c in enumerate(cands):
            f = np.where(np.isfinite(fit[bi * p : (bi + 1) * p]), fit[bi * p : (bi + 1) * p], 1e30)
            self.states[bi], _ = self.algo.tell(
                self._split(),
                jnp.asarray(to_unit(c, ctx.cost), jnp.float32),
                jnp.asarray(f, jnp.float32),
                self.states[bi],
                self.params,
            )


class CMAES(_Evosax):
    name = "cmaes"
    default_population = 16
    std_init = 0.15

    def _make(self, pop: int) -> Any:
        from evosax.algorithms import CMA_ES

        return CMA_ES(pop, np.zeros(self.ctx.cost.n_genes, np.float32))

    def _params(self) -> Any:
        return self.algo.default_params.replace(std_init=self._jax.numpy.asarray(self.std_init))

    def settings(self) -> dict[str, Any]:
        return {
            "population": self.algo.population_size,
            "algorithm": "evosax.CMA_ES",
            "std_init": self.std_init,
            "coordinates": "level / max level, rounded, repaired + filled (told the raw samples)",
        }

    def _template(self) -> Any:
        jnp = self._jax.numpy
        return self.algo.init(self._jax.random.PRNGKey(0), jnp.zeros(self.ctx.cost.n_genes), self.params)

    def init(self) -> None:
        ctx, jnp, gs, bs = self.ctx, self._jax.numpy, [], []
        self.states = []
        for b in ctx.budgets:
            first = self._uniform_best(b)[:1] or [repair(uniform_genome(ctx.tree, 0.0), ctx.cost, b.value, ctx.rng)]
            start = fill(first[0], ctx.cost, b.value, ctx.rng)
            gs.append(start)
            bs.append(b.value)
            self.states.append(
                self.algo.init(self._split(), jnp.asarray(to_unit(start, ctx.cost), jnp.float32), self.params)
            )
        self._eval_full(gs, bs)

    def step(self, gen: int) -> None:
        ctx, p, jnp = self.ctx, self.algo.population_size, self._jax.numpy
        xs, cands = [], []
        for bi, b in enumerate(ctx.budgets):
            x, self.states[bi] = self.algo.ask(self._split(), self.states[bi], self.params)
            xs.append(x)
            cands.append(self._candidates(np.asarray(x), b))
        fit = self._eval_full(list(np.concatenate(cands)), [b.value for b in ctx.budgets for _ in range(p)])
        for bi in range(len(ctx.budgets)):
            f = np.where(np.isfinite(fit[bi * p : (bi + 1) * p]), fit[bi * p : (bi + 1) * p], 1e30)
            self.states[bi], _ = self.algo.tell(
                self._split(), xs[bi], jnp.asarray(f, jnp.float32), self.states[bi], self.params
            )


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (LevelSwitch, GA, CMAES, Uniform, OneShot, Depth, RandomSearch)
}


def make_strategy(name: str, ctx: Context, population: int | None = None) -> Strategy:
    if name not in STRATEGIES:
        raise SearchError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name](ctx, population)
