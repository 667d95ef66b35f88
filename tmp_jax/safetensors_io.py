"""One streaming engine for safetensors checkpoints <-> Flax NNX models.

A checkpoint is read tensor by tensor with our own safetensors header parser and positioned reads
(no mmap of whole shards, no ``torch.load``): peak host memory is bounded by the tensors of one table
entry. Each architecture supplies a declarative table of :class:`Entry` objects (source keys, NNX state
paths, expected source shapes, and explicit value hooks for both directions); the same table drives
import and export.

Strictness: an unknown key, a missing key, a shape or dtype mismatch, a truncated file, or a shard named
in the index but absent each raise :class:`CheckpointError` naming the file, key, expected and found.
Writes go to a temporary name and are renamed at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

PathT = tuple[str | int, ...]
Hook = Callable[[list[np.ndarray]], list[np.ndarray]]

# safetensors dtype tags <-> numpy dtypes (bf16 / fp8 through ml_dtypes).
ST_TO_NP: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NP_TO_ST = {v: k for k, v in ST_TO_NP.items()}
FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}


class CheckpointError(ValueError):
    """A bad checkpoint or conversion input; the message is one line naming file, key and problem."""


def read_json(path: Path, what: str, error: type[Exception] = ValueError) -> Any:
    """A user's JSON file, with one-line errors naming the file (``what`` says what needs it)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise error(f"{path}: missing ({what})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e


def read_config(folder: Path, from_dict: Callable[[dict], Any], what: str) -> Any:
    """``folder/config.json`` parsed by ``from_dict``; every problem is a CheckpointError naming the file."""
    p = Path(folder) / "config.json"
    d = read_json(p, what, CheckpointError)
    try:
        return from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: {e}") from e


# --------------------------------------------------------------------------------------------------
# Tables


def _ident(xs: list[np.ndarray]) -> list[np.ndarray]:
    return xs


def _transpose(xs: list[np.ndarray]) -> list[np.ndarray]:
    # Views, not copies: ``jax.device_put`` takes strided host arrays and transposes while copying
    # (about 3x faster than numpy's ascontiguousarray(x.T) for bf16), and the writer lays out
    # non-contiguous arrays through :func:`contiguous`.
    return [x.T for x in xs]


def contiguous(x: np.ndarray, tile: int = 256) -> np.ndarray:
    """C-contiguous copy of ``x``; a transposed 2-D view is copied tile by tile (cache-friendly),
    which is 2-3x faster than numpy's element-strided copy for large weights."""
    if x.flags.c_contiguous:
        return x
    if x.ndim != 2 or not x.flags.f_contiguous:
        return np.ascontiguousarray(x)
    out = np.empty(x.shape, x.dtype)
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(x.dtype.itemsize)
    src, dst = (x.T, out) if bits is None else (x.T.view(bits), out.view(bits))  # src: C-contiguous (c, r)
    r, c = x.shape
    for j in range(0, c, tile):
        for i in range(0, r, tile):
            dst[i : i + tile, j : j + tile] = src[j : j + tile, i : i + tile].T
    return out


def aligned_empty(shape: Sequence[int], dtype: Any, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary (the JAX CPU
    backend wraps 64-byte-aligned host arrays without copying them)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + n].view(dtype).reshape(tuple(shape))


@dataclass(frozen=True)
class Entry:
    """One mapping between source tensors (PyTorch layout) and NNX state leaves.

    ``to_flax`` turns the source arrays (in ``torch_keys`` order) into the NNX arrays (in ``flax_paths``
    order); ``to_torch`` is its exact inverse. ``torch_shapes`` are the expected source shapes, computed
    from the (possibly per-layer) config, never guessed from the file.
    """

    torch_keys: tuple[str, ...]
    flax_paths: tuple[PathT, ...]
    torch_shapes: tuple[tuple[int, ...], ...]
    to_flax: Hook = _ident
    to_torch: Hook = _ident


def same(torch_key: str, flax_path: PathT, shape: Sequence[int]) -> Entry:
    """A tensor stored identically on both sides (biases, norm weights, pad tokens)."""
    return Entry((torch_key,), (tuple(flax_path),), (tuple(shape),))


def linear(torch_key: str, flax_path: PathT, out_in: Sequence[int]) -> Entry:
    """A Linear weight: PyTorch ``(out, in)`` <-> our kernel ``(in, out)`` (explicit transpose)."""
    return Entry((torch_key,), (tuple(flax_path),), (tuple(out_in),), _transpose, _transpose)


@dataclass
class KeyTable:
    """All entries of one architecture plus source keys recognised but not ported (carried through)."""

    entries: list[Entry]
    passthrough: tuple[str, ...] = ()  # regexes matched against whole source keys

    def __post_init__(self) -> None:
        self.by_key: dict[str, Entry] = {}
        for e in self.entries:
            for k in e.torch_keys:
                if k in self.by_key:
                    raise ValueError(f"key table maps {k!r} twice")
                self.by_key[k] = e
        self._pt = [re.compile(p) for p in self.passthrough]

    def is_passthrough(self, key: str) -> bool:
        return any(p.fullmatch(key) for p in self._pt)

    def num_params(self) -> int:
        return sum(int(np.prod(s)) for e in self.entries for s in e.torch_shapes)


# --------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in file
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors file's header; validate offsets against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header (length {n}, file {size} B)")
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for key, d in header.items():
        tag, shape, (s, e) = d["dtype"], tuple(d["shape"]), d["data_offsets"]
        if tag not in ST_TO_NP:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {tag}")
        want = int(np.prod(shape, dtype=np.int64)) * ST_TO_NP[tag].itemsize
        if e - s != want:
            raise CheckpointError(f"{path}: tensor {key!r} spans {e - s} B, expected {want} B for {tag}{list(shape)}")
        if base + e > size:
            raise CheckpointError(f"{path}: truncated file: tensor {key!r} ends at byte {base + e}, file has {size} B")
        out[key] = TensorInfo(path, tag, shape, base + s, base + e)
    return out, meta


WEIGHT_FILE_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


class SafetensorsReader:
    """Lazy, strict view of a checkpoint: a folder (single file or sharded with an index) or one file."""

    def __init__(self, path: str | os.PathLike[str]):
        self.root = Path(path)
        self._fds: dict[Path, int] = {}
        self._fd_lock = threading.Lock()
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        files = self._discover()
        for f in files:
            infos, meta = read_header(f)
            for k, info in infos.items():
                if k in self.infos:
                    raise CheckpointError(f"{f}: tensor {k!r} also present in {self.infos[k].file}")
                self.infos[k] = info
            self.metadata.update(meta)
        if self.index_map is not None:
            for k, fname in self.index_map.items():
                if k not in self.infos:
                    raise CheckpointError(f"{self.root / fname}: tensor {k!r} listed in the index is absent")
                if self.infos[k].file.name != Path(fname).name:
                    raise CheckpointError(f"{self.infos[k].file}: tensor {k!r} found here, index says {fname}")
        self.files = files

    def _discover(self) -> list[Path]:
        self.index_map: dict[str, str] | None = None
        if self.root.is_file():
            return [self.root]
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: no such checkpoint file or folder")
        indexes = sorted(self.root.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{self.root}: several index files {[p.name for p in indexes]}; expected one")
        if indexes:
            try:
                self.index_map = json.loads(indexes[0].read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{indexes[0]}: not a safetensors index (need 'weight_map'): {e}") from e
            files = []
            for fname in sorted(set(self.index_map.values())):
                p = self.root / fname
                if not p.is_file():
                    raise CheckpointError(f"{p}: shard named in {indexes[0].name} is missing")
                files.append(p)
            return files
        for name in WEIGHT_FILE_NAMES:
            if (self.root / name).is_file():
                return [self.root / name]
        found = sorted(self.root.glob("*.safetensors"))
        if len(found) == 1:
            return found
        raise CheckpointError(
            f"{self.root}: expected {' or '.join(WEIGHT_FILE_NAMES)} or a *.safetensors.index.json, "
            f"found {[p.name for p in found] or 'no safetensors files'}"
        )

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """Read one tensor (positioned read of exactly its bytes) into ``out`` or a fresh host array.

        Fresh arrays are 64-byte aligned, so the JAX CPU backend adopts them without a copy. ``out``
        must be C-contiguous with the tensor's dtype and shape (the loader's reused staging buffers).
        """
        info = self.infos[key]
        dt = ST_TO_NP[info.dtype]
        arr = aligned_empty(info.shape, dt) if out is None else out
        if arr.dtype != dt or tuple(arr.shape) != info.shape or not arr.flags.c_contiguous:
            raise ValueError(f"read({key!r}): out is {arr.dtype}{list(arr.shape)}, need {dt}{list(info.shape)}")
        want = info.end - info.start
        buf = memoryview(arr.reshape(-1).view(np.uint8))
        got = 0
        fd = self._fd(info.file)
        while got < want:  # one pread returns at most ~2 GiB; loop until done or EOF
            n = os.preadv(fd, [buf[got:]], info.start + got)
            if n <= 0:
                break
            got += n
        if got != want:
            raise CheckpointError(f"{info.file}: truncated while reading {key!r} ({got} of {want} B)")
        return arr

    def _fd(self, path: Path) -> int:
        """One read-only descriptor per shard (pread is position-free, so threads can share it)."""
        with self._fd_lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                try:  # a larger kernel read-ahead window for the mostly sequential tensor order
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                except (AttributeError, OSError):
                    pass
                self._fds[path] = fd
            return fd

    def prefetch(self, keys: Iterable[str]) -> None:
        """Ask the kernel to start reading these tensors into the page cache (asynchronous, no memory
        of ours): with a cold cache the disk then works on the next tensors while this one is placed."""
        for k in keys:
            info = self.infos.get(k)
            if info is not None:
                try:
                    os.posix_fadvise(self._fd(info.file), info.start, info.end - info.start, os.POSIX_FADV_WILLNEED)
                except (AttributeError, OSError):
                    return

    def close(self) -> None:
        """Close the shard descriptors (reads reopen them on demand)."""
        with self._fd_lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def total_bytes(self) -> int:
        return sum(i.end - i.start for i in self.infos.values())


# --------------------------------------------------------------------------------------------------
# Abstract model helpers


def flat_variables(model_or_state: Any) -> dict[PathT, nnx.Variable]:
    """NNX state as {path: Variable} (works on abstract models from ``nnx.eval_shape``)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return {tuple(p): v for p, v in nnx.to_flat_state(state)}


def check_table_covers(table: KeyTable, variables: dict[PathT, nnx.Variable]) -> None:
    """Every model parameter is written by exactly one entry, and every entry targets a real parameter."""
    targets = [p for e in table.entries for p in e.flax_paths]
    missing = sorted(set(variables) - set(targets), key=str)
    if missing:
        raise CheckpointError(f"key table leaves model parameter {'.'.join(map(str, missing[0]))} unmapped")
    extra = sorted(set(targets) - set(variables), key=str)
    if extra:
        raise CheckpointError(f"key table targets {'.'.join(map(str, extra[0]))}, which the model does not have")


# --------------------------------------------------------------------------------------------------
# Import: checkpoint -> NNX


def _check_source(reader: SafetensorsReader, table: KeyTable, allow_ints: bool = False) -> None:
    for key, info in reader.infos.items():
        if key not in table.by_key:
            if table.is_passthrough(key):
                continue
            raise CheckpointError(f"{info.file}: unknown key {key!r} (not in the key table)")
    for e in table.entries:
        for key, shape in zip(e.torch_keys, e.torch_shapes):
            if key not in reader.infos:
                where = reader.root
                raise CheckpointError(f"{where}: missing key {key!r} (expected shape {list(shape)})")
            info = reader.infos[key]
            if info.shape != tuple(shape):
                raise CheckpointError(f"{info.file}: key {key!r} has shape {list(info.shape)}, expected {list(shape)}")
            if info.dtype not in FLOAT_TAGS and not allow_ints:
                raise CheckpointError(f"{info.file}: key {key!r} has dtype {info.dtype}, expected a float type")


def load_into(
    abstract_model: nnx.Module,
    table: KeyTable,
    reader: SafetensorsReader,
    *,
    dtype: Any | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
    transpose_on: str = "auto",
    read_ahead: int = 1,
) -> nnx.Module:
    """Fill an abstract NNX model (from ``nnx.eval_shape``) from a checkpoint, strictly.

    Plain entries (Linear weights from :func:`linear`, tensors from :func:`same`) take the fast path:
    the bytes are read into a reused, already-faulted host staging buffer (or, where the array can be
    adopted as is, straight into its final aligned buffer) and placed from there.

    * ``transpose_on="device"``: the bytes are placed *as stored* and one jitted transpose / cast per
      (shape, dtype, sharding) writes the target array in its sharding. With a mesh, a Linear weight is
      placed with the reversed PartitionSpec, so each device transposes only its own block. Host work is
      then read + DMA.
    * ``"host"``: the host-to-device copy transposes (``device_put`` of the transposed view); casts still
      run on the device.
    * ``"auto"`` (default): ``"device"`` on accelerators, ``"host"`` on the CPU backend.
    * ``"legacy"``: the previous path (hook on the host, then ``device_put``), kept for comparison.

    Entries with their own hooks are always converted on the host and placed afterwards, each device
    receiving only its slice via ``jax.make_array_from_callback``.

    ``read_ahead`` entries are read by a background thread while the current one is placed (host memory:
    about ``read_ahead + 1`` of the largest tensors in flight). ``dtype`` casts floating tensors (the
    router and other fp32-by-design parameters keep fp32).
    """
    from tmp_jax.sharding import variable_sharding

    if transpose_on not in ("auto", "device", "host", "legacy"):
        raise ValueError(f"transpose_on must be 'auto', 'device', 'host' or 'legacy', got {transpose_on!r}")
    variables = flat_variables(abstract_model)
    check_table_covers(table, variables)
    _check_source(reader, table)
    platform = (mesh.devices.flat[0] if mesh is not None else _default_device()).platform
    # On the CPU backend the "device" is this host: XLA's transpose measured about as fast as PJRT's
    # transposing copy, plus a compile per shape (docs/benchmarks.md section 2), so auto = host there.
    on_device = transpose_on == "device" or (transpose_on == "auto" and platform != "cpu")
    # auto: a tensor of at most HOST_PLACE_BYTES is transposed / cast on the host instead (microseconds), since
    # its device program is a compile per shape (~0.1 s each on a GPU: a small model's load was mostly those)
    host_below = HOST_PLACE_BYTES if transpose_on == "auto" else -1
    fast = {id(e) for e in table.entries if transpose_on != "legacy" and _is_plain(e)}
    # Reused staging buffers for fast-path tensors whose placement makes a new device buffer (all of
    # them off the CPU; on the CPU, whose device_put adopts aligned host memory, only transposes and
    # casts). A buffer is reused only once the array computed from it is ready.
    stage = _Staging(read_ahead + 1, platform != "cpu")
    pbar = _pbar(len(table.entries), "load", progress)
    filled: dict[PathT, jax.Array] = {}

    single = jax.sharding.SingleDeviceSharding(_default_device()) if mesh is None else None

    def plan(e: Entry) -> list[tuple[Any, bool, Any]]:
        """Per source tensor: (target dtype, transpose?, target sharding)."""
        out = []
        for k, path in zip(e.torch_keys, e.flax_paths):
            var = variables[path]
            want = var.get_value()
            tr = e.to_flax is _transpose
            info = reader.infos[k]
            conv = tuple(reversed(info.shape)) if tr else tuple(info.shape)
            if conv != tuple(want.shape):
                raise CheckpointError(
                    f"{reader.root}: {k!r} converts to shape {list(conv)} for "
                    f"{'.'.join(map(str, path))}, model expects {list(want.shape)}"
                )
            tdt = np.dtype(want.dtype if dtype is None else _cast_dtype(want.dtype, dtype, var))
            out.append((tdt, tr, variable_sharding(var, mesh) if mesh is not None else single))
        return out

    # Every plan up front (a table/model mismatch fails before any read), and the device programs
    # compiled on a background thread in first-use order, overlapping the first reads.
    plans = {id(e): plan(e) for e in table.entries if id(e) in fast}
    for e in table.entries:
        for k, (tdt, tr, sharding) in zip(e.torch_keys, plans.get(id(e), ())):
            src_dt = ST_TO_NP[reader.infos[k].dtype]
            small = reader.infos[k].end - reader.infos[k].start <= host_below
            if (tdt != src_dt or (tr and on_device)) and not small:
                _precompile(_place_key(reader.infos[k].shape, src_dt, tdt, tr, sharding))

    index = {id(e): i for i, e in enumerate(table.entries)}
    prefetch = getattr(reader, "prefetch", None)

    def read_entry(e: Entry) -> tuple[Entry, list[np.ndarray], list[Any]]:
        i = index[id(e)] + 1
        if prefetch is not None and i < len(table.entries):
            prefetch(table.entries[i].torch_keys)
        if id(e) not in fast:
            return e, [reader.read(k) for k in e.torch_keys], []
        arrs, slots = [], []
        for k, (tdt, tr, _) in zip(e.torch_keys, plans[id(e)]):
            info = reader.infos[k]
            src_dt = ST_TO_NP[info.dtype]
            slot = stage.acquire(info.end - info.start) if (tr or tdt != src_dt or stage.always) else None
            arrs.append(reader.read(k) if slot is None else _read_slot(reader, k, slot))
            slots.append(slot)
        return e, arrs, slots

    try:
        for e, src, slots in _read_ahead(table.entries, read_entry, read_ahead):
            if id(e) in fast:
                for path, raw, slot, (tdt, tr, sharding) in zip(e.flax_paths, src, slots, plans[id(e)]):
                    filled[path] = _place_plain(raw, tdt, tr, sharding, on_device, slot is not None, host_below)
                    if slot is not None:
                        stage.done(slot, filled[path])
            else:
                arrays = e.to_flax(src)
                for path, arr in zip(e.flax_paths, arrays):  # a hook may split one key into several
                    want = variables[path].get_value()
                    if tuple(arr.shape) != tuple(want.shape):
                        raise CheckpointError(
                            f"{reader.root}: {e.torch_keys[0]!r} converts to shape {list(arr.shape)} for "
                            f"{'.'.join(map(str, path))}, model expects {list(want.shape)}"
                        )
                    var = variables[path]
                    target_dtype = want.dtype if dtype is None else _cast_dtype(want.dtype, dtype, var)
                    arr = arr.astype(target_dtype, copy=False)
                    if mesh is not None:
                        sharding = variable_sharding(var, mesh)
                        filled[path] = jax.make_array_from_callback(arr.shape, sharding, lambda idx, a=arr: a[idx])
                    else:
                        filled[path] = jax.device_put(arr)
            del src, slots
            if pbar:
                pbar.update(1)
    finally:
        stage.release()
        if pbar:
            pbar.close()
    state = nnx.state(abstract_model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        var.set_value(filled[tuple(path)])
    nnx.update(abstract_model, state)
    return abstract_model


def _default_device() -> Any:
    d = jax.config.jax_default_device
    return d if isinstance(d, jax.Device) else jax.devices()[0]


def _is_plain(e: Entry) -> bool:
    """Entries the device path may place itself: a pure transpose (Linear) or identity, tensor by tensor."""
    return e.to_flax in (_transpose, _ident) and len(e.torch_keys) == len(e.flax_paths)


def _read_ahead(entries: Sequence[Entry], read: Callable[[Entry], Any], depth: int) -> Iterator[Any]:
    """``read(e)`` for each entry in order, up to ``depth`` entries ahead on one background thread."""
    if depth <= 0:
        yield from map(read, entries)
        return
    it = iter(entries)
    with ThreadPoolExecutor(1, thread_name_prefix="ckpt-read") as ex:
        futs = deque(ex.submit(read, e) for _, e in zip(range(depth), it))
        try:
            while futs:
                res = futs.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    futs.append(ex.submit(read, nxt))
                yield res
        finally:
            for f in futs:
                f.cancel()


class _Slot:
    """A reusable host staging buffer. ``taken``: holds a read whose entry is not placed yet; ``busy``:
    the device array last computed from it (the buffer may be overwritten once that is ready)."""

    def __init__(self) -> None:
        self.buf: np.ndarray | None = None
        self.busy: jax.Array | None = None
        self.taken = False


class _Staging:
    """A ring of staging buffers, grown to the largest tensor seen and then reused (no page faults).

    ``always``: stage every fast-path tensor (off the CPU backend, device_put always copies); otherwise
    only those whose placement writes a new buffer (a transpose or a cast): the CPU backend adopts an
    aligned host array as the device buffer itself, so that one must stay a fresh allocation.
    """

    def __init__(self, n: int, always: bool):
        self.slots = [_Slot() for _ in range(max(n, 1))]
        self.always = always
        self.i = 0
        self.lock = threading.Lock()

    def acquire(self, nbytes: int) -> _Slot | None:
        """A free slot of at least ``nbytes`` (None when all are taken: the caller reads into a fresh array)."""
        with self.lock:
            for j in range(len(self.slots)):
                slot = self.slots[(self.i + j) % len(self.slots)]
                if not slot.taken:
                    slot.taken = True
                    self.i += j + 1
                    break
            else:
                return None
        if slot.busy is not None:
            slot.busy.block_until_ready()  # the DMA / transpose has finished reading this buffer
            slot.busy = None
        if slot.buf is None or slot.buf.nbytes < nbytes:
            slot.buf = None
            slot.buf = aligned_empty((nbytes,), np.uint8)
        return slot

    def done(self, slot: _Slot, arr: jax.Array) -> None:
        """The entry read into ``slot`` is placed; ``arr`` is being computed from it."""
        with self.lock:
            slot.busy, slot.taken = arr, False

    def release(self) -> None:
        with self.lock:
            for s in self.slots:
                s.buf = s.busy = None


def _read_slot(reader: SafetensorsReader, key: str, slot: _Slot) -> np.ndarray:
    info = reader.infos[key]
    dt = ST_TO_NP[info.dtype]
    assert slot.buf is not None
    view = slot.buf[: int(np.prod(info.shape, dtype=np.int64)) * dt.itemsize].view(dt).reshape(info.shape)
    if isinstance(reader, SafetensorsReader):
        return reader.read(key, out=view)
    view[...] = reader.read(key)  # other readers (e.g. ComfyUI's fused-qkv view) return their own arrays
    return view


def _unadoptable(x: np.ndarray, staged: bool, sharding: Any) -> np.ndarray:
    """``x``, or a copy of it where the device array could adopt a reused staging buffer.

    The CPU backend adopts C-contiguous aligned host memory whatever ``may_alias`` says (jax 0.10.2):
    an untransposed tensor, or the transposed view of an (n, 1) weight. A normal CPU load reads untransposed
    tensors into fresh buffers, so this copies only such thin weights; accelerators always copy to device.
    """
    if not staged or not x.flags.c_contiguous:
        return x
    platform = next(iter(sharding.device_set)).platform
    return x.copy() if platform == "cpu" else x


_PLACE_FNS: dict[tuple[Any, ...], Future] = {}
_COMPILER = ThreadPoolExecutor(1, thread_name_prefix="ckpt-compile")


def _input_sharding(sharding: Any, shape: tuple[int, ...], transpose: bool) -> Any:
    """Where the as-stored array is placed: the target sharding, or for a transpose the target's
    PartitionSpec reversed, so every device holds exactly the block its output slice needs."""
    if not transpose or not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*reversed(spec)))


def _place_key(shape: tuple[int, ...], src: np.dtype, dst: np.dtype, transpose: bool, sharding: Any) -> tuple:
    return (tuple(shape), np.dtype(src), np.dtype(dst), transpose, sharding)


def _precompile(key: tuple) -> Future:
    """Start compiling the (transpose +) cast for ``key`` on the compile thread (once per process)."""
    fut = _PLACE_FNS.get(key)
    if fut is None or (fut.done() and fut.exception() is not None):
        shape, src, dst, transpose, sharding = key

        def f(x: jax.Array) -> jax.Array:
            return (x.T if transpose else x).astype(dst)  # [out, in] -> [in, out]

        arg = jax.ShapeDtypeStruct(shape, src, sharding=_input_sharding(sharding, shape, transpose))
        fut = _PLACE_FNS[key] = _COMPILER.submit(lambda: jax.jit(f, out_shardings=sharding).lower(arg).compile())
    return fut


HOST_PLACE_BYTES = 1 << 20


def _place_plain(
    raw: np.ndarray,
    dst: np.dtype,
    transpose: bool,
    sharding: Any,
    on_device: bool,
    staged: bool,
    host_below: int = -1,
) -> jax.Array:
    """Put ``raw`` (PyTorch layout, as stored) on the devices and finish it there.

    ``sharding`` is the target (a NamedSharding, or a SingleDeviceSharding without a mesh). A cast always
    runs on the device, fused with the transpose (one pass over the bytes). A transpose without a cast
    runs on the device when ``on_device``; otherwise the host-to-device copy itself transposes
    (``device_put`` of the transposed view: on the CPU backend PJRT's tiled transposing copy, with no
    compile). ``staged``: ``raw`` is a reused staging buffer; every output here is a new device buffer
    (a transpose, a cast or a forced copy), so the buffer is free once the output is ready. A tensor of at most
    ``host_below`` bytes is transposed and cast on the host into a new array (the same values: numpy's and
    XLA's float casts both round to nearest even), which saves its device program's compile.
    """
    if (transpose or raw.dtype != dst) and raw.nbytes <= host_below:
        return jax.device_put(np.ascontiguousarray(raw.T if transpose else raw).astype(dst), sharding)
    if not transpose and raw.dtype == dst:
        return jax.device_put(_unadoptable(raw, staged, sharding), sharding)
    if transpose and raw.dtype == dst and not on_device:
        return jax.device_put(_unadoptable(raw.T, staged, sharding), sharding)  # [in, out]
    compiled = _precompile(_place_key(raw.shape, raw.dtype, dst, transpose, sharding)).result()
    return compiled(jax.device_put(raw, _input_sharding(sharding, raw.shape, transpose)))


def _cast_dtype(model_dtype: Any, requested: Any, var: nnx.Variable) -> Any:
    if var.get_metadata().get("keep_fp32"):
        return np.float32
    return requested if np.issubdtype(np.dtype(model_dtype), np.floating) else model_dtype


# --------------------------------------------------------------------------------------------------
# Export: NNX -> checkpoint


@dataclass
class PlannedTensor:
    key: str
    shape: tuple[int, ...]
    tag: str


@dataclass
class ShardPlan:
    files: list[list[PlannedTensor]] = field(default_factory=list)


def _plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> ShardPlan:
    plan = ShardPlan([[]])
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t.shape, dtype=np.int64)) * ST_TO_NP[t.tag].itemsize
        if plan.files[-1] and size + nbytes > max_shard_bytes:
            plan.files.append([])
            size = 0
        plan.files[-1].append(t)
        size += nbytes
    return plan


def _header_bytes(tensors: list[PlannedTensor], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for t in tensors:
        n = int(np.prod(t.shape, dtype=np.int64)) * ST_TO_NP[t.tag].itemsize
        header[t.key] = {"dtype": t.tag, "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)  # safetensors pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw


class StreamingWriter:
    """Writes a (possibly sharded) safetensors checkpoint whose tensor list is known in advance.

    Tensors must be supplied in plan order; each goes straight to disk. Call :meth:`finish` to write
    the index; the caller renames the temporary folder into place.
    """

    def __init__(
        self,
        folder: Path,
        tensors: list[PlannedTensor],
        *,
        prefix: str,
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ):
        self.folder = folder
        self.plan = _plan_shards(tensors, max_shard_bytes)
        n = len(self.plan.files)
        self.names = (
            [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.prefix = prefix
        self.metadata = metadata or {"format": "pt"}
        self._order = [(fi, t) for fi, ts in enumerate(self.plan.files) for t in ts]
        self._pos = 0
        self._fh = None
        self._file_idx = -1
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, key: str, arr: np.ndarray) -> None:
        fi, t = self._order[self._pos]
        if key != t.key:
            raise RuntimeError(f"writer expected tensor {t.key!r} next, got {key!r}")
        if tuple(arr.shape) != t.shape or NP_TO_ST[arr.dtype] != t.tag:
            raise RuntimeError(f"{key!r}: got {arr.dtype}{list(arr.shape)}, planned {t.tag}{list(t.shape)}")
        if fi != self._file_idx:
            if self._fh:
                self._fh.close()
            self._file_idx = fi
            self._fh = open(self.folder / self.names[fi], "wb")
            self._fh.write(_header_bytes(self.plan.files[fi], self.metadata))
        self._fh.write(contiguous(arr).reshape(-1).view(np.uint8).data)
        self.weight_map[key] = self.names[fi]
        self.total_size += arr.nbytes
        self._pos += 1

    def finish(self) -> list[str]:
        if self._pos != len(self._order):
            raise RuntimeError(f"writer got {self._pos} of {len(self._order)} planned tensors")
        if self._fh:
            self._fh.close()
        if len(self.names) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(self.weight_map.items())),
            }
            write_json(self.folder / f"{self.prefix}.safetensors.index.json", index)
        return self.names


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file in the same folder + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicDir:
    """Context manager: yields a temp folder next to ``dest``; renames it to ``dest`` on success only."""

    def __init__(self, dest: str | os.PathLike[str], overwrite: bool = False):
        self.dest = Path(dest)
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        if self.dest.exists() and not self.overwrite:
            raise CheckpointError(f"{self.dest}: output folder exists (pass overwrite / --overwrite to replace it)")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.dest.parent, prefix=f".{self.dest.name}.tmp-"))
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.dest, old)
            os.replace(self.tmp, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dest)


def export_arrays(
    table: KeyTable,
    get_flax: Callable[[PathT], np.ndarray],
    *,
    dtype: Any | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (source key, PyTorch-layout array) for every table entry, one entry at a time."""
    for e in table.entries:
        arrays = [get_flax(p) for p in e.flax_paths]
        outs = e.to_torch(arrays)
        for key, shape, arr in zip(e.torch_keys, e.torch_shapes, outs):
            if tuple(arr.shape) != tuple(shape):
                raise CheckpointError(f"export of {key!r} produced shape {list(arr.shape)}, expected {list(shape)}")
            if dtype is not None and np.issubdtype(arr.dtype, np.floating):
                arr = arr.astype(dtype)
            yield key, arr


def save_model(
    model: nnx.Module,
    table: KeyTable,
    out_dir: str | os.PathLike[str],
    *,
    prefix: str,
    config: dict[str, Any] | None = None,
    config_name: str = "config.json",
    dtype: Any | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
    passthrough_from: SafetensorsReader | None = None,
    extra_files: Iterable[Path] = (),
    progress: bool = False,
) -> Path:
    """Write ``model`` as a PyTorch-layout safetensors checkpoint (+ index when sharded) atomically.

    One tensor at a time is gathered from the devices (``np.asarray``), converted and written.
    ``passthrough_from`` copies the source's carried-through keys (e.g. a VAE) byte for byte.
    """
    variables = flat_variables(model)
    check_table_covers(table, variables)

    def get_flax(p: PathT) -> np.ndarray:
        return np.asarray(variables[p].get_value())

    np_dtype = None if dtype is None else np.dtype(dtype)
    planned: list[PlannedTensor] = []
    for e in table.entries:
        # One dtype per entry: that of its first NNX leaf (fused entries share one dtype).
        src_dt = np.dtype(variables[e.flax_paths[0]].get_value().dtype)
        for key, shape in zip(e.torch_keys, e.torch_shapes):
            tag = NP_TO_ST[np_dtype if (np_dtype is not None and np.issubdtype(src_dt, np.floating)) else src_dt]
            planned.append(PlannedTensor(key, tuple(shape), tag))
    pt_keys: list[str] = []
    if passthrough_from is not None:
        pt_keys = [k for k in passthrough_from.keys() if table.is_passthrough(k)]
        for k in pt_keys:
            info = passthrough_from.infos[k]
            planned.append(PlannedTensor(k, info.shape, info.dtype))
    with AtomicDir(out_dir, overwrite=overwrite) as tmp:
        writer = StreamingWriter(tmp, planned, prefix=prefix, max_shard_bytes=max_shard_bytes)
        pbar = _pbar(len(planned), "save", progress)
        for key, arr in export_arrays(table, get_flax, dtype=np_dtype):
            writer.write(key, arr)
            if pbar:
                pbar.update(1)
        for k in pt_keys:
            writer.write(k, passthrough_from.read(k))
            if pbar:
                pbar.update(1)
        if pbar:
            pbar.close()
        writer.finish()
        if config is not None:
            write_json(tmp / config_name, config)
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
    return Path(out_dir)


def _pbar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tmp_jax.progress import progress_bar

    return progress_bar(total=total, desc=desc, unit="tensor", leave=False)
