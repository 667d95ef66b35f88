"""Block-by-block reconstruction of a pruned student: the cluster-free re-fit past the closed form (issue 17).

A compensated plan (:mod:`tmp_jax.compensate`) re-fits each consumer projection in closed form, one linear map at
a time, on the TEACHER's input. Reconstruction goes further without distillation's memory or data: it walks the
model block by block in execution order (the architecture's streamed schedule, :class:`tmp_jax.arch.StreamHooks`)
and fits every kept parameter of the student's block with Adam so that the block's output on the STUDENT's own
activations matches the teacher's block output on the teacher's activations, over the calibration set the search
used (the teacher's sampler trajectory for the embedded teachers, ``--calib`` otherwise). So each block also
corrects the error that reaches it from the blocks before. A block the plan drops has no student block: the
next kept block's target is the teacher's output after the dropped one, so it learns to stand in for it. One
block is trained at a time; a fit that does not lower its block's error on the calibration set is not kept.

    python -m tmp_jax.reconstruct --plan OUT/plan.json [--model SRC] [--calib DIR] [--steps 300] [--out DIR]
        [--streamed auto|on|off] [--dtype auto|bf16|fp32] [--micro-batch ROWS] [--resume]

Writes ``OUT/weights`` (the student checkpoint, as :mod:`tmp_jax.distill` does: ``python -m converters.export
--plan OUT/plan.json --weights OUT/weights``, ``python -m tmp_jax.evaluate OUT/weights``) and
``OUT/reconstruct.json`` (each block's calibration error before and after, the settings). Both are rewritten
atomically after every block, so ``--resume`` continues after the last finished block.

Memory (``--streamed auto|on|off``):

* in memory (``off``; what ``auto`` picks when the teacher's float32 parameters take at most half of the devices'
  memory): the teacher, the student and both models' activations of the calibration set are on the devices, and
  the student checkpoint is rewritten after every block (the embedded teachers; a 6B Turbo in fp32 with its 4B
  student, 41 GB of parameters, should fit one 80 GB GPU, not measured yet);
* streamed (``on``; the 80B MoE): both models are shape-only; each block is read when its turn comes, the
  teacher's from its checkpoint as :mod:`tmp_jax.streamed_calibration` reads it, the student's as
  ``converters.export`` slices and re-fits it (:class:`converters.export.PrunedSource`). The devices hold the
  stems, one teacher block, one student block with its Adam state, and the activations. Each fitted block goes to
  ``OUT/blocks/`` (float32 safetensors, atomically); the end writes ``OUT/weights`` as the export does, with the
  fitted blocks in place of the sliced ones. Both forms give the same fits (tests/test_reconstruct.py).

Precision (``--dtype``): the dtype the teacher is loaded in and the student's blocks compute in (``auto``: bf16
on a GPU, fp32 on the CPU). The student's parameters, its Adam state and the errors are float32, and so is
``OUT/weights`` (``converters.export --weights OUT/weights --dtype bf16`` halves it).

Activation memory (``--micro-batch ROWS``): cuts the calibration micro-batches smaller so one step fits. At full
HunyuanImage width an fp32 teacher block on 4 rows of 1024^2 asked for 133 GiB on an H200, because XLA's
``ragged_dot`` runs densely over every expert; the routed experts now take the tiled grouped matmul at that size
(``tmp_jax/models/hunyuan_image3/tiled_gmm.py``, memory linear in the tokens, forward and backward) and the Mosaic
kernel for the bf16 forward on one Hopper GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tmp_jax import arch, dtypes
from tmp_jax.streamed_calibration import (  # the streamed walk's own step helpers and parameter residency
    AbstractParams,
    _get,
    _op_jit,
    _split_static,
)

Carry = Any  # one micro-batch's activations between schedule steps (a dict of arrays)


@dataclass(frozen=True)
class ReconstructConfig:
    """``steps``: Adam steps per kept block (one calibration micro-batch each, in set order); ``lr``: the peak
    learning rate of a cosine decay over those steps, or None (the default) for :data:`AUTO_LR` times the RMS of
    the block's weight matrices (:func:`block_lr`); ``dtype``: the dtype the student's blocks COMPUTE in
    ("float32" or "bfloat16"; its parameters and the optimiser state stay float32, the error is float32)."""

    steps: int = 300
    lr: float | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @property
    def compute_dtype(self) -> str | None:
        """The cast the student's blocks compute under (None for float32: the parameters as they are)."""
        return None if self.dtype == "float32" else self.dtype


# The default peak step, relative to the block's weight scale. Adam's steps have a fixed size whatever the
# weights' scale, so an absolute learning rate tuned on one model is too large for a model with smaller weights:
# 1e-3 suits the embedded teachers (block weight RMS 0.072-0.086), but a full-width HunyuanImage-3.0 block's RMS
# is about 1/sqrt(4096) = 0.016. On the embedded MoE, 5x its rate (1e-3 relative to full-width weights) left its
# first block unimproved. 1/80 of the RMS is about 1e-3 on the embedded teachers, 2e-4 at full HunyuanImage width.
# (A random-weight full-width block was not lowered in 10 steps at either rate: docs/benchmarks.md section 11.)
AUTO_LR = 1 / 80


def block_lr(params: Any, cfg: ReconstructConfig) -> float:
    """The peak learning rate for one block: ``cfg.lr`` if set, else :data:`AUTO_LR` times the RMS over every
    element of the block's floating parameters of two or more dimensions (the weight matrices and stacked
    experts; norm scales and biases would pull it towards their own scales)."""
    if cfg.lr is not None:
        return cfg.lr
    mats = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2]
    if not mats:  # a block of vectors only: the rate the embedded teachers were tuned with
        return 1e-3
    ss = sum(float(jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in mats)
    rms = (ss / sum(x.size for x in mats)) ** 0.5
    return AUTO_LR * rms if rms > 0 else 1e-3


@dataclass
class BlockFit:
    """One kept block's normalised calibration error (summed over the activations it writes) before and after."""

    block: str  # the teacher block's path, "/"-joined
    before: float
    after: float
    kept: bool  # the fit lowered the error and replaced the block's parameters
    seconds: float
    lr: float = 0.0  # the peak learning rate it was fitted with (0: no steps)


def _cast(params: Any, dtype: str | None) -> Any:
    """Floating parameters in the compute dtype (None: as they are). Inside a jitted, differentiated function the
    cast is part of the graph, so gradients reach the float32 master copy."""
    if dtype is None:
        return params
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def float32_master(model: Any) -> None:
    """Cast ``model``'s floating parameters to float32 in place: the master copy a fit trains (Adam on bf16
    parameters loses late, small updates to rounding). Every in-memory caller of :func:`reconstruct` does this."""
    nnx.update(model, _cast(nnx.state(model, nnx.Param), "float32"))


@partial(jax.jit, static_argnums=(0, 1, 5))
def _block(gd: Any, fn: Callable, params: Any, rest: Any, carry: Carry, dtype: str | None = None) -> Carry:
    return fn(nnx.merge(gd, _cast(params, dtype), rest), carry)


def _error(out: Carry, target: Carry, keys: tuple[str, ...]) -> jax.Array:
    """Sum over the written activations of ||out - target||^2 / ||target||^2 (in float32 whatever they are in)."""
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return sum(jnp.sum(jnp.square(f32(out[k]) - f32(target[k]))) / jnp.sum(jnp.square(f32(target[k]))) for k in keys)


# Adam's direction without its learning rate: one module-level transformation, so the jitted step's static
# arguments are equal for every block of the same structure and they share one compiled step (a new optax.adam per
# block, a static argument hashed by identity, compiled the step again for every block). The rate is an argument.
_ADAM = optax.scale_by_adam()


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _train_step(
    gd: Any,
    fn: Callable,
    keys: tuple,
    dtype: str | None,
    params: Any,
    rest: Any,
    ost: Any,
    carry: Carry,
    target: Carry,
    lr: jax.Array,
) -> tuple[Any, Any, jax.Array]:
    loss, g = jax.value_and_grad(lambda p: _error(_block(gd, fn, p, rest, carry, dtype), target, keys))(params)
    direction, ost = _ADAM.update(g, ost, params)
    return jax.tree.map(lambda p, d: p - lr * d, params, direction), ost, loss


def _written(before: Carry, after: Carry) -> tuple[str, ...]:
    """The carry entries a block step wrote (its output activations): arrays whose value changed."""
    arrays = [k for k in before if isinstance(before[k], jax.Array) and isinstance(after.get(k), jax.Array)]
    same = lambda k: before[k].shape == after[k].shape and bool(jnp.array_equal(before[k], after[k]))  # noqa: E731
    return tuple(k for k in arrays if not same(k))


def _mean_error(
    gd: Any, fn: Callable, params: Any, rest: Any, carries: list, targets: list, keys: tuple, dtype: str | None
) -> float:
    errs = [_error(_block(gd, fn, params, rest, c, dtype), t, keys) for c, t in zip(carries, targets)]
    return float(np.mean(errs))


class Residency:
    """How a model's modules get their parameters onto the devices: a loaded model has them already."""

    def load(self, module: Any) -> None:
        """Put ``module``'s parameters on the devices (before it runs)."""

    def release(self, module: Any) -> None:
        """Take them off again (after it ran): the arrays can be freed."""


class StudentStreamer(AbstractParams):
    """A shape-only student whose blocks are filled from the teacher checkpoint as :mod:`converters.export`
    writes them (sliced by the plan, consumers re-fitted: :class:`converters.export.PrunedSource`), one module at
    a time, in float32; a block fitted by an earlier run is read from its file in ``blocks`` instead."""

    def __init__(self, src: Any, blocks: Path | None = None):
        super().__init__(arch.get(src.name).init_abstract(src.new_cfg, jnp.float32))
        self.src, self.blocks = src, blocks
        self.fitted: dict[tuple, Path] = {}  # parameter path -> the block file holding its fitted value
        if blocks is not None and blocks.is_dir():
            for f in sorted(blocks.glob("*.safetensors")):
                for key in _block_file_keys(f):
                    self.fitted[_key_path(key)] = f

    def load(self, module: Any) -> None:
        from safetensors import safe_open

        paths = self.param_paths(module)
        files = {self.fitted[p] for p in paths if p in self.fitted}
        stored: dict[tuple, np.ndarray] = {}
        for f in files:
            with safe_open(str(f), framework="numpy") as h:
                stored.update({_key_path(k): h.get_tensor(k) for k in h.keys()})
        for p in paths:
            arr = stored[p] if p in stored else self.src.array(p)
            self.var[p].set_value(jax.device_put(np.asarray(arr, np.float32)))

    def save_block(self, name: str, module: Any) -> Path:
        """Write ``module``'s (fitted) parameters to ``blocks/<name>.safetensors`` (float32, atomic)."""
        from tmp_jax.compensate import save_f32_safetensors

        assert self.blocks is not None
        self.blocks.mkdir(parents=True, exist_ok=True)
        f = self.blocks / _block_file(name).name
        paths = self.param_paths(module)
        save_f32_safetensors(f, [(_path_key(p), self.var[p].get_value()) for p in paths])
        for p in paths:
            self.fitted[p] = f
        return f

    def override(self, p: tuple) -> np.ndarray | None:
        """The fitted value of parameter ``p`` (None: not fitted; the export slices it): for ``export``."""
        from safetensors import safe_open

        f = self.fitted.get(p)
        if f is None:
            return None
        with safe_open(str(f), framework="numpy") as h:
            return h.get_tensor(_path_key(p))


def _block_file(name: str) -> Path:
    """The file name of block ``name``'s fitted parameters (in ``OUT/blocks``)."""
    return Path(f"{name.replace('/', '.')}.safetensors")


def _path_key(p: tuple) -> str:
    return "/".join(map(str, p))


def _key_path(key: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in key.split("/"))


def _block_file_keys(f: Path) -> list[str]:
    from tmp_jax.safetensors_io import read_header

    return list(read_header(f)[0])


def reconstruct(
    teacher: Any,
    student: Any,
    inputs: list[dict[str, Any]],
    cfg: ReconstructConfig = ReconstructConfig(),
    *,
    done: frozenset[str] = frozenset(),
    on_block: Callable[[BlockFit, Any], None] | None = None,
    progress: bool = False,
    resident: tuple[Any, Any] | None = None,
) -> list[BlockFit]:
    """Fit ``student``'s kept blocks in place (see the module doc); returns one :class:`BlockFit` per block fitted.

    ``inputs``: prepared model inputs (:func:`tmp_jax.calibration.prepare`), one dict per micro-batch.
    ``done``: blocks (as in :attr:`BlockFit.block`) already fitted by an earlier run: they only run forward.
    ``on_block``: called after every fitted block with its record and the student's block module, already
    updated (a checkpoint hook). ``resident``: (teacher's, student's) :class:`Residency` (or
    :class:`~tmp_jax.streamed_calibration.AbstractParams`, which has the same ``load`` / ``release``): how a module's
    parameters are put on the devices before it runs and taken off after (streamed models, where the models
    are shape-only and each block is read when its turn comes); None: both models are loaded."""
    if not inputs:
        raise ValueError("reconstruct: the calibration set is empty")
    h = arch.get(teacher.ARCH)
    if h.streamed is None:
        raise ValueError(f"arch {teacher.ARCH!r} has no block schedule (ArchHooks.streamed)")
    sh = h.streamed()
    to_teacher = h.path_map(teacher.config, student.config)  # student parameter path -> teacher path
    s_steps = {to_teacher(s.path): s for s in sh.schedule(student.config) if s.kind == "block"}
    steps = sh.schedule(teacher.config)
    todo = [s for s in steps if s.kind == "block" and s.path in s_steps and _path_key(s.path) not in done]
    if not todo:  # every kept block fitted already (a resumed run): nothing to walk
        return []
    bar = None
    if progress:
        from tmp_jax.progress import progress_bar

        bar = progress_bar(total=len(todo) * cfg.steps, desc="reconstruct", unit="step")
    t_res, s_res = resident if resident is not None else (Residency(), Residency())
    cdt = cfg.compute_dtype
    stems = [(t_res, sh.stem_view(teacher)), (s_res, sh.stem_view(student))]
    for res, stem in stems:
        res.load(stem)
    tc: list[Carry] = [None] * len(inputs)  # the teacher's activations, per micro-batch
    sc: list[Carry] = [None] * len(inputs)  # the student's
    fits: list[BlockFit] = []
    for step in steps:
        if step.kind == "op":  # embeddings / head: the stems are not pruned, each model runs its own
            for (_, stem), cs in zip(stems, (tc, sc)):
                gd, st = nnx.split(stem)
                for i, inp in enumerate(inputs):
                    dyn, static = _split_static(inp)
                    cs[i] = _op_jit(gd, step.fn, static, st, dyn, cs[i])
            continue
        tblk = _get(teacher, step.path)
        t_res.load(tblk)
        tgd, tparams, trest = nnx.split(tblk, nnx.Param, ...)
        target = [_block(tgd, step.fn, tparams, trest, c) for c in tc]
        del tparams, trest
        t_res.release(tblk)
        s = s_steps.get(step.path)
        if s is not None:
            blk = _get(student, s.path)
            s_res.load(blk)
            gd, params, rest = nnx.split(blk, nnx.Param, ...)
            name = _path_key(step.path)
            if name not in done:
                fit, fitted = _fit_block(name, gd, s.fn, params, rest, sc, target, _written(tc[0], target[0]), cfg, bar)
                if fit.kept:
                    params = fitted
                    nnx.update(blk, params)
                fits.append(fit)
                if on_block is not None:
                    on_block(fit, blk)
            sc = [_block(gd, s.fn, params, rest, c, cdt) for c in sc]
            del params, rest
            s_res.release(blk)
        tc = target  # a dropped block: the student's activations go on unchanged
    for res, stem in stems:
        res.release(stem)
    if bar is not None:
        bar.close()
    return fits


def _fit_block(
    name: str,
    gd: Any,
    fn: Callable,
    params: Any,
    rest: Any,
    carries: list[Carry],
    targets: list[Carry],
    keys: tuple[str, ...],
    cfg: ReconstructConfig,
    bar: Any,
) -> tuple[BlockFit, Any]:
    """Adam on one block's parameters, micro-batch ``k % n`` at step ``k``: (its record, the fitted parameters)."""
    t0 = time.perf_counter()
    cdt = cfg.compute_dtype
    before = _mean_error(gd, fn, params, rest, carries, targets, keys, cdt)
    fitted = params
    peak = block_lr(params, cfg) if cfg.steps else 0.0
    if cfg.steps:
        schedule = optax.cosine_decay_schedule(peak, cfg.steps)
        ost = _ADAM.init(params)
        for k in range(cfg.steps):
            i = k % len(carries)
            lr = jnp.asarray(schedule(k), jnp.float32)
            fitted, ost, _ = _train_step(gd, fn, keys, cdt, fitted, rest, ost, carries[i], targets[i], lr)
            if bar is not None:
                bar.update(1)
    after = _mean_error(gd, fn, fitted, rest, carries, targets, keys, cdt)
    seconds = round(time.perf_counter() - t0, 2)
    return BlockFit(name, before, min(before, after), after < before, seconds, float(f"{peak:.4g}")), fitted


# ----------------------------------------------------------------------------------------------
# CLI


def _settings(a: argparse.Namespace, plan_path: Path) -> dict[str, Any]:
    """What a resumed run must share with the run it continues."""
    return {
        "plan": str(plan_path.resolve()),
        "plan_sha": _sha(plan_path),
        "model": a.model,
        "calib": a.calib,
        "compensate": not a.no_compensate,
        "micro_batch": a.micro_batch,
        **asdict(_config(a)),
    }


def _config(a: argparse.Namespace) -> ReconstructConfig:
    return ReconstructConfig(a.steps, a.lr, dtypes.resolve(a.dtype))


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tmp_jax.reconstruct", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--plan", required=True, type=Path, help="plan.json from python -m tmp_jax.search")
    p.add_argument(
        "--model",
        help="the teacher checkpoint the plan was made from (default: the embedded teacher the plan was searched on)",
    )
    p.add_argument(
        "--calib",
        help="calibration set folder (default: an embedded teacher's own set; other models: a synthetic set, with a "
        "warning)",
    )
    p.add_argument("--steps", type=int, default=ReconstructConfig.steps, help="Adam steps per kept block (300)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate of the cosine decay (default: 1/80 of each block's weight RMS, about 1e-3 on the "
        "embedded teachers and 2e-4 at full HunyuanImage-3.0 width: Adam's step size does not follow the weights' "
        "scale)",
    )
    p.add_argument("--no-compensate", action="store_true", help="start from plain slices, not the re-fitted plan")
    dtypes.add_argument(
        p,
        help="dtype the teacher is loaded in and the student's blocks compute in: bf16, fp32 or auto (default: bf16 "
        "on a GPU/TPU, fp32 on the CPU); the student's parameters, the Adam state and the errors stay float32",
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        help="split the calibration micro-batches into ones of at most this many rows (less device memory per "
        "step; default: as the set comes)",
    )
    p.add_argument("--out", type=Path, default=Path("reconstruct-out"), help="output folder (default: reconstruct-out)")
    p.add_argument("--resume", action="store_true", help="continue after the last finished block in --out")
    p.add_argument(
        "--streamed",
        choices=("auto", "on", "off"),
        default="auto",
        help="stream the weights from the checkpoint, one teacher block and one student block on the devices "
        "(auto, the default: when the teacher's float32 parameters exceed half of the devices' memory)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    a.dtype = dtypes.from_args(p, a.dtype)  # a bad value: one line, exit 2
    try:
        return _run(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace) -> int:
    from tmp_jax.compile_cache import enable_default
    from tmp_jax.fileio import atomic_write

    cfg = _config(a)  # bad values: one line before any work
    if a.micro_batch is not None and a.micro_batch < 1:
        raise ValueError(f"--micro-batch must be >= 1, got {a.micro_batch}")
    if not a.plan.is_file():
        raise FileNotFoundError(f"--plan {a.plan}: no such file")
    if a.model is None:  # a plan of an embedded teacher names it; others keep the default (and its clear error)
        from tmp_jax.teachers import plan_teacher

        a.model = plan_teacher(a.plan)
    enable_default()
    out = Path(a.out)
    log_path, weights = out / "reconstruct.json", out / "weights"
    streamed = _choose_streamed(a)
    settings = {**_settings(a, a.plan), "streamed": streamed}
    fits: list[dict[str, Any]] = []
    if log_path.is_file():
        if not a.resume:
            raise ValueError(f"{log_path} exists: pass --resume to continue that run, or choose another --out")
        prev = json.loads(log_path.read_text())
        if prev.get("settings") != settings:
            raise ValueError(f"{log_path}: written with other settings ({prev.get('settings')}); use another --out")
        fits = prev["blocks"]
    t0 = time.perf_counter()

    def record(fit: BlockFit) -> None:
        fits.append(asdict(fit))
        atomic_write(log_path, json.dumps({"settings": settings, "blocks": fits, "finished": False}, indent=1))

    done = frozenset(f["block"] for f in fits)
    run = _run_streamed if streamed else _run_in_memory
    run(a, cfg, out, weights, done, record)
    rec = {
        "settings": settings,
        "blocks": fits,
        "finished": True,
        "seconds": round(time.perf_counter() - t0, 1),
        "device_peak_gb": _device_peak_gb(),
    }
    atomic_write(log_path, json.dumps(rec, indent=1))
    err = [(f["before"], f["after"]) for f in fits]
    print(
        f"tmp_jax.reconstruct: {len(fits)} blocks{' (streamed)' if streamed else ''}, calibration error summed "
        f"over blocks {sum(b for b, _ in err):.4f} -> {sum(x for _, x in err):.4f} -> {weights}\n"
        f"next: python -m converters.export --plan {a.plan} --model {_model_spec(a)} --weights {weights} "
        "--out pruned/ [--dtype bf16]   (or python -m tmp_jax.evaluate --model " + str(weights) + ")\n"
        f"      with a training budget: python -m tmp_jax.distill --plan {a.plan} --model {_model_spec(a)} "
        f"--init {weights} --out distill-out/"
    )
    return 0


def _device_peak_gb() -> float | None:
    """Peak bytes in use on the first device, in GB (None where the backend keeps no statistics: the CPU)."""
    st = jax.devices()[0].memory_stats() or {}
    return round(st["peak_bytes_in_use"] / 1e9, 2) if "peak_bytes_in_use" in st else None


def _model_spec(a: argparse.Namespace) -> str:
    from tmp_jax.teachers import DEFAULT_MODEL

    return a.model if a.model is not None else DEFAULT_MODEL


def _choose_streamed(a: argparse.Namespace) -> bool:
    """``--streamed auto``: stream when the teacher's float32 parameters exceed half of the devices' memory
    (the in-memory walk holds the teacher, the student and one block's optimiser state)."""
    if a.streamed != "auto":
        return a.streamed == "on"
    from tmp_jax.evaluate import resolve
    from tmp_jax.streamed_calibration import model_fits

    return not model_fits(resolve(_model_spec(a)), jnp.float32)


def _calib_source(plan_path: Path) -> str:
    """The set the search calibrated on (an embedded teacher's: the source the plan records)."""
    from tmp_jax.plan import load_plan

    return load_plan(plan_path).get("search", {}).get("calib_source") or "trajectory"  # a bad plan: one line


def _run_in_memory(a: argparse.Namespace, cfg: ReconstructConfig, out: Path, weights: Path, done, record) -> None:
    """Teacher and student loaded; the student checkpoint rewritten after every block."""
    from tmp_jax.calibration import prepare
    from tmp_jax.distill import plan_student
    from tmp_jax.problem import _teacher_and_set

    source = _calib_source(a.plan)
    teacher, path, _, batches, _ = _teacher_and_set(a.model, a.calib, cfg.dtype, None, 8, 0, source)
    student, _, _ = plan_student(a.plan, teacher, path, a.model, not a.no_compensate)
    float32_master(student)
    batches = split_rows(batches, a.micro_batch)
    h = arch.get(teacher.ARCH)
    if done:  # the blocks fitted so far live in the saved student
        student = h.load(str(weights), dtype=jnp.float32)
    inputs = [prepare(h, teacher.config, b) for b in batches]

    def checkpoint(fit: BlockFit, _blk: Any) -> None:
        h.save(student, weights, overwrite=True)
        record(fit)

    reconstruct(teacher, student, inputs, cfg, done=done, on_block=checkpoint, progress=not a.no_progress)
    if not weights.is_dir():  # nothing to fit (every block done, or none kept): still write the student
        h.save(student, weights, overwrite=True)


def _run_streamed(a: argparse.Namespace, cfg: ReconstructConfig, out: Path, weights: Path, done, record) -> None:
    """Only the stems and one teacher block and one student block on the devices, read from the checkpoint when
    their turn comes; each fitted block goes to ``OUT/blocks/``, and the end writes the student checkpoint the
    way ``converters.export`` does, with the fitted blocks in place of the sliced ones."""
    from converters.export import ExportConfig, PrunedSource, export
    from tmp_jax.calibration import prepare
    from tmp_jax.evaluate import resolve
    from tmp_jax.streamed_calibration import ParamStreamer, get_hooks

    model = resolve(_model_spec(a))
    src = PrunedSource(a.plan, model, compensate=not a.no_compensate)  # checks plan, fingerprint, keys: one line
    batches = split_rows(_streamed_calib(model, a.calib, _calib_source(a.plan), src), a.micro_batch)
    h = arch.get(src.name)
    ts = ParamStreamer(model, get_hooks(src.name), dtype=jnp.dtype(cfg.dtype))
    blocks = out / "blocks"
    if blocks.is_dir():  # a block file the record does not list (a crash between the two writes, an old run): gone
        recorded = {_block_file(b).name for b in done}
        for f in blocks.glob("*.safetensors"):
            if f.name not in recorded:
                f.unlink()
    ss = StudentStreamer(src, blocks)
    inputs = [prepare(h, src.src_cfg, b) for b in batches]

    def checkpoint(fit: BlockFit, blk: Any) -> None:
        if fit.kept:
            ss.save_block(fit.block, blk)
        record(fit)

    reconstruct(
        ts.model,
        ss.model,
        inputs,
        cfg,
        done=done,
        on_block=checkpoint,
        progress=not a.no_progress,
        resident=(ts, ss),
    )
    ecfg = ExportConfig(
        plan=a.plan,
        model=model,
        out=weights,
        dtype="fp32",  # the fit is in float32; `converters.export --weights W --dtype bf16` halves it, as after distill
        overwrite=True,
        progress=not a.no_progress,
        compensate=not a.no_compensate,
    )
    export(ecfg, overrides=ss.override)


def split_rows(batches: list[dict[str, Any]], rows: int | None) -> list[dict[str, Any]]:
    """Each raw calibration micro-batch cut into ones of at most ``rows`` rows (None: unchanged). Every array of a
    micro-batch must have its rows first (one-line error otherwise); other values are copied to each piece. The
    keys that shape only the search fitness (a guided batch's CFG scale and pair weights,
    :data:`tmp_jax.trajectory.FITNESS_KEYS`) are dropped: the block errors do not use them, and a piece need
    not hold whole cond/uncond pairs."""
    from tmp_jax.trajectory import FITNESS_KEYS

    if rows is None:
        return batches
    out = []
    for i, b in enumerate(batches):
        b = {k: v for k, v in b.items() if k not in FITNESS_KEYS}
        lead = {k: np.shape(v)[0] for k, v in b.items() if isinstance(v, np.ndarray | jax.Array) and np.ndim(v)}
        n = set(lead.values())
        if len(n) != 1:
            raise ValueError(f"--micro-batch: calibration micro-batch {i} has arrays of different leading sizes {lead}")
        (n_rows,) = n
        for r in range(0, n_rows, rows):
            out.append({k: (v[r : r + rows] if k in lead else v) for k, v in b.items()})
    return out


def _streamed_calib(model: Path, calib: str | None, source: str, src: Any) -> list[dict[str, Any]]:
    """The calibration micro-batches without loading the teacher: ``--calib``, an embedded teacher's own set
    (small: loaded for it), else the arch's synthetic set (with a warning, as the search gives)."""
    import warnings

    from tmp_jax.calibration import load_calib
    from tmp_jax.problem import _teacher_and_set
    from tmp_jax.teachers import ASSETS

    if calib is not None:
        return load_calib(calib, src.name)
    if model.parent == ASSETS:
        return _teacher_and_set(str(model), None, "fp32", None, 8, 0, source)[3]
    h = arch.get(src.name)
    if h.synthetic_calib is None:
        raise ValueError(f"arch {src.name!r} has no synthetic calibration set: pass --calib")
    warnings.warn("no --calib given: using a synthetic calibration set; real data gives better fits", stacklevel=2)
    return h.synthetic_calib(src.src_cfg, 8, 4, 0)


if __name__ == "__main__":
    sys.exit(main())
