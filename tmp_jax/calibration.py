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

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tmp_jax import arch
from tmp_jax.tree import Tree

FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Set format


def write_calib(folder: str | Path, batches: list[dict[str, np.ndarray]], arch_name: str, task: str = "t2i") -> Path:
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, b in enumerate(batches):
        name = f"batch-{i:05d}.safetensors"
        tmp = folder / f".{name}.tmp"
        save_file({k: np.ascontiguousarray(v) for k, v in b.items()}, str(tmp))
        os.replace(tmp, folder / name)
        names.append(name)
    meta = {"format_version": FORMAT_VERSION, "arch": arch_name, "task": task, "batches": names}
    _atomic_write(folder / "calib.json", json.dumps(meta, indent=2).encode())
    return folder


def load_calib(folder: str | Path, arch_name: str | None = None) -> list[dict[str, np.ndarray]]:
    """Read a calibration set (safetensors + JSON only); clear one-line errors on bad input."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    p = folder / "calib.json"
    from converters.engine import read_json

    meta = read_json(p, "a calibration set is a folder with calib.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{p}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    if arch_name is not None and meta.get("arch") != arch_name:
        raise ValueError(f"{p}: calibration set is for arch {meta.get('arch')!r}, model is {arch_name!r}")
    out = []
    for name in meta["batches"]:
        f = folder / name
        if not f.is_file():
            raise ValueError(f"{f}: batch listed in calib.json is missing")
        out.append(load_file(str(f)))
    if not out:
        raise ValueError(f"{p}: no batches")
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Running the teacher


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
    inputs: list[dict[str, Any]]  # prepared model inputs per micro-batch
    teacher: list[np.ndarray]  # cached teacher outputs per micro-batch
    stats: dict[tuple, np.ndarray]  # summed statistics by module path


def calibrate(
    model: Any,
    batches: list[dict[str, np.ndarray]],
    *,
    mesh: jax.sharding.Mesh | None = None,
    out: str | Path | None = None,
    progress: bool = False,
    streamed: bool | None = None,
    dtype: Any = None,
) -> Calibration:
    """Teacher outputs + summed statistics over all micro-batches (resumes from ``out``).

    ``model`` is a loaded model, or the path of a checkpoint folder. For a path, ``streamed`` chooses
    block-by-block calibration with the weights streamed from disk
    (:func:`tmp_jax.streamed_calibration.calibrate_streamed`, same result, only the stem and one block on the
    devices); None (default) streams when the parameters at ``dtype`` exceed half of the devices' memory,
    otherwise the checkpoint is loaded (onto ``mesh``) and calibrated in memory.
    """
    if isinstance(model, str | os.PathLike):
        from tmp_jax import streamed_calibration as sc

        if streamed is None:
            streamed = not sc.model_fits(model, dtype, mesh)
        if streamed:
            return sc.calibrate_streamed(model, batches, dtype=dtype, mesh=mesh, out=out, progress=progress)
        h = arch.get(sc.checkpoint_arch(Path(model)))
        model = h.load(str(model), dtype=jnp.float32 if dtype is None else dtype, mesh=mesh)
    elif streamed:
        raise ValueError("streamed calibration reads the weights from the checkpoint: pass its path, not a model")
    hooks = arch.get(_arch_of(model))
    cfg = model.config
    inputs = [shard_inputs(hooks.prepare_batch(cfg, b), mesh) for b in batches]
    state_path = Path(out) / "calib_state.npz" if out is not None else None
    done, teacher, stats = 0, [], {}
    if state_path is not None and state_path.is_file():
        done, teacher, stats = _load_state(state_path)
    it = range(done, len(inputs))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="calibration", unit="batch", initial=done, total=len(inputs))
    for i in it:
        y, s = hooks.collect_stats(model, inputs[i])
        teacher.append(np.asarray(y))
        for k, v in s.items():
            stats[k] = stats[k] + v if k in stats else v
        if state_path is not None:
            _save_state(state_path, i + 1, teacher, stats)
    return Calibration(inputs, teacher, stats)


def _load_state(path: Path) -> tuple[int, list[np.ndarray], dict[tuple, np.ndarray]]:
    """(finished micro-batches, their teacher outputs, summed statistics) from a ``calib_state.npz``."""
    z = np.load(path, allow_pickle=False)
    done = int(z["done"])
    teacher = [z[f"teacher_{i}"] for i in range(done)]
    keys = json.loads(str(z["stat_keys"]))
    return done, teacher, {tuple(k): z[f"stat_{i}"] for i, k in enumerate(keys)}


def _save_state(path: Path, done: int, teacher: list[np.ndarray], stats: dict[tuple, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(stats)
    arrays = {f"teacher_{i}": t for i, t in enumerate(teacher)}
    arrays.update({f"stat_{i}": stats[k] for i, k in enumerate(keys)})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calib_state.", suffix=".npz")
    os.close(fd)
    np.savez(tmp, done=np.int64(done), stat_keys=np.array(json.dumps([list(k) for k in keys])), **arrays)
    os.replace(tmp, path)


def _arch_of(model: Any) -> str:
    return getattr(model, "ARCH", None) or type(model).__module__.split(".")[2].replace("_", "")


# ----------------------------------------------------------------------------------------------
# Importance


def _node_path(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def importance(tree: Tree, stats: dict[tuple, np.ndarray]) -> tuple[dict, dict]:
    """Per-unit scores {(node, kind): (n,)} and per-droppable-node scores {node: float}.

    Units read the statistic their node's module sowed (``unit_stat_<kind>`` or ``unit_stat``);
    droppable nodes read ``block_stat`` = [sum ||out - in||^2, sum ||in||^2] (relative change).
    """
    units: dict[tuple[str, str], np.ndarray] = {}
    blocks: dict[str, float] = {}
    for n in tree.spec.nodes():
        base = _node_path(n.name)
        for u in n.units:
            v = stats.get((*base, f"unit_stat_{u.kind}"), stats.get((*base, "unit_stat")))
            if v is None:
                raise ValueError(f"no importance statistic sown for {n.name}/{u.kind}")
            if v.shape != (u.n,):
                raise ValueError(f"statistic for {n.name}/{u.kind} has shape {v.shape}, expected ({u.n},)")
            units[(n.name, u.kind)] = np.asarray(v, np.float64)
        bs = stats.get((*base, "block_stat"))
        if n.droppable and bs is not None:
            blocks[n.name] = float(bs[0] / max(bs[1], 1e-30))
    return units, blocks


def order_from_scores(units: dict[tuple[str, str], np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
    """Most important first (stable, so ties keep original order)."""
    return {k: np.argsort(-v, kind="stable") for k, v in units.items()}
