"""Fashion-MNIST data for the small real-data teachers: loaders, latents and conditioning.

Real Z-Image / HunyuanImage weights cannot be fetched here, so the project trains tiny teachers of the
same architectures on Fashion-MNIST (Debian package ``dataset-fashion-mnist``, idx ``.gz`` files in
``/usr/share/datasets/fashion-mnist``; ``$FMNIST_DIR`` overrides the folder).

* :func:`load_subset` reads the committed, balanced subset ``tmp_jax/assets/fmnist_subset.npz``
  (written by ``scripts/make_fmnist_subset.py``): 4096 train images (calibration / distillation) and
  2048 test images (evaluation), uint8 ``(N, 28, 28)`` + int64 labels, classes in equal numbers.
* :func:`load_fmnist` reads the full package split (60k train / 10k test) for teacher training.
* "Latents": :func:`to_latents` pixel-unshuffles a 28x28 image into ``(4, 14, 14)`` (channel
  ``2*dy + dx`` holds pixel ``(2*i + dy, 2*j + dx)``) and maps ``[0, 255]`` to ``[-1, 1]``;
  :func:`from_latents` is its exact inverse on the uint8 grid. Z-Image sees them as ``(C=4, F=1, 14,
  14)``; with patch 2 that is 7x7 = 49 image tokens of 16 values.
* Z-Image conditioning: :func:`caption_features` gives each class a fixed, seeded random "text
  encoder output" of :data:`CAPTION_LEN` tokens x ``cap_feat_dim`` (a shared template part plus a
  class part, like a prompt "a photo of a <class>"), and :data:`NULL_LABEL` selects the null caption
  (the empty-prompt embedding used for classifier-free guidance).
* HunyuanImage conditioning: :func:`hunyuan_prompt_ids` gives per-class token ids (template below).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASSES)
NULL_LABEL = NUM_CLASSES  # label value that selects the null (unconditional) caption
IMAGE_SIZE = 28
LATENT_CHANNELS = 4
LATENT_SIZE = IMAGE_SIZE // 2
CAPTION_LEN = 8
CAPTION_SEED = 20240601
DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
ASSETS = Path(__file__).resolve().parent / "assets"
SUBSET_PATH = ASSETS / "fmnist_subset.npz"

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class Split:
    """Images uint8 ``(N, 28, 28)`` and labels int64 ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


# ----------------------------------------------------------------------------------------------
# Loading


def fmnist_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder with the idx ``.gz`` files: ``root``, else ``$FMNIST_DIR``, else the package's."""
    return Path(root or os.environ.get("FMNIST_DIR") or DEFAULT_FMNIST_DIR)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (gzip or plain): magic ``0 0 dtype ndim``, big-endian int32 dims, then data."""
    p = Path(path)
    raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{p}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{p}: {data.size} bytes of data for dims {dims.tolist()}")
    return data.reshape(dims)


def load_fmnist(split: str, root: str | os.PathLike[str] | None = None) -> Split:
    """The full package split ('train': 60000, 'test': 10000)."""
    if split not in _IDX_FILES:
        raise ValueError(f"split must be one of {list(_IDX_FILES)}, got {split!r}")
    d = fmnist_dir(root)
    img_f, lab_f = (d / f for f in _IDX_FILES[split])
    if not img_f.exists():
        raise FileNotFoundError(
            f"{img_f}: missing; `apt-get install dataset-fashion-mnist` or set FMNIST_DIR to the idx folder"
        )
    images, labels = read_idx(img_f), read_idx(lab_f).astype(np.int64)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(images) != len(labels):
        raise ValueError(f"{d}: unexpected shapes {images.shape} / {labels.shape}")
    return Split(images, labels)


def load_subset(split: str, path: str | os.PathLike[str] | None = None) -> Split:
    """The committed balanced subset ('train': 4096 images, 'test': 2048 images)."""
    if split not in _IDX_FILES:
        raise ValueError(f"split must be one of {list(_IDX_FILES)}, got {split!r}")
    with np.load(Path(path) if path else SUBSET_PATH) as z:
        return Split(z[f"{split}_images"], z[f"{split}_labels"].astype(np.int64))


_NPZ_CACHE: dict[tuple, dict[str, np.ndarray]] = {}


def load_training_npz(path: str | os.PathLike[str], keys: tuple[str, ...], want: str) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of a user's ``--data`` .npz (no pickles), read once per file version and kept.

    Distillation draws a batch from it every step; re-reading (and decompressing) the file each step was the
    cost. Cached by (path, size, mtime), so an edited file is read again. ``want`` describes the expected
    contents for the one-line errors (unreadable file, missing array)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read an .npz with {want} ({e})") from None
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, keys)
    if key not in _NPZ_CACHE:
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:  # not an .npz, or a pickle (refused)
            raise ValueError(f"{path}: cannot read an .npz with {want} ({e})") from None
        missing = [k for k in keys if k not in z]
        if missing:
            raise ValueError(f"{path}: missing array {missing[0]!r} (expected {want})")
        _NPZ_CACHE.clear()  # one training file at a time: keep only the newest
        _NPZ_CACHE[key] = {k: z[k] for k in keys}
    return _NPZ_CACHE[key]


def balanced_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` indices of each class drawn without replacement (seeded), shuffled together."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than {per_class}")
        picks.append(rng.choice(idx, per_class, replace=False))
    out = np.concatenate(picks)
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------------------------
# Latents (pixel unshuffle)


def to_latents(images: np.ndarray) -> np.ndarray:
    """uint8 ``(..., 28, 28)`` -> float32 ``(..., 4, 14, 14)`` in [-1, 1]; channel = 2*dy + dx."""
    x = np.asarray(images)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected (..., 28, 28) images, got {x.shape}")
    lead = x.shape[:-2]
    x = x.reshape(*lead, LATENT_SIZE, 2, LATENT_SIZE, 2)  # [..., i, dy, j, dx]
    n = len(lead)
    x = np.moveaxis(x, (n + 1, n + 3), (n, n + 1))  # [..., dy, dx, i, j]
    x = x.reshape(*lead, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    return (x.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def from_latents(latents: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_latents`: float ``(..., 4, 14, 14)`` -> uint8 ``(..., 28, 28)`` (clipped)."""
    z = np.asarray(latents, np.float32)
    if z.shape[-3:] != (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE):
        raise ValueError(f"expected (..., 4, 14, 14) latents, got {z.shape}")
    lead = z.shape[:-3]
    n = len(lead)
    x = z.reshape(*lead, 2, 2, LATENT_SIZE, LATENT_SIZE)  # [..., dy, dx, i, j]
    x = np.moveaxis(x, (n, n + 1), (n + 1, n + 3))  # [..., i, dy, j, dx]
    x = x.reshape(*lead, IMAGE_SIZE, IMAGE_SIZE)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Conditioning


def caption_table(cap_feat_dim: int, length: int = CAPTION_LEN, seed: int = CAPTION_SEED) -> np.ndarray:
    """float32 ``(NUM_CLASSES + 1, length, cap_feat_dim)``: row ``c`` is class ``c``'s caption,
    row :data:`NULL_LABEL` the null caption. Deterministic in (cap_feat_dim, length, seed).

    A class caption is ``template + class_part``: the first half of the tokens carries a shared
    template sequence (like "a photo of a"), the second half adds a class-specific sequence; all
    unit-variance Gaussian. The null caption is an independent sequence (the empty prompt).
    """
    rng = np.random.default_rng([seed, cap_feat_dim, length])
    template = rng.standard_normal((length, cap_feat_dim))
    classes = rng.standard_normal((NUM_CLASSES, length, cap_feat_dim))
    half = length // 2
    caps = np.repeat(template[None], NUM_CLASSES, 0)
    caps[:, half:] = 0.5 * caps[:, half:] + classes[:, half:]
    caps[:, :half] += 0.1 * classes[:, :half]
    null = rng.standard_normal((1, length, cap_feat_dim))
    return np.concatenate([caps, null], 0).astype(np.float32)


def caption_features(
    labels: np.ndarray | list[int], cap_feat_dim: int, length: int = CAPTION_LEN, seed: int = CAPTION_SEED
) -> np.ndarray:
    """Per-sample caption features ``(B, length, cap_feat_dim)``; label :data:`NULL_LABEL` = null."""
    lab = np.asarray(labels, np.int64)
    if lab.size and (lab.min() < 0 or lab.max() > NULL_LABEL):
        raise ValueError(f"labels must be in [0, {NULL_LABEL}], got range [{lab.min()}, {lab.max()}]")
    return caption_table(cap_feat_dim, length, seed)[lab]


# HunyuanImage prompt template (token ids of a tiny teacher's vocabulary):
#   [bos] <a> <photo> <of> <a> <CLASS> [eos]      -> class prompt, CLASS id = HUNYUAN_CLASS_BASE + label
#   [bos] <null> <null> <null> <null> <null> [eos] -> null prompt for CFG (label NULL_LABEL)
# Word ids are fixed small integers; bos/eos come from the model config. Every prompt has the same
# length (HUNYUAN_PROMPT_LEN), so one layout serves a whole batch.
HUNYUAN_WORD_IDS = {"a": 10, "photo": 11, "of": 12, "null": 13}
HUNYUAN_CLASS_BASE = 20
HUNYUAN_PROMPT_LEN = 7


def hunyuan_prompt_ids(labels: np.ndarray | list[int], *, bos_id: int, eos_id: int, vocab_size: int) -> np.ndarray:
    """int32 ``(B, HUNYUAN_PROMPT_LEN)`` token ids following the template above."""
    lab = np.asarray(labels, np.int64)
    if lab.size and (lab.min() < 0 or lab.max() > NULL_LABEL):
        raise ValueError(f"labels must be in [0, {NULL_LABEL}], got range [{lab.min()}, {lab.max()}]")
    used = set(HUNYUAN_WORD_IDS.values()) | set(range(HUNYUAN_CLASS_BASE, HUNYUAN_CLASS_BASE + NUM_CLASSES))
    if vocab_size <= max(used) or bos_id in used or eos_id in used:
        raise ValueError(
            f"vocab_size={vocab_size}, bos={bos_id}, eos={eos_id} clash with the template ids {sorted(used)}"
        )
    w = HUNYUAN_WORD_IDS
    out = np.empty((lab.size, HUNYUAN_PROMPT_LEN), np.int32)
    out[:, 0], out[:, -1] = bos_id, eos_id
    out[:, 1:5] = [w["a"], w["photo"], w["of"], w["a"]]
    out[:, 5] = HUNYUAN_CLASS_BASE + np.minimum(lab.reshape(-1), NUM_CLASSES - 1)
    null = lab.reshape(-1) == NULL_LABEL
    out[null, 1:6] = w["null"]
    return out
