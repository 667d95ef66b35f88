"""Registry of architecture hooks: everything generic code needs from a model family.

Generic modules (tree, materialize, importance, calibration, search, export) look hooks up by the
spec's ``arch`` name; they never branch on the model type. Adding an architecture = registering one
:class:`ArchHooks`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PathT = tuple[str | int, ...]


@dataclass(frozen=True)
class StreamStep:
    """One step of a streamed forward (tmp_jax.streamed_calibration).

    ``op``: ``fn(stem, inputs, carry) -> carry`` on the stem view (``carry`` is None for the first step; the
    last step returns the teacher output). ``block``: ``fn(block, carry) -> carry`` on the module at ``path``
    (its statistics are sown and stored under ``path``). Both are traced under ``jax.jit`` with ``fn`` static,
    so they must be module-level functions.
    """

    kind: str  # 'op' | 'block'
    fn: Callable[..., Any]
    path: PathT = ()


@dataclass(frozen=True)
class StreamHooks:
    """What block-by-block calibration with streamed weights needs from an arch (``ArchHooks.streamed``); the
    config reader and key table are the arch's ``read_config`` / ``key_table``."""

    name: str  # the architecture's name
    reader: Callable[[Any], Any]  # checkpoint path -> a SafetensorsReader-like object (keys, infos, read)
    stem_view: Callable[[Any], Any]  # model -> module holding what the op steps use
    schedule: Callable[[Any], list[StreamStep]]  # config -> steps in execution order


@dataclass(frozen=True)
class ArchHooks:
    name: str
    build_spec: Callable[[Any], Any]  # cfg -> tree.Spec
    pruned_config: Callable[[Any, Any, Any], Any]  # (cfg, tree, assignment) -> smaller cfg
    path_map: Callable[[Any, Any], Callable[[PathT], PathT]]  # (src cfg, new cfg) -> new path -> src path
    init_abstract: Callable[[Any, Any], Any]  # (cfg, dtype) -> abstract model
    init_random: Callable[[Any, Any, int], Any]  # (cfg, dtype, seed) -> model with random weights
    # --- calibration / evaluation ---------------------------------------------------------------
    prepare_batch: Callable[[Any, dict], dict] | None = None  # (cfg, calib batch) -> model inputs (+ 'mask')
    forward: Callable[[Any, dict], Any] | None = None  # (model, inputs) -> output compared with the teacher
    # (permuted teacher, tree, assignment, inputs, refits=None) -> the candidate's output, evaluated without
    # building it; ``refits``: re-fitted consumers per (path, kept units) (tmp_jax.materialize.with_refits)
    forward_pruned: Callable[[Any, Any, Any, dict], Any] | None = None
    # (full permuted teacher, tmp_jax.masked_eval.MaskView, inputs) -> the candidate's output, TRACEABLE: the
    # decisions are runtime data (unit masks, branch gates), so tmp_jax.masked_eval compiles one program per
    # (task, input shapes) for every candidate. None: the task is evaluated by ``forward_pruned`` (sliced)
    forward_masked: Callable[[Any, Any, dict], Any] | None = None
    collect_stats: Callable[[Any, dict], tuple[Any, dict]] | None = None  # -> (output, {path: stat})
    # gene kinds whose level is runtime data in ``forward_pruned`` (a mask, not a slice): they never change a
    # compiled program's shape, so the warm-up walks them at full size only (tmp_jax.problem.warmup_genomes)
    data_kinds: frozenset[str] = frozenset()
    # a raw calibration micro-batch -> each sample's noise level sigma (1 = pure noise), float64 [B]: what the
    # timestep weighting of the compensation Grams reads (tmp_jax.compensate.sample_sigmas)
    noise_levels: Callable[[dict], Any] | None = None
    synthetic_calib: Callable[[Any, int, int, int], list[dict]] | None = None  # (cfg, n, batch, seed)
    load: Callable[..., Any] | None = None  # (path, dtype=, mesh=) -> model
    config_file_kind: Callable[[dict], bool] | None = None  # does this config.json belong to the arch?
    config_from_dict: Callable[[dict], Any] | None = None  # config.json dict -> config
    config_type: type | None = None  # the class of the arch's config objects (see of_config)
    # --- checkpoints (the arch's torch layout, read and written through tmp_jax.safetensors_io) ---------------
    read_config: Callable[[Any], Any] | None = None  # checkpoint folder -> config (a one-line CheckpointError)
    key_table: Callable[[Any], Any] | None = None  # config -> safetensors_io.KeyTable (torch keys <-> NNX paths)
    weights_prefix: str = "model"  # file name prefix of the arch's safetensors shards (PREFIX-00001-of-0000N...)
    # () -> the arch's StreamHooks (block-by-block calibration with streamed weights, tmp_jax.streamed_calibration),
    # imported lazily; None: the arch's checkpoints are calibrated in memory only
    streamed: Callable[[], StreamHooks] | None = None
    # token counts of one forward ({stream: length}, streams as in Node.tokens) for FLOP budgets and the plan's
    # FLOP counts when the problem gives none; None: a built-in arch's ``DEFAULT_TOKENS`` (see default_tokens)
    default_tokens: Mapping[str, int] | None = None
    # --- distillation ---------------------------------------------------------------------------
    forward_train: Callable[[Any, dict, bool], tuple] | None = None  # (model, inputs, remat) -> (out, feats)
    matched_features: Callable[[Any], tuple[int, ...]] | None = None  # student cfg -> teacher feature ids
    training_batch: Callable[..., dict] | None = None  # (cfg, data, batch, seed, step) -> calib batch
    # (cfg, latents [P, C, H, W], sigma [P], class labels [P]) -> a raw calibration micro-batch of 2P samples:
    # the P conditional ones, then the same latents and sigmas with the null prompt (tmp_jax.trajectory)
    guided_batch: Callable[[Any, Any, Any, Any], dict] | None = None
    save: Callable[..., Any] | None = None  # (model, folder, overwrite=) -> None
    # --- embedded teachers and tmp_jax.evaluate (the Fashion-MNIST task) --------------------------
    embedded: tuple[str, ...] = ()  # names of this arch's embedded teachers (folders tmp_jax/assets/NAME)
    student_fields: tuple[str, ...] = ()  # config fields a student shares with its teacher (inputs, outputs)
    # (cfg, clean latents (N, C, H, W), class labels (N,), noise seed) -> held-out inputs with "xt", "sigma",
    # "target" and whatever the arch's forward needs; (model, those inputs, batch) -> prediction like "target"
    heldout_inputs: Callable[[Any, Any, Any, int], dict] | None = None
    heldout_predictions: Callable[[Any, dict, int], Any] | None = None
    # (mesh or None) -> None: switch the arch's expert parallelism on for that mesh where it applies, else off
    expert_parallel: Callable[[Any], Any] | None = None
    # --- export (converters) --------------------------------------------------------------------
    # regexes of the exported torch keys that weight-only quantisation converts (2-D Linear weights of the
    # repeated blocks); anything else stays in the export dtype (converters.quantize)
    quantize_rules: tuple[str, ...] = ()
    # the inference memory model of an export (converters.memory_plan): a module with tokens(conf, resolution,
    # text_tokens), activation_bytes(conf, seq, itemsize), not_loaded(key), cpu_resident(key), expert_of(key)
    memory_model: Callable[[], Any] | None = None  # () -> that module (imported lazily)
    # --- tasks (T2I and TI2I editing) -----------------------------------------------------------
    # the arch's fields above serve ``default_task``; ``tasks[name]`` overrides any of them (by field name:
    # prepare_batch, forward, forward_pruned, forward_masked, collect_stats, forward_train, synthetic_calib,
    # ...) for the micro-batches of that task. Generic code picks the hooks with ``hooks.for_task(task)``, never
    # by model type.
    default_task: str = "t2i"
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_of: Callable[[dict], str] | None = None  # a raw micro-batch without a "task" tag -> its task

    def task_names(self) -> tuple[str, ...]:
        return (self.default_task, *(t for t in self.tasks if t != self.default_task))

    def for_task(self, task: str | None) -> ArchHooks:
        """These hooks with ``task``'s overrides applied (``None`` = the default task)."""
        if task is None or task == self.default_task:
            return self
        if task not in self.tasks:
            raise ValueError(
                f"arch {self.name!r} has no hooks for task {task!r} (it supports {', '.join(self.task_names())})"
            )
        key = (self.name, task)
        if key not in _TASK_CACHE:
            _TASK_CACHE[key] = dataclasses.replace(self, **self.tasks[task])
        return _TASK_CACHE[key]

    def batch_task(self, batch: dict) -> str:
        """The task of a raw micro-batch (or of prepared inputs): its ``"task"`` tag, else ``task_of``."""
        t = batch.get("task")
        if isinstance(t, str):
            return t
        return self.task_of(batch) if self.task_of is not None else self.default_task


_TASK_CACHE: dict[tuple[str, str], ArchHooks] = {}


_REGISTRY: dict[str, ArchHooks] = {}


def runner_hooks(module: str) -> dict[str, Callable[..., Any]]:
    """The evaluation hooks every runner module provides (prepare_batch, forward_blockwise,
    collect_stats), imported lazily so registering an arch stays cheap."""
    import importlib

    def r() -> Any:
        return importlib.import_module(module)

    return {
        "prepare_batch": lambda cfg, b: r().prepare_batch(cfg, b),
        "forward": lambda m, x: r().forward_blockwise(m, x),
        "forward_pruned": lambda m, tree, a, x, refits=None: r().forward_pruned(m, tree, a, x, refits),
        "collect_stats": lambda m, x: r().collect_stats(m, x),
    }


def register(h: ArchHooks) -> ArchHooks:
    _REGISTRY[h.name] = h
    for k in [k for k in _TASK_CACHE if k[0] == h.name]:
        del _TASK_CACHE[k]
    return h


def detect(config: dict) -> ArchHooks:
    """The architecture whose ``config_file_kind`` accepts this config.json dict."""
    _load_builtin()
    for h in _REGISTRY.values():
        if h.config_file_kind is not None and h.config_file_kind(config):
            return h
    raise ValueError(f"config.json matches no known architecture ({sorted(_REGISTRY)})")


def get(name: str) -> ArchHooks:
    if name not in _REGISTRY:
        _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown architecture {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def of_config(cfg: Any) -> ArchHooks:
    """The architecture whose config class ``cfg`` is an instance of."""
    _load_builtin()
    for h in _REGISTRY.values():
        if h.config_type is not None and isinstance(cfg, h.config_type):
            return h
    raise ValueError(f"a {type(cfg).__name__} is the config of no registered architecture ({sorted(_REGISTRY)})")


def names() -> list[str]:
    """The registered architectures, built-in ones first."""
    _load_builtin()
    return list(_REGISTRY)


def embedded_teachers() -> dict[str, str]:
    """Every registered embedded teacher name -> its architecture, in registration order."""
    return {t: h.name for h in (get(n) for n in names()) for t in h.embedded}


def default_tokens(name: str) -> dict[str, int]:
    """Token counts of one forward of arch ``name`` that FLOP budgets use when the problem gives none: its
    ``default_tokens`` hook, else ``DEFAULT_TOKENS`` of a built-in arch's ``config`` module (the numbers live
    with each model package). KeyError (one line) when the arch declares none."""
    h = get(name)
    if h.default_tokens is not None:
        return dict(h.default_tokens)
    import importlib

    pkg = _BUILTIN.get(name)
    tokens = getattr(importlib.import_module(f"{pkg}.config"), "DEFAULT_TOKENS", None) if pkg else None
    if tokens is None:
        raise KeyError(f"architecture {name!r} declares no default token counts (ArchHooks.default_tokens)")
    return dict(tokens)


# built-in architectures: name -> model package (its ``structure`` module registers the hooks)
_BUILTIN = {"zimage": "tmp_jax.models.z_image", "hunyuan": "tmp_jax.models.hunyuan_image3"}


def import_if_present(mod: str) -> bool:
    """Import module ``mod`` if it exists (False if it does not); a missing module it imports in turn still raises."""
    import importlib

    try:
        importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name != mod:
            raise
        return False
    return True


def _load_builtin() -> None:
    for pkg in _BUILTIN.values():
        import_if_present(f"{pkg}.structure")
