"""Write tmp_jax/assets/fmnist_subset.npz: a small balanced, seeded Fashion-MNIST subset.

4096 train images (410 of classes 0-5, 409 of classes 6-9) and 2048 test images (205 of classes 0-7,
204 of classes 8-9), uint8 28x28 + labels + the indices into the package split. Same seed, same
file. The source is the Debian package ``dataset-fashion-mnist`` (or ``$FMNIST_DIR``).

    python scripts/make_fmnist_subset.py [--root DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tmp_jax.fmnist import NUM_CLASSES, SUBSET_PATH, balanced_indices, load_fmnist

SEED = 1234
SIZES = {"train": 4096, "test": 2048}


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices with class counts differing by at most one (the first ``n % 10`` classes get +1)."""
    per = -(-n // NUM_CLASSES)
    idx = balanced_indices(labels, per, seed)
    keep, counts = [], dict.fromkeys(range(NUM_CLASSES), 0)
    quota = {c: n // NUM_CLASSES + (1 if c < n % NUM_CLASSES else 0) for c in range(NUM_CLASSES)}
    for i in idx:
        c = int(labels[i])
        if counts[c] < quota[c]:
            keep.append(i)
            counts[c] += 1
    return np.asarray(keep, np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="folder with the idx .gz files")
    ap.add_argument("--out", default=str(SUBSET_PATH))
    args = ap.parse_args()
    arrays = {}
    for k, (split, n) in enumerate(SIZES.items()):
        s = load_fmnist(split, args.root)
        idx = balanced_subset(s.labels, n, SEED + k)
        arrays[f"{split}_images"] = s.images[idx]
        arrays[f"{split}_labels"] = s.labels[idx].astype(np.uint8)
        arrays[f"{split}_source_index"] = idx.astype(np.int32)
        print(split, arrays[f"{split}_images"].shape, np.bincount(s.labels[idx], minlength=NUM_CLASSES).tolist())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
