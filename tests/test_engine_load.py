"""The streaming loader's placement paths (issue 10 item 5): every path gives bit-identical arrays.

``load_into`` places plain entries (Linear weights, untransposed tensors) from reused staging buffers with
a read-ahead thread, transposing either on the device (a jitted transpose into the target sharding, the
input placed with the reversed PartitionSpec) or in the host-to-device copy. These tests check each path
against the legacy host path and against numpy, on one device and on a 2x4 mesh of the 8 fake CPU
devices, including casts, the staging ring used off the CPU backend, and errors raised in the read thread.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from converters import engine
from converters.engine import CheckpointError, SafetensorsReader, load_into
from converters.zimage import read_config, zimage_key_table
from tmp_jax.models.z_image import TINY, ZImageTransformer
from tmp_jax.models.z_image.model import init_abstract
from tmp_jax.sharding import make_mesh, variable_sharding

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eng") / "tiny"
    m = ZImageTransformer(TINY, rngs=nnx.Rngs(3))
    m.save_pretrained(str(folder), max_shard_bytes=40_000)  # several shards + index
    return folder


def _load(folder: Path, **kw) -> dict:
    cfg = read_config(folder)
    dtype = kw.pop("dtype", None)
    m = load_into(
        init_abstract(cfg, dtype or jnp.float32), zimage_key_table(cfg), SafetensorsReader(folder), dtype=dtype, **kw
    )
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}


def _bits(x: jax.Array) -> bytes:
    a = np.asarray(x)
    return a.dtype.str.encode() + str(a.shape).encode() + a.tobytes()


@pytest.fixture(scope="module")
def legacy(ckpt) -> dict:
    return _load(ckpt, transpose_on="legacy", read_ahead=0)


def test_legacy_matches_file(ckpt, legacy):
    """The reference path itself: every kernel is the transposed stored weight, everything else as stored."""
    r = SafetensorsReader(ckpt)
    table = zimage_key_table(read_config(ckpt))
    n_t = 0
    for e in table.entries:
        raw = r.read(e.torch_keys[0])
        want = raw.T if e.to_flax is engine._transpose else raw
        n_t += e.to_flax is engine._transpose
        assert np.array_equal(np.asarray(legacy[e.flax_paths[0]]), want), e.torch_keys[0]
    assert n_t > 20


@pytest.mark.parametrize("mode", ["auto", "device", "host"])
@pytest.mark.parametrize("read_ahead", [0, 2])
def test_paths_bit_identical_single_device(ckpt, legacy, mode, read_ahead):
    got = _load(ckpt, transpose_on=mode, read_ahead=read_ahead)
    assert got.keys() == legacy.keys()
    for p in legacy:
        assert _bits(got[p]) == _bits(legacy[p]), p


def test_device_transpose_sharded(ckpt, legacy):
    """On a mesh the device path lands every array in its rule-resolved sharding, values unchanged."""
    mesh = make_mesh("data:2,model:4")
    cfg = read_config(ckpt)
    abstract = init_abstract(cfg, jnp.float32)
    variables = engine.flat_variables(abstract)
    want_sh = {p: variable_sharding(v, mesh) for p, v in variables.items()}
    for mode in ("device", "host"):
        m = load_into(
            init_abstract(cfg, jnp.float32),
            zimage_key_table(cfg),
            SafetensorsReader(ckpt),
            mesh=mesh,
            transpose_on=mode,
        )
        n_split = 0
        for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
            x = v.get_value()
            assert x.sharding.is_equivalent_to(want_sh[tuple(p)], x.ndim), (mode, p)
            n_split += not x.sharding.is_fully_replicated
            assert _bits(x) == _bits(legacy[tuple(p)]), (mode, p)
        assert n_split > 10  # the mesh really splits kernels (the reversed-spec input path is exercised)


def test_casts_on_device_equal_numpy(tmp_path, ckpt):
    """bf16 load of an fp32 checkpoint and fp32 load of a bf16 one: the device casts round like numpy."""
    got = _load(ckpt, dtype=jnp.bfloat16, transpose_on="device")
    r = SafetensorsReader(ckpt)
    table = zimage_key_table(read_config(ckpt))
    for e in table.entries:
        raw = r.read(e.torch_keys[0]).astype(BF16)
        want = raw.T if e.to_flax is engine._transpose else raw
        assert np.asarray(got[e.flax_paths[0]]).tobytes() == np.ascontiguousarray(want).tobytes(), e.torch_keys[0]
    m = ZImageTransformer.from_pretrained(str(ckpt), dtype=jnp.bfloat16)
    m.save_pretrained(str(tmp_path / "bf16"))
    for mode in ("auto", "device"):
        up = _load(tmp_path / "bf16", dtype=jnp.float32, transpose_on=mode)
        for p, x in up.items():
            assert x.dtype == jnp.float32
            assert np.asarray(x).tobytes() == np.asarray(got[p]).astype(np.float32).tobytes(), (mode, p)


def test_staging_ring_reused(ckpt, legacy, monkeypatch):
    """Off the CPU backend every tensor goes through the staging ring; force that here and check the
    buffers are reused (fewer allocations than tensors) and the values are still exact."""
    allocs = {"n": 0}
    real_init, real_empty = engine._Staging.__init__, engine.aligned_empty

    def init(self, n, always):
        real_init(self, n, True)

    def counting_empty(shape, dtype, align=64):
        allocs["n"] += 1
        return real_empty(shape, dtype, align)

    monkeypatch.setattr(engine._Staging, "__init__", init)
    monkeypatch.setattr(engine, "aligned_empty", counting_empty)
    for mode in ("device", "host"):
        allocs["n"] = 0
        got = _load(ckpt, transpose_on=mode, read_ahead=1)
        for p in legacy:
            assert _bits(got[p]) == _bits(legacy[p]), (mode, p)
        assert allocs["n"] < len(legacy) // 4, allocs


def test_truncated_during_read_raises_from_thread(tmp_path, ckpt):
    """A shard cut short after its header was read fails in the read-ahead thread with the usual error."""
    import shutil

    bad = tmp_path / "cut"
    shutil.copytree(ckpt, bad)
    cfg = read_config(bad)
    reader = SafetensorsReader(bad)
    last = max(reader.infos.values(), key=lambda i: (i.file.name, i.end))
    with open(last.file, "r+b") as f:
        f.truncate(last.end - 10)
    for mode in ("auto", "device", "legacy"):
        with pytest.raises(CheckpointError, match=r"truncated while reading .* \(\d+ of \d+ B\)"):
            load_into(init_abstract(cfg, jnp.float32), zimage_key_table(cfg), reader, transpose_on=mode)
    with pytest.raises(ValueError, match="transpose_on must be"):
        load_into(init_abstract(cfg, jnp.float32), zimage_key_table(cfg), reader, transpose_on="gpu")


def test_aligned_read_and_out_checks(ckpt):
    r = SafetensorsReader(ckpt)
    k = next(k for k, i in r.infos.items() if len(i.shape) == 2)
    a = r.read(k)
    assert a.ctypes.data % 64 == 0 and a.flags.c_contiguous
    with pytest.raises(ValueError, match="out is"):
        r.read(k, out=np.empty(a.shape[::-1], a.dtype))
    out = np.empty_like(a)
    assert r.read(k, out=out) is out and np.array_equal(out, a)


class _Thin(nnx.Module):
    """Linear weights with an out or in width of 1: their transposed views are C-contiguous too."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(8, 1, rngs=rngs), nnx.Linear(1, 8, rngs=rngs)] * 1
            + [nnx.Linear(8, 1, rngs=rngs) for _ in range(4)]
        )


def test_thin_linears_not_adopted_from_staging(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    shapes = [(1, 8), (8, 1)] + [(1, 8)] * 4
    sd = {f"layers.{i}.weight": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    sd.update({f"layers.{i}.bias": rng.standard_normal(s[0]).astype(np.float32) for i, s in enumerate(shapes)})
    save_file(sd, str(tmp_path / "model.safetensors"))
    es = []
    for i, s in enumerate(shapes):
        es += [
            engine.linear(f"layers.{i}.weight", ("layers", i, "kernel"), s),
            engine.same(f"layers.{i}.bias", ("layers", i, "bias"), (s[0],)),
        ]
    table = engine.KeyTable(es)
    for mode in ("auto", "device"):
        m = load_into(nnx.eval_shape(lambda: _Thin(nnx.Rngs(0))), table, SafetensorsReader(tmp_path), transpose_on=mode)
        for i, layer in enumerate(m.layers):
            assert np.array_equal(np.asarray(layer.kernel.get_value()), sd[f"layers.{i}.weight"].T), (mode, i)
            assert np.array_equal(np.asarray(layer.bias.get_value()), sd[f"layers.{i}.bias"]), (mode, i)


def test_device_cast_special_values_equal_numpy():
    """The fused device transpose + cast rounds denormals, NaN, inf and ties exactly like numpy/ml_dtypes."""
    rng = np.random.default_rng(1)
    special = np.array([1e-40, -1e-40, 1e-45, 3e-39, np.nan, np.inf, -np.inf, -0.0, 1.0000001, 1 + 2**-8], np.float32)
    x = np.concatenate([rng.standard_normal(40 * 16 - special.size - 64).astype(np.float32), special])
    x = np.concatenate([x, (rng.standard_normal(64) * 1e-39).astype(np.float32)]).reshape(40, 16)
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for src, dst in [(x, BF16), (x.astype(BF16), np.dtype(np.float32)), (x, np.dtype(np.float16))]:
        for tr in (True, False):
            got = np.asarray(engine._place_plain(src, np.dtype(dst), tr, sh, True, False))
            want = np.ascontiguousarray((src.T if tr else src).astype(dst))
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (src.dtype, dst, tr)
