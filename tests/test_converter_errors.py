"""Strictness of the streaming converter: every bad input is one clear error and leaves nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from converters import engine
from converters.engine import CheckpointError, SafetensorsReader
from converters.zimage import load_zimage
from tmp_jax.models.z_image import TINY, ZImageTransformer


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    ZImageTransformer(TINY, rngs=nnx.Rngs(0)).save_pretrained(str(folder))
    return folder


def _copy_with(tmp: Path, good: Path, mutate) -> Path:
    sd = load_file(str(good / "diffusion_pytorch_model.safetensors"))
    mutate(sd)
    out = tmp / "bad"
    out.mkdir()
    (out / "config.json").write_text((good / "config.json").read_text())
    save_file(sd, str(out / "diffusion_pytorch_model.safetensors"))
    return out


def test_good_loads(good):
    m = load_zimage(good)
    assert m.layers[0].attention.to_q.kernel.get_value().shape == (64, 64)


def test_unknown_key(tmp_path, good):
    bad = _copy_with(tmp_path, good, lambda sd: sd.__setitem__("layers.0.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(
        CheckpointError, match=r"diffusion_pytorch_model.safetensors: unknown key 'layers.0.extra.weight'"
    ):
        load_zimage(bad)


def test_missing_key(tmp_path, good):
    bad = _copy_with(tmp_path, good, lambda sd: sd.pop("layers.1.feed_forward.w2.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing key 'layers.1.feed_forward.w2.weight' \(expected shape \[64, 170\]\)"
    ):
        load_zimage(bad)


def test_shape_mismatch(tmp_path, good):
    bad = _copy_with(tmp_path, good, lambda sd: sd.__setitem__("x_pad_token", np.zeros((1, 63), np.float32)))
    with pytest.raises(CheckpointError, match=r"'x_pad_token' has shape \[1, 63\], expected \[1, 64\]"):
        load_zimage(bad)


def test_dtype_mismatch(tmp_path, good):
    bad = _copy_with(tmp_path, good, lambda sd: sd.__setitem__("x_pad_token", np.zeros((1, 64), np.int32)))
    with pytest.raises(CheckpointError, match=r"'x_pad_token' has dtype I32, expected a float type"):
        load_zimage(bad)


def test_truncated_file(tmp_path, good):
    bad = _copy_with(tmp_path, good, lambda sd: None)
    f = bad / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated file"):
        load_zimage(bad)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        SafetensorsReader(bad)


def test_missing_shard_and_bad_index(tmp_path, good):
    sharded = tmp_path / "sharded"
    load_zimage(good).save_pretrained(str(sharded), max_shard_bytes=50_000)
    shards = sorted(sharded.glob("*-of-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[-1].name}: shard named in .*index.json is missing"):
        load_zimage(sharded)
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        load_zimage(sharded)


def test_missing_config_and_folder(tmp_path, good):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        SafetensorsReader(tmp_path / "nope")
    f = tmp_path / "noconf"
    f.mkdir()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_zimage(f)


def test_save_refuses_existing_and_leaves_nothing_on_failure(tmp_path, good, monkeypatch):
    m = load_zimage(good)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="output folder exists"):
        m.save_pretrained(str(out))
    assert (out / "keep.txt").read_text() == "user data"

    calls = {"n": 0}
    real_write = engine.StreamingWriter.write

    def failing_write(self, key, arr):  # simulate a full disk half-way through
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError(28, "No space left on device")
        return real_write(self, key, arr)

    monkeypatch.setattr(engine.StreamingWriter, "write", failing_write)
    dest = tmp_path / "fresh"
    with pytest.raises(OSError, match="No space left"):
        m.save_pretrained(str(dest))
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_index_lists_tensor_absent_from_shard(tmp_path, good):
    sharded = tmp_path / "s2"
    load_zimage(good).save_pretrained(str(sharded), max_shard_bytes=50_000)
    idx = sharded / "diffusion_pytorch_model.safetensors.index.json"
    d = json.loads(idx.read_text())
    d["weight_map"]["ghost.weight"] = next(iter(d["weight_map"].values()))
    idx.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="'ghost.weight' listed in the index is absent"):
        load_zimage(sharded)
    assert os.path.isdir(sharded)
