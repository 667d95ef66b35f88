"""Bottom-level file helpers every layer shares: atomic writes and checkpoint fingerprints.

Nothing here imports another tmp_jax module, so calibration, search, distillation and the converters can all
use it without an import cycle.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write to a temp file in the same folder, then rename: readers never see a partial file, and a crash
    leaves the previous version (or nothing) in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` of ``arrays``, written atomically (no pickled objects: load with ``allow_pickle=False``)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def fingerprint(path: str | Path | None, config: dict[str, Any]) -> str:
    """sha256 over config.json and every safetensors header + file size (cheap, content-sensitive
    enough to tell checkpoints apart without reading 100+ GB)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    if path is not None:
        p = Path(path)
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(f.name.encode() + fh.read(n) + str(f.stat().st_size).encode())
    return "sha256:" + h.hexdigest()
