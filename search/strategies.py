"""Search strategies and baselines, by name (``STRATEGIES``).

Every strategy works for one or several budgets at once and only ever hands the evaluator candidates
within their budget (it checks). Results are not kept here: the engine's archive holds every
full-fidelity evaluation, and the winner for a budget is the archive's best candidate within it —
so a candidate found while searching one budget also serves every larger one (the shared Pareto set).

* ``levelswitch`` (default) — EvoPress-style (1+λ) evolution per budget: λ level-switch offspring of
  the budget's current winner, multi-step selection on growing calibration sample counts (all λ on
  N/8 samples, the best quarter on N/2, the best quarter of those on N).
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
from dataclasses import dataclass
from typing import Any

import numpy as np

from search.budget import Budget, CostModel, SearchError
from search.genome import GeneLoss, fill, from_unit, level_switch, random_genome, repair, to_unit, uniform_genome
from tmp_jax.tree import Tree

# evaluate(genomes [P, G], n_samples, budget values [P]) -> fitness [P] (minimised)
EvalFn = Callable[[np.ndarray, int, np.ndarray], np.ndarray]


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
    max_switch = 3  # level-switch moves per mutation: 1 (p=1/2), 2 (1/4), 3 (1/4)

    def __init__(self, ctx: Context, population: int | None = None):
        super().__init__(ctx, population)
        self.stages = fidelity_stages(ctx.n_total, self.population)

    def settings(self) -> dict[str, Any]:
        return {
            "offspring": self.population,
            "stages": [{"samples": n, "candidates": k} for n, k in self.stages],
            "max_switch": self.max_switch,
            "start": "best of uniform / oneshot / random fill",
        }

    def init(self) -> None:
        ctx, gs, bs = self.ctx, [], []
        for b in ctx.budgets:
            starts = self._uniform_best(b)[:1]
            if not starts:
                starts = [repair(uniform_genome(ctx.tree, 0.0), ctx.cost, b.value, ctx.rng, loss=ctx.loss)]
            # the uniform start filled up to the budget: EvoPress starts from a uniform configuration
            starts.append(fill(starts[0], ctx.cost, b.value, ctx.rng))
            if ctx.loss is not None:
                starts.append(repair(ctx.tree.full_genome(), ctx.cost, b.value, loss=ctx.loss))
            gs += starts
            bs += [b.value] * len(starts)
        self._eval_full(gs, bs)

    def _offspring(self, parent: np.ndarray, b: Budget) -> list[np.ndarray]:
        ctx, out = self.ctx, []
        seen = {ctx.cost.canonical(parent)[0].tobytes()}
        for _ in range(self.population):
            for _attempt in range(4):  # a few retries so offspring differ from the parent and each other
                n_switch = min(self.max_switch, int(ctx.rng.geometric(0.5)))
                child = level_switch(parent, ctx.cost, b.value, ctx.rng, n_switch)
                key = ctx.cost.canonical(child)[0].tobytes()
                if key not in seen:
                    break
            seen.add(key)
            out.append(child)
        return out

    def step(self, gen: int) -> None:
        ctx = self.ctx
        cands: list[tuple[int, np.ndarray]] = []  # (budget index, genome)
        for bi, b in enumerate(ctx.budgets):
            w = ctx.winner(b.value)
            if w is None:
                raise RuntimeError(f"no evaluated candidate within budget {b.text}")
            cands += [(bi, c) for c in self._offspring(w[0], b)]
        for si, (n, _k) in enumerate(self.stages):
            fit = ctx.evaluate(np.stack([g for _, g in cands]), n, np.array([ctx.budgets[bi].value for bi, _ in cands]))
            if si + 1 == len(self.stages):
                break  # full-fidelity results are in the archive; the winners update through it
            keep = self.stages[si + 1][1]
            nxt = []
            for bi in range(len(ctx.budgets)):
                idx = [i for i, (bj, _) in enumerate(cands) if bj == bi]
                best = sorted(idx, key=lambda i: (fit[i], i))[:keep]  # stable: ties by offspring order
                nxt += [cands[i] for i in best]
            cands = nxt


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
