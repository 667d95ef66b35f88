"""The search problem: a teacher, its pruning tree, cached calibration outputs, and a fitness.

Fitness of a genome = normalised discrepancy between the candidate's denoiser output and the cached
teacher output over calibration micro-batches: ``sum ||y - y_T||^2 / sum ||y_T||^2`` over the output
tokens that matter (image tokens; for TI2I the target image's), minimised. A mixed set (T2I + TI2I
micro-batches, each tagged with its task) gives the weighted mean of the per-task normalised
discrepancies, ``sum_t w_t * (sum_t ||y - y_T||^2 / sum_t ||y_T||^2)``, with the ``--task`` weights.

The teacher is permuted once into importance order, so every candidate is a set of prefix slices. Two
evaluation modes (``eval_mode``), neither building a model per candidate, and after warm-up neither compiles:

* ``sliced``: the candidate at its own pruned widths. The permuted teacher's FULL parameters go through
  per-sub-layer jitted functions that slice those prefixes inside the jit (``hooks.forward_pruned``), each
  compiled once per (sub-layer kind, width level). FLOPs scale with the kept widths: for large teachers.
* ``masked``: the candidate at the teacher's full width, its decisions (unit masks, branch gates, re-fit
  slots) as runtime data of ONE program per (task, input shapes) (``hooks.forward_masked``,
  :mod:`tmp_jax.masked_eval`), several candidates per call. For small teachers, where the sliced mode's
  compiles and per-sub-layer dispatches cost more than the masked units' FLOPs.

``auto`` (the default) picks masked below :data:`MASKED_MAX_PARAMS` parameters (:data:`MASKED_MAX_PARAMS_CPU`
on the CPU, where full-width FLOPs are not free). Each micro-batch runs through its own task's hooks
(``hooks.for_task``); a task without ``forward_masked`` is evaluated sliced, and a task without
``forward_pruned`` falls back to a materialised candidate.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from tmp_jax import aot, arch
from tmp_jax.calibration import (
    Calibration,
    batches_signature,
    calibrate,
    importance,
    load_calib,
    order_from_scores,
    parse_task_weights,
    prepare,
    select_tasks,
)
from tmp_jax.compensate import Compensation, CompensationConfig, consumer_slice, gram_stats
from tmp_jax.dtypes import model_dtype
from tmp_jax.fileio import fingerprint
from tmp_jax.masked_eval import MaskedEvaluator, Precompile
from tmp_jax.materialize import Refits, materialize, permute
from tmp_jax.progress import progress_bar
from tmp_jax.teachers import ASSETS, DEFAULT_MODEL, EMBEDDED  # noqa: F401 - EMBEDDED / DEFAULT_MODEL: re-exported
from tmp_jax.teachers import load_model as _load_model
from tmp_jax.trajectory import error_weights, guided_view
from tmp_jax.tree import Tree, node_path

# the embedded teachers each registered architecture ships (tmp_jax/assets/NAME); the first is the default model

EVAL_MODES = ("auto", "masked", "sliced")
# eval_mode="auto" evaluates masked below this many teacher parameters. Masked evaluation runs every candidate
# at the teacher's FULL width (a candidate at half the budget costs twice its own FLOPs) but compiles one
# program instead of one per (sub-layer, width level) and dispatches one call per few candidates instead of
# ~2 per block per candidate. On an accelerator a forward below ~1e9 parameters is launch- and compile-bound
# (the embedded teachers: ~5M; a cold sliced warm-up compiles ~50 programs of 1-5 s each on a GPU), so the
# masked FLOPs are nearly free; from the ~6B Z-Image up, the FLOPs dominate and the sliced per-width programs
# (compiled once, reused for the whole search) are the cheaper way.
MASKED_MAX_PARAMS = 1_000_000_000
# The same on the CPU, where a forward is compute-bound at any size: full-width FLOPs cost their full time.
# Measured on the 5.1M-parameter embedded DiT (2 cores): the masked warm-up is 12 s shorter (1 program vs 50)
# but a random candidate costs 65 vs 30 ms per micro-batch, so sliced wins after ~40 full evaluations (a
# default search makes 1000). Test-size teachers (< 1e6: ~0.6M for the tiny configs) run a forward in a few
# ms, where compiles dominate any search.
MASKED_MAX_PARAMS_CPU = 1_000_000


def warmup_genomes(tree: Tree, data_kinds: frozenset[str] | set[str] = frozenset()) -> list[np.ndarray]:
    """Genomes that together visit, for every node, every combination of the levels of the SHAPE genes acting
    on it (keep genes at 'keep'). Generic: a gene acts on its ``node`` and on its tied ``members``.

    ``data_kinds``: gene kinds the evaluator takes as runtime data (``ArchHooks.data_kinds``, e.g. an expert
    count applied as a router mask). They never change a compiled shape, so they stay at full size here: a
    node with an expert-count and an expert-width gene needs width-many genomes, not count x width. Nodes walk
    their combinations side by side, so the number of genomes is the largest per-node product of shape
    levels, and the compiled programs grow with the sum of the levels over unit kinds."""
    mx = tree.max_levels()
    by_node: dict[str, list[int]] = {}
    for i, g in enumerate(tree.genes):
        if g.kind == "keep" or g.kind in data_kinds:
            continue
        for n in dict.fromkeys((g.node, *g.members)):
            by_node.setdefault(n, []).append(i)
    groups = list(dict.fromkeys(tuple(ix) for ix in by_node.values()))
    sizes = [int(np.prod([mx[i] + 1 for i in ix])) for ix in groups]
    out = []
    for k in range(max(sizes, default=1)):
        g = mx.copy()
        for ix, size in zip(groups, sizes):
            r = k % size
            for i in ix:  # mixed-radix digits of r, one per gene of the group
                g[i] = r % (mx[i] + 1)
                r //= mx[i] + 1
        out.append(g)
    return out


def resolve_eval_mode(mode: str, hooks: arch.ArchHooks, tasks: Any, n_params: int) -> str:
    """``auto`` -> ``masked`` when one of the weighted ``tasks`` has ``forward_masked`` and the teacher has fewer
    than :data:`MASKED_MAX_PARAMS` parameters (:data:`MASKED_MAX_PARAMS_CPU` on the CPU), else ``sliced``.
    Explicit ``masked`` needs such a task."""
    if mode not in EVAL_MODES:
        raise ValueError(f"eval_mode must be one of {', '.join(EVAL_MODES)}, got {mode!r}")
    has = [t for t in tasks if hooks.for_task(t).forward_masked is not None]
    if mode == "masked" and not has:
        raise ValueError(f"eval_mode masked: arch {hooks.name!r} has no masked forward for task(s) {', '.join(tasks)}")
    if mode == "auto":
        limit = MASKED_MAX_PARAMS_CPU if jax.default_backend() == "cpu" else MASKED_MAX_PARAMS
        return "masked" if has and n_params < limit else "sliced"
    return mode


def shape_representatives(inputs: list[dict[str, Any]]) -> list[int]:
    """One index per distinct (task, shapes of the array inputs, nested ones included) of prepared micro-batches:
    a program depends on its input shapes, not on their values, so warming these up covers every micro-batch."""
    seen: dict[tuple, int] = {}
    for i, inp in enumerate(inputs):
        leaves = jax.tree_util.tree_flatten_with_path({k: v for k, v in inp.items() if k != "task"})[0]
        shapes = tuple((jax.tree_util.keystr(p), np.shape(v)) for p, v in leaves if hasattr(v, "shape"))
        seen.setdefault((inp.get("task"), shapes), i)
    return sorted(seen.values())


def refit_levels(tree: Tree, compensation: CompensationConfig | None) -> dict[tuple, list[int]]:
    """Consumer path -> the kept counts compensation will re-fit it at (the keys of
    :attr:`PruningProblem.refits`), from the tree alone: every group with a consumer slice gets a Gram, and
    :meth:`~tmp_jax.compensate.Compensation.level_counts` names the counts below full of the genes acting on
    it. What the masked program's layout needs before calibration (:class:`tmp_jax.masked_eval.Precompile`);
    an architecture that sows fewer Grams gets another layout, and its program compiles in the warm-up."""
    if compensation is None:
        return {}
    groups = {(n.name, u.kind): None for n in tree.spec.nodes() for u in n.units if consumer_slice(u) is not None}
    comp = Compensation(groups, compensation)
    counts = comp.level_counts(tree)
    out = {}
    for path, (node, kind, _, _) in comp.consumers(tree).items():
        if counts.get((node, kind)):
            out[path] = counts[(node, kind)]
    return out


# Compensated pruning evaluates every candidate with its consumers re-fitted at its widths, from a table of one
# full-size consumer per (consumer, width level): at full Z-Image-Turbo size 68 consumers x 7 levels, 12.9e9
# elements, 25.7 GB in bf16 and 51.5 GB in fp32, next to the teacher and its permuted copy (2 x 24.6 GB in
# fp32). Tables larger than this fraction of the device memory left free keep to the host instead.
REFITS_DEVICE_FRACTION = 0.5


def refits_on_host(tree: Tree, compensation: CompensationConfig | None, dtype: Any) -> bool:
    """Whether the re-fit tables of ``tree`` (:func:`refit_levels`, in ``dtype``) are kept on the host: they
    exceed :data:`REFITS_DEVICE_FRACTION` of the default device's free memory (never on a CPU, whose arrays are
    host memory anyway, or on a backend that keeps no memory statistics)."""
    if jax.default_backend() == "cpu":
        return False
    try:
        st = jax.devices()[0].memory_stats() or {}
        jax.devices("cpu")
    except Exception:  # noqa: BLE001 - no statistics, or no CPU backend to build them on: keep them on the device
        return False
    if "bytes_limit" not in st:
        return False
    need = sum(int(np.prod(tree.spec.shapes[p])) * len(ks) for p, ks in refit_levels(tree, compensation).items())
    free = int(st["bytes_limit"]) - int(st.get("bytes_in_use", 0))
    return need * np.dtype(dtype).itemsize > REFITS_DEVICE_FRACTION * free


def warmup_workers() -> int:
    """Threads compiling warm-up programs side by side: ``TMP_JAX_COMPILE_WORKERS``, else up to 8 (one per
    core). XLA compiles without the GIL, so programs of different shapes compile in parallel."""
    return aot.env_count("TMP_JAX_COMPILE_WORKERS", max(1, min(8, os.cpu_count() or 1)))


class PruningProblem:
    def __init__(
        self,
        model: Any,
        calib: Calibration,
        *,
        source: dict[str, Any],
        levels: dict | None = None,
        task_weights: dict[str, float] | None = None,
        compensation: CompensationConfig | None = None,
        eval_mode: str = "auto",
        masked_batch: int | None = None,
        precompiled: Precompile | None = None,
        keep_teacher: bool = True,
    ):
        """``task_weights``: {task: weight} for the fitness (normalised to sum 1; default: the calibration's
        weights, else equal over the tasks of its micro-batches). Every weighted task needs micro-batches.

        ``compensation``: compensated pruning (:mod:`tmp_jax.compensate`; needs a calibration with Grams):
        unit groups with a consumer Gram are ordered by greedy structured OBS (their scores become the OBS
        output error, commensurate like the others) and every candidate is evaluated with its consumers
        re-fitted at its kept widths (precomputed per (consumer, level): :attr:`refits`).

        ``eval_mode``: ``"sliced"``, ``"masked"`` or ``"auto"`` (module docstring; the mode in use is
        :attr:`eval_mode`). ``masked_batch``: candidates per masked call
        (default :func:`tmp_jax.masked_eval.default_batch`). ``precompiled``: the masked program of this
        teacher, compiling since before calibration (:func:`build_problem`); used when it is the same program.

        ``keep_teacher``: keep the caller's model unchanged as :attr:`teacher_model` beside the permuted copy the
        search evaluates (default). False: permute ``model`` IN PLACE and keep only that copy (half the memory:
        a 6.15B Turbo in fp32 is 24.6 GB a copy); :meth:`plan_fitness` then maps a plan's units into the permuted
        numbering, and :attr:`teacher_model` is None."""
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {', '.join(EVAL_MODES)}, got {eval_mode!r}")
        self.arch = model.ARCH
        self.dtype = model_dtype(model)  # what the teacher and every candidate run in (recorded in plans)
        self.hooks = arch.get(self.arch)
        self.tree = Tree(self.hooks.build_spec(model.config), levels)
        self.importance, self.block_scores = importance(self.tree, calib.stats)
        self.order = order_from_scores(self.importance)
        self.source = source
        self.teacher_model = model if keep_teacher else None
        self.compensation: Compensation | None = None  # in the TEACHER's (original) numbering
        if compensation is not None:
            self.compensation = self._compensate(model, calib.stats, compensation)
        # permute once: every kept set becomes a prefix (function-preserving)
        self.model = permute(nnx.clone(model) if keep_teacher else model, self.tree, self.order)
        self.refits: Refits | None = None
        self._comp_perm: Compensation | None = None  # the Grams in the permuted model's numbering
        if self.compensation is not None:
            self._comp_perm = self.compensation.permuted(self.tree, self.order)
            dtype = next(iter(_params(self.model, self.compensation.consumers(self.tree)).values())).dtype
            host = refits_on_host(self.tree, compensation, dtype)
            # on the host: built on the CPU device (never all on the accelerator at once), kept as numpy arrays,
            # which every jitted sub-layer call copies in for its own consumer (same shapes and programs)
            with jax.default_device(jax.devices("cpu")[0]) if host else contextlib.nullcontext():
                self.refits = self.compensation.level_refits(self.tree, self._snapshots, self.order, dtype)
            if host:
                self.refits = {k: np.asarray(v) for k, v in self.refits.items()}
            self._snapshots = {}
        self.calib = calib
        self._targets: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # micro-batch -> compared teacher output, weights
        tasks = calib.tasks
        w = task_weights or calib.weights or parse_task_weights(None, tasks)
        missing = [t for t in w if t not in tasks]
        if missing:
            raise ValueError(f"task weight for {missing[0]!r}, but the calibration has no {missing[0]!r} micro-batches")
        total = sum(w.values())
        self.task_weights = {t: float(v) / total for t, v in w.items()}
        # micro-batch indices per weighted task, in set order (the multi-fidelity prefix is taken per task)
        self.task_batches = {t: [i for i, x in enumerate(tasks) if x == t] for t in self.task_weights}
        self.n_evals = 0
        self._rollout_ref: dict[tuple, np.ndarray] = {}  # (steps, n, seed) -> the teacher's final latents
        self.calib_fingerprint: str | None = None  # set by build_problem (recorded in compensated plans)
        self.eval_mode = self._resolve_eval_mode(eval_mode)
        self.masked: MaskedEvaluator | None = None
        if self.eval_mode == "masked":
            self.masked = MaskedEvaluator(self.model, self.tree, self.refits, masked_batch, precompiled)

    def _resolve_eval_mode(self, mode: str) -> str:
        """:func:`resolve_eval_mode` for this problem's weighted tasks and teacher size."""
        return resolve_eval_mode(mode, self.hooks, list(self.task_weights), self.tree.full["params"])

    def _masked_hook(self, inputs: dict) -> Any:
        """The masked forward of ``inputs``' task, or None (sliced mode, or a task without one)."""
        if self.masked is None:
            return None
        return self.hooks.for_task(inputs.get("task")).forward_masked

    def _compensate(self, model: Any, stats: dict, cfg: CompensationConfig) -> Compensation:
        """The Grams of the calibration; OBS order and scores replace the importance order of their groups."""
        grams = gram_stats(self.tree, stats)
        if not grams:
            raise ValueError("compensated pruning needs consumer Grams: calibrate with grams=True (or --no-compensate)")
        comp = Compensation(grams, cfg)
        # the OBS pass also yields the re-fitted consumers of every level (no separate solve per level)
        order, scores, self._snapshots = comp.orders(self.tree, _params(model, comp.consumers(self.tree)))
        for key, o in order.items():
            base = node_path(key[0])
            res, out = stats.get((*base, "res_energy")), stats.get((*base, "out_energy"))
            # OBS scores are consumer-output energy; scaled into energy entering the residual stream
            scale = float(res) / max(float(out), 1e-30) if res is not None and out is not None else 1.0
            self.order[key] = o
            self.importance[key] = scores[key] * scale
        return comp

    def warmup(self, progress: bool = False, workers: int | None = None) -> int:
        """Compile every program candidate evaluation needs once: afterwards evaluating any candidate compiles
        nothing. Returns the number of XLA compiles so far (:meth:`compile_count`).

        Masked mode: the masked program of one calibration micro-batch per distinct (task, input shapes)
        (ahead of time, :mod:`tmp_jax.aot`: nothing runs), nothing per level. Sliced mode (and, in masked mode,
        the tasks without ``forward_masked``): every (stream, sub-layer, width-level combination) variant. The
        genomes of :func:`warmup_genomes` (the largest per-node product of SHAPE levels; data kinds such as
        the expert count cost no compile) go through the candidate forward in compile-only mode (each
        sub-layer program is compiled for the shapes of one micro-batch per distinct (task, input shapes),
        nothing runs, nothing is allocated). The first genome goes alone (it compiles the programs every
        candidate shares: stem, head, full-width sub-layers); the rest, and the masked programs, go on
        ``workers`` threads (default :func:`warmup_workers`; on a GPU also bounded by free memory over the
        widest programs' workspace, :func:`tmp_jax.aot.memory_bound_workers`, since autotuning allocates, and
        a job whose side-by-side compile ran out of memory compiled again alone), whose programs differ in
        shape, so XLA compiles them side by side. A task without ``forward_pruned`` (the materialising
        fallback, e.g. HunyuanImage TI2I) runs the first genome's candidate for real, once: a check that the path
        runs before the search starts. Its whole-model program is compiled per candidate SHAPE, so no other
        candidate reuses a warm-up genome's program, and the other genomes skip it (when every sliced micro-batch
        is such a task, only the first genome runs). ``progress``: a "compiling" bar (k/N warm-up jobs, ETA,
        programs so far)."""
        reps = self._shape_representatives()
        masked = [i for i in reps if self._masked_hook(self.calib.inputs[i]) is not None]
        sliced = [i for i in reps if i not in masked]
        fallback = [i for i in sliced if self.hooks.for_task(self.calib.inputs[i].get("task")).forward_pruned is None]
        pruned = [i for i in sliced if i not in fallback]
        genomes = warmup_genomes(self.tree, self.hooks.data_kinds) if sliced else []
        if not pruned:
            genomes = genomes[:1]  # the fallback alone: one candidate
        workers = warmup_workers() if workers is None else max(1, int(workers))

        def run(g: np.ndarray, first: bool = False) -> None:
            a = self.tree.decode(g)
            built: list[Any] = []
            for i in fallback if first else []:
                np.asarray(self._run(a, self.calib.inputs[i], built))  # compiles as it runs
            for i in pruned:
                with aot.compile_only():
                    self._run(a, self.calib.inputs[i], built)

        def compile_masked(i: int) -> None:
            assert self.masked is not None
            inputs = self.calib.inputs[i]
            self.masked.compile(self._masked_hook(inputs), i, inputs)

        jobs = [lambda g=g: run(g) for g in genomes[1:]] + [lambda i=i: compile_masked(i) for i in masked]
        bar = progress_bar(total=len(genomes) + len(masked), desc="compiling", unit="job", disable=not progress)
        try:
            if genomes:
                run(genomes[0], first=True)
                bar.update(1)
                bar.set_postfix(programs=self.compile_count())
            if jobs:
                # the first genome's programs are the widest: their workspace bounds how many fit side by side
                workers = aot.memory_bound_workers(workers)
                retry = []
                with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                    futures = {pool.submit(j): j for j in jobs}
                    for f in as_completed(futures):
                        try:
                            f.result()  # re-raise a worker's error here
                        except Exception as e:  # noqa: BLE001 - only device-memory exhaustion is retried
                            if "RESOURCE_EXHAUSTED" not in str(e):
                                raise
                            retry.append(futures[f])  # autotuning side by side ran out of memory
                            continue
                        bar.update(1)
                        bar.set_postfix(programs=self.compile_count())
                for job in retry:  # one at a time: the whole free memory for each one's autotuning
                    job()
                    bar.update(1)
                    bar.set_postfix(programs=self.compile_count())
        finally:
            bar.close()
        return self.compile_count()

    def _shape_representatives(self) -> list[int]:
        """One calibration micro-batch index per distinct (task, input shapes): the warm-up runs only these
        (:func:`shape_representatives`)."""
        return shape_representatives(self.calib.inputs)

    def n_samples_total(self) -> int:
        return sum(int(t.shape[0]) for t in self.calib.teacher)

    def compile_count(self) -> int:
        """XLA compiles of the process so far (:func:`tmp_jax.aot.compile_events`): evaluating candidates after
        :meth:`warmup` must leave it unchanged."""
        return aot.compile_events()

    def candidate(self, genome: np.ndarray) -> Any:
        """The materialised candidate (consumers re-fitted under compensation)."""
        return materialize(self.model, self.tree, self.tree.decode(genome), None, comp=self._comp_perm)

    def fitness(self, genomes: np.ndarray, n_samples: int | None = None, start: int = 0) -> np.ndarray:
        """Normalised output error of each genome's candidate on the first ``n_samples`` calibration samples.

        ``start``: each task's micro-batches are read cyclically from its ``start % n``-th (n its micro-batches),
        so a low-fidelity evaluation can take fresh micro-batches (search selection stages); 0 = the first ones.

        Candidates are evaluated on the permuted teacher itself, so nothing is materialised per candidate:
        masked mode runs every genome of a micro-batch through its task's one masked program (``batch``
        candidates per call), sliced mode each genome through ``hooks.forward_pruned`` (prefixes sliced inside
        the per-sub-layer jitted functions); a task (or an architecture) without those hooks falls back to
        materialising the candidate, once per genome."""
        genomes = np.atleast_2d(np.asarray(genomes))
        if self.masked is None:
            out = np.zeros(len(genomes))
            for i, g in enumerate(genomes):
                a = self.tree.decode(g)
                built: list[Any] = []
                out[i] = self._error(lambda inputs, a=a, built=built: self._run(a, inputs, built), n_samples, start)
                self.n_evals += 1
            return out
        assignments = [self.tree.decode(g) for g in genomes]
        data = self.masked.data(assignments) if len(genomes) else None
        builds: list[list[Any]] = [[] for _ in assignments]

        def run_all(i: int, inputs: dict) -> np.ndarray:
            hook = self._masked_hook(inputs)
            if hook is not None:
                return self.masked.run(hook, data, i, inputs)
            return np.stack([np.asarray(self._run(a, inputs, b)) for a, b in zip(assignments, builds)])

        errs = self._task_errors_many(run_all, len(genomes), n_samples, start)
        self.n_evals += len(genomes)
        return sum((self.task_weights[t] * e for t, e in errs.items()), np.zeros(len(genomes)))

    def _run(self, a: Any, inputs: dict, built: list) -> Any:
        """Candidate ``a``'s output on prepared ``inputs``: ``hooks.forward_pruned`` on the permuted teacher, or
        (a task without it) the candidate materialised once into ``built`` and shared by its tasks."""
        h = self.hooks.for_task(inputs.get("task"))
        if h.forward_pruned is not None:
            return h.forward_pruned(self.model, self.tree, a, inputs, self.refits)
        if not built:
            built.append(materialize(self.model, self.tree, a, None, refits=self.refits))
        return h.forward(built[0], inputs)

    def recovered_fitness(self, genome: np.ndarray, steps: int, calib: str | None = None, seed: int = 0) -> float:
        """:meth:`fitness` of a genome's candidate after ``steps`` distillation steps against the teacher (the
        permuted copy: the same function), on every calibration sample. What ``--recover-steps`` ranks the search's
        final candidates by: the best pruned model is not always the best recovered one. ``calib``: a calibration
        folder to distil on (default: the architecture's data pipeline, the embedded Fashion-MNIST data)."""
        from tmp_jax.distill import DistillConfig, recover_in_memory

        cfg = DistillConfig(plan=Path("-"), calib=calib, steps=steps, seed=seed, warmup=max(1, steps // 10))
        student = recover_in_memory(self.model, self.candidate(genome), cfg)
        return self._error(lambda inputs: self.hooks.for_task(inputs.get("task")).forward(student, inputs), None)

    def reconstructed_fitness(self, genome: np.ndarray, steps: int, progress: bool = False) -> float:
        """:meth:`fitness` of a genome's candidate after block-by-block reconstruction (:func:`tmp_jax.reconstruct.
        reconstruct`, ``steps`` Adam steps per kept block, float32 master parameters computing in this problem's
        dtype) against the permuted teacher on this problem's calibration set. What ``--reconstruct-steps`` ranks
        the search's final candidates by: the plan ``python -m tmp_jax.reconstruct`` re-fits best. The re-fit and
        the score read the same calibration samples, as the CLI's re-fit does (its fit is kept only where it lowers
        a block's error on them); every ranked candidate shares that bias. ``progress``: a bar over the fit's steps."""
        from tmp_jax.reconstruct import ReconstructConfig, float32_master, reconstruct

        student = self.candidate(genome)
        dtypes = jax.tree.map(lambda x: x.dtype, nnx.state(student, nnx.Param))
        float32_master(student)
        cfg = ReconstructConfig(steps, dtype="bfloat16" if self.dtype == "bfloat16" else "float32")
        reconstruct(self.model, student, list(self.calib.inputs), cfg, progress=progress)
        # back in each parameter's own dtype (a bf16 model keeps its fp32 router): scored like every candidate
        nnx.update(student, jax.tree.map(lambda x, d: x.astype(d), nnx.state(student, nnx.Param), dtypes))
        return self._error(lambda inputs: self.hooks.for_task(inputs.get("task")).forward(student, inputs), None)

    def rollout_fitness(self, genome: np.ndarray, steps: int, n: int = 40, seed: int = 0) -> float:
        """Final-latent error of a short sampler rollout: the genome's candidate and the teacher each draw ``n``
        samples (classes ``0..9`` in turn) with ``steps`` Euler steps at the trajectory's CFG scale from the SAME
        noise, and the error is ``sum ||x - x_T||^2 / sum ||x_T||^2`` over the final latents. What ``--rollout-steps``
        ranks the search's final candidates by: unlike the one-step fitness it sees errors compound along the
        sampler. Needs a class-conditioned sampler (the embedded Fashion-MNIST teachers); else a ValueError."""
        from tmp_jax.sampling import sample_latents
        from tmp_jax.trajectory import GUIDANCE

        labels = np.arange(n) % 10
        key = (steps, n, seed)
        ref = self._rollout_ref.get(key)
        if ref is None:  # the permuted teacher computes the teacher's function: its samples are the reference
            try:
                ref = np.asarray(sample_latents(self.model, labels, seed=seed, steps=steps, guidance=GUIDANCE))
            except Exception as e:  # noqa: BLE001 - any failure here means "no sampler for this model"
                raise ValueError(
                    f"a rollout needs a class-conditioned sampler (the embedded Fashion-MNIST teachers); "
                    f"{self.arch} model {type(self.model).__name__} has none ({type(e).__name__}: {e})"
                ) from None
            self._rollout_ref[key] = ref
        x = np.asarray(sample_latents(self.candidate(genome), labels, seed=seed, steps=steps, guidance=GUIDANCE))
        return float(np.sum((x - ref) ** 2) / max(float(np.sum(ref**2)), 1e-30))

    def fitness_materialized(self, genomes: np.ndarray, n_samples: int | None = None) -> np.ndarray:
        """:meth:`fitness` through a materialised candidate per genome (the reference the fast path is
        tested against; slow: builds and slices a model per genome). Does not count as search evaluations."""
        genomes = np.atleast_2d(np.asarray(genomes))
        out = np.zeros(len(genomes))
        for i, g in enumerate(genomes):
            m = self.candidate(g)
            out[i] = self._error(
                lambda inputs, m=m: self.hooks.for_task(inputs.get("task")).forward(m, inputs), n_samples
            )
        return out

    def plan_fitness(
        self, plan: dict[str, Any], compensation: Compensation | None = None, n_samples: int | None = None
    ) -> float:
        """:meth:`fitness` of a PLAN's subnetwork: its ``policy`` (dropped nodes, kept unit indices in the original
        numbering), materialised from this problem's teacher, whatever problem searched it. What "re-scoring the
        fp32 winner in bf16" means: the same genome would name other units here wherever this problem's
        importance order differs from the searching one's, the plan's kept units do not.

        ``compensation``: the Grams the plan's consumers are re-fitted with (teacher numbering; the searching
        problem's :attr:`compensation`, or ``tmp_jax.compensate.from_plan``: what export and distill use); None:
        plain slices. The candidate is built in the teacher's dtype and run through the materialising forward, so
        compare plans by this method with each other, not with :meth:`fitness` values (bf16: they differ at the
        bf16 noise floor)."""
        from tmp_jax.materialize import kept_first_order
        from tmp_jax.plan import plan_assignment

        kept = plan["policy"]["kept_units"]
        if self.teacher_model is not None:
            order = kept_first_order(self.tree, kept)
            m = materialize(self.teacher_model, self.tree, plan_assignment(plan), order, comp=compensation)
        else:  # only the permuted teacher is kept: the plan's units (and the Grams) in its numbering
            if compensation is self.compensation:  # its Grams are permuted already (None stays None)
                compensation = self._comp_perm
            elif compensation is not None:
                compensation = compensation.permuted(self.tree, self.order)
            order = kept_first_order(self.tree, self._permuted_ids(kept))
            m = materialize(self.model, self.tree, plan_assignment(plan), order, comp=compensation)
        return self._error(lambda inputs: self.hooks.for_task(inputs.get("task")).forward(m, inputs), n_samples)

    def _permuted_ids(self, kept: dict[str, Any]) -> dict[str, list]:
        """A plan's ``kept_units`` (original numbering) in the numbering of the permuted teacher :attr:`model`.

        Unit ``u`` of a group ordered by ``o`` sits at position ``argsort(o)[u]``. A per-expert group's rows move
        with the experts (permuted row ``r`` is original expert ``order_experts[r]``), and each row is mapped by
        its own expert's order."""
        out = {}
        for key, ids in kept.items():
            node, kind = key.rsplit("/", 1)
            u = self.tree.units(node, kind)
            ids = np.asarray(ids, np.int64)
            o = self.order.get((node, kind))
            if u.batch is None:
                out[key] = (ids if o is None else np.argsort(o)[ids]).tolist()
                continue
            rows = self.tree.units(node, u.batch).n
            ids2 = np.broadcast_to(ids, (rows, ids.shape[-1]))  # a flat list: the same units in every expert
            eo = self.order.get((node, u.batch))
            eo = np.arange(rows) if eo is None else np.asarray(eo)
            o2 = np.broadcast_to(np.arange(u.n) if o is None else np.asarray(o), (rows, u.n))
            out[key] = np.stack([np.argsort(o2[e])[ids2[e]] for e in eo]).tolist()
        return out

    def task_errors(self, run: Any, n_samples: int | None = None, start: int = 0) -> dict[str, float]:
        """Per task: ``sum ||y - y_T||^2 / sum ||y_T||^2`` over the masked output of its first micro-batches.

        With ``n_samples`` (multi-fidelity) each task takes its first micro-batches until it has seen
        ``ceil(n_samples * N_t / N)`` samples (N_t its samples, N all weighted tasks'), at least one
        micro-batch: a low-fidelity evaluation sees every task in its set proportion. ``start``: each task's
        micro-batches are taken cyclically from its ``start % n``-th instead of its first (:meth:`fitness`)."""
        errs = self._task_errors_many(lambda _, inputs: np.asarray(run(inputs))[None], 1, n_samples, start)
        return {t: float(e[0]) for t, e in errs.items()}

    def _task_errors_many(self, run: Any, n: int, n_samples: int | None, start: int = 0) -> dict[str, np.ndarray]:
        """:meth:`task_errors` of ``n`` candidates at once: ``run(i, inputs)`` gives their outputs on micro-batch
        ``i``, stacked ([n, *output]); per task an [n] array."""
        n_all = sum(int(self.calib.teacher[i].shape[0]) for ids in self.task_batches.values() for i in ids)
        errs = {}
        for t, ids in self.task_batches.items():
            n_t = sum(int(self.calib.teacher[i].shape[0]) for i in ids)
            quota = None if n_samples is None or n_samples >= n_all else max(1, -(-n_samples * n_t // n_all))
            num, den = np.zeros(n), 0.0
            seen = 0
            s = int(start) % len(ids) if ids and quota is not None else 0  # all micro-batches: the order stays
            for i in ids[s:] + ids[:s]:
                if quota is not None and seen >= quota:
                    break
                inputs, (yt, wt) = self.calib.inputs[i], self._target(i)
                if n:  # trajectory sets: the guided output u + w (c - u), each state weighted by its step
                    y = guided_view(np.asarray(run(i, inputs), np.float64), inputs, axis=1)
                    num += np.sum((np.square(y - yt) * wt).reshape(n, -1), axis=1)
                den += float(np.sum(np.square(yt) * wt))
                seen += int(self.calib.teacher[i].shape[0])
            errs[t] = num / max(den, 1e-30)
        return errs

    def _target(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Micro-batch ``i``'s compared teacher output (float64; the guided view of a trajectory batch) and the
        weight of each compared element (:func:`tmp_jax.trajectory.error_weights`), computed once."""
        cache = self._targets
        if i not in cache:
            inputs = self.calib.inputs[i]
            yt = guided_view(np.asarray(self.calib.teacher[i], np.float64), inputs, axis=0)
            cache[i] = (yt, error_weights(inputs))
        return cache[i]

    def _error(self, run: Any, n_samples: int | None, start: int = 0) -> float:
        """The weighted mean of the per-task normalised discrepancies (:meth:`task_errors`)."""
        errs = self.task_errors(run, n_samples, start)
        return float(sum(self.task_weights[t] * e for t, e in errs.items()))


def _params(model: Any, paths: Any = None) -> dict[tuple, Any]:
    """The parameters by path (device arrays; only ``paths`` when given: compensation reads the consumers)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {tuple(p): v.get_value() for p, v in flat if paths is None or tuple(p) in paths}


CALIB_SOURCES = ("trajectory", "noised")  # an embedded teacher's built-in calibration set (build_problem)


def build_problem(
    model: str | None = None,
    calib: str | None = None,
    mesh: str | None = None,
    seed: int = 0,
    progress: bool = False,
    n_synthetic: int = 8,
    out: str | Path | None = None,
    task: str | None = None,
    compensation: CompensationConfig | None = None,
    dtype: str | None = "auto",
    phases: bool = False,
    eval_mode: str = "auto",
    calib_source: str = "trajectory",
    keep_teacher: bool = True,
) -> PruningProblem:
    """Load the teacher (a checkpoint folder, an embedded name, or the default) and calibrate it.

    ``keep_teacher``: :class:`PruningProblem`'s (False: one permuted copy of the teacher in memory, not two).
    ``calib_source``: an embedded teacher's built-in set when ``calib`` is None: ``"trajectory"`` (its CFG
    sampler's states, fitness on the guided output: :mod:`tmp_jax.trajectory`) or ``"noised"`` (noised
    training images at random sigma).

    ``task``: the ``--task`` spec (``"t2i,ti2i"``, ``"t2i:0.7,ti2i:0.3"``): only micro-batches of these tasks
    are used, statistics and fitness are weighted per task. None: every task of the set, equal weights.
    ``mesh``: a HunyuanImage model on a mesh with an ``expert`` axis (and no ``model`` axis) runs its routed
    experts expert-parallel for the rest of the process (:func:`maybe_expert_parallel`).
    ``compensation``: compensated pruning (calibrates with the consumer Grams); None: prefix slicing only.
    ``dtype``: the dtype the teacher is loaded and evaluated in, ``"bf16"`` / ``"fp32"`` / ``"auto"`` (bf16 on a
    GPU/TPU, fp32 on the CPU; :mod:`tmp_jax.dtypes`). Statistics and Grams are accumulated in fp32, the fitness
    in fp64, the compensation re-fits solved in fp32/fp64 and stored in this dtype (``problem.dtype`` names it).
    ``phases``: print ``[phase] loading`` / ``[phase] calibration`` start and end lines on stderr
    (:func:`tmp_jax.progress.phase`: a cold run is never silent).
    ``eval_mode``: candidate evaluation (:class:`PruningProblem`: auto, masked or sliced)."""
    from tmp_jax.progress import phase
    from tmp_jax.sharding import make_mesh, shard_module

    with phase("loading", enabled=phases):
        m_obj, path, name, batches, weights = _teacher_and_set(
            model, calib, dtype, task, n_synthetic, seed, calib_source
        )
        if eval_mode == "masked":  # fail before calibrating, as PruningProblem would after
            hooks = arch.get(m_obj.ARCH)
            tasks = sorted({hooks.batch_task(b) for b in batches})
            if all(hooks.for_task(t).forward_masked is None for t in tasks):
                raise ValueError(
                    f"--eval-mode masked: arch {m_obj.ARCH!r} has no masked forward for {', '.join(tasks)}"
                )
        msh = make_mesh(mesh) if mesh else None
        if msh is not None:
            shard_module(m_obj, msh)
    cfg_dict = m_obj.config.to_hf_config()
    source = {
        "path": str(path) if path else name,
        "fingerprint": fingerprint(path, cfg_dict),
        "config": cfg_dict,
    }
    ep = arch.get(m_obj.ARCH).expert_parallel
    if ep is not None:  # routed experts expert-parallel (shard_map) on an expert axis, else off
        ep(msh)
    grams, stride = compensation is not None, compensation.token_stride if compensation is not None else 1
    tw = compensation.timestep_weight if compensation is not None else "uniform"
    # the teacher pass, then what is derived from its statistics (importance; the OBS order and re-fits)
    with phase("calibration", enabled=phases):
        # masked evaluation's one program does not depend on the calibration's results, only on shapes known
        # now: it compiles on a background thread while the teacher pass and the OBS re-fits run
        pre = start_precompile(m_obj, batches, weights, compensation, eval_mode, msh)
        cal = calibrate(
            m_obj,
            batches,
            mesh=msh,
            out=out,
            progress=progress,
            weights=weights,
            grams=grams,
            gram_stride=stride,
            gram_timestep_weight=tw,
        )
        prob = PruningProblem(
            m_obj,
            cal,
            source=source,
            task_weights=weights,
            compensation=compensation,
            eval_mode=eval_mode,
            precompiled=pre,
            keep_teacher=keep_teacher,
        )
    prob.calib_fingerprint = "sha256:" + batches_signature(batches)  # which set the Grams come from
    return prob


def start_precompile(
    model: Any,
    batches: list[dict[str, Any]],
    weights: dict[str, float] | None,
    compensation: CompensationConfig | None,
    eval_mode: str,
    mesh: Any = None,
    levels: dict | None = None,
) -> Precompile | None:
    """Start compiling the masked program of ``model`` on a background thread (:class:`Precompile`) when the
    problem :func:`build_problem` is about to calibrate will evaluate masked; None otherwise (sliced
    evaluation; a mesh, whose input placement the program would be keyed on; ``TMP_JAX_PRECOMPILE=0``, which
    leaves the compile to the warm-up as before). The layout is predicted from the tree
    (:func:`refit_levels`); the program is compiled for one micro-batch per distinct (task, input shapes).
    ``levels``: the width levels the problem will be built with (:class:`PruningProblem`'s)."""
    if mesh is not None or os.environ.get("TMP_JAX_PRECOMPILE", "1") == "0":
        return None
    hooks = arch.get(model.ARCH)
    tree = Tree(hooks.build_spec(model.config), levels)
    present = list(dict.fromkeys(hooks.batch_task(b) for b in batches))
    tasks = list(weights) if weights else present
    if resolve_eval_mode(eval_mode, hooks, tasks, tree.full["params"]) != "masked":
        return None
    inputs = [prepare(hooks, model.config, b) for b in batches]
    jobs = []
    for i in shape_representatives(inputs):
        fwd = hooks.for_task(inputs[i]["task"]).forward_masked
        if fwd is not None:
            jobs.append((fwd, inputs[i]))
    return Precompile(model, tree, refit_levels(tree, compensation), jobs) if jobs else None


def _teacher_and_set(
    model: str | None,
    calib: str | None,
    dtype: str | None,
    task: str | None,
    n_synthetic: int,
    seed: int,
    calib_source: str = "trajectory",
) -> tuple[Any, Path | None, str, list[dict[str, Any]], dict[str, float] | None]:
    """(the teacher in ``dtype``, its folder, its name, the calibration micro-batches, the ``--task`` weights)."""
    if calib_source not in CALIB_SOURCES:
        raise ValueError(f"--calib-source must be one of {', '.join(CALIB_SOURCES)}, got {calib_source!r}")
    m_obj, path, name = _load_model(model, dtype)
    hooks = arch.get(m_obj.ARCH)
    weights = parse_task_weights(task)
    if weights is not None:
        for t in weights:
            try:
                hooks.for_task(t)  # unknown task -> one-line error before any work
            except ValueError as e:
                raise ValueError(f"--task {task}: {e}") from None
    if calib is not None:
        batches = load_calib(calib, m_obj.ARCH)
    else:
        emb = _embedded_calib(m_obj, path, calib_source)
        if emb is not None and (weights is None or set(weights) == {hooks.default_task}):
            batches = emb
        else:
            warnings.warn(
                "no --calib given: using a synthetic calibration set matching the model's inputs; "
                "real data gives better plans",
                stacklevel=3,
            )
            batches = []
            for t in weights or [hooks.default_task]:
                h = hooks.for_task(t)
                if h.synthetic_calib is None:
                    raise ValueError(f"arch {m_obj.ARCH!r} has no synthetic {t} calibration set: pass --calib")
                batches += [{**b, "task": t} for b in h.synthetic_calib(m_obj.config, n_synthetic, 4, seed)]
    if weights is not None:
        batches = select_tasks(batches, weights, f"calibration set {calib}" if calib else "calibration set")
    return m_obj, path, name, batches, weights


def load_tree(model: str | None) -> Tree:
    """The pruning tree of ``model`` from its config.json alone (fast budget checks before loading)."""
    if model is None:
        model = DEFAULT_MODEL
    p = EMBEDDED.get(model, Path(model))
    conf = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if not conf.is_file():
        raise ValueError(f"--model {model}: no config.json (expected a HF/diffusers checkpoint folder)")
    try:
        cfg_d = json.loads(conf.read_text())
        hooks = arch.detect(cfg_d)
        return Tree(hooks.build_spec(hooks.config_from_dict(cfg_d)))
    except ValueError as e:  # unreadable JSON, an unknown or quantised config, a pruned checkpoint: one line
        raise ValueError(f"--model {model}: {conf}: {e}") from None


def _embedded_calib(model: Any, path: Path | None, source: str = "trajectory", n_batches: int = 4) -> list[dict] | None:
    """The embedded teacher's own calibration set: its CFG sampler's trajectory (``source="trajectory"``:
    :func:`tmp_jax.trajectory.trajectory_calib`) or noised train-split images at a spread of t (``"noised"``)."""
    if path is None or path.parent != ASSETS:
        return None
    hooks = arch.get(model.ARCH)
    if source == "trajectory" and hooks.guided_batch is not None:
        from tmp_jax.trajectory import default_states_file, trajectory_calib

        # the shipped sampler states when they belong to this checkpoint (else sampled: a sampler compile)
        key = fingerprint(path, model.config.to_hf_config())
        return trajectory_calib(model, teacher_key=key, cache=default_states_file(path.name))
    if hooks.training_batch is None:
        return None
    return [hooks.training_batch(model.config, None, 8, 1234, i) for i in range(n_batches)]
