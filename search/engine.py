"""The search driver: budgets -> strategy generations -> plan.json, history, Pareto plot, checkpoints.

:func:`run` is what ``python -m tmp_jax.search`` calls (and what tests exercise). It

1. builds (or takes) a pruning problem — the tree plus a minimised fitness on cached teacher outputs,
   with a multi-fidelity sample count (``problem.fitness(genomes, n_samples)``);
2. parses the budgets against exact costs (a budget below the floor fails at once);
3. runs a strategy from :mod:`search.strategies`; every evaluation goes through :class:`FitnessCache`,
   which refuses over-budget candidates, caches fitness per (decoded genome, sample count) and keeps
   the archive of full-fidelity results that winners and the Pareto front are read from;
4. after every generation appends ``history.jsonl`` and writes an atomic checkpoint (JSON + NPZ, no
   pickle) holding the archive, the numpy RNG state and the strategy state, so ``--resume`` after a
   kill at any point ends with the same plan as an uninterrupted run;
5. writes ``plan.json`` (format: ``docs/plan-format.md``; :func:`load_plan` reads it back),
   ``pareto.png`` and prints a summary.

Each phase (``loading`` and ``calibration`` in ``build_problem``, ``compiling`` the warm-up, ``searching``) prints
a start and an end line on stderr (:func:`tmp_jax.progress.phase`), with or without progress bars. The problem's
dtype (``--dtype``: the teacher's and every candidate's) is recorded in the plan and the checkpoint signature.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from search.budget import Budget, BudgetError, CostModel, SearchError, fmt_count, parse_budgets
from search.genome import GeneLoss, split_importance
from search.strategies import STRATEGIES, Context, Strategy, make_strategy
from tmp_jax.fileio import atomic_npz, atomic_write
from tmp_jax.plan import FORMAT_VERSION, budget_metric, build_plan, jsonable, load_plan, plan_assignment, plan_json
from tmp_jax.tree import Tree

CHECKPOINT_VERSION = 1


class Problem(Protocol):
    """What the engine needs from a pruning problem (``tmp_jax.problem.PruningProblem``)."""

    tree: Tree
    arch: str
    source: dict[str, Any]
    order: dict[tuple[str, str], np.ndarray]

    def fitness(self, genomes: np.ndarray, n_samples: int | None = None) -> np.ndarray: ...

    # optional: ``fitness(genomes, n_samples, start=k)`` reads each task's micro-batches cyclically from the k-th
    # (fresh micro-batches per selection stage); a problem without ``start`` is always read from the first

    def n_samples_total(self) -> int: ...


@dataclass
class SearchConfig:
    """One search run (the CLI's flags). ``budget`` is one or several comma-separated budgets."""

    budget: str
    model: str | None = None
    budget_kind: str = "params"
    calib: str | None = None
    # the embedded teachers' built-in set without --calib: "trajectory" (the teacher's CFG sampler states, scored
    # on the guided output: tmp_jax.trajectory) or "noised" (noised training images at random sigma)
    calib_source: str = "trajectory"
    out: str = "search-out"
    strategy: str = "levelswitch"
    population: int | None = None
    generations: int | None = None
    seed: int = 0
    resume: bool = False
    mesh: str | None = None
    progress: bool = True
    summary: bool = True
    task: str | None = None  # "t2i,ti2i" / "t2i:0.7,ti2i:0.3": tasks of the calibration set and their weights
    compensate: bool = True  # compensated pruning: OBS order + least-squares re-fit of the kept consumers
    damp: float = 0.01  # the re-fit's ridge, as a fraction of the Gram's mean diagonal
    gram_stride: int = 1  # the Grams read every gram_stride-th token
    gram_timestep_weight: str = "uniform"  # each sample's Gram weight by its noise level: uniform | high-noise
    dtype: str = "auto"  # the teacher's and the candidates' dtype: bf16, fp32, auto (bf16 on GPU/TPU, fp32 on CPU)
    phases: bool = True  # "[phase] loading ... done in 12.3 s" lines on stderr (also without progress bars)
    eval_mode: str = "auto"  # candidate evaluation: auto | masked | sliced (tmp_jax.problem.EVAL_MODES)
    # levelswitch dynamics (None: the strategy's default; search.strategies.LevelSwitch)
    max_changes: int | None = None  # cap on the total level changes of an offspring vs its parent
    cross_kind: float | None = None  # probability that a level switch pairs genes of different kinds
    patience: int | None = None  # generations without improvement before the change cap doubles (0: never)
    start: str | None = None  # classic (default: uniform / oneshot) | all (+ tree DP) | dp | auto (DP if cheap)
    fresh_batches: bool = True  # each selection stage below full fidelity reads fresh calibration micro-batches
    # recoverability (TinyFusion): the best `recover_top` full-fidelity candidates per budget are distilled for
    # `recover_steps` steps and the best RECOVERED one wins (0: the best pruned one, no distillation)
    recover_steps: int = 0
    recover_top: int = 4
    # the last selection stage's rollout (issue 17): the best `rollout_top` full-fidelity candidates per budget
    # each sample `rollout_samples` latents with `rollout_steps` CFG Euler steps from the teacher's noise, and the
    # one whose final latents are closest to the teacher's wins (0: off)
    rollout_steps: int = 0
    rollout_top: int = 4
    rollout_samples: int = 40
    # reconstructability: the best `reconstruct_top` full-fidelity candidates per budget are each re-fitted block by
    # block (tmp_jax.reconstruct, `reconstruct_steps` Adam steps per block, on the calibration set) and the one with
    # the least error AFTER that re-fit wins: the plan the cluster-free path re-fits best (0: off)
    reconstruct_steps: int = 0
    reconstruct_top: int = 4


@dataclass
class SearchResult:
    plans: list[dict[str, Any]]
    plan_paths: list[Path]
    out: Path
    generations: int
    evals: int
    sample_evals: int
    wall_s: float
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Evaluation, cache and archive


class FitnessCache:
    """The only door to ``problem.fitness``: budget check, cache, counters, full-fidelity archive."""

    def __init__(self, problem: Problem, cost: CostModel, n_total: int):
        self.problem, self.cost, self.n_total = problem, cost, n_total
        try:
            self.takes_start = "start" in inspect.signature(problem.fitness).parameters
        except (TypeError, ValueError):
            self.takes_start = False
        self.cache: dict[tuple[bytes, int, int], float] = {}
        self.order: list[tuple[np.ndarray, int, int, float]] = []  # insertion order, for checkpoints
        self.evals = 0
        self.sample_evals = 0
        self.arch_genomes: list[np.ndarray] = []
        self.arch_fitness: list[float] = []
        self.arch_cost: list[int] = []

    def __call__(self, genomes: np.ndarray, n: int, budget_values: np.ndarray, start: int = 0) -> np.ndarray:
        """Fitness of ``genomes`` on ``n`` samples, the micro-batches read from the ``start``-th on (ignored at
        full fidelity and by problems without it); cached per (canonical genome, n, start)."""
        start = int(start) if self.takes_start and n < self.n_total else 0
        g = self.cost.canonical(genomes)
        c = self.cost(g)
        over = np.flatnonzero(c > np.asarray(budget_values))
        if len(over):  # a strategy bug, never a user error: nothing over budget is ever evaluated
            raise RuntimeError(f"candidate over budget: cost {c[over[0]]:,} > {budget_values[over[0]]:,}")
        keys = [row.tobytes() for row in g]
        todo: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if (k, n, start) not in self.cache and k not in todo:
                todo[k] = i
        if todo:
            rows = np.stack([g[i] for i in todo.values()]).astype(np.int32)
            kw = {"start": start} if start else {}
            fit = np.asarray(self.problem.fitness(rows, n_samples=n, **kw), np.float64).reshape(-1)
            if fit.shape != (len(rows),):
                raise RuntimeError(f"problem.fitness returned shape {fit.shape} for {len(rows)} genomes")
            fit = np.where(np.isfinite(fit), fit, np.inf)  # a failed candidate never wins
            for i, f in zip(todo.values(), fit):
                self._record(g[i], n, start, float(f), int(c[i]))
            self.evals += len(rows)
            self.sample_evals += len(rows) * n
        return np.array([self.cache[(k, n, start)] for k in keys])

    def _record(self, genome: np.ndarray, n: int, start: int, f: float, cost: int) -> None:
        self.cache[(genome.tobytes(), n, start)] = f
        self.order.append((genome.copy(), n, start, f))
        if n == self.n_total:
            self.arch_genomes.append(genome.copy())
            self.arch_fitness.append(f)
            self.arch_cost.append(cost)

    def winner(self, budget_value: int) -> tuple[np.ndarray, float] | None:
        """Best full-fidelity candidate within ``budget_value`` (first found wins ties)."""
        if not self.arch_fitness:
            return None
        f = np.where(np.asarray(self.arch_cost) <= budget_value, self.arch_fitness, np.nan)
        if np.all(np.isnan(f)):
            return None
        i = int(np.nanargmin(f))
        return self.arch_genomes[i], float(self.arch_fitness[i])

    # checkpoint -----------------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        n_genes = self.cost.n_genes
        return {
            "cache_genomes": np.array([g for g, _, _, _ in self.order], np.int32).reshape(-1, n_genes),
            "cache_n": np.array([n for _, n, _, _ in self.order], np.int64),
            "cache_start": np.array([s for _, _, s, _ in self.order], np.int64),
            "cache_fit": np.array([f for _, _, _, f in self.order], np.float64),
        }

    def restore(self, arrays: dict[str, np.ndarray], evals: int, sample_evals: int) -> None:
        g = arrays["cache_genomes"].astype(np.int64)
        costs = self.cost(g) if len(g) else np.zeros(0, np.int64)
        starts = arrays.get("cache_start", np.zeros(len(g), np.int64))  # checkpoints before fresh batches: 0
        for row, n, s, f, c in zip(g, arrays["cache_n"], starts, arrays["cache_fit"], costs):
            self._record(row, int(n), int(s), float(f), int(c))
        self.evals, self.sample_evals = evals, sample_evals


# --------------------------------------------------------------------------------------------------
# Plans


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z.]+", "_", text.replace("%", "pct")).strip("_")


# --------------------------------------------------------------------------------------------------
# Pareto plot


def pareto_front(params: np.ndarray, fitness: np.ndarray) -> np.ndarray:
    """Indices of non-dominated points (fewer params AND lower fitness), by increasing params."""
    idx = np.lexsort((fitness, params))
    front, best = [], np.inf
    for i in idx:
        if fitness[i] < best:
            front.append(int(i))
            best = fitness[i]
    return np.array(front, np.int64)


def plot_pareto(
    path: Path,
    params: np.ndarray,
    fitness: np.ndarray,
    winners: list[tuple[str, int, float]],
    title: str,
    budget_lines: Sequence[int] = (),
) -> None:
    """Fitness vs params of every evaluated in-budget candidate; front highlighted; budget winners."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ok = np.isfinite(fitness)
    ax.scatter(params[ok], fitness[ok], s=10, c="0.7", label=f"evaluated on all samples ({int(ok.sum())})")
    if ok.any():
        fr = np.flatnonzero(ok)[pareto_front(params[ok], fitness[ok])]
        ax.step(params[fr], fitness[fr], where="post", c="C0", lw=1.5)
        ax.scatter(params[fr], fitness[fr], s=18, c="C0", label="Pareto front")
    for v in budget_lines:
        ax.axvline(v, c="0.5", ls=":", lw=1)
    markers = "*DsP^vX"
    for i, (label, p, f) in enumerate(winners):
        ax.scatter(
            [p],
            [f],
            s=120,
            marker=markers[i % len(markers)],
            c=f"C{(i % 8) + 1}",
            edgecolors="k",
            zorder=5,
            label=f"budget {label}",
        )
    ax.set_xlabel("parameters")
    ax.set_ylabel("fitness (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# The run


def _top_candidates(ev: FitnessCache, b: Budget, k: int, tree: Tree | None = None) -> list[tuple[np.ndarray, float]]:
    """The ``k`` best full-fidelity candidates within budget ``b`` (distinct genomes), best first.

    With ``tree``: one per STRUCTURE first (the set of nodes the candidate drops: blocks, sub-layers), the best of
    each structure in order of its best fitness, then the next best of any structure up to ``k``. What the
    reconstruction re-ranking takes: a block-by-block re-fit repairs some plans far more than others, and the best
    pruned plan need not be the best re-fitted one (docs/quality.md, "Does the search's lead survive
    reconstruction?"), so plans of other structures get re-fitted too, not only near-copies of the winner."""
    fit, cost = np.asarray(ev.arch_fitness, np.float64), np.asarray(ev.arch_cost)
    order = np.argsort(np.where(cost <= b.value, fit, np.inf), kind="stable")
    ok = [i for i in order if cost[i] <= b.value and np.isfinite(fit[i])]
    seen, rows = set(), []
    if tree is not None:
        shapes: set[frozenset[str]] = set()
        for i in ok:
            shape = frozenset(tree.decode(ev.arch_genomes[i]).dropped)
            key = ev.arch_genomes[i].tobytes()
            if shape in shapes or key in seen or len(rows) == k:
                continue
            shapes.add(shape)
            seen.add(key)
            rows.append((ev.arch_genomes[i], float(fit[i])))
    for i in ok:
        key = ev.arch_genomes[i].tobytes()
        if len(rows) >= k:
            break
        if key in seen:
            continue
        seen.add(key)
        rows.append((ev.arch_genomes[i], float(fit[i])))
    return sorted(rows, key=lambda r: r[1])


class Rerank(NamedTuple):
    """One re-ranking of each budget's best final candidates: the problem's method that scores a candidate, the
    candidate record's field for that score, the phase's name, and the plan entry that lists the candidates."""

    method: str
    field: str
    phase: str
    plan_key: str


# how -> its re-ranking, in the order they apply (a later one picks the winner)
RERANKS: dict[str, Rerank] = {
    "rollout": Rerank("rollout_fitness", "rollout_error", "rollout", "rollout"),
    "reconstruct": Rerank("reconstructed_fitness", "reconstructed_fitness", "reconstructing", "reconstruction"),
    "recover": Rerank("recovered_fitness", "recovered_fitness", "recovering", "recovery"),
}


def _rerank(problem: Problem, ev: FitnessCache, budgets: list[Budget], config: SearchConfig, how: str) -> dict:
    """Per budget: its best full-fidelity candidates, each with its pruned fitness and a second score that picks
    the winner (:data:`RERANKS`). ``how``: ``rollout`` (``rollout_fitness``: final-latent error of a
    ``rollout_steps``-step sampler rollout), ``reconstruct`` (``reconstructed_fitness`` after block-by-block
    reconstruction with ``reconstruct_steps`` Adam steps per block) or ``recover`` (``recovered_fitness`` after
    ``recover_steps`` distillation steps: TinyFusion)."""
    from tmp_jax.progress import phase

    method, field, name, _ = RERANKS[how]
    opt = f"--{how}-steps"
    fn = getattr(problem, method, None)
    if fn is None:
        raise SearchError(f"{opt} needs a problem that can {how} its candidates (tmp_jax.problem)")
    top = getattr(config, f"{how}_top")
    steps = getattr(config, f"{how}_steps")
    out: dict[str, list] = {}
    tree = getattr(problem, "tree", None) if how == "reconstruct" else None  # one per structure first
    with phase(name, enabled=config.phases):
        for b in budgets:
            out[b.text] = []
            for g, f in _top_candidates(ev, b, top, tree):
                try:
                    if how == "recover":
                        r = float(fn(g, steps, calib=config.calib, seed=config.seed))
                    elif how == "rollout":
                        r = float(fn(g, steps, n=config.rollout_samples, seed=config.seed))
                    else:  # a bar per candidate: each re-fit takes steps x blocks training steps
                        r = float(fn(g, steps, progress=config.progress))
                except ValueError as e:  # no data pipeline / sampler / block schedule for this model: one line
                    raise SearchError(f"{opt}: {e}") from None
                out[b.text].append({"genome": [int(x) for x in g], "fitness": f, field: r})
    return out


def _build_problem(cfg: SearchConfig) -> Problem:
    try:
        from tmp_jax.problem import build_problem
    except ModuleNotFoundError as e:
        if e.name == "tmp_jax.problem":
            raise SearchError("tmp_jax.problem is not available in this checkout") from None
        raise
    try:
        from tmp_jax.compensate import CompensationConfig

        comp = (
            CompensationConfig(damp=cfg.damp, token_stride=cfg.gram_stride, timestep_weight=cfg.gram_timestep_weight)
            if cfg.compensate
            else None
        )
        return build_problem(
            cfg.model,
            cfg.calib,
            cfg.mesh,
            cfg.seed,
            cfg.progress,
            task=cfg.task,
            compensation=comp,
            dtype=cfg.dtype,
            phases=cfg.phases,
            eval_mode=cfg.eval_mode,
            calib_source=cfg.calib_source,
            keep_teacher=False,  # the search needs only the permuted copy: half the teacher memory
        )
    except ValueError as e:
        # malformed options: a config error
        if str(e).startswith(("--task", "--dtype", "--eval-mode", "--calib-source")):
            raise SearchError(str(e)) from None
        raise


def _precheck_budgets(cfg: SearchConfig) -> None:
    """Fail on a bad budget BEFORE loading and calibrating, when the problem module can give the tree
    from the model's config alone (optional ``tmp_jax.problem.load_tree(model) -> Tree``)."""
    try:
        from tmp_jax import problem as pm
    except ModuleNotFoundError:
        return
    load_tree = getattr(pm, "load_tree", None)
    if load_tree is None:
        return
    try:
        tree = load_tree(cfg.model)
    except ValueError as e:  # the model's config.json is unusable: a one-line error, before any work
        raise SearchError(str(e)) from None
    parse_budgets(cfg.budget, CostModel(tree, cfg.budget_kind))


def _signature(cfg: SearchConfig, strat: Strategy, budgets: list[Budget], problem: Problem, n_total: int) -> dict:
    tree = problem.tree
    genes = hashlib.sha256("\n".join(f"{g.name}:{g.counts}" for g in tree.genes).encode()).hexdigest()[:16]
    return {
        "strategy": cfg.strategy,
        "settings": jsonable(strat.settings()),
        "budgets": [b.to_json() for b in budgets],
        "seed": cfg.seed,
        "genes": genes,
        "n_samples_total": n_total,
        "fingerprint": str((getattr(problem, "source", {}) or {}).get("fingerprint", "")),
        "task": cfg.task,
        "compensation": _signature_compensation(problem),
        "dtype": _problem_dtype(problem) or "float32",
    }


# signature keys added after checkpoints were first written: their value in a checkpoint that lacks them
_SIGNATURE_DEFAULTS = {"dtype": "float32"}  # problems were always evaluated in float32 before --dtype


def _problem_dtype(problem: Problem) -> str | None:
    """The dtype the problem evaluates candidates in (``"bfloat16"``, ``"float32"``); None if it does not say."""
    dt = getattr(problem, "dtype", None)
    return None if dt is None else str(dt)


def _signature_compensation(problem: Problem) -> dict[str, Any] | None:
    """The compensation record in a resume signature; the uniform timestep weighting is left out, so search
    checkpoints written before that field existed still resume."""
    rec = _compensation_record(problem)
    if rec is not None and rec.get("timestep_weight") == "uniform":
        rec = {k: v for k, v in rec.items() if k != "timestep_weight"}
    return rec


def _compensation_record(problem: Problem) -> dict[str, Any] | None:
    """What a plan records of compensated pruning (None: prefix slicing only)."""
    comp = getattr(problem, "compensation", None)
    if comp is None:
        return None
    return {**comp.config.to_json(), "calibration": getattr(problem, "calib_fingerprint", None)}


def _save_compensation(out: Path, problem: Problem) -> dict[str, Any] | None:
    """Write the consumer Grams next to the plans; returns the plan's ``compensation`` record (with the
    file's name and sha256), so ``converters.export`` reproduces the re-fitted weights from the source."""
    rec = _compensation_record(problem)
    if rec is None:
        return None
    from tmp_jax.compensate import STATS_FILE

    sha = problem.compensation.save(out / STATS_FILE)
    return {**rec, "stats": STATS_FILE, "stats_sha256": sha}


def _save_importance(path: Path, problem: Problem) -> None:
    """Store the calibration importance with the run (per-unit scores, block scores, unit order)."""
    units = getattr(problem, "importance", None)
    if not units:
        return
    arrays = {f"units/{n}/{k}": np.asarray(v) for (n, k), v in units.items()}
    arrays.update({f"block/{n}": np.asarray(v) for n, v in (getattr(problem, "block_scores", None) or {}).items()})
    arrays.update({f"order/{n}/{k}": np.asarray(v) for (n, k), v in (getattr(problem, "order", None) or {}).items()})
    atomic_npz(path, arrays)


def run(config: SearchConfig, problem: Problem | None = None) -> SearchResult:
    """Run one search (see the module docstring); returns the plans (one per budget) and counters."""
    if config.strategy not in STRATEGIES:
        raise SearchError(f"unknown strategy {config.strategy!r}; choose from {', '.join(STRATEGIES)}")
    if config.generations is not None and config.generations < 0:
        raise SearchError(f"--generations must be >= 0, got {config.generations}")
    if problem is None:
        _precheck_budgets(config)
        problem = _build_problem(config)
    tree = problem.tree
    tokens = dict(getattr(problem, "tokens", None) or {}) or None
    cost = CostModel(tree, config.budget_kind, tokens)
    tokens = cost.tokens
    budgets = parse_budgets(config.budget, cost)
    params_cost = cost if config.budget_kind == "params" else CostModel(tree, "params", tokens)
    n_total = int(problem.n_samples_total())
    if n_total < 1:
        raise SearchError("the problem has no calibration samples")

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.Generator(np.random.PCG64(config.seed))
    ev = FitnessCache(problem, cost, n_total)
    imp = split_importance(problem)
    loss = GeneLoss(tree, cost, imp[0], imp[1], getattr(problem, "order", None)) if imp else None
    options = {
        "max_changes": config.max_changes,
        "cross_kind": config.cross_kind,
        "patience": config.patience,
        "start": config.start,
        "fresh_batches": config.fresh_batches and ev.takes_start,
        # the run's length: levelswitch's start auto weighs the DP's error tables against it
        "generations": config.generations,
    }
    ctx = Context(tree, cost, budgets, ev, n_total, rng, config.seed, ev.winner, loss, imp[1] if imp else None, options)
    strat = make_strategy(config.strategy, ctx, config.population)
    generations = config.generations if config.generations is not None else strat.default_generations
    generations = generations if strat.iterative else 0
    sig = _signature(config, strat, budgets, problem, n_total)

    from tmp_jax.progress import phase, progress_bar

    warm = getattr(problem, "warmup", None)
    if warm is not None:  # compile every width level once, so generations compile nothing
        with phase("compiling", enabled=config.phases):
            # a PruningProblem shows a "compiling" bar (k/N warm-up candidates, ETA); other problems may not take it
            takes_progress = "progress" in inspect.signature(warm).parameters
            warm(progress=config.progress) if takes_progress else warm()
    history: list[dict[str, Any]] = []
    elapsed0 = 0.0
    start = -1  # last completed generation
    ckpt = out / "checkpoint.json"
    if config.resume and ckpt.exists():
        meta = json.loads(ckpt.read_text())
        if meta.get("checkpoint_version") != CHECKPOINT_VERSION:
            raise SearchError(f"{ckpt}: unsupported checkpoint version {meta.get('checkpoint_version')!r}")
        diff = [k for k in sig if meta["signature"].get(k, _SIGNATURE_DEFAULTS.get(k)) != sig[k]]
        if diff:
            raise SearchError(
                f"{ckpt} is from a different search ({', '.join(diff)} differ); use another --out or drop --resume"
            )
        with np.load(out / meta["npz"], allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        ev.restore(arrays, meta["evals"], meta["sample_evals"])
        rng.bit_generator.state = meta["rng"]
        strat.load_state(meta["strategy"], {k[9:]: v for k, v in arrays.items() if k.startswith("strategy/")})
        history, elapsed0, start = meta["history"], float(meta["elapsed_s"]), int(meta["generation"])
        atomic_write(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    else:
        (out / "history.jsonl").unlink(missing_ok=True)
    # only now: a refused --resume (another search) must not overwrite that search's files
    _save_importance(out / "importance.npz", problem)
    comp_record = _save_compensation(out, problem)

    t_run = time.time()

    def record(gen: int) -> dict[str, Any]:
        per = []
        for b in budgets:
            w = ev.winner(b.value)
            assert w is not None, f"no candidate within budget {b.text}"
            per.append(
                {"budget": b.text, "fitness": w[1], "params": int(params_cost(w[0])[0]), "cost": int(cost(w[0])[0])}
            )
        h = {
            "gen": gen,
            "best_fitness": per[0]["fitness"],
            "params": per[0]["params"],
            "evals": ev.evals,
            "sample_evals": ev.sample_evals,
            "wall_s": round(elapsed0 + time.time() - t_run, 3),
            "budgets": per,
        }
        history.append(h)
        return h

    def checkpoint(gen: int) -> None:
        smeta, sarr = strat.state()
        arrays = {**ev.arrays(), **{f"strategy/{k}": v for k, v in sarr.items()}}
        npz = f"checkpoint-{gen}.npz"
        atomic_npz(out / npz, arrays)
        meta = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "signature": sig,
            "generation": gen,
            "npz": npz,
            "rng": rng.bit_generator.state,
            "strategy": smeta,
            "history": history,
            "evals": ev.evals,
            "sample_evals": ev.sample_evals,
            "elapsed_s": elapsed0 + time.time() - t_run,
        }
        atomic_write(ckpt, plan_json(meta))
        for old in out.glob("checkpoint-*.npz"):  # only after the JSON points at the new one
            if old.name != npz:
                old.unlink(missing_ok=True)
        with open(out / "history.jsonl", "a") as f:
            f.write(json.dumps(history[-1]) + "\n")

    def show(bar: Any, h: dict[str, Any]) -> None:
        bar.set_postfix_str(f"best {h['best_fitness']:.4g}, {fmt_count(h['params'])}, {h['evals']} evals")

    with phase("searching", enabled=config.phases):  # the bar inside gives generations and the ETA
        bar = progress_bar(
            total=generations,
            initial=max(start, 0),
            disable=not config.progress,
            unit="gen",
            desc=f"{config.strategy} search",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        if start < 0:
            strat.init()
            show(bar, record(0))
            checkpoint(0)
            start = 0
        elif history:
            show(bar, history[-1])
        for gen in range(start + 1, generations + 1):
            strat.step(gen)
            show(bar, record(gen))
            checkpoint(gen)
            bar.update(1)
        bar.close()

    wall = elapsed0 + time.time() - t_run
    search_meta = {
        "strategy": config.strategy,
        "settings": jsonable(strat.settings()),
        "seed": config.seed,
        "generations": generations,
        "evals": ev.evals,
        "sample_evals": ev.sample_evals,
        "n_samples_total": n_total,
        "wall_s": round(wall, 3),
        "budgets": [b.to_json() for b in budgets],
        "model": config.model,
        "calib": config.calib,
        "calib_source": None if config.calib else config.calib_source,
        "mesh": config.mesh,
        "task": config.task,
        "task_weights": dict(getattr(problem, "task_weights", None) or {}),
        "dtype": _problem_dtype(problem),
    }
    ranked = {how: _rerank(problem, ev, budgets, config, how) for how in RERANKS if getattr(config, f"{how}_steps") > 0}
    for how in ranked:
        search_meta[how] = {"steps": getattr(config, f"{how}_steps"), "top": getattr(config, f"{how}_top")}
        if how == "rollout":
            search_meta[how]["samples"] = config.rollout_samples
    plans, paths = [], []
    for i, b in enumerate(budgets):
        g, f = ev.winner(b.value)
        for how, per_budget in ranked.items():  # in RERANKS order: the last one given picks the winner
            if not per_budget[b.text]:  # no full-fidelity candidate within this budget: the winner stays
                continue
            field = RERANKS[how].field
            best = min(per_budget[b.text], key=lambda r, field=field: r[field])
            g, f = np.asarray(best["genome"], np.int64), best["fitness"]  # its pruned fitness stays the plan's
        plan = build_plan(problem, b, g, f, n_total, search_meta, tokens)
        if comp_record is not None:
            plan["compensation"] = comp_record
        for how, per_budget in ranked.items():  # every re-ranked candidate, best pruned first
            if not per_budget[b.text]:
                continue
            kept = {k: v for k, v in search_meta[how].items() if k != "top"}
            plan[RERANKS[how].plan_key] = {**kept, "candidates": per_budget[b.text]}
        # the exact tree count and the vectorised cost must agree: a plan is never over its budget
        if budget_metric(tree, tree.decode(g), b.kind, tokens) > b.value or plan["counts"]["after"]["params"] != int(
            params_cost(g)[0]
        ):
            raise RuntimeError(f"internal: plan for budget {b.text} disagrees with its exact count")
        plans.append(plan)
        names = ["plan.json"] if i == 0 else []
        if len(budgets) > 1:
            names.append(f"plan-{_slug(b.text)}.json")
        for name in names:
            atomic_write(out / name, plan_json(plan))
        paths.append(out / names[-1])

    # the Pareto plot: every full-fidelity candidate within the largest budget
    pc = params_cost(np.stack(ev.arch_genomes)) if ev.arch_genomes else np.zeros(0, np.int64)
    fit = np.asarray(ev.arch_fitness, np.float64)
    inb = np.asarray(ev.arch_cost) <= max(b.value for b in budgets)
    winners = [(b.text, p["counts"]["after"]["params"], p["fitness"]["value"]) for b, p in zip(budgets, plans)]
    plot_pareto(
        out / "pareto.png",
        pc[inb].astype(np.float64),
        fit[inb],
        winners,
        f"{tree.spec.arch}: {config.strategy}, {ev.evals} evaluations, budget kind {config.budget_kind}",
        [b.value for b in budgets] if config.budget_kind == "params" else [],
    )

    res = SearchResult(plans, paths, out, generations, ev.evals, ev.sample_evals, wall, history)
    if config.summary:
        print(summary(res, budgets))
    return res


def summary(res: SearchResult, budgets: list[Budget]) -> str:
    """The final report: per budget, fitness and params before -> after, and where the files are."""
    p0 = res.plans[0]
    s = p0["search"]
    lines = [
        f"tmp_jax.search: {p0['arch']}, strategy {s['strategy']}, {res.generations} generations, "
        f"{res.evals} evaluations ({res.sample_evals} sample-evaluations), {res.wall_s:.1f} s"
    ]
    for b, plan, path in zip(budgets, res.plans, res.plan_paths):
        c = plan["counts"]
        before, after = c["before"], c["after"]
        lines.append(
            f"  budget {b.text} ({fmt_count(b.value, b.kind)}): fitness {plan['fitness']['value']:.5g}; "
            f"params {before['params']:,} -> {after['params']:,} ({after['params'] / before['params']:.1%}), "
            f"active {after['active']:,}, dropped {len(plan['policy']['dropped'])} nodes -> {path}"
        )
        how = next((h for h in reversed(RERANKS) if plan.get(RERANKS[h].plan_key)), None)  # the one that picked it
        if how is not None:
            r = plan[RERANKS[how].plan_key]
            field = RERANKS[how].field
            win = min(r["candidates"], key=lambda c, field=field: c[field])
            what = {
                "rollout": f"rollout error {{:.5g}} ({r['steps']}-step sampler, {r.get('samples')} samples)",
                "reconstruct": f"fitness {{:.5g}} after reconstruction ({r['steps']} Adam steps per block)",
                "recover": f"recovered fitness {{:.5g}} after {r['steps']} distillation steps",
            }[how].format(win[field])
            lines.append(
                f"    {what}: the best of {len(r['candidates'])} candidates "
                f"(pruned rank {r['candidates'].index(win) + 1})"
            )
    lines.append(f"  history: {res.out / 'history.jsonl'}; Pareto plot: {res.out / 'pareto.png'}")
    return "\n".join(lines)


__all__ = [
    "BudgetError",
    "FitnessCache",
    "FORMAT_VERSION",
    "SearchConfig",
    "SearchError",
    "SearchResult",
    "build_plan",
    "load_plan",
    "pareto_front",
    "plan_assignment",
    "run",
    "summary",
]
