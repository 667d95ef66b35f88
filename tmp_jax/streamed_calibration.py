"""Block-by-block calibration with weights streamed from the checkpoint (models larger than device memory).

:func:`calibrate_streamed` produces the same :class:`~tmp_jax.calib_state.Calibration` (teacher outputs and
summed sown statistics) as the in-memory :func:`~tmp_jax.calibration.calibrate`, but never holds more than
the stem (embeddings, T2I heads) and ONE block's parameters on the devices: it walks the model's blocks in
execution order, reads each block's tensors from the safetensors checkpoint (the converters' streaming
reader and key tables, one table entry at a time), runs EVERY calibration micro-batch through that block,
keeps the activations ("carries", one flat dict of arrays per micro-batch, on the device or on the host) for
the next block, and drops the block's weights before loading the next one. Each checkpoint tensor is read
once.

Generic code only walks a per-architecture *schedule* of steps (:class:`Step`): ``op`` steps run on the
stem (embedding, the Z-Image unify, the output head), ``block`` steps run one block module with its
statistics sown. An architecture provides a :class:`~tmp_jax.arch.StreamHooks` (reader, stem view, schedule)
through ``ArchHooks.streamed``, next to its ``read_config`` and ``key_table``; the built-in ones are in
``tmp_jax/models/<arch>/streamed.py``. This module names no architecture.

Resume: with ``out``, every micro-batch's state (its carry and its own statistics) is written atomically to
``OUT/calib_stream/mb-MMMMM-at-SSSS.npz`` as it finishes every ``checkpoint_every``-th step; an interrupted
run resumes each micro-batch from its last written step (micro-batch granularity, as the in-memory one).
The finished result is written to ``OUT/calib_state.npz`` in the in-memory calibration's
format, so either calibration resumes from (and reuses) the other's finished result.

Consumer Grams (``grams=True``, compensated pruning): a block's Grams are summed over the micro-batches ON
THE DEVICE while the block is resident, then moved off it when the block is done, so the devices never hold
more than one block's Grams (HunyuanImage: 64 x 3072^2 fp32 = 2.4 GB of expert Grams per layer). Without
``out`` they go to host RAM; with ``out`` each block's go to ONE safetensors file,
``OUT/calib_grams/grams-SSSS.safetensors`` (SSSS = the block's step; written atomically, one tensor in host
memory at a time), and the result holds them as :class:`~tmp_jax.compensate.StoredGram` s, read when
used; ``calib_state.npz`` names the files. A block's Grams sum EVERY micro-batch, so while a block runs its
micro-batch states are held back until its Gram file is written: no state past a block exists without that
block's Grams on disk, and a resumed run that re-runs a block whose Gram file exists (for micro-batches
whose state is older) does not add to it. A crash loses at most the block in progress (plus the
``checkpoint_every`` spacing), never a Gram contribution.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax import arch
from tmp_jax.arch import StreamHooks, StreamStep
from tmp_jax.calib_state import (
    Calibration,
    batches_signature,
    gram_signature,
    host_output,
    load_state,
    save_state,
    shard_inputs,
)
from tmp_jax.compensate import (
    StoredGram,
    check_timestep_weight,
    sample_sigmas,
    save_f32_safetensors,
    timestep_weights,
)
from tmp_jax.stats import is_resident, set_gram_weights, set_grams, split_collecting
from tmp_jax.trajectory import fitness_entries

PathT = tuple[str | int, ...]
Carry = Any  # one micro-batch's activations between steps: any pytree of arrays (a dict, usually)
STREAM_DIR = "calib_stream"
GRAM_DIR = "calib_grams"  # per-block Gram files of a streamed calibration with a run folder (kept with the result)


# ----------------------------------------------------------------------------------------------
# Per-architecture hooks


Step = StreamStep  # the per-arch step and hooks types live in tmp_jax.arch (model packages import only that)


def get_hooks(name: str) -> StreamHooks:
    """Architecture ``name``'s streamed-calibration hooks (its ``ArchHooks.streamed``)."""
    h = arch.get(name)
    if h.streamed is None:
        have = sorted(n for n in arch.names() if arch.get(n).streamed is not None)
        raise KeyError(f"no streamed-calibration hooks for architecture {name!r}; registered: {have}")
    return h.streamed()


# ----------------------------------------------------------------------------------------------
# Jitted step runners (generic; compiled once per step function and module graph)


def _op_fn(gd: Any, fn: Callable, static: tuple, st: Any, dyn: dict, carry: Carry | None) -> Any:
    return fn(nnx.merge(gd, st), {**dyn, **dict(static)}, carry)


def _block_fn(gd: Any, fn: Callable, st: Any, carry: Carry) -> Carry:
    return fn(nnx.merge(gd, st), carry)


_op_jit = jax.jit(_op_fn, static_argnums=(0, 1, 2))


@partial(jax.jit, static_argnums=(0, 1))
def _block_jit(gd: Any, fn: Callable, st: Any, carry: Carry) -> tuple[Carry, Any]:
    blk = nnx.merge(gd, st)
    out = fn(blk, carry)
    return out, nnx.pop(blk, nnx.Intermediate)


def compile_count() -> int:
    return _op_jit._cache_size() + _block_jit._cache_size()


def _split_static(inputs: dict[str, Any]) -> tuple[dict[str, Any], tuple]:
    """Model inputs -> (arrays, hashable static rest) (e.g. Z-Image's ``patch_key`` string)."""
    dyn, static = {}, []
    for k, v in inputs.items():
        if isinstance(v, str | int | float | bool | None):
            static.append((k, v))
        else:
            dyn[k] = v
    return dyn, tuple(sorted(static))


def _get(module: Any, path: PathT) -> Any:
    for p in path:
        module = module[p] if isinstance(p, int) else getattr(module, p)
    return module


# ----------------------------------------------------------------------------------------------
# Streaming parameters in and out of an abstract model


def _read_entry(reader: Any, entry: Any) -> list[np.ndarray]:
    """One key-table entry: its source tensors read (positioned reads) and converted to the NNX layout."""
    return entry.to_flax([reader.read(k) for k in entry.torch_keys])


def _place(arr: np.ndarray, var: nnx.Variable, dtype: Any, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """A converted host array -> a device array in the variable's dtype and rule-resolved sharding."""
    from tmp_jax.safetensors_io import _cast_dtype

    want = var.get_value()
    arr = arr.astype(want.dtype if dtype is None else _cast_dtype(want.dtype, dtype, var), copy=False)
    if mesh is None:
        return jax.device_put(arr)
    from tmp_jax.sharding import variable_sharding

    return jax.make_array_from_callback(arr.shape, variable_sharding(var, mesh), lambda idx: arr[idx])


class AbstractParams:
    """A shape-only model whose parameters are filled module by module (``load``, by a subclass) and put back to
    their abstract placeholders (``release``) so the arrays can be freed."""

    def __init__(self, model: nnx.Module):
        from tmp_jax.safetensors_io import flat_variables

        self.model = model
        self.var = flat_variables(model)
        self.path_of = {id(v): p for p, v in self.var.items()}
        self.placeholder = {p: v.get_value() for p, v in self.var.items()}

    def param_paths(self, module: nnx.Module) -> list[PathT]:
        """The paths of the parameters reachable from ``module``."""
        return [self.path_of[id(v)] for _, v in nnx.iter_graph(module) if id(v) in self.path_of]

    def load(self, module: nnx.Module) -> None:
        raise NotImplementedError

    def release(self, module: nnx.Module) -> None:
        for p in self.param_paths(module):
            self.var[p].set_value(self.placeholder[p])


class ParamStreamer(AbstractParams):
    """An abstract (shape-only) model whose variables are filled from the checkpoint module by module.

    ``load(module)`` fills exactly the parameters reachable from ``module`` (reading every table entry that
    targets one of them), ``release(module)`` puts the abstract placeholders back so the arrays can be freed.
    """

    def __init__(self, path: Path, hooks: StreamHooks, dtype: Any = None, mesh: jax.sharding.Mesh | None = None):
        from tmp_jax.safetensors_io import CheckpointError, _check_source, check_table_covers

        folder = path if path.is_dir() else path.parent
        h = arch.get(hooks.name)
        self.cfg = h.read_config(folder)
        self.reader = hooks.reader(path)
        self.table = h.key_table(self.cfg)
        super().__init__(h.init_abstract(self.cfg, jnp.float32 if dtype is None else dtype))
        self.dtype, self.mesh = dtype, mesh
        check_table_covers(self.table, self.var)
        _check_source(self.reader, self.table)
        self.entries_of: dict[PathT, Any] = {}
        for e in self.table.entries:
            for p in e.flax_paths:
                self.entries_of[p] = e
        self.error = CheckpointError

    def param_bytes(self, module: nnx.Module | None = None) -> int:
        paths = self.var if module is None else self.param_paths(module)
        out = 0
        for p in paths:
            x = self.placeholder[p]
            itemsize = np.dtype(x.dtype if self.dtype is None else self.dtype).itemsize
            out += int(np.prod(x.shape, dtype=np.int64)) * itemsize
        return out

    def load(self, module: nnx.Module) -> None:
        want = set(self.param_paths(module))
        done: set[PathT] = set()
        for p in sorted(want, key=str):
            if p in done:
                continue
            e = self.entries_of[p]
            for q, arr in zip(e.flax_paths, _read_entry(self.reader, e)):
                if tuple(arr.shape) != tuple(self.placeholder[q].shape):
                    raise self.error(
                        f"{self.reader.root}: {e.torch_keys[0]!r} converts to shape {list(arr.shape)} for "
                        f"{'.'.join(map(str, q))}, model expects {list(self.placeholder[q].shape)}"
                    )
                if q in want:  # a fused entry may also fill a parameter outside the module: skip it
                    self.var[q].set_value(_place(arr, self.var[q], self.dtype, self.mesh))
                done.add(q)


# ----------------------------------------------------------------------------------------------
# Device memory estimate (automatic choice)


def device_capacity(mesh: jax.sharding.Mesh | None = None) -> int:
    """Bytes available for parameters: the devices' memory limits (host RAM for CPU devices), divided by the
    number of data-parallel replicas (every replica holds a full copy of what the other axes shard)."""
    devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
    limits = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        limits.append((stats or {}).get("bytes_limit"))
    if any(x is None for x in limits):  # CPU devices share the host's RAM
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        total = int(sum(limits))
    replicas = mesh.shape.get("data", 1) if mesh is not None else 1
    return total // replicas


def checkpoint_param_bytes(path: str | os.PathLike[str], dtype: Any = None) -> int:
    """Parameter bytes the model of checkpoint ``path`` needs at ``dtype`` (None: as stored), from the header
    and the key table only (nothing is loaded)."""
    name = checkpoint_arch(Path(path))
    h, sh = arch.get(name), get_hooks(name)
    p = Path(path)
    cfg = h.read_config(p if p.is_dir() else p.parent)
    table, reader = h.key_table(cfg), sh.reader(p)
    if dtype is not None:
        return table.num_params() * np.dtype(dtype).itemsize
    return sum(reader.infos[k].end - reader.infos[k].start for e in table.entries for k in e.torch_keys)


def model_fits(path: str | os.PathLike[str], dtype: Any = None, mesh: Any = None, fraction: float = 0.5) -> bool:
    """Whether the model's parameters take at most ``fraction`` of :func:`device_capacity` (the rest is left
    for activations, teacher outputs and compiled code)."""
    return checkpoint_param_bytes(path, dtype) <= fraction * device_capacity(mesh)


def checkpoint_arch(path: Path) -> str:
    """The registered architecture whose config.json kind matches the checkpoint at ``path``."""
    from tmp_jax.safetensors_io import read_json

    folder = path if path.is_dir() else path.parent
    return arch.detect(read_json(folder / "config.json", "a checkpoint folder needs config.json")).name


# ----------------------------------------------------------------------------------------------
# Resume state


def _save_arrays(path: Path, arrays: dict[str, Any]) -> None:
    """A flat dict of arrays as .npz; non-numpy dtypes (bf16, fp8) stored as raw integer views + their tag."""
    from tmp_jax.safetensors_io import NP_TO_ST

    out, tags = {}, {}
    for k, v in arrays.items():
        a = np.asarray(v)
        tag = NP_TO_ST.get(a.dtype)
        if tag in ("BF16", "F8_E4M3", "F8_E5M2"):  # ml_dtypes types: .npz cannot name them
            tags[k] = tag
            a = a.view({1: np.uint8, 2: np.uint16}[a.dtype.itemsize])
        out[k] = a
    np.savez(path, __tags__=np.array(json.dumps(tags)), **out)


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    from tmp_jax.safetensors_io import ST_TO_NP

    z = np.load(path, allow_pickle=False)
    tags = json.loads(str(z["__tags__"]))
    return {k: (z[k].view(ST_TO_NP[tags[k]]) if k in tags else z[k]) for k in z.files if k != "__tags__"}


def _mb_file(root: Path, m: int, at: int) -> Path:
    return root / f"mb-{m:05d}-at-{at:04d}.npz"


def _write_mb(
    root: Path, m: int, at: int, n_batches: int, n_steps: int, carry: Carry, stats: dict, sig: str | None = None
) -> None:
    """Micro-batch ``m``'s state after its first ``at`` steps: its carry (pytree leaves ``leaf-NNNN``; the
    structure is re-derived on resume by :func:`_carry_structures`, no pickles) or, after the last step, its
    teacher output, and its OWN statistics; written under a temporary name, renamed, older files removed."""
    root.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {}
    if at == n_steps:
        arrays["teacher"] = np.asarray(carry)
    else:
        arrays.update({f"leaf-{i:04d}": x for i, x in enumerate(jax.tree.leaves(jax.device_get(carry)))})
    keys = list(stats)
    arrays.update({f"stat-{i:05d}": np.asarray(stats[k]) for i, k in enumerate(keys)})
    meta = {"at": at, "n_batches": n_batches, "n_steps": n_steps, "stat_keys": [list(k) for k in keys], "sig": sig}
    arrays["meta"] = np.array(json.dumps(meta))
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".mb-{m:05d}.", suffix=".npz")
    os.close(fd)
    try:
        _save_arrays(Path(tmp), arrays)
        os.replace(tmp, _mb_file(root, m, at))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in root.glob(f"mb-{m:05d}-at-*.npz"):
        if old.name != _mb_file(root, m, at).name:
            old.unlink(missing_ok=True)


def _read_mbs(root: Path, n_batches: int, n_steps: int, sig: str | None = None) -> list[tuple[int, Any, dict]]:
    """Per micro-batch: (steps done, carry leaves or teacher output, its statistics); (0, None, {}) if none."""
    out = []
    for m in range(n_batches):
        files = sorted(root.glob(f"mb-{m:05d}-at-*.npz"))
        if not files:
            out.append((0, None, {}))
            continue
        z = _load_arrays(files[-1])
        meta = json.loads(str(z["meta"]))
        if meta["n_batches"] != n_batches or meta["n_steps"] != n_steps or meta.get("sig", sig) != sig:
            raise ValueError(
                f"{files[-1]}: streamed-calibration state of {meta['n_batches']} micro-batches x {meta['n_steps']} "
                f"steps of {'this' if meta.get('sig', sig) == sig else 'another'} calibration set, this run has "
                f"{n_batches} x {n_steps} (remove {root} to start over)"
            )
        stats = {tuple(k): z[f"stat-{i:05d}"] for i, k in enumerate(meta["stat_keys"])}
        at = int(meta["at"])
        data = (
            z["teacher"]
            if at == n_steps
            else [z[f"leaf-{i:04d}"] for i in range(sum(k.startswith("leaf-") for k in z))]
        )
        out.append((at, data, stats))
    return out


def _carry_structures(ps: ParamStreamer, stem: nnx.Module, steps: list[Step], inputs: list[dict], at: list[int]):
    """The pytree structure of micro-batch ``m``'s carry after ``steps[:at[m]]``, by tracing the steps
    abstractly on the shape-only model (``jax.eval_shape``; nothing is loaded or compiled), once per distinct
    input signature and step count."""
    cache: dict[Any, Any] = {}
    out = []
    for inp, k in zip(inputs, at):
        dyn, static = _split_static(inp)
        leaves, tdef = jax.tree.flatten(dyn)
        sig = (k, static, tdef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))
        if sig not in cache:
            c = None
            for step in steps[:k]:
                if step.kind == "op":
                    gd, st = nnx.split(stem)
                    c = jax.eval_shape(partial(_op_fn, gd, step.fn, static), st, dyn, c)
                else:
                    gd, st = nnx.split(_get(ps.model, step.path))
                    c = jax.eval_shape(partial(_block_fn, gd, step.fn), st, c)
            cache[sig] = jax.tree.structure(c)
        out.append(cache[sig])
    return out


# ----------------------------------------------------------------------------------------------
# Consumer Grams: one block's at a time on the device, then on the host or in one file per block


def _split_intermediates(inter: Any) -> tuple[dict[tuple, np.ndarray], dict[tuple, jax.Array]]:
    """A block's sown intermediates -> (host statistics, as :func:`tmp_jax.stats.flatten_intermediates` gives
    them; the consumer Grams, summed over the calls but left on the device)."""
    host, dev = {}, {}
    for path, v in nnx.to_flat_state(inter):
        val = v.get_value() if hasattr(v, "get_value") else v
        arrs = val if isinstance(val, tuple) else (val,)
        if is_resident(tuple(path)):
            dev[tuple(path)] = sum(arrs[1:], arrs[0])
        else:
            host[tuple(path)] = np.asarray(sum(np.asarray(x) for x in arrs))
    return host, dev


def _gram_file(root: Path, si: int) -> Path:
    return root / f"grams-{si:04d}.safetensors"


def _read_block_grams(f: Path, sig: str | None) -> dict[tuple, StoredGram] | None:
    """The Grams of a finished block from its file (None if it has none yet); a file of another calibration
    (set, checkpoint or Gram settings) is a ValueError."""
    if not f.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(f), framework="numpy") as fh:
        meta, names = fh.metadata() or {}, list(fh.keys())
    if meta.get("sig") != (sig or ""):
        raise ValueError(
            f"{f}: consumer Grams of another calibration (micro-batches, checkpoint or Gram settings); "
            f"remove {f.parent} to start over"
        )
    keys = json.loads(meta["keys"])
    return {tuple(keys[nm]): StoredGram.open(f, nm) for nm in names}


def _store_block_grams(acc: dict[tuple, jax.Array], f: Path | None, sig: str | None) -> dict[tuple, Any]:
    """One finished block's summed Grams off the device: to host arrays (``f`` None) or to the file ``f``
    (atomically, one Gram on the host at a time), returned as :class:`StoredGram` s. Empties ``acc``, so the
    device copies are freed."""
    try:
        if f is None:
            return {k: np.asarray(jax.device_get(v)) for k, v in acc.items()}
        names = {"/".join(map(str, k)): k for k in acc}  # readable tensor names; the keys (ints kept) in metadata
        meta = {"sig": sig or "", "keys": json.dumps({nm: list(k) for nm, k in names.items()})}
        f.parent.mkdir(parents=True, exist_ok=True)
        save_f32_safetensors(f, [(nm, acc[k]) for nm, k in names.items()], meta)
        return {k: StoredGram.open(f, nm) for nm, k in names.items()}
    finally:
        acc.clear()


# ----------------------------------------------------------------------------------------------
# The streamed calibration


def _sampled_content_hash(path: Path, samples: int = 64, chunk: int = 4096) -> str:
    """sha256 of ``samples`` evenly spaced ``chunk``-byte reads of every safetensors file (a few hundred KB per
    file, not the 100+ GB): tells apart checkpoints of the same shapes with other weights (a fine-tune, another
    seed), which headers and sizes alone do not."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            for i in range(samples):
                fh.seek(max(0, (size - chunk) * i // max(samples - 1, 1)))
                h.update(fh.read(chunk))
    return h.hexdigest()


def calibrate_streamed(
    path: str | os.PathLike[str],
    batches: list[dict[str, np.ndarray]],
    *,
    dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    out: str | Path | None = None,
    progress: bool = False,
    carry_on: str = "device",
    checkpoint_every: int = 1,
    grams: bool = False,
    gram_stride: int = 1,
    gram_timestep_weight: str = "uniform",
) -> Calibration:
    """Teacher outputs + summed statistics of the checkpoint at ``path``, block by block (see module doc).

    Args:
        path: a checkpoint folder (config.json + safetensors) of a registered architecture.
        batches: calibration micro-batches (``load_calib``).
        dtype: parameter dtype on the devices (None: the model's default, fp32; the router stays fp32).
        mesh: device mesh (batch on ``data``, parameters by the rules table), as for ``calibrate``.
        out: run folder for the resume state and the finished ``calib_state.npz``.
        carry_on: ``"device"`` keeps every micro-batch's activations on the devices between blocks,
            ``"host"`` moves them to host RAM (device memory = stem + one block + one micro-batch).
        checkpoint_every: with ``out``, write each micro-batch's state (its carry: activations) as it finishes
            every this many-th step (and the last); a large set may prefer a few blocks between checkpoints.
        grams / gram_stride / gram_timestep_weight: also the consumer Grams of compensated pruning, as for
            ``calibrate`` (one block's on the device at a time; host RAM without ``out``, else one file per
            block under ``OUT/calib_grams``: see the module docstring).
    """
    if carry_on not in ("device", "host"):
        raise ValueError(f"carry_on={carry_on!r}: expected 'device' or 'host'")
    if grams:
        check_timestep_weight(gram_timestep_weight)
    path = Path(path)
    hooks = get_hooks(checkpoint_arch(path))
    ps = ParamStreamer(path, hooks, dtype, mesh)
    cfg = ps.cfg
    inputs = [shard_inputs({**arch.get(hooks.name).prepare_batch(cfg, b), **fitness_entries(b)}, mesh) for b in batches]
    n = len(inputs)
    final = Path(out) / "calib_state.npz" if out is not None else None
    sig = tsig = None
    if out is not None:  # the resume state belongs to this set AND this checkpoint (headers, sizes, config)
        from tmp_jax.fileio import fingerprint

        sig = batches_signature(batches) + gram_signature(grams, gram_stride, gram_timestep_weight)
        tsig = f"files:{fingerprint(path, cfg.to_hf_config())}:{_sampled_content_hash(path)}"
    dt_name = np.dtype(jnp.float32 if dtype is None else dtype).name  # the resume states are per teacher dtype
    if final is not None and final.is_file():
        done, teacher, stats = load_state(final, sig=sig, n=n, teacher_sig=tsig, dtype=dt_name)
        if done == n:
            return Calibration(inputs, teacher, stats)
    steps = hooks.schedule(cfg)
    n_steps = len(steps)
    root = Path(out) / STREAM_DIR if out is not None else None
    # per-micro-batch states: this set, checkpoint and teacher dtype
    mb_sig = None if sig is None else f"{sig}:{tsig}" + ("" if dt_name == "float32" else f":{dt_name}")
    saved = [(0, None, {})] * n if root is None else _read_mbs(root, n, n_steps, mb_sig)
    at = [a for a, _, _ in saved]  # steps each micro-batch has finished
    own = [dict(st) for _, _, st in saved]  # each micro-batch's own statistics (summed in order at the end)
    stem = hooks.stem_view(ps.model)
    trees = _carry_structures(ps, stem, steps, inputs, [a if a < n_steps else 0 for a in at])
    gram_root = Path(out) / GRAM_DIR if out is not None and grams else None
    gram_w = [timestep_weights(gram_timestep_weight, sample_sigmas(hooks.name, b)) for b in batches] if grams else []
    block_grams: dict[tuple, Any] = {}  # the finished blocks' Grams (host arrays, or StoredGrams with out)
    pending_g: set[int] = set()  # block steps whose Grams this run sums (the others' are on disk already)
    for si, step in enumerate(steps):
        if not grams or step.kind != "block":
            continue
        done_g = _read_block_grams(_gram_file(gram_root, si), mb_sig) if gram_root is not None else None
        if done_g is None and max(at) > si:  # a state past a block is written only after the block's Grams
            raise ValueError(
                f"{root}: micro-batch states past step {si} without its consumer Grams in {gram_root}; remove "
                f"{root} to start over"
            )
        block_grams.update(done_g or {})
        if done_g is None:
            pending_g.add(si)
    set_grams(ps.model, grams, gram_stride)
    carries: list[Any] = [None] * n
    teacher: list[Any] = [None] * n
    for m, (a, data, _) in enumerate(saved):
        if a == n_steps:
            teacher[m] = data
        elif a:
            carries[m] = jax.tree.unflatten(trees[m], data)
            if carry_on == "device":
                carries[m] = _to_devices(carries[m], mesh)

    pbar = None
    if progress:
        from tmp_jax.progress import progress_bar

        pbar = progress_bar(total=n_steps * n, initial=sum(at), desc="calibration (streamed)", unit="batch")
    stem_loaded = False
    for si in range(min(at), n_steps):
        step = steps[si]
        todo = [m for m in range(n) if at[m] == si]
        if not todo:  # every micro-batch resumed past this step: nothing to load
            continue
        checkpoint = root is not None and ((si + 1) % checkpoint_every == 0 or si == n_steps - 1)
        if step.kind == "op":
            if not stem_loaded:
                ps.load(stem)
                gd_s, st_s = nnx.split(stem)
                stem_loaded = True
        else:
            blk = _get(ps.model, step.path)
            ps.load(blk)
            gd, st = split_collecting(blk)
        # this block's Grams: summed on the device over every micro-batch (all in ``todo``: checked above),
        # unless a resumed run has them on disk (then the block only re-runs for the activations)
        accumulate = si in pending_g
        acc: dict[tuple, jax.Array] = {}
        held: list[int] = []  # micro-batch states held back until the block's Grams are written
        for m in todo:
            if step.kind == "op":
                dyn, static = _split_static(inputs[m])
                prev = None if carries[m] is None else _to_devices(carries[m], mesh)
                carries[m] = _op_jit(gd_s, step.fn, static, st_s, dyn, prev)
            else:
                if grams and gram_w[m] is not None:  # this micro-batch's per-sample Gram weights (a state leaf)
                    set_gram_weights(blk, gram_w[m])
                    gd, st = split_collecting(blk)
                carries[m], inter = _block_jit(gd, step.fn, st, _to_devices(carries[m], mesh))
                host, dev = _split_intermediates(inter)
                for k, v in host.items():
                    own[m][(*step.path, *k)] = v
                for k, v in dev.items() if accumulate else ():  # in micro-batch order, as calibrate sums
                    key = (*step.path, *k)
                    acc[key] = acc[key] + v if key in acc else v
                del inter, dev
            at[m] = si + 1
            if si == n_steps - 1:
                teacher[m], carries[m] = host_output(carries[m]), None  # float32 on the host (bf16 teacher)
            elif carry_on == "host":
                carries[m] = jax.device_get(carries[m])
            if checkpoint and accumulate and gram_root is not None:
                held.append(m)
            elif checkpoint:
                _write_mb(root, m, si + 1, n, n_steps, teacher[m] if si == n_steps - 1 else carries[m], own[m], mb_sig)
            if pbar:
                pbar.update(1)
        if accumulate:  # off the device before the next block's are summed
            block_grams.update(_store_block_grams(acc, gram_root and _gram_file(gram_root, si), mb_sig))
        for m in held:
            _write_mb(root, m, si + 1, n, n_steps, teacher[m] if si == n_steps - 1 else carries[m], own[m], mb_sig)
        if step.kind == "block":
            if grams:
                set_gram_weights(blk, None)
            del st
            ps.release(blk)
    if pbar:
        pbar.close()
    if stem_loaded:
        del st_s
        ps.release(stem)
    stats: dict[tuple, Any] = {}
    for m in range(n):  # the in-memory calibration's order: micro-batch by micro-batch
        for k, v in own[m].items():
            stats[k] = stats[k] + v if k in stats else v
    stats.update(block_grams)
    if final is not None:
        save_state(final, n, teacher, stats, sig, tsig, dtype=dt_name)
        shutil.rmtree(root, ignore_errors=True)
    return Calibration(inputs, teacher, stats)


def _to_devices(carry: Carry, mesh: jax.sharding.Mesh | None) -> Carry:
    """A carry back on the devices (batch on the mesh's data axis), as the calibration inputs are placed."""
    if all(isinstance(v, jax.Array) for v in jax.tree.leaves(carry)):
        return carry
    if mesh is None:
        return jax.tree.map(jnp.asarray, carry)
    return shard_inputs({"carry": carry}, mesh)["carry"]
