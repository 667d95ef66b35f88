"""Recovery distillation of a pruned student from its unpruned teacher (optax, orbax, resumable).

    python -m tmp_jax.distill --plan OUT/plan.json --model SRC [--calib DIR | --data NPZ] [--steps N]
                              [--out DIR] [--resume] [--mesh SPEC] [--task t2i:0.7,ti2i:0.3] [--dtype bf16|fp32]

The student is the plan's subnetwork materialised from the teacher (kept unit indices in ORIGINAL
numbering). Loss = ``w_out`` * normalised MSE between student and teacher denoiser outputs on noised
inputs + ``w_feat`` * feature alignment at matched block boundaries (student block j, which is
teacher block ``kept[j]``, matches that teacher block's output; a run of dropped blocks is therefore
matched at the next kept boundary). Weights and optimiser settings: ``configs/distill.json``.

Training keeps an fp32 master copy of the parameters and the optimiser state (AdamW, warm-up +
cosine, global-norm clipping). ``--dtype`` (bf16 / fp32 / auto = bf16 on a GPU or TPU, fp32 on the CPU) is
the dtype the teacher is loaded in, so the one the frozen teacher runs in and the student is sliced from
(the fp32 master starts from those values), and the student's forward dtype (``--compute-dtype`` overrides
the latter alone); the losses are computed in fp32. Every block is rematerialised (``jax.checkpoint``) and
micro-batches accumulated. Orbax checkpoints every ``--save-every`` steps and every ``--save-every-s``
seconds, whichever comes first; ``--resume`` continues exactly
(batches are a pure function of seed and step).
A NaN/Inf loss stops the run with a clear message and keeps the last good checkpoint.

Mixed T2I + TI2I calibration sets (``--calib`` with micro-batches of several tasks): each step draws a task by
its ``--task`` weight (default: equal over the set's tasks), then one micro-batch of that task (a pure function
of seed and step); each task's micro-batches run through that task's ``forward_train`` (``hooks.for_task``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tmp_jax import arch
from tmp_jax import dtypes as dtypes_mod
from tmp_jax.dtypes import model_dtype
from tmp_jax.dtypes import resolve as resolve_dtype
from tmp_jax.tree import Tree

DEFAULTS_PATH = Path(__file__).resolve().parents[1] / "configs" / "distill.json"


@dataclass
class DistillConfig:
    plan: Path
    model: str | None = None
    calib: str | None = None
    data: str | None = None
    out: Path = Path("distill-out")
    steps: int = 200
    batch_size: int = 8
    micro_batch: int | None = None
    lr: float = 3e-4
    warmup: int = 20
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    w_out: float = 1.0
    w_feat: float = 0.1
    save_every: int = 500
    save_every_s: float = 300.0  # also checkpoint when this many seconds passed since the last one (0: off)
    seed: int = 0
    resume: bool = False
    mesh: str | None = None
    dtype: str = "auto"  # the teacher's dtype (loaded in it): bf16, fp32, auto (bf16 on GPU/TPU, fp32 on CPU)
    compute_dtype: str | None = None  # the student's forward dtype (None: the teacher's, ``dtype``)
    remat: bool = True
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    task: str | None = None  # "t2i,ti2i" / "t2i:0.7,ti2i:0.3": tasks of --calib to train on and their weights
    compensate: bool = True  # start from the plan's re-fitted consumers (compensated plans), not plain slices
    init: Path | None = None  # start from this checkpoint of the plan's student (tmp_jax.reconstruct's OUT/weights)


class NonFiniteLoss(RuntimeError):
    pass


def load_defaults() -> dict[str, Any]:
    try:
        return json.loads(DEFAULTS_PATH.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{DEFAULTS_PATH}: cannot read distillation defaults ({e})") from e


# ----------------------------------------------------------------------------------------------
# Student / teacher


def build_pair(cfg: DistillConfig) -> tuple[Any, Any, Tree, dict[str, Any]]:
    """(teacher, student, tree, plan): the student is the plan's subnetwork sliced from the teacher."""
    from tmp_jax.plan import load_plan
    from tmp_jax.teachers import load_model as _load_model

    load_plan(cfg.plan)  # a bad plan fails in one line before the teacher is loaded
    if cfg.init is not None and not (Path(cfg.init) / "config.json").is_file():
        raise ValueError(f"--init {cfg.init}: not a model folder (no config.json); expected a student checkpoint")
    teacher, path, _ = _load_model(cfg.model, cfg.dtype)
    student, tree, plan = plan_student(cfg.plan, teacher, path, cfg.model, cfg.compensate)
    if cfg.init is not None:
        init_student(student, Path(cfg.init))
    return teacher, student, tree, plan


def init_student(student: Any, init: Path) -> None:
    """Overwrite ``student``'s parameters (in place, each kept in its own dtype) with those of the checkpoint at
    ``init``, which must hold the same subnetwork: every parameter path and shape equal (one-line error naming the
    first that differs). What ``--init`` starts distillation from, e.g. ``tmp_jax.reconstruct``'s OUT/weights:
    the plan's student re-fitted block by block, so distillation starts nearer the teacher."""
    from flax import traverse_util

    h = arch.get(student.ARCH)
    try:
        loaded = h.load(str(init), dtype=jnp.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--init {init}: cannot load as a {student.ARCH} model ({type(e).__name__}: {e})") from None
    mine = traverse_util.flatten_dict(nnx.state(student, nnx.Param).to_pure_dict())
    theirs = traverse_util.flatten_dict(nnx.state(loaded, nnx.Param).to_pure_dict())
    for k, v in mine.items():
        other = theirs.get(k)
        if other is None or tuple(other.shape) != tuple(v.shape):
            got = "missing" if other is None else f"shape {tuple(other.shape)}"
            raise ValueError(
                f"--init {init}: parameter {'/'.join(map(str, k))} is {got}, the plan's student has shape "
                f"{tuple(v.shape)} (a checkpoint of another plan?)"
            )
    extra = sorted(set(theirs) - set(mine))
    if extra:
        raise ValueError(f"--init {init}: parameter {'/'.join(map(str, extra[0]))} is not in the plan's student")
    new = {k: jnp.asarray(theirs[k], v.dtype) for k, v in mine.items()}
    nnx.update(student, nnx.State(traverse_util.unflatten_dict(new)))


def plan_student(
    plan_path: Path, teacher: Any, path: Path | None, model: str | None, compensate: bool = True
) -> tuple[Any, Tree, dict[str, Any]]:
    """(student, tree, plan): the plan at ``plan_path`` sliced from ``teacher`` (loaded from ``path``, named
    ``model`` on the command line), re-fitted with the plan's compensation when ``compensate`` (a plan searched
    with ``--no-compensate`` has none: plain slices). The plan must come from that very checkpoint."""
    from tmp_jax.fileio import fingerprint
    from tmp_jax.materialize import kept_first_order, materialize
    from tmp_jax.plan import load_plan, plan_assignment

    plan = load_plan(plan_path)
    if teacher.ARCH != plan["arch"]:
        raise ValueError(f"{plan_path}: plan is for {plan['arch']!r}, --model is {teacher.ARCH!r}")
    fp = fingerprint(path, teacher.config.to_hf_config())
    if plan.get("source", {}).get("fingerprint") != fp:
        raise ValueError(f"{plan_path}: the plan was made from another checkpoint than --model {model}")
    hooks = arch.get(teacher.ARCH)
    tree = Tree(hooks.build_spec(teacher.config))
    a = plan_assignment(plan)
    order = kept_first_order(tree, plan["policy"]["kept_units"])
    comp = None
    if compensate:
        from tmp_jax.compensate import from_plan

        comp = from_plan(plan, plan_path)  # None for a plan searched with --no-compensate
    student = materialize(teacher, tree, a, order, comp=comp)
    return student, tree, plan


def training_batches(cfg: DistillConfig, model_cfg: Any, arch_name: str) -> Any:
    """A function step -> model inputs: noised data (``--data`` / embedded) or calibration inputs.

    Calibration inputs of one task cycle in set order (``step % n``). With several tasks (a mixed set, or
    ``cfg.task``), step s draws a task with probability = its weight and one of its micro-batches uniformly,
    from ``default_rng([seed, s])``: a pure function of seed and step, so a resumed run sees the same batches.
    Inputs carry their ``"task"``, which picks the task's training forward (:meth:`Trainer.gradients`)."""
    from tmp_jax.calibration import parse_task_weights, prepare, select_tasks

    hooks = arch.get(arch_name)
    weights = parse_task_weights(cfg.task)
    if weights is not None:
        for t in weights:
            try:
                if hooks.for_task(t).forward_train is None:
                    raise ValueError(f"arch {arch_name!r} cannot distil {t} micro-batches (no forward_train)")
            except ValueError as e:
                raise ValueError(f"--task {cfg.task}: {e}") from None
    if cfg.calib is not None:
        from tmp_jax.calibration import load_calib

        batches = load_calib(cfg.calib, arch_name)
        if weights is not None:
            batches = select_tasks(batches, weights, f"calibration set {cfg.calib}")
        prepared = [_arrays_only(prepare(hooks, model_cfg, b)) for b in batches]
        by_task: dict[str, list[dict[str, Any]]] = {}
        for x in prepared:
            by_task.setdefault(x["task"], []).append(x)
        w = weights or parse_task_weights(None, list(by_task))
        if len(by_task) == 1:
            return lambda step: prepared[step % len(prepared)]
        names = list(w)
        p = np.array([w[t] for t in names], np.float64)

        def pick(step: int) -> dict[str, Any]:
            rng = np.random.default_rng([cfg.seed, step])
            items = by_task[names[int(rng.choice(len(names), p=p / p.sum()))]]
            return items[int(rng.integers(len(items)))]

        return pick
    if weights is not None and set(weights) != {hooks.default_task}:
        raise ValueError(
            f"--task {cfg.task}: the {arch_name} data pipeline makes {hooks.default_task} batches only; "
            "pass --calib with micro-batches of every task"
        )
    if hooks.training_batch is None:
        raise ValueError(f"arch {arch_name!r} has no data pipeline for distillation; pass --calib DIR")
    return lambda step: _arrays_only(
        hooks.prepare_batch(model_cfg, hooks.training_batch(model_cfg, cfg.data, cfg.batch_size, cfg.seed, step))
    )


def _arrays_only(inputs: dict[str, Any]) -> dict[str, Any]:
    """Drop static (string) entries so the inputs are a jit-able pytree; forwards use their default.
    The ``"task"`` tag stays: :meth:`Trainer.gradients` takes it out to pick the task's step."""
    return {k: v for k, v in inputs.items() if k == "task" or not isinstance(v, str)}


# ----------------------------------------------------------------------------------------------
# Loss and step


def _loss_fn(
    student: Any,
    t_out: jax.Array,
    t_feats: list[jax.Array],
    inputs: dict,
    matched: tuple[int, ...],
    w_out: float,
    w_feat: float,
    fwd: Any,
    dtype: Any,
) -> tuple[jax.Array, dict]:
    if dtype != jnp.float32:  # fp32 master weights, low-precision compute
        gd, st = nnx.split(student)
        student = nnx.merge(
            gd, jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, st)
        )
    out, feats = fwd(student, inputs)
    mask = inputs["mask"][..., None].astype(jnp.float32)
    num = jnp.sum(jnp.square(out.astype(jnp.float32) - t_out) * mask)
    l_out = num / jnp.maximum(jnp.sum(jnp.square(t_out) * mask), 1e-12)
    l_feat = jnp.zeros((), jnp.float32)
    for j, ti in enumerate(matched):
        tf = t_feats[ti].astype(jnp.float32)
        l_feat += jnp.mean(jnp.square(feats[j].astype(jnp.float32) - tf)) / jnp.maximum(jnp.mean(jnp.square(tf)), 1e-12)
    if matched:
        l_feat = l_feat / len(matched)
    return w_out * l_out + w_feat * l_feat, {"out": l_out, "feat": l_feat}


def make_optimizer(cfg: DistillConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(1, cfg.warmup), max(cfg.steps, cfg.warmup + 1), end_value=cfg.lr * 0.1
    )
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(sched, weight_decay=cfg.weight_decay))


# ----------------------------------------------------------------------------------------------
# Training step (in-memory models)


@dataclass
class Trainer:
    """The distillation step on in-memory models (used by :func:`run` and ``bench/distill_throughput.py``).

    One optimiser step = :meth:`gradients` (teacher forward + student forward/backward per micro-batch,
    summed into one fp32 buffer) then :meth:`apply` (mean gradient, clipping, AdamW). Both jitted
    functions donate the buffers they replace (accumulator; params, optimiser state), so a step holds
    one fp32 gradient buffer beside the master weights and the two Adam moments.
    """

    grad_step: Any  # jit: (params, t_state, inputs, acc) -> (loss, parts, acc + grads); acc donated
    apply_fn: Any  # jit: (params, opt_state, grad_sum, n_micro) -> (params, opt_state); params, state donated
    t_state: Any  # the frozen teacher's state (its own arrays, not copied)
    micro: int | None  # micro-batch size (None: the whole batch at once)
    task_steps: dict[str, Any] = field(default_factory=dict)  # task -> its grad_step (other than the default)
    default_task: str = "t2i"  # the task ``grad_step`` runs
    # task -> jit (params, opt_state, t_state, inputs) -> (params, opt_state, loss, parts): the gradient and the
    # update in ONE program (params and optimiser state donated), used when a batch is one micro-batch
    fused: dict[str, Any] = field(default_factory=dict)

    def split_micro(self, inputs: dict, i: int) -> dict:
        b = inputs["mask"].shape[0]
        if self.micro is None or self.micro >= b:
            return inputs
        sl = slice(i * self.micro, (i + 1) * self.micro)
        return jax.tree.map(lambda x: x[sl] if hasattr(x, "shape") and x.ndim and x.shape[0] == b else x, inputs)

    def gradients(self, params: Any, inputs: dict) -> tuple[float, dict[str, float], Any, int]:
        """(mean loss, mean loss parts, SUM of the micro-batch gradients, number of micro-batches).

        ``inputs["task"]`` (if present) picks that task's step (its training forward)."""
        task = inputs.get("task", self.default_task)
        inputs = {k: v for k, v in inputs.items() if k != "task"}
        if task == self.default_task:
            step = self.grad_step
        elif task in self.task_steps:
            step = self.task_steps[task]
        else:
            raise ValueError(
                f"no distillation step for task {task!r} (have {self.default_task}, {list(self.task_steps)})"
            )
        b = int(np.asarray(inputs["mask"]).shape[0])
        n_micro = max(1, math.ceil(b / (self.micro or b)))
        acc = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), params)
        loss_acc, parts_acc = 0.0, {"out": 0.0, "feat": 0.0}
        for i in range(n_micro):
            loss, parts, acc = step(params, self.t_state, self.split_micro(inputs, i), acc)
            loss_acc += float(loss) / n_micro
            parts_acc = {k: parts_acc[k] + float(parts[k]) / n_micro for k in parts_acc}
        return loss_acc, parts_acc, acc, n_micro

    def step(self, params: Any, opt_state: Any, inputs: dict) -> tuple[Any, Any, Any, dict[str, Any]]:
        """One optimiser step: (params, opt_state, loss, loss parts); ``params`` and ``opt_state`` are consumed.

        A batch of one micro-batch runs the fused program and returns the loss as device scalars without waiting
        for them, so the host can queue the next step while this one runs (the GPU is never idle on small
        models); the caller reads the losses in bulk (:func:`_train`). Several micro-batches go through
        :meth:`gradients` + :meth:`apply` (host floats)."""
        task = inputs.get("task", self.default_task)
        b = int(np.shape(inputs["mask"])[0])
        if task in self.fused and (self.micro is None or self.micro >= b):
            x = {k: v for k, v in inputs.items() if k != "task"}
            return self.fused[task](params, opt_state, self.t_state, x)
        loss, parts, grad_sum, n_micro = self.gradients(params, inputs)
        params, opt_state = self.apply(params, opt_state, grad_sum, n_micro)
        return params, opt_state, np.float32(loss), {k: np.float32(v) for k, v in parts.items()}

    def apply(self, params: Any, opt_state: Any, grad_sum: Any, n_micro: int) -> tuple[Any, Any]:
        """One AdamW step on the mean gradient; ``params``, ``opt_state`` and ``grad_sum`` are consumed."""
        out = self.apply_fn(params, opt_state, grad_sum, n_micro)
        # no output can alias the accumulator, so free it now rather than when the caller drops it
        # (otherwise it stays alive while the next step allocates its own); after the step has run
        jax.block_until_ready(out)
        for g in jax.tree.leaves(grad_sum):
            g.delete()
        return out


def _committed(tree: Any) -> Any:
    """Every leaf committed to its device(s): a sharded leaf as it is, an uncommitted one (``opt.init``'s step
    count, the unsharded case's params) to its device, or replicated over the params' mesh when they are
    sharded. A jitted step's outputs are committed; an uncommitted argument lowers to another program, so
    without this the first step compiles the gradient and update programs once more than the later steps."""
    leaves = jax.tree.leaves(tree)
    mesh = next((x.sharding.mesh for x in leaves if isinstance(x.sharding, jax.sharding.NamedSharding)), None)
    rep = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def put(x: Any) -> Any:
        if isinstance(x.sharding, jax.sharding.NamedSharding):
            return x
        return jax.device_put(x, x.sharding if rep is None else rep)

    return jax.tree.map(put, tree)


def make_trainer(cfg: DistillConfig, teacher: Any, student: Any) -> tuple[Trainer, Any, Any]:
    """(trainer, fp32 master params, optimiser state) for distilling ``student`` from ``teacher``.

    The master params are new fp32 buffers (never the student's or the teacher's arrays, which
    :meth:`Trainer.apply` would otherwise invalidate by donation); ``student`` itself is not modified.
    """
    hooks = arch.get(teacher.ARCH)
    if hooks.forward_train is None:
        raise ValueError(f"arch {teacher.ARCH!r} does not support distillation yet")
    matched = hooks.matched_features(student.config)  # student block j -> teacher feature index
    # the student's forward dtype: as set, else the teacher's (its parameters' dtype: the one --dtype loaded)
    dtype = jnp.dtype(cfg.compute_dtype or resolve_dtype(model_dtype(teacher)))
    opt = make_optimizer(cfg)
    s_gd, s_params = nnx.split(student, nnx.Param)
    # a jitted cast always writes new buffers (astype to the same dtype returns the input itself)
    s_params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.float32), p))(s_params)
    t_gd, t_state = nnx.split(teacher)
    # committed like the jitted steps' outputs, so step 0 runs the same compiled programs as the later steps
    s_params, opt_state = _committed((s_params, opt.init(s_params)))

    def make_grad_step(h: Any) -> Any:
        """The jitted (params, t_state, inputs, acc) step of one task's training forward ``h.forward_train``."""
        fwd = lambda m, x: h.forward_train(m, x, cfg.remat)  # noqa: E731

        def teacher_fwd(t_state: Any, inputs: dict) -> tuple:
            return h.forward_train(nnx.merge(t_gd, t_state), inputs, False)

        def loss_and_grads(params: Any, t_state: Any, inputs: dict) -> tuple:
            t_out, t_feats = teacher_fwd(t_state, inputs)
            t_out, t_feats = jax.lax.stop_gradient((t_out.astype(jnp.float32), t_feats))

            def f(p: Any) -> tuple:
                return _loss_fn(nnx.merge(s_gd, p), t_out, t_feats, inputs, matched, cfg.w_out, cfg.w_feat, fwd, dtype)

            (loss, parts), grads = jax.value_and_grad(f, has_aux=True)(params)
            return loss, parts, grads

        @partial(jax.jit, donate_argnums=(3,))
        def grad_step(params: Any, t_state: Any, inputs: dict, acc: Any) -> tuple:
            loss, parts, grads = loss_and_grads(params, t_state, inputs)
            return loss, parts, jax.tree.map(jnp.add, acc, grads)

        @partial(jax.jit, donate_argnums=(0, 1))
        def fused_step(params: Any, opt_state: Any, t_state: Any, inputs: dict) -> tuple:
            loss, parts, grads = loss_and_grads(params, t_state, inputs)
            params, opt_state = update(params, opt_state, grads)
            return params, opt_state, loss, parts

        return grad_step, fused_step

    def update(params: Any, opt_state: Any, grads: Any) -> tuple:
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    steps = {
        t: make_grad_step(hooks.for_task(t))
        for t in hooks.task_names()
        if t == hooks.default_task or hooks.for_task(t).forward_train is not None
    }
    grad_step = steps[hooks.default_task][0]
    task_steps = {t: g for t, (g, _) in steps.items() if t != hooks.default_task}

    @partial(jax.jit, donate_argnums=(0, 1))
    def apply_fn(params: Any, opt_state: Any, grad_sum: Any, n_micro: Any) -> tuple:
        return update(params, opt_state, jax.tree.map(lambda g: g / n_micro, grad_sum))

    trainer = Trainer(
        grad_step,
        apply_fn,
        t_state,
        cfg.micro_batch or cfg.batch_size,
        task_steps,
        hooks.default_task,
        {t: f for t, (_, f) in steps.items()},
    )
    return trainer, s_params, opt_state


# ----------------------------------------------------------------------------------------------
# Run


def run(cfg: DistillConfig) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    teacher, student, tree, plan = build_pair(cfg)
    batch_at = training_batches(cfg, teacher.config, teacher.ARCH)
    if cfg.mesh:  # teacher and student sharded alike by the rules table; the batch over 'data'
        from tmp_jax.calibration import shard_inputs
        from tmp_jax.sharding import make_mesh, shard_module

        mesh = make_mesh(cfg.mesh)
        shard_module(teacher, mesh)
        shard_module(student, mesh)
        unsharded = batch_at
        batch_at = lambda step: shard_inputs(unsharded(step), mesh)  # noqa: E731
    trainer, s_params, opt_state = make_trainer(cfg, teacher, student)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = (out / "checkpoints").resolve()
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    start, history = 0, []
    if cfg.resume and mngr.latest_step() is not None:
        step0 = mngr.latest_step()
        target = {"params": s_params, "opt": opt_state, "history": np.zeros((step0, 3), np.float64)}
        restored = mngr.restore(step0, args=ocp.args.StandardRestore(target))
        s_params, opt_state = restored["params"], restored["opt"]
        history = [tuple(r) for r in np.asarray(restored["history"]).tolist()]
        start = step0
    elif mngr.latest_step() is not None and not cfg.resume:
        raise ValueError(f"{ckpt_dir}: checkpoints exist; pass --resume to continue or choose another --out")
    from tmp_jax.progress import progress_bar

    pbar = progress_bar(total=cfg.steps, initial=start, desc="distill", unit="step", disable=not cfg.progress)
    last_save = [time.monotonic()]

    def due(step: int) -> bool:  # checkpoint after ``step`` steps: every save_every steps or save_every_s seconds
        by_time = cfg.save_every_s > 0 and time.monotonic() - last_save[0] >= cfg.save_every_s
        return step % cfg.save_every == 0 or step == cfg.steps or by_time

    def save(step: int, params: Any, opt: Any, hist: list) -> None:
        state = {"params": params, "opt": opt, "history": np.asarray(hist, np.float64)}
        mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
        last_save[0] = time.monotonic()

    def on_error(step: int, loss: float) -> NonFiniteLoss:
        last = mngr.latest_step()
        return NonFiniteLoss(
            f"loss became {loss} at step {step}; stopped. Last good checkpoint: "
            f"{ckpt_dir / str(last) if last is not None else 'none'} (lower --lr or check the data)"
        )

    t0, clock = time.time(), []
    try:
        s_params, opt_state = _train(
            trainer,
            s_params,
            opt_state,
            batch_at,
            start,
            cfg.steps,
            history,
            pbar=pbar,
            due=due,
            save=save,
            error=on_error,
            clock=clock,
        )
    finally:
        pbar.close()
    nnx.update(student, s_params)
    _write_outputs(cfg, student, history, plan, time.time() - t0)
    return {
        "history": history,
        "student": student,
        "teacher": teacher,
        "tree": tree,
        "plan": plan,
        "seconds": time.time() - t0,
        "step_ms": steady_step_ms(clock),
    }


def steady_step_ms(clock: list[tuple[int, float]]) -> float | None:
    """Milliseconds per step over the second half of a run's loss reads (compile and warm-up excluded);
    None for runs too short to tell."""
    if len(clock) < 3:
        return None
    (s0, t0), (s1, t1) = clock[len(clock) // 2], clock[-1]
    return (t1 - t0) * 1e3 / (s1 - s0) if s1 > s0 else None


SYNC_EVERY = 25  # steps queued on the device between two reads of their losses


def _train(
    trainer: Trainer,
    params: Any,
    opt_state: Any,
    batch_at: Any,
    start: int,
    stop: int,
    history: list,
    *,
    pbar: Any = None,
    due: Any = None,
    save: Any = None,
    error: Any = None,
    clock: list | None = None,
) -> tuple[Any, Any]:
    """Steps ``start`` .. ``stop - 1``; appends ``(step, loss, output loss)`` to ``history``; returns the new
    (params, opt_state).

    The host never waits for a step: it prepares the next batch in a thread while the device runs, queues up
    to :data:`SYNC_EVERY` steps, then reads their losses in one transfer (a per-step ``float(loss)`` made small
    models launch-bound: the device idled while the host built each step). The losses are checked when read,
    and always before a checkpoint (``due(step)`` -> ``save(step, params, opt_state, history)``), so a
    checkpoint never holds a diverged state; a NaN/Inf raises ``error(step, loss)`` (default
    :class:`NonFiniteLoss`). ``clock`` (if given) gets ``(steps done, time.perf_counter())`` at every read, all
    steps before it finished: the steady-state step time without the compile of the first step."""
    from concurrent.futures import ThreadPoolExecutor

    pending: list[tuple[int, Any, Any]] = []

    def flush() -> None:
        vals = jax.device_get([(loss, out) for _, loss, out in pending])
        for (step, _, _), (loss, out) in zip(pending, vals):
            loss = float(loss)
            if not math.isfinite(loss):
                raise (error or (lambda s, v: NonFiniteLoss(f"loss became {v} at step {s}")))(step, loss)
            history.append((step, loss, float(out)))
        if clock is not None and pending:
            clock.append((pending[-1][0] + 1, time.perf_counter()))
        if pbar is not None and pending:
            pbar.set_postfix(loss=f"{history[-1][1]:.4g}")
            pbar.update(len(pending))
        pending.clear()

    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(batch_at, start) if start < stop else None
        for step in range(start, stop):
            inputs = nxt.result()
            if step + 1 < stop:
                nxt = pool.submit(batch_at, step + 1)
            params, opt_state, loss, parts = trainer.step(params, opt_state, inputs)
            pending.append((step, loss, parts["out"]))
            checkpoint = due is not None and due(step + 1)
            if len(pending) >= SYNC_EVERY or checkpoint or step + 1 == stop:
                flush()
            if checkpoint:
                save(step + 1, params, opt_state, history)
    return params, opt_state


def recover_in_memory(teacher: Any, student: Any, cfg: DistillConfig) -> Any:
    """``student`` after ``cfg.steps`` distillation steps against ``teacher``, both loaded models: no plan, no
    files, no checkpoints (the search's recoverability check, ``--recover-steps``); ``cfg`` gives the data and the
    optimiser (its ``plan``, ``out`` and checkpoint fields are unused). Raises :class:`NonFiniteLoss` if the loss
    diverges."""
    batch_at = training_batches(cfg, teacher.config, teacher.ARCH)
    trainer, s_params, opt_state = make_trainer(cfg, teacher, student)
    err = lambda step, loss: NonFiniteLoss(f"recovery: loss became {loss} at step {step}")  # noqa: E731
    s_params, _ = _train(trainer, s_params, opt_state, batch_at, 0, cfg.steps, [], error=err)
    nnx.update(student, s_params)
    return student


def _write_outputs(cfg: DistillConfig, student: Any, history: list, plan: dict, seconds: float) -> None:
    out = Path(cfg.out)
    hooks = arch.get(student.ARCH)
    if hooks.save is not None:
        hooks.save(student, out / "weights", overwrite=True)
    h = np.asarray(history, np.float64) if history else np.zeros((0, 3))
    (out / "history.json").write_text(
        json.dumps(
            {
                "step": h[:, 0].tolist(),
                "loss": h[:, 1].tolist(),
                "out": h[:, 2].tolist(),
                "seconds": seconds,
                "config": {k: str(v) for k, v in asdict(cfg).items()},
            }
        )
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.semilogy(h[:, 0], h[:, 1], label="total")
        ax.semilogy(h[:, 0], h[:, 2], label="output MSE (normalised)")
        ax.set_xlabel("step")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=120)
        plt.close(fig)
    except ImportError:  # matplotlib is a runtime dependency; tolerate minimal installs
        pass


def main(argv: list[str] | None = None) -> int:
    d = load_defaults()
    p = argparse.ArgumentParser(
        prog="python -m tmp_jax.distill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--plan", required=True, type=Path, help="plan.json from python -m tmp_jax.search")
    p.add_argument(
        "--model",
        help="the teacher checkpoint the plan was made from (default: the embedded teacher the plan was searched on)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--calib", help="calibration set folder: distil on its (already noised) inputs")
    g.add_argument("--data", help="clean training data (.npz) to noise on the fly (default: the embedded set)")
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--micro-batch", type=int, default=None, help="gradient-accumulation micro-batch size")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--out", type=Path, default=Path("distill-out"))
    p.add_argument("--save-every", type=int, default=d["save_every"], help="checkpoint every N steps")
    p.add_argument(
        "--save-every-s",
        type=float,
        default=d.get("save_every_s", 300.0),
        help="also checkpoint when this many seconds passed since the last checkpoint (0: by steps only)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--mesh", help="device mesh, e.g. data:4,model:2 (default: all devices on data)")
    dtypes_mod.add_argument(
        p,
        default=d.get("dtype", "auto"),
        help="dtype the teacher is loaded and run in, and the student's forward dtype: bf16, fp32 or auto "
        "(default: auto = bf16 on a GPU/TPU, fp32 on the CPU). The master weights, the optimiser state and the "
        "losses stay fp32 either way; the student is sliced from the teacher as loaded",
    )
    p.add_argument(
        "--compute-dtype",
        default=d.get("compute_dtype"),
        choices=["float32", "bfloat16"],
        help="the student's forward dtype only (default: --dtype's); the teacher stays in --dtype",
    )
    p.add_argument(
        "--task",
        default=None,
        help="tasks of --calib to train on and their sampling weights: t2i,ti2i (equal) or t2i:0.7,ti2i:0.3 "
        "(default: every task of the set, equal)",
    )
    p.add_argument(
        "--compensate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start the student from the plan's least-squares re-fitted consumer weights, as the search "
        "evaluated it (default; plans made with --no-compensate have none); --no-compensate: plain slices",
    )
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this checkpoint of the plan's student instead of the sliced one, e.g. the OUT/weights of "
        "python -m tmp_jax.reconstruct (the student re-fitted block by block; same parameters and shapes)",
    )
    a = p.parse_args(argv)
    dtype = dtypes_mod.from_args(p, a.dtype)
    from tmp_jax.compile_cache import enable_default

    enable_default()  # persistent XLA compilation cache (TMP_JAX_COMPILATION_CACHE=off disables)
    from tmp_jax.teachers import plan_teacher

    cfg = DistillConfig(
        plan=a.plan,
        model=a.model if a.model is not None else plan_teacher(a.plan),  # a plan of an embedded teacher names it
        calib=a.calib,
        data=a.data,
        out=a.out,
        steps=a.steps,
        batch_size=a.batch_size,
        micro_batch=a.micro_batch,
        lr=a.lr,
        warmup=d["warmup"],
        weight_decay=d["weight_decay"],
        clip_norm=d["clip_norm"],
        w_out=d["w_out"],
        w_feat=d["w_feat"],
        save_every=a.save_every,
        save_every_s=a.save_every_s,
        seed=a.seed,
        resume=a.resume,
        mesh=a.mesh,
        dtype=dtype,
        compute_dtype=a.compute_dtype,
        task=a.task,
        compensate=a.compensate,
        init=a.init,
    )
    try:
        res = run(cfg)
    except (ValueError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    h = res["history"]
    print(f"distilled {len(h)} steps: loss {h[0][1]:.4g} -> {h[-1][1]:.4g}; weights in {cfg.out / 'weights'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
