"""Calibration sets, teacher outputs and per-unit importance, on a device mesh, resumable.

Calibration-set format (``docs/calibration-format.md``): a folder with ``calib.json``
(``{"format_version": 1, "arch": ..., "task": "t2i", "batches": [file, ...]}``) and one safetensors
file per micro-batch holding the model inputs (Z-Image: ``latents`` (B,C,F,H,W), ``cap_feats``
(B,L,D), ``cap_lens`` (B,), ``t`` (B,) with 1 = clean).

:func:`calibrate` runs the teacher over every micro-batch once (jit; batch sharded over the mesh's
``data`` axis, parameters by the rules table), caches the teacher outputs, and accumulates the
statistics the modules sow. After each micro-batch the accumulators are written atomically to
``OUT/calib_state.npz``, so an interrupted calibration resumes from its last finished micro-batch.

Models larger than device memory: ``calibrate(checkpoint_path, ...)`` streams the weights block by block
from disk (:mod:`tmp_jax.streamed_calibration`) when they do not fit, with the same result.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tmp_jax import arch

# Calibration, shard_inputs, host_output and the signatures live in calib_state (shared with the streamed path)
from tmp_jax.calib_state import (
    Calibration,
    batches_signature,
    gram_signature,
    host_output,
    shard_inputs,
)
from tmp_jax.calib_state import load_state as _load_state
from tmp_jax.calib_state import save_state as _save_state
from tmp_jax.compensate import StoredGram, check_timestep_weight, sample_sigmas, timestep_weights
from tmp_jax.dtypes import model_dtype
from tmp_jax.fileio import atomic_write
from tmp_jax.stats import set_gram_weights, set_grams, stat_dtype
from tmp_jax.trajectory import fitness_entries
from tmp_jax.tree import Tree, node_path

FORMAT_VERSION = 1
GRAMS_SAVE_EVERY_S = 300.0  # calibration with consumer Grams writes its resume state at most this often


# ----------------------------------------------------------------------------------------------
# Set format


def write_calib(folder: str | Path, batches: list[dict[str, Any]], arch_name: str, task: str | None = None) -> Path:
    """Write a calibration set atomically (one safetensors file per micro-batch + ``calib.json``).

    Every micro-batch carries its task: its own ``"task"`` entry (a string, e.g. ``"ti2i"``) if it has one,
    else the arch's ``task_of`` (Z-Image: ``"ti2i"`` iff it has ``cond_latents``), else ``task`` (one task
    name) or ``"t2i"``. The tag goes into the file's safetensors metadata and into ``calib.json``'s ``tasks`` list;
    ``calib.json``'s ``task`` is the comma list of the tasks present (``"t2i"``, ``"t2i,ti2i"``)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hooks = _hooks_or_none(arch_name)
    names, tags = [], []
    for i, b in enumerate(batches):
        tag = b.get("task") if isinstance(b.get("task"), str) else None
        if tag is None and hooks is not None and hooks.task_of is not None:
            tag = hooks.task_of(b)
        if tag is None:
            tag = task if task and "," not in task else "t2i"
        name = f"batch-{i:05d}.safetensors"
        tmp = folder / f".{name}.tmp"
        arrays = {k: np.ascontiguousarray(v) for k, v in b.items() if k != "task"}
        save_file(arrays, str(tmp), metadata={"task": tag})
        os.replace(tmp, folder / name)
        names.append(name)
        tags.append(tag)
    present = ",".join(dict.fromkeys(tags)) or (task or "t2i")
    meta = {"format_version": FORMAT_VERSION, "arch": arch_name, "task": present, "batches": names, "tasks": tags}
    atomic_write(folder / "calib.json", json.dumps(meta, indent=2).encode())
    return folder


def _hooks_or_none(arch_name: str) -> Any:
    try:
        return arch.get(arch_name)
    except KeyError:
        return None


def load_calib(folder: str | Path, arch_name: str | None = None) -> list[dict[str, Any]]:
    """Read a calibration set (safetensors + JSON only); clear one-line errors on bad input.

    Each micro-batch dict gets its task under ``"task"`` (a string): from ``calib.json``'s ``tasks`` list;
    sets written before per-batch tags take the arch's ``task_of`` of the arrays, else ``calib.json``'s
    ``task`` when it names one task."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    p = folder / "calib.json"
    from tmp_jax.safetensors_io import read_json

    meta = read_json(p, "a calibration set is a folder with calib.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{p}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    if arch_name is not None and meta.get("arch") != arch_name:
        raise ValueError(f"{p}: calibration set is for arch {meta.get('arch')!r}, model is {arch_name!r}")
    tags = meta.get("tasks")
    if tags is not None and (not isinstance(tags, list) or len(tags) != len(meta["batches"])):
        raise ValueError(f"{p}: 'tasks' must list one task per entry of 'batches' ({len(meta['batches'])})")
    hooks = _hooks_or_none(str(meta.get("arch")))
    single = meta.get("task") if isinstance(meta.get("task"), str) and "," not in meta.get("task") else None
    out = []
    for i, name in enumerate(meta["batches"]):
        f = folder / name
        if not f.is_file():
            raise ValueError(f"{f}: batch listed in calib.json is missing")
        b: dict[str, Any] = dict(load_file(str(f)))
        if tags is not None:
            b["task"] = str(tags[i])
        elif hooks is not None and hooks.task_of is not None:
            b["task"] = hooks.task_of(b)
        else:
            b["task"] = single or "t2i"
        out.append(b)
    if not out:
        raise ValueError(f"{p}: no batches")
    return out


def parse_task_weights(spec: str | None, present: list[str] | None = None) -> dict[str, float] | None:
    """``"t2i,ti2i"`` (equal weights) or ``"t2i:0.7,ti2i:0.3"`` -> {task: weight}, weights summing to 1.

    ``None`` -> equal weights over ``present`` (the tasks of the calibration set), or None without it.
    Raises ValueError with a one-line message on a malformed spec."""
    if spec is None:
        return None if not present else {t: 1.0 / len(dict.fromkeys(present)) for t in dict.fromkeys(present)}
    w: dict[str, float] = {}
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        name, _, val = item.partition(":")
        name = name.strip()
        if not name or name in w:
            raise ValueError(f"--task {spec!r}: {'duplicate task ' + repr(name) if name else 'empty task name'}")
        try:
            v = float(val) if val else 1.0
        except ValueError:
            raise ValueError(f"--task {spec!r}: weight of {name!r} must be a number, got {val!r}") from None
        if not np.isfinite(v) or v <= 0:
            raise ValueError(f"--task {spec!r}: weight of {name!r} must be > 0, got {val!r}")
        w[name] = v
    if not w:
        raise ValueError(f"--task {spec!r}: expected e.g. t2i,ti2i or t2i:0.7,ti2i:0.3")
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}


def select_tasks(batches: list[dict[str, Any]], weights: dict[str, float], where: str = "calibration set") -> list:
    """The micro-batches of the weighted tasks (in set order); a weighted task without any is an error."""
    have = [b.get("task", "t2i") for b in batches]
    missing = [t for t in weights if t not in have]
    if missing:
        raise ValueError(
            f"--task {missing[0]}: the {where} has no {missing[0]!r} micro-batches "
            f"(it has {', '.join(dict.fromkeys(have))})"
        )
    return [b for b, t in zip(batches, have) if t in weights]


# ----------------------------------------------------------------------------------------------
# Running the teacher


def combine_stats(
    by_task: dict[str, dict[tuple, np.ndarray]], n_samples: dict[str, int], weights: dict[str, float] | None
) -> dict[tuple, np.ndarray]:
    """Per-task summed statistics -> one set for importance: ``sum_t w_t * S_t * N / N_t``.

    ``S_t`` is task t's sum over its ``N_t`` samples and ``N`` the total: every task contributes its weight's
    share of the total at the scale of a sum over all samples, whatever its sample count. One task: exactly its
    sum. A statistic only one task sows (Z-Image's SigLIP refiner under TI2I) is combined the same way."""
    if len(by_task) == 1 and (weights is None or len(weights) <= 1):  # device Grams -> host; Grams on disk stay
        return {k: v if isinstance(v, StoredGram) else np.asarray(v) for k, v in next(iter(by_task.values())).items()}
    if weights is None:
        weights = {t: 1.0 / len(by_task) for t in by_task}
    total = sum(n_samples[t] for t in by_task)
    out: dict[tuple, np.ndarray] = {}
    for t, stats in by_task.items():
        f = weights.get(t, 0.0) * total / max(n_samples[t], 1)
        for k, v in stats.items():
            v = np.asarray(v, np.float64) * f
            out[k] = out[k] + v if k in out else v
    return out


def calibrate(
    model: Any,
    batches: list[dict[str, np.ndarray]],
    *,
    mesh: jax.sharding.Mesh | None = None,
    out: str | Path | None = None,
    progress: bool = False,
    streamed: bool | None = None,
    dtype: Any = None,
    weights: dict[str, float] | None = None,
    grams: bool = False,
    gram_stride: int = 1,
    gram_timestep_weight: str = "uniform",
) -> Calibration:
    """Teacher outputs + summed statistics over all micro-batches (resumes from ``out``).

    ``grams``: also accumulate the consumer Grams that compensated pruning re-fits with (``gram_<kind>`` per
    unit group, :mod:`tmp_jax.compensate`), reading every ``gram_stride``-th token, each sample's rows weighted
    by its noise level per ``gram_timestep_weight`` (:func:`tmp_jax.compensate.timestep_weights`; "uniform":
    unweighted); all three are part of the resume signature (:func:`gram_signature`).

    Precision: the teacher runs in its parameters' dtype (``dtype`` for a path; a bf16 teacher runs in bf16), but
    statistics and Grams are accumulated in float32 and the cached teacher outputs are float32 on the host. The
    teacher's dtype is part of the resume signature: a state written by an fp32 calibration is refused for a
    bf16 one (and the reverse), with a message saying so.

    ``model`` is a loaded model, or the path of a checkpoint folder. For a path, ``streamed`` chooses
    block-by-block calibration with the weights streamed from disk
    (:func:`tmp_jax.streamed_calibration.calibrate_streamed`, same result, only the stem and one block on the
    devices); None (default) streams when the parameters at ``dtype`` exceed half of the devices' memory,
    otherwise the checkpoint is loaded (onto ``mesh``) and calibrated in memory.

    Mixed sets (T2I + TI2I): each micro-batch runs through its task's hooks (``hooks.for_task``); statistics
    are summed per task (``Calibration.stats_by_task``) and combined with ``weights`` (task -> weight, default
    equal over the tasks present) into ``Calibration.stats`` (:func:`combine_stats`).
    """
    if grams:
        check_timestep_weight(gram_timestep_weight)
    if isinstance(dtype, str):  # "bf16" / "fp32" / "auto" as on the command line
        from tmp_jax.dtypes import jnp_dtype

        dtype = jnp_dtype(dtype)
    if isinstance(model, str | os.PathLike):
        from tmp_jax import streamed_calibration as sc

        if streamed is None:
            streamed = not sc.model_fits(model, dtype, mesh)
        if streamed:
            h = arch.get(sc.checkpoint_arch(Path(model)))
            other = sorted({h.batch_task(b) for b in batches} - {h.default_task})
            if other:
                raise ValueError(
                    f"streamed (block-by-block) calibration covers {h.default_task} micro-batches only; "
                    f"this set has {', '.join(other)} ones (calibrate a loaded model instead)"
                )
            return sc.calibrate_streamed(
                model,
                batches,
                dtype=dtype,
                mesh=mesh,
                out=out,
                progress=progress,
                grams=grams,
                gram_stride=gram_stride,
                gram_timestep_weight=gram_timestep_weight,
            )
        h = arch.get(sc.checkpoint_arch(Path(model)))
        model = h.load(str(model), dtype=jnp.float32 if dtype is None else dtype, mesh=mesh)
    elif streamed:
        raise ValueError("streamed calibration reads the weights from the checkpoint: pass its path, not a model")
    hooks = arch.get(_arch_of(model))
    cfg = model.config
    inputs = [shard_inputs(prepare(hooks, cfg, b), mesh) for b in batches]
    state_path = Path(out) / "calib_state.npz" if out is not None else None
    done, teacher, by_task = 0, [], {}
    # the resume state belongs to this set of micro-batches AND this teacher
    gsig = gram_signature(grams, gram_stride, gram_timestep_weight)
    sig = batches_signature(batches) + gsig if state_path is not None else None
    tsig = f"params:{teacher_signature(model)}" if state_path is not None else None
    mdt = model_dtype(model)
    if state_path is not None and state_path.is_file():
        done, teacher, by_task = _load_state(
            state_path, by_task=True, sig=sig, n=len(inputs), teacher_sig=tsig, dtype=mdt
        )
    it = range(done, len(inputs))
    if progress:
        from tmp_jax.progress import progress_bar

        it = progress_bar(it, desc="calibration", unit="batch", initial=done, total=len(inputs))
    set_grams(model, grams, gram_stride)
    arch_name = _arch_of(model)
    saved = time.monotonic()
    try:
        for i in it:
            task = inputs[i]["task"]
            if grams:  # this micro-batch's per-sample Gram weights (None: uniform, the unweighted program)
                set_gram_weights(model, timestep_weights(gram_timestep_weight, sample_sigmas(arch_name, batches[i])))
            y, s = hooks.for_task(task).collect_stats(model, inputs[i])
            teacher.append(host_output(y))
            acc = by_task.setdefault(task, {})
            for k, v in s.items():  # Grams come back as device arrays and are summed there; all in >= fp32
                v = v.astype(stat_dtype(v.dtype))
                acc[k] = acc[k] + v if k in acc else v
            # the resume state after every micro-batch; with Grams (GBs at full size, copied to the host to be
            # written) at most every GRAMS_SAVE_EVERY_S seconds and after the last micro-batch
            last = i + 1 == len(inputs)
            if state_path is not None and (not grams or last or time.monotonic() - saved >= GRAMS_SAVE_EVERY_S):
                _save_state(state_path, i + 1, teacher, by_task, sig, tsig, dtype=mdt)
                saved = time.monotonic()
    finally:
        set_grams(model, False)
        set_gram_weights(model, None)
    return finish(inputs, teacher, by_task, weights)


def teacher_signature(model: Any) -> str:
    """sha256 of a loaded teacher: its config, every parameter's path / shape / dtype, and two checksums of
    each parameter's raw bits (computed on the devices in one jitted call, so nothing full-size leaves them).

    Part of the resume signature: a calibration state written for one teacher is refused for another (the
    same micro-batches through other weights give other outputs). The checksums are integer sums modulo
    2^32, so they are exact and independent of reduction order and sharding: the same weights give the
    same signature on any device layout, and a changed weight changes it."""
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    leaves = [v.get_value() if hasattr(v, "get_value") else v for _, v in flat]
    sums = np.asarray(_param_checksums(leaves))  # [P, 2] uint32
    h = hashlib.sha256(json.dumps(model.config.to_hf_config(), sort_keys=True, default=str).encode())
    for (path, _), leaf, c in zip(flat, leaves, sums):
        h.update(f"{'/'.join(map(str, path))}:{leaf.dtype}{tuple(leaf.shape)};".encode())
        h.update(c.tobytes())
    return h.hexdigest()


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@jax.jit
def _param_checksums(leaves: list[jax.Array]) -> jax.Array:
    """[P, 2] uint32 per parameter: sum of its bit patterns, and the same weighted by position (mod 2^32)."""
    out = []
    for x in leaves:
        u = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
        pos = (jax.lax.iota(jnp.uint32, x.size) % jnp.uint32(65521) + jnp.uint32(1)).reshape(x.shape)
        out.append(jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * pos, dtype=jnp.uint32)]))
    return jnp.stack(out)


def prepare(hooks: arch.ArchHooks, cfg: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """A raw micro-batch -> model inputs through its task's ``prepare_batch``, tagged with that task."""
    task = hooks.batch_task(batch)
    inputs = hooks.for_task(task).prepare_batch(cfg, batch)
    # a trajectory set's guidance / per-sample weights ride along for the fitness (the forwards never read them)
    return {**inputs, **fitness_entries(batch), "task": task}


def finish(
    inputs: list[dict[str, Any]],
    teacher: list[np.ndarray],
    by_task: dict[str, dict[tuple, np.ndarray]],
    weights: dict[str, float] | None,
) -> Calibration:
    """The :class:`Calibration` of per-task summed statistics (combined by ``weights``, see :func:`combine_stats`)."""
    n = {}
    for inp, y in zip(inputs, teacher):
        t = inp.get("task", "t2i")
        n[t] = n.get(t, 0) + int(y.shape[0])
    stats = combine_stats(by_task, n, weights) if by_task else {}
    return Calibration(inputs, teacher, stats, by_task, weights)


def _arch_of(model: Any) -> str:
    return getattr(model, "ARCH", None) or type(model).__module__.split(".")[2].replace("_", "")


# ----------------------------------------------------------------------------------------------
# Importance


def importance(tree: Tree, stats: dict[tuple, np.ndarray], commensurate: bool = True) -> tuple[dict, dict]:
    """Per-unit scores {(node, kind): (n,)}, (batch units, n) for a batched group (``Units.batch``), and
    per-droppable-node scores {node: float}.

    Units read the statistic their node's module sowed (``unit_stat_<kind>`` or ``unit_stat``);
    droppable nodes read ``block_stat`` = [sum ||out - in||^2, sum ||in||^2].

    ``commensurate`` (default): every score is energy entering the residual stream, so heads, FFN channels,
    experts, expert channels and blocks compare on one scale: a unit's score is its share of its group's
    statistic times the branch's ``res_energy`` (what the branch adds to the residual stream, after its
    post-norm and gate, where the node sows it), and a block's score is ``sum ||out - in||^2``. Otherwise:
    the raw statistics and the relative block change (the scales differ per kind).
    """
    units: dict[tuple[str, str], np.ndarray] = {}
    blocks: dict[str, float] = {}
    for n in tree.spec.nodes():
        base = node_path(n.name)
        for u in n.units:
            v = stats.get((*base, f"unit_stat_{u.kind}"), stats.get((*base, "unit_stat")))
            if v is None:
                raise ValueError(f"no importance statistic sown for {n.name}/{u.kind}")
            want = (u.n,) if u.batch is None else (tree.units(n.name, u.batch).n, u.n)  # per batch unit (expert)
            if v.shape != want and not (u.batch is not None and v.shape == (u.n,)):  # (n,): the same for every row
                raise ValueError(f"statistic for {n.name}/{u.kind} has shape {v.shape}, expected {want}")
            v = np.asarray(v, np.float64)
            res = stats.get((*base, "res_energy"))
            if commensurate and res is not None:
                v = v / max(float(v.sum()), 1e-30) * float(res)
            units[(n.name, u.kind)] = v
        bs = stats.get((*base, "block_stat"))
        if n.droppable and bs is not None:
            blocks[n.name] = float(bs[0]) if commensurate else float(bs[0] / max(bs[1], 1e-30))
    return units, blocks


def order_from_scores(units: dict[tuple[str, str], np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
    """Most important first (stable, so ties keep original order); a (B, n) score array (a batched group,
    ``Units.batch``) gets one order per row."""
    return {k: np.argsort(-v, axis=-1, kind="stable") for k, v in units.items()}
