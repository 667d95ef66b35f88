"""Compensated structured pruning: a least-squares re-fit of the kept consumer weights at every level.

Pruning a unit (a head, an FFN channel, an expert channel) removes rows of the projection that consumes
it (``to_out`` / ``o_proj`` / ``w2`` / an expert's ``down_proj``: the spec's slice marked ``consumer``).
The remaining rows can absorb much of what was lost: with ``X`` the consumer's input over the calibration
tokens and ``G = X^T X`` its Gram (sown by the modules as ``gram_<kind>`` when calibration runs with
``grams=True``), the kept rows ``K`` are re-fitted as

    W'_K = argmin ||X W - X_K W'||^2 + lam ||W' - W_K||^2 = (G_KK + lam I)^-1 (G_K: W + lam W_K),

in float64 on the host, ``lam = damp * mean(diag G)``. The ridge pulls toward the original weights, so
keeping every unit gives ``W`` exactly. A batched Gram ``(E, N, N)`` (per-expert, gate-weighted) re-fits
each expert's ``down_proj`` with its own Gram. With ``timestep_weight="high-noise"`` every calibration
sample's rows enter ``G`` with the weight ``sigma`` of its noise level (:func:`timestep_weights`; the models
weight the rows as they sow the Grams, :func:`tmp_jax.stats.set_gram_weights`).

Order: a greedy structured-OBS pass (ZipLM / SlimGPT style) removes, one unit (or a small chunk, for
wide groups) at a time, the unit whose removal adds the least output error given the re-fit of the
others: ``err_S = tr(W_S^T (H^-1_SS)^-1 W_S)`` with ``H^-1 = (G + lam I)^-1``, followed by the
OBS updates of ``W`` and ``H^-1``. Removal is sequential, so the kept sets of all levels are nested
(prefixes of the reversed removal order): the zero-recompile prefix design holds. The error added at
each removal is the unit's score, so the score lost by a level (what :class:`search.genome.GeneLoss`
sums) is the OBS error of that level.

Everything here works in "the numbering of the model at hand": :meth:`Compensation.permuted` maps the
Grams into a permuted model's numbering (the search evaluates candidates on the importance-permuted
teacher), and :meth:`level_refits` precomputes, per (consumer parameter, kept count), the re-fitted
consumer at FULL shape (rows past the kept prefix zero), so a candidate swaps that array in for the
teacher's and the per-width compiled functions are reused unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tmp_jax import arch
from tmp_jax.tree import PathT, Slice, Tree, Units, node_path

METHOD = "obs-lsq"  # greedy structured-OBS order + damped least-squares re-fit of the consumer
GRAM_PREFIX = "gram_"
STATS_FILE = "compensation.safetensors"


# How the calibration samples' Gram contributions are weighted by their noise level sigma (1 = pure noise):
# "uniform" (every sample alike) or "high-noise" (w = sigma: see timestep_weights).
TIMESTEP_WEIGHTS = ("uniform", "high-noise")


@dataclass(frozen=True)
class CompensationConfig:
    """``damp``: ridge as a fraction of the Gram's mean diagonal; ``chunk``: wide groups remove
    ``max(1, alive // chunk)`` units per greedy OBS step (1 unit at a time below ``chunk`` units);
    ``token_stride``: the Grams read every ``token_stride``-th token (cheaper calibration);
    ``timestep_weight``: one of :data:`TIMESTEP_WEIGHTS`, each sample's weight in the Grams by its noise
    level (:func:`timestep_weights`)."""

    damp: float = 0.01
    chunk: int = 64
    token_stride: int = 1
    timestep_weight: str = "uniform"

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"compensation damp must be > 0, got {self.damp}")
        if int(self.chunk) < 1 or int(self.token_stride) < 1:
            raise ValueError(f"compensation chunk and token_stride must be >= 1, got {self.chunk}, {self.token_stride}")
        check_timestep_weight(self.timestep_weight)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "damp": self.damp,
            "chunk": self.chunk,
            "token_stride": self.token_stride,
            "timestep_weight": self.timestep_weight,
        }


def check_timestep_weight(kind: str) -> str:
    """``kind`` if it names a Gram timestep weighting, else a one-line ValueError."""
    if kind not in TIMESTEP_WEIGHTS:
        raise ValueError(f"Gram timestep weight {kind!r}: expected one of {', '.join(TIMESTEP_WEIGHTS)}")
    return kind


def sample_sigmas(arch_name: str, batch: dict[str, Any]) -> np.ndarray:
    """Each sample's noise level sigma in [0, 1] (1 = pure noise) of a raw calibration micro-batch
    (``docs/calibration-format.md``), read by the arch's ``noise_levels`` hook. -> (B,) float64."""
    hook = arch.get(arch_name).noise_levels
    if hook is None:
        raise ValueError(f"Gram timestep weighting: no noise level known for arch {arch_name!r}")
    sigma = np.asarray(hook(batch), np.float64)
    if not np.all(np.isfinite(sigma)):
        raise ValueError(f"Gram timestep weighting: non-finite timesteps in a {arch_name} micro-batch")
    return np.clip(sigma, 0.0, 1.0)


def timestep_weights(kind: str, sigma: np.ndarray) -> np.ndarray | None:
    """Per-sample weights of the Gram contributions (``G = sum_b w_b sum_{t in b} x_t^T x_t``), None for uniform.

    ``"high-noise"``: ``w = sigma``. Under flow matching, the high-noise steps fix layout and composition and
    their velocity errors are carried through every later step of sampling, while the low-noise steps refine
    detail; a linear ramp is the simplest monotone choice with no knob to tune (with sigma ~ U(0, 1) the
    noisier half of the samples gets 3/4 of the weight instead of 1/2). Only ratios between samples matter:
    the re-fit needs the Gram up to scale and its damping is relative. A sample at sigma = 0 drops out of the
    Grams. The importance statistics stay unweighted."""
    check_timestep_weight(kind)
    if kind == "uniform":
        return None
    return np.asarray(sigma, np.float64).reshape(-1)


def consumer_slice(u: Units) -> Slice | None:
    """The slice of ``u`` whose rows feed the branch output (re-fitted), or None."""
    return next((s for s in u.slices if s.consumer), None)


def gram_stats(tree: Tree, stats: dict[tuple, Any]) -> dict[tuple[str, str], Any]:
    """The consumer Grams sown during calibration, by (node, units kind); groups without one are absent.

    Host arrays come back as float64; a :class:`StoredGram` (streamed calibration with a run folder keeps its
    Grams on disk) stays one, read when a group is ordered or re-fitted."""
    out = {}
    for n in tree.spec.nodes():
        for u in n.units:
            g = stats.get((*node_path(n.name), GRAM_PREFIX + u.kind))
            if g is not None and consumer_slice(u) is not None:
                out[(n.name, u.kind)] = g if isinstance(g, StoredGram) else np.asarray(g, np.float64)
    return out


def _f64(g: Any) -> np.ndarray:
    """A Gram (host array or :class:`StoredGram`) as a float64 host array."""
    return np.asarray(g, np.float64)


def _take(g: Any, idx: np.ndarray, axis: int) -> Any:
    """``np.take`` of a Gram (or consumer); a 2-D ``idx`` (rows, k) selects per row of axis 0 (one order per
    expert). A :class:`StoredGram` stays lazy (the selection is applied when it is read)."""
    if isinstance(g, StoredGram):
        return g.take(idx, axis)
    idx = np.asarray(idx)
    if idx.ndim == 1:
        return np.take(g, idx, axis=axis)
    axis %= g.ndim
    shape = [1] * g.ndim
    shape[0], shape[axis] = idx.shape
    return np.take_along_axis(g, idx.reshape(shape), axis=axis)


class StoredGram:
    """A Gram in a safetensors file, read when used (``np.asarray(g)``, float32 as stored).

    Streamed calibration writes each block's Grams to disk as soon as the block is done (HunyuanImage: 64 x
    3072^2 fp32 = 2.4 GB of expert Grams per layer, never all in memory at once); :class:`Compensation`
    reads one group's Gram at a time. ``take`` records an index selection applied on read (the permuted
    numbering of :meth:`Compensation.permuted`) without reading anything."""

    def __init__(self, path: str | Path, name: str, shape: tuple[int, ...], takes: tuple = ()):
        self.path, self.name, self.takes = Path(path), name, takes
        self.shape = tuple(int(d) for d in shape)  # after the selections in ``takes``

    @classmethod
    def open(cls, path: str | Path, name: str) -> StoredGram:
        """The tensor ``name`` of the safetensors file ``path`` (its shape from the header)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            return cls(path, name, tuple(f.get_slice(name).get_shape()))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def take(self, idx: Any, axis: int) -> StoredGram:
        """Record ``_take(self, idx, axis)``: 1-D ``idx`` for every row, or (rows, k) per row of axis 0."""
        idx, axis = np.asarray(idx, np.int64), axis % self.ndim
        shape = list(self.shape)
        shape[axis] = idx.shape[-1]
        return StoredGram(self.path, self.name, tuple(shape), (*self.takes, (idx, axis)))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="numpy") as f:
            a = f.get_tensor(self.name)
        for idx, axis in self.takes:
            a = _take(a, idx, axis)
        return a if dtype is None else a.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"StoredGram({str(self.path)!r}, {self.name!r}, shape={self.shape})"


def save_f32_safetensors(
    path: str | Path, arrays: list[tuple[str, Any]], metadata: dict[str, str] | None = None
) -> str:
    """Write ``(name, array)`` pairs as one float32 safetensors file, atomically (a temporary name in the same
    folder, then a rename); returns the file's sha256, computed while writing.

    The arrays (host or device arrays, :class:`StoredGram`) are converted and written ONE AT A TIME, so
    writing Grams larger than host memory in total needs memory for the largest one only (the format's
    header, which lists every tensor's shape and byte range, is written first, from the shapes alone)."""
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    off = 0
    for name, a in arrays:
        size = int(np.prod(a.shape, dtype=np.int64)) * 4
        header[name] = {"dtype": "F32", "shape": [int(d) for d in a.shape], "data_offsets": [off, off + size]}
        off += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as the reference writer pads
    sha = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for part in (struct.pack("<Q", len(head)), head):
                f.write(part)
                sha.update(part)
            for _, a in arrays:
                data = memoryview(np.ascontiguousarray(np.asarray(a, np.float32), "<f4")).cast("B")
                f.write(data)
                sha.update(data)
                del data
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha.hexdigest()


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _damp(g: np.ndarray, damp: float) -> np.ndarray:
    """lam per batch entry: ``damp * mean(diag)`` (a tiny floor keeps an all-zero Gram invertible)."""
    d = np.mean(np.diagonal(g, axis1=-2, axis2=-1), axis=-1)
    return damp * d + 1e-12 * (1.0 + np.max(np.abs(d)))


def _rows(w: np.ndarray, axis: int) -> np.ndarray:
    """Consumer parameter -> (batch, N, rest): the consumer axis second, a leading batch of 1 if none."""
    if axis == 0:
        return w.reshape(1, w.shape[0], -1)
    if axis == 1:
        return w.reshape(w.shape[0], w.shape[1], -1)
    raise ValueError(f"consumer axis {axis} not supported (0, or 1 with a leading expert axis)")


def refit(
    g: np.ndarray,
    w: np.ndarray,
    ids: np.ndarray,
    group: int,
    axis: int,
    damp: float,
    rhs_gram: np.ndarray | None = None,
) -> np.ndarray:
    """Re-fitted consumer rows of the kept units ``ids`` (in the given sequence), float64; ``ids`` (B, k): each
    batch entry (expert) keeps its own units.

    ``g``: (N, N) or (B, N, N) Gram of the consumer input in the numbering of ``w``; ``w``: the FULL
    consumer parameter, its input rows on ``axis`` (0; or 1 after a leading batch/expert axis of size B);
    returns ``w`` with that axis reduced to the kept rows, ``len(ids) * group`` of them.

    ``rhs_gram``: the target's side, ``Xs^T X`` (same shape as ``g``) when the kept rows see another input
    ``Xs`` (``g = Xs^T Xs``) than the one the target ``X W`` is computed on; None: ``g`` itself (``Xs = X``)."""
    w64 = _rows(np.asarray(w, np.float64), axis)  # [B, N, D]
    gb = g if g.ndim == 3 else g[None]
    if gb.shape[0] != w64.shape[0] or gb.shape[1] != w64.shape[1]:
        raise ValueError(f"Gram of shape {g.shape} does not match consumer of shape {w.shape} on axis {axis}")
    rb = None if rhs_gram is None else (rhs_gram if rhs_gram.ndim == 3 else rhs_gram[None])
    if rb is not None and rb.shape != gb.shape:
        raise ValueError(f"right-hand Gram of shape {rhs_gram.shape} differs from the Gram's {g.shape}")
    ids = np.asarray(ids, np.int64)
    if ids.ndim == 2 and ids.shape[0] != gb.shape[0]:
        raise ValueError(f"per-row kept units for {ids.shape[0]} rows, the Gram has {gb.shape[0]}")
    el = np.broadcast_to(_elements(ids, group), (gb.shape[0], ids.shape[-1] * group))  # [B, k*group]
    lam = _damp(gb, damp)
    if _accelerate(gb.shape):
        out = np.asarray(_refit_device(gb, w64, el, lam, rb), np.float64)
    else:
        out = np.empty((w64.shape[0], el.shape[1], w64.shape[2]))
        for b in range(w64.shape[0]):
            e = el[b]
            a = gb[b][np.ix_(e, e)] + lam[b] * np.eye(len(e))
            rhs = (gb if rb is None else rb)[b][e] @ w64[b] + lam[b] * w64[b][e]
            out[b] = _solve_psd(a, rhs)
    shape = list(w.shape)
    shape[axis] = el.shape[1]
    return out.reshape(shape)


# Wide groups (a 10240-channel FFN, 64 experts x 3072 channels) run on the default JAX device in float32: the
# float64 host loop needs minutes per such group. Below this many Gram entries the host path is exact and fast.
ACCELERATE_ABOVE = 4096**2


def _accelerate(shape: tuple[int, ...]) -> bool:
    """Whether a (B, N, N) Gram takes the on-device float32 path (set ACCELERATE_ABOVE to force either)."""
    return int(np.prod(shape)) > ACCELERATE_ABOVE


def _refit_device(g: np.ndarray, w: np.ndarray, el: np.ndarray, lam: np.ndarray, r: np.ndarray | None = None) -> Any:
    """:func:`refit` for a batch on the default JAX device (float32, Cholesky); ``r``: its ``rhs_gram`` (None:
    ``g``, not copied to the device twice)."""
    import jax.numpy as jnp

    rd = None if r is None else jnp.asarray(r, jnp.float32)
    return _refit_jit(jnp.asarray(g, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(el), jnp.asarray(lam), rd)


def _refit_body(g: Any, w: Any, el: Any, lam: Any, r: Any = None) -> Any:
    import jax
    import jax.numpy as jnp

    def one(gb: Any, wb: Any, eb: Any, lb: Any, rb: Any) -> Any:
        a = gb[eb][:, eb] + lb * jnp.eye(eb.shape[0], dtype=gb.dtype)  # [k, k]
        rhs = (gb if rb is None else rb)[eb] @ wb + lb * wb[eb]  # [k, D]
        c = jax.scipy.linalg.cho_factor(a, lower=True)
        return jax.scipy.linalg.cho_solve(c, rhs)

    hp = jax.default_matmul_precision("highest")
    with hp:
        return jax.lax.map(lambda t: one(*t), (g, w, el, lam.astype(g.dtype), r))


def _lazy_jit(fn: Any, **kw: Any) -> Any:
    """``jax.jit(fn)`` built on first use (importing this module stays free of JAX work)."""
    cache: list = []

    def call(*a: Any) -> Any:
        if not cache:
            import jax

            cache.append(jax.jit(fn, **kw))
        return cache[0](*a)

    return call


_refit_jit = _lazy_jit(_refit_body)


def _solve_psd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        c = np.linalg.cholesky(a)
        return np.linalg.solve(c.T, np.linalg.solve(c, b))
    except np.linalg.LinAlgError:  # numerically semi-definite: least squares is still well defined
        return np.linalg.lstsq(a, b, rcond=None)[0]


def obs_order(
    g: np.ndarray,
    w: np.ndarray,
    group: int,
    axis: int,
    damp: float,
    chunk: int = 64,
    snapshots: tuple[int, ...] = (),
) -> tuple:
    """Greedy structured-OBS removal over the units of one group.

    Returns ``(order, scores)``: unit ids most important first (the reverse of the removal order), and per
    unit (original numbering) the output error its removal added, summed over a batched Gram's entries.
    The error of keeping the first ``k`` of ``order`` (with the re-fit) is the sum of the scores of the others.

    ``snapshots``: kept counts ``k`` at which the OBS-updated consumer is also returned, as a third item
    ``{k: array}`` (``w``'s shape, removed rows zero). The OBS update solves the same damped least squares as
    :func:`refit` (``min ||X W - X_K W'||^2 + lam ||W' - W_K||^2``), so each snapshot's kept rows are the re-fit
    of keeping ``order[:k]``, with no solve of its own; the removal steps stop exactly at every such ``k``.
    """
    w64 = _rows(np.asarray(w, np.float64), axis)  # [B, N, D]
    gb = g if g.ndim == 3 else g[None]
    nb, ne, _ = w64.shape
    n = ne // group
    lam = _damp(gb, damp)
    stops = _stops(snapshots, n)
    if _accelerate(gb.shape):
        order, scores, snaps = _obs_order_device(gb, w64, lam, group, chunk, stops)
        snaps = {k: np.asarray(v, np.float64).reshape(w.shape) for k, v in snaps.items()}
        return (order, scores, snaps) if snapshots else (order, scores)
    hinv = np.stack([np.linalg.inv(gb[b] + lam[b] * np.eye(ne)) for b in range(nb)])  # [B, N, N]
    hinv = 0.5 * (hinv + np.transpose(hinv, (0, 2, 1)))
    wk = w64.copy()
    alive = np.ones(n, bool)
    removed: list[int] = []
    scores = np.zeros(n)
    snaps: dict[int, np.ndarray] = {}
    while alive.sum() > 0:
        units = np.flatnonzero(alive)
        if stops and len(units) == stops[0]:
            snaps[stops.pop(0)] = wk.copy().reshape(w.shape)
        err = _unit_errors(hinv, wk, units, group)  # [len(units)]
        take = max(1, len(units) // chunk) if len(units) > chunk else 1
        if stops:  # never step past a snapshot
            take = min(take, len(units) - stops[0])
        best = np.argsort(err, kind="stable")[:take]
        pick = units[best]
        joint = _joint_error(hinv, wk, pick, group) if take > 1 else 0.0
        scores[pick] = _chunk_scores(err[best], joint)
        _remove(hinv, wk, pick, group)
        alive[pick] = False
        removed.extend(int(p) for p in pick)
    order = np.asarray(removed[::-1], np.int64)
    return (order, scores, snaps) if snapshots else (order, scores)


def _stops(snapshots: tuple[int, ...], n: int) -> list[int]:
    """The snapshot kept counts strictly between 0 and ``n`` units, descending (the greedy pass meets them in turn)."""
    return sorted({int(k) for k in snapshots if 0 < int(k) < n}, reverse=True)


def obs_order_rows(
    g: np.ndarray,
    w: np.ndarray,
    group: int,
    axis: int,
    damp: float,
    chunk: int = 64,
    snapshots: tuple[int, ...] = (),
) -> tuple:
    """:func:`obs_order` run separately for every entry of a batched Gram ``g`` (B, N, N) and consumer ``w``
    (B leading, its rows on ``axis`` >= 1): one order per expert, since channel ``c`` of one expert has
    nothing to do with channel ``c`` of another. Returns ``(order [B, n], scores [B, n], {k: w-shaped})``:
    the snapshot at ``k`` holds every expert's own re-fit of its own first ``k`` units."""
    if g.ndim != 3 or axis < 1 or w.shape[0] != g.shape[0]:
        raise ValueError(f"per-row OBS needs a (B, N, N) Gram and a consumer with B leading, got {g.shape}, {w.shape}")
    if _accelerate(g.shape):  # all experts side by side on the device (vmapped steps), float32
        w64 = _rows(np.asarray(w, np.float64), axis)  # [B, N, D]
        stops = _stops(snapshots, w64.shape[1] // group)
        order, scores, snaps = _obs_order_device(g, w64, _damp(g, damp), group, chunk, stops, rows=True)
        return order, scores, {k: np.asarray(v, np.float64).reshape(w.shape) for k, v in snaps.items()}
    orders, scores, snaps = [], [], {}
    for b in range(g.shape[0]):
        o, sc, sn = obs_order(g[b], w[b], group, axis - 1, damp, chunk, tuple(snapshots) or (0,))
        orders.append(o)
        scores.append(sc)
        for k, v in sn.items():
            snaps.setdefault(k, []).append(np.asarray(v))
    return np.stack(orders), np.stack(scores), {k: np.stack(v) for k, v in snaps.items()}


def _obs_order_device(
    g: np.ndarray, w: np.ndarray, lam: np.ndarray, group: int, chunk: int, stops: list[int], rows: bool = False
) -> tuple:
    """:func:`obs_order` on the default JAX device in float32: the same greedy removal and OBS updates, one
    jitted step per removal (chunks rounded down to a power of two, so a few step shapes compile); snapshots
    at the kept counts ``stops`` (descending) stay on the device. ``rows``: every batch entry is its own
    greedy pass (:func:`obs_order_rows`; the steps vmapped over the entries, which all remove ``take`` units
    per step), and the order and scores are (B, n)."""
    import jax.numpy as jnp

    nb, n = g.shape[0], g.shape[1] // group
    hinv = _obs_init_jit(jnp.asarray(g, jnp.float32), jnp.asarray(lam, jnp.float32))
    wk = jnp.asarray(w, jnp.float32)
    alive = jnp.ones((nb, n) if rows else n, bool)
    removed: list[np.ndarray] = []
    scores = np.zeros((nb, n) if rows else n)
    snaps: dict[int, Any] = {}
    step = _obs_step_rows_jit if rows else _obs_step_jit
    left = n
    while left > 0:
        if stops and left == stops[0]:
            snaps[stops.pop(0)] = wk + 0.0  # a copy: the step donates wk
        want = max(1, left // chunk) if left > chunk else 1
        if stops:  # never step past a snapshot
            want = min(want, left - stops[0])
        take = 1 << (want.bit_length() - 1)  # a power of two <= want
        hinv, wk, alive, pick, err, joint = step(hinv, wk, alive, group, take)
        pick, err, joint = np.asarray(pick), np.asarray(err, np.float64), np.asarray(joint, np.float64)
        if rows:
            for b in range(nb):
                scores[b, pick[b]] = _chunk_scores(err[b], float(joint[b]))
        else:
            scores[pick] = _chunk_scores(err, float(joint))
        removed.append(pick)
        left -= take
    order = np.concatenate(removed, axis=-1)[..., ::-1].astype(np.int64)  # most important first
    return order, scores, snaps


def _obs_init(g: Any, lam: Any) -> tuple:
    import jax
    import jax.numpy as jnp

    eye = jnp.eye(g.shape[1], dtype=g.dtype)
    with jax.default_matmul_precision("highest"):
        hinv = jnp.linalg.inv(g + lam[:, None, None] * eye)
    return 0.5 * (hinv + jnp.swapaxes(hinv, 1, 2))


def _obs_step(hinv: Any, w: Any, alive: Any, group: int, take: int) -> tuple:
    """One greedy OBS removal of the ``take`` alive units with the least single-unit error (traced)."""
    import jax
    import jax.numpy as jnp

    nb, ne, _ = hinv.shape
    n = ne // group
    with jax.default_matmul_precision("highest"):
        if group == 1:
            d = jnp.diagonal(hinv, axis1=1, axis2=2)  # [B, N]
            err = jnp.sum(jnp.sum(jnp.square(w), -1) / jnp.maximum(d, 1e-30), axis=0)  # [N]
        else:
            h5 = hinv.reshape(nb, n, group, n, group)
            blocks = h5[:, jnp.arange(n), :, jnp.arange(n), :]  # [n, B, g, g]: each unit's diagonal block
            ws = w.reshape(nb, n, group, -1)  # [B, n, g, D]
            sol = jnp.linalg.solve(blocks, jnp.swapaxes(ws, 0, 1))  # [n, B, g, D]
            err = jnp.einsum("nbgd,bngd->n", sol, ws)
        err = jnp.where(alive, err, jnp.inf)
        neg, pick = jax.lax.top_k(-err, take)
        el = (pick[:, None] * group + jnp.arange(group)[None, :]).reshape(-1)  # [s]
        h_s = hinv[:, :, el]  # [B, N, s]
        inv_ss = jnp.linalg.inv(h_s[:, el, :])  # [B, s, s]
        w_s = w[:, el, :]  # [B, s, D]
        joint = jnp.sum(w_s * (inv_ss @ w_s))
        w = w - h_s @ (inv_ss @ w_s)
        hinv = hinv - h_s @ inv_ss @ jnp.swapaxes(h_s, 1, 2)
    w = w.at[:, el, :].set(0.0)
    hinv = hinv.at[:, el, :].set(0.0).at[:, :, el].set(0.0).at[:, el, el].set(1.0)
    return hinv, w, alive.at[pick].set(False), pick, -neg, joint


def _obs_step_rows(hinv: Any, w: Any, alive: Any, group: int, take: int) -> tuple:
    """:func:`_obs_step` for every batch entry on its own (``alive`` [B, n]): one greedy pass per expert."""
    import jax

    def one(h: Any, ww: Any, al: Any) -> tuple:
        h, ww, al, pick, err, joint = _obs_step(h[None], ww[None], al, group, take)
        return h[0], ww[0], al, pick, err, joint

    return jax.vmap(one)(hinv, w, alive)


_obs_init_jit = _lazy_jit(_obs_init)
_obs_step_jit = _lazy_jit(_obs_step, static_argnums=(3, 4), donate_argnums=(0, 1))
_obs_step_rows_jit = _lazy_jit(_obs_step_rows, static_argnums=(3, 4), donate_argnums=(0, 1))


def _chunk_scores(single: np.ndarray, joint: float) -> np.ndarray:
    """Scores of the units removed in one greedy step: a single unit keeps its own error; a chunk shares
    the chunk's joint error in proportion to the single-unit errors (equally where those are all zero)."""
    if len(single) == 1:
        return single
    total = float(single.sum())
    return joint * single / total if total > 0 else np.full(len(single), joint / len(single))


def _elements(units: np.ndarray, group: int) -> np.ndarray:
    """Unit ids [..., k] -> element (row) indices [..., k*group]."""
    units = np.asarray(units)
    return (units[..., :, None] * group + np.arange(group)).reshape(*units.shape[:-1], -1)


def _unit_errors(hinv: np.ndarray, w: np.ndarray, units: np.ndarray, group: int) -> np.ndarray:
    """Per alive unit: ``sum_b tr(W_S^T (H^-1_SS)^-1 W_S)`` for S = that unit's rows."""
    if group == 1:
        d = np.diagonal(hinv, axis1=1, axis2=2)[:, units]  # [B, U]
        num = np.sum(np.square(w[:, units, :]), axis=-1)  # [B, U]
        return np.sum(num / np.maximum(d, 1e-300), axis=0)
    el = _elements(units, group).reshape(len(units), group)  # [U, g]
    out = np.zeros(len(units))
    for b in range(hinv.shape[0]):
        blk = hinv[b][el[:, :, None], el[:, None, :]]  # [U, g, g]
        ws = w[b][el]  # [U, g, D]
        sol = np.linalg.solve(blk, ws)  # (H^-1_SS)^-1 W_S
        out += np.einsum("ugd,ugd->u", ws, sol)
    return out


def _joint_error(hinv: np.ndarray, w: np.ndarray, units: np.ndarray, group: int) -> float:
    el = _elements(units, group)
    tot = 0.0
    for b in range(hinv.shape[0]):
        ws = w[b][el]
        tot += float(np.sum(ws * np.linalg.solve(hinv[b][np.ix_(el, el)], ws)))
    return tot


def _remove(hinv: np.ndarray, w: np.ndarray, units: np.ndarray, group: int) -> None:
    """OBS updates (in place) after removing ``units``: the others absorb the removed rows' output."""
    el = _elements(units, group)
    for b in range(hinv.shape[0]):
        h_s = hinv[b][:, el]  # [N, s]
        inv_ss = np.linalg.inv(hinv[b][np.ix_(el, el)])
        w[b] -= h_s @ (inv_ss @ w[b][el])
        hinv[b] -= h_s @ inv_ss @ h_s.T
        w[b][el] = 0.0
        hinv[b][el, :] = 0.0
        hinv[b][:, el] = 0.0
        hinv[b][el, el] = 1.0  # removed: inert (never picked again, keeps the matrix invertible)


@dataclass
class Compensation:
    """Consumer Grams by (node, units kind), in the numbering of the model they belong to."""

    grams: dict[tuple[str, str], Any]  # host arrays (float64) or StoredGram (read on use)
    config: CompensationConfig = field(default_factory=CompensationConfig)

    def consumers(self, tree: Tree) -> dict[PathT, tuple[str, str, Units, Slice]]:
        """Consumer parameter path -> (node, kind, units, slice), for the groups with a Gram."""
        out = {}
        for n in tree.spec.nodes():
            for u in n.units:
                s = consumer_slice(u)
                if s is not None and (n.name, u.kind) in self.grams:
                    out[s.path] = (n.name, u.kind, u, s)
        return out

    def orders(self, tree: Tree, params: dict[PathT, Any]) -> tuple[dict, dict, dict]:
        """Greedy OBS for every group with a Gram; ``params``: path -> full array (this numbering).

        Returns ``(order, scores, snapshots)``: per (node, kind) the unit order and scores of :func:`obs_order`
        (a batched group, ``Units.batch``: (B, n) from :func:`obs_order_rows`, one order per expert), and
        ``{k: re-fitted consumer}`` at every kept count ``k`` below full of the genes acting on the group
        (the OBS pass's own updates: :func:`obs_order` ``snapshots``)."""
        counts = self.level_counts(tree)
        order, scores, snaps = {}, {}, {}
        for path, (node, kind, u, s) in self.consumers(tree).items():
            w, g = np.asarray(params[path]), _f64(self.grams[(node, kind)])  # one group's Gram in memory at a time
            ks = tuple(counts.get((node, kind), ())) or (0,)  # (0,): none wanted, still the 3-tuple form
            if u.batch is not None and g.ndim == 3:  # one order per expert, each from its own Gram
                o, sc, sn = obs_order_rows(g, w, s.group, s.axis, self.config.damp, self.config.chunk, ks)
            else:
                o, sc, sn = obs_order(g, w, s.group, s.axis, self.config.damp, self.config.chunk, ks)
            order[(node, kind)], scores[(node, kind)], snaps[(node, kind)] = o, sc, sn
        return order, scores, snaps

    def level_counts(self, tree: Tree) -> dict[tuple[str, str], list[int]]:
        """Kept counts below full, per (node, kind) with a Gram, of the genes acting on it."""
        counts: dict[tuple[str, str], set[int]] = {}
        for gene in tree.genes:
            for m in gene.members or (gene.node,):
                if (m, gene.kind) in self.grams:
                    n = tree.units(m, gene.kind).n
                    counts.setdefault((m, gene.kind), set()).update(c for c in gene.counts if 0 < c < n)
        return {k: sorted(v) for k, v in counts.items()}

    def apply(self, tree: Tree, path: PathT, w: Any, ids: np.ndarray) -> np.ndarray | None:
        """The re-fitted consumer ``path`` keeping unit ``ids`` (its consumer axis reduced), or None if
        ``path`` is no compensated consumer."""
        c = self.consumers(tree).get(path)
        if c is None:
            return None
        node, kind, _, s = c
        return refit(_f64(self.grams[(node, kind)]), np.asarray(w), ids, s.group, s.axis, self.config.damp)

    def permuted(self, tree: Tree, order: dict[tuple[str, str], np.ndarray]) -> Compensation:
        """These Grams in the numbering of a model permuted by ``order`` (:func:`tmp_jax.materialize.permute`).

        A batched (per-expert) Gram is also permuted along its batch axis by the order of the node's group
        that slices the consumer's axis 0 (the experts): expert ``e`` of the permuted model is ``order[e]``.
        A :class:`StoredGram` stays on disk (the permutation is applied when it is read)."""
        out = {}
        for key, g in self.grams.items():
            s = consumer_slice(tree.units(*key))
            o = order.get(key)
            if o is not None:  # a 2-D order (one per expert) selects per batch row, before the batch order
                el = _elements(np.asarray(o), s.group)
                g = _take(_take(g, el, -2), el, -1)
            bo = _batch_order(tree, *key, s, order) if g.ndim == 3 else None
            out[key] = _take(g, bo, 0) if bo is not None else g
        return Compensation(out, self.config)

    def level_refits(
        self, tree: Tree, snapshots: dict[tuple[str, str], dict[int, np.ndarray]], order: dict, dtype: Any
    ) -> dict[tuple[PathT, int], Any]:
        """(consumer path, kept units k) -> the re-fitted consumer at FULL shape in the numbering of the model
        permuted by ``order`` (kept = a prefix; rows past it zero), from :meth:`orders`' snapshots (this
        Compensation's numbering): what the search swaps in per candidate width, on the default device."""
        import jax.numpy as jnp

        out = {}
        for path, (node, kind, _, s) in self.consumers(tree).items():
            for k, snap in snapshots.get((node, kind), {}).items():
                out[(path, k)] = jnp.asarray(_permute_consumer(tree, node, kind, s, snap, order), dtype)
        return out

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> str:
        """Write the Grams (float32 safetensors, atomically, one Gram in memory at a time); returns the file's
        sha256."""
        arrays = [(f"{n}/{k}", g) for (n, k), g in sorted(self.grams.items())]
        meta = {"config": json.dumps(self.config.to_json()), **(extra or {})}
        return save_f32_safetensors(path, arrays, meta)

    @classmethod
    def load(cls, path: str | Path, config: CompensationConfig, sha256: str | None = None) -> Compensation:
        """Open a Gram file written by :meth:`save` (safetensors only); ``sha256`` checks it is the one a plan
        was made with. The Grams are :class:`StoredGram` s, read from the file when a group is re-fitted."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: compensation statistics file missing (written by tmp_jax.search)")
        if sha256 is not None:
            got = _sha256_file(path)
            if got != sha256:
                raise ValueError(f"{path}: sha256 {got[:12]}... differs from the plan's {sha256[:12]}... (another run)")
        grams: dict[tuple[str, str], Any] = {}
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                node, _, kind = key.rpartition("/")
                if not node:
                    raise ValueError(f"{path}: key {key!r} is not 'node/kind'")
                grams[(node, kind)] = StoredGram(path, key, tuple(f.get_slice(key).get_shape()))
        return cls(grams, config)


def _batch_order(tree: Tree, node: str, kind: str, s: Slice, order: dict) -> np.ndarray | None:
    """The order of the node's other group that slices the consumer's axis 0 (the experts), if any."""
    for n in tree.spec.nodes():
        if n.name == node:
            for u in n.units:
                on_axis0 = any(x.path == s.path and x.axis == 0 for x in u.slices)
                if u.kind != kind and (node, u.kind) in order and on_axis0:
                    return np.asarray(order[(node, u.kind)])
    return None


def _permute_consumer(tree: Tree, node: str, kind: str, s: Slice, w: np.ndarray, order: dict) -> np.ndarray:
    """A consumer array (full shape) in the numbering of the model permuted by ``order``."""
    o = order.get((node, kind))
    if o is not None:  # a 2-D order: per row of axis 0 in the original numbering, before the batch order
        w = _take(w, _elements(np.asarray(o), s.group), s.axis)
    bo = _batch_order(tree, node, kind, s, order) if s.axis > 0 else None
    return np.take(w, bo, axis=0) if bo is not None else w


def from_plan(plan: dict[str, Any], plan_path: str | Path) -> Compensation | None:
    """The compensation a plan was searched with (its Gram file next to the plan, sha256-checked), or None
    for a plan made with ``--no-compensate``. One-line errors name the plan and what is wrong."""
    rec = plan.get("compensation")
    if rec is None:
        return None
    p = Path(plan_path)
    if not isinstance(rec, dict) or rec.get("method") != METHOD or "stats" not in rec:
        raise ValueError(f"{p}: 'compensation' must record method {METHOD!r} and its 'stats' file, got {rec!r}")
    try:
        cfg = CompensationConfig(
            damp=float(rec.get("damp", 0.01)),
            chunk=int(rec.get("chunk", 64)),
            token_stride=int(rec.get("token_stride", 1)),
            timestep_weight=str(rec.get("timestep_weight", "uniform")),  # plans before the field: uniform
        )
    except (TypeError, ValueError):
        raise ValueError(
            f"{p}: 'compensation' damp / chunk must be numbers and timestep_weight one of "
            f"{', '.join(TIMESTEP_WEIGHTS)}, got {rec!r}"
        ) from None
    return Compensation.load(p.parent / str(rec["stats"]), cfg, sha256=rec.get("stats_sha256"))
