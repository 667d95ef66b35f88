"""Calibration results and their resume state: what the in-memory and the streamed calibration share.

:class:`Calibration` (teacher outputs, summed statistics), the ``calib_state.npz`` reader / writer
(:func:`load_state` / :func:`save_state`), the resume signatures of a calibration set and of its Gram settings,
and how inputs go onto the mesh and teacher outputs back to the host. :mod:`tmp_jax.calibration` (in memory) and
:mod:`tmp_jax.streamed_calibration` (block by block) both build on it, and neither imports the other at module
level: ``calibration.calibrate`` dispatches to the streamed path, which imports only this module, so the two
form no import cycle. The names stay importable from :mod:`tmp_jax.calibration`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tmp_jax.compensate import StoredGram
from tmp_jax.stats import stat_dtype


def shard_inputs(inputs: dict[str, Any], mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
    """Put every batched array on the mesh's data axis (replicated where the batch doesn't divide)."""
    if mesh is None:
        return inputs
    n = mesh.shape.get("data", 1)

    def put(x: Any) -> Any:
        if isinstance(x, np.ndarray | jax.Array) and x.ndim >= 1 and x.shape[0] % n == 0 and n > 1:
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
        if isinstance(x, np.ndarray | jax.Array):
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
        return x

    return {k: (jax.tree.map(put, v) if k != "patch_key" else v) for k, v in inputs.items()}


@dataclass
class Calibration:
    inputs: list[dict[str, Any]]  # prepared model inputs per micro-batch (each with its "task")
    teacher: list[np.ndarray]  # cached teacher outputs per micro-batch
    stats: dict[tuple, np.ndarray]  # statistics by module path, the task sums combined by the weights
    stats_by_task: dict[str, dict[tuple, np.ndarray]] | None = None  # summed statistics per task
    weights: dict[str, float] | None = None  # the task weights ``stats`` was combined with

    @property
    def tasks(self) -> list[str]:
        return [inp.get("task", "t2i") for inp in self.inputs]


def gram_signature(grams: bool, stride: int = 1, timestep_weight: str = "uniform") -> str:
    """The consumer-Gram settings' part of a calibration resume signature ("" without Grams; the uniform
    weighting adds nothing, so states written before timestep weighting existed still resume)."""
    if not grams:
        return ""
    return f":grams{stride}" + ("" if timestep_weight == "uniform" else f":tw={timestep_weight}")


def host_output(y: Any) -> np.ndarray:
    """A teacher output on the host, float32 when the model ran in a narrower float (bf16): what the fitness
    compares candidates with (in fp64) and what ``calib_state.npz`` stores (``.npz`` cannot name bf16)."""
    y = np.asarray(y)
    return y.astype(stat_dtype(y.dtype), copy=False)


def batches_signature(batches: list[dict[str, Any]]) -> str:
    """sha256 of the micro-batches (keys, dtypes, shapes, bytes, task tags): which set a resume state belongs to."""
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            if isinstance(b[k], str):
                h.update(f"{k}={b[k]};".encode())
                continue
            a = np.ascontiguousarray(b[k])
            h.update(f"{k}:{a.dtype.str}{a.shape};".encode())
            h.update(a.reshape(-1).view(np.uint8).data)
        h.update(b"|")
    return h.hexdigest()


def load_state(
    path: Path,
    by_task: bool = False,
    sig: str | None = None,
    n: int | None = None,
    teacher_sig: str | None = None,
    dtype: str | None = None,
) -> tuple[int, list[np.ndarray], dict]:
    """(finished micro-batches, their teacher outputs, summed statistics) from a ``calib_state.npz``.

    ``by_task``: statistics as {task: {path: sum}} (files without ``stat_tasks`` are all ``t2i``); else the flat
    {path: sum} of a single-task file (what the streamed calibration reads and writes). ``sig``
    (:func:`batches_signature`) / ``n``: the set being calibrated; a state of another set is a ValueError.
    ``teacher_sig``: ``"params:..."`` (:func:`teacher_signature` of a loaded model) or ``"files:..."`` (the
    checkpoint fingerprint, streamed calibration); a state written for another teacher of the same kind is a
    ValueError (a state of the other kind cannot be compared and is accepted: the two paths share the format).
    Statistics the state names by file (``stat_files``: streamed calibration's per-block Gram files) come back
    as :class:`~tmp_jax.compensate.StoredGram` s.
    ``dtype``: the teacher's dtype name (``"bfloat16"``); a state written at another dtype is a ValueError (files
    from before the dtype was recorded were all written by float32 teachers)."""
    z = np.load(path, allow_pickle=False)
    done = int(z["done"])
    stored_dt = str(z["dtype"]) if "dtype" in z else "float32"
    if dtype is not None and stored_dt != dtype:
        raise ValueError(
            f"{path}: resume state of a calibration with the teacher in {stored_dt}, this run has it in {dtype} "
            "(--dtype); remove it, calibrate into another folder, or pass the same --dtype"
        )
    stored = str(z["batch_sig"]) if "batch_sig" in z else None
    if (sig is not None and stored is not None and stored != sig) or (n is not None and done > n):
        raise ValueError(
            f"{path}: resume state of another calibration set ({done} micro-batches done; this set has {n}); "
            "remove it or calibrate into another folder"
        )
    t_stored = str(z["teacher_sig"]) if "teacher_sig" in z else None
    if teacher_sig and t_stored and t_stored.split(":")[0] == teacher_sig.split(":")[0] and t_stored != teacher_sig:
        raise ValueError(
            f"{path}: resume state of another teacher (same micro-batches, other weights or config); "
            "remove it or calibrate into another folder"
        )
    teacher = [z[f"teacher_{i}"] for i in range(done)]
    keys = json.loads(str(z["stat_keys"]))
    tasks = json.loads(str(z["stat_tasks"])) if "stat_tasks" in z else ["t2i"] * len(keys)
    files = {int(i): (f, name) for i, f, name in json.loads(str(z["stat_files"]))} if "stat_files" in z else {}
    per: dict[str, dict[tuple, Any]] = {}
    for i, (t, k) in enumerate(zip(tasks, keys)):
        if i in files:  # a Gram kept on disk next to the state
            f = path.parent / files[i][0]
            if not f.is_file():
                raise ValueError(f"{path}: names the Gram file {f}, which is missing; remove {path} to recalibrate")
            per.setdefault(t, {})[tuple(k)] = StoredGram.open(f, files[i][1])
        else:
            per.setdefault(t, {})[tuple(k)] = z[f"stat_{i}"]
    if by_task:
        return done, teacher, per
    if len(per) > 1:
        raise ValueError(f"{path}: holds statistics of several tasks ({', '.join(per)}); read it with by_task=True")
    return done, teacher, next(iter(per.values()), {})


def save_state(
    path: Path,
    done: int,
    teacher: list[np.ndarray],
    stats: dict,
    sig: str | None = None,
    teacher_sig: str | None = None,
    dtype: str | None = None,
) -> None:
    """Write ``calib_state.npz`` atomically; ``stats`` is {path: sum} (one task, t2i) or {task: {path: sum}}.

    A :class:`~tmp_jax.compensate.StoredGram` (a Gram already on disk) is recorded by its file (relative to the
    state's folder) and tensor name, not copied. ``dtype``: the teacher's dtype name, checked on resume
    (:func:`load_state`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if stats and all(isinstance(k, str) for k in stats):
        items = [(t, k, v) for t, st in stats.items() for k, v in st.items()]
    else:
        items = [("t2i", k, v) for k, v in stats.items()]
    arrays = {f"teacher_{i}": t for i, t in enumerate(teacher)}
    arrays.update({f"stat_{i}": v for i, (_, _, v) in enumerate(items) if not isinstance(v, StoredGram)})
    files = []
    for i, (_, _, v) in enumerate(items):
        if isinstance(v, StoredGram):
            if v.takes:
                raise ValueError(f"internal: a permuted StoredGram ({v!r}) is no calibration statistic")
            files.append([i, os.path.relpath(v.path, path.parent), v.name])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calib_state.", suffix=".npz")
    os.close(fd)
    np.savez(
        tmp,
        done=np.int64(done),
        stat_keys=np.array(json.dumps([list(k) for _, k, _ in items])),
        stat_tasks=np.array(json.dumps([t for t, _, _ in items])),
        **({"batch_sig": np.array(sig)} if sig else {}),
        **({"teacher_sig": np.array(teacher_sig)} if teacher_sig else {}),
        **({"stat_files": np.array(json.dumps(files))} if files else {}),
        **({"dtype": np.array(dtype)} if dtype else {}),
        **arrays,
    )
    os.replace(tmp, path)
