"""Frozen Fashion-MNIST classifier used to score generated images (accuracy and FID_cls).

A small Flax NNX CNN (conv32-pool-conv64-pool-conv128-fc128-fc10, ReLU, 3x3 'SAME') trained on the full
60k Fashion-MNIST train split by ``scripts/train_teachers.py --model evaluator`` and committed as
``tmp_jax/assets/evaluator.safetensors`` (keys are the NNX state paths joined by dots, fp32).

* :func:`load_evaluator` returns the frozen model; the module-level helpers use it by default.
* :func:`features` gives the 128-d penultimate (post-ReLU) features used for FID_cls,
  :func:`fid` the Fréchet distance between two feature sets, :func:`accuracy` the top-1 accuracy.

Images are uint8 ``(N, 28, 28)`` (divided by 255) or floats already in [0, 1].
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax.fmnist import ASSETS, NUM_CLASSES, Split

EVALUATOR_PATH = ASSETS / "evaluator.safetensors"
FEATURE_DIM = 128


class Conv2d(nnx.Module):
    """3x3 'SAME' convolution, NHWC, kernel (3, 3, in, out) + bias."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        std = (2.0 / (9 * cin)) ** 0.5
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (3, 3, cin, cout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + self.bias[...]


class Dense(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        std = (2.0 / cin) ** 0.5
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (cin, cout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...] + self.bias[...]


def _pool(x: jax.Array) -> jax.Array:
    B, H, W, C = x.shape
    return x.reshape(B, H // 2, 2, W // 2, 2, C).max(axis=(2, 4))


class EvalCNN(nnx.Module):
    """28x28x1 -> 128 features -> 10 logits."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = Conv2d(1, 32, rngs=rngs)
        self.conv2 = Conv2d(32, 64, rngs=rngs)
        self.conv3 = Conv2d(64, 128, rngs=rngs)
        self.fc1 = Dense(7 * 7 * 128, FEATURE_DIM, rngs=rngs)
        self.fc2 = Dense(FEATURE_DIM, NUM_CLASSES, rngs=rngs)

    def features(self, x: jax.Array, dropout_key: jax.Array | None = None, rate: float = 0.0) -> jax.Array:
        """x: (B, 28, 28) in [0, 1] -> (B, 128) post-ReLU features."""
        h = (x[..., None] - 0.286) / 0.353  # Fashion-MNIST pixel mean / std
        h = _pool(jax.nn.relu(self.conv1(h)))  # 14x14x32
        h = _pool(jax.nn.relu(self.conv2(h)))  # 7x7x64
        h = jax.nn.relu(self.conv3(h))  # 7x7x128
        if dropout_key is not None and rate > 0:
            k1, dropout_key = jax.random.split(dropout_key)
            h = h * jax.random.bernoulli(k1, 1 - rate, h.shape) / (1 - rate)
        h = jax.nn.relu(self.fc1(h.reshape(h.shape[0], -1)))
        if dropout_key is not None and rate > 0:
            h = h * jax.random.bernoulli(dropout_key, 1 - rate, h.shape) / (1 - rate)
        return h

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None, rate: float = 0.0) -> jax.Array:
        return self.fc2(self.features(x, dropout_key, rate))


# ----------------------------------------------------------------------------------------------
# Save / load


def _flat(model: nnx.Module) -> dict[str, Any]:
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_evaluator(model: EvalCNN, path: str | os.PathLike[str] = EVALUATOR_PATH) -> Path:
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.asarray(v.get_value(), np.float32) for k, v in _flat(model).items()}, str(path))
    return path


def load_evaluator_from(path: str | os.PathLike[str]) -> EvalCNN:
    """Strict load: every key present with the right shape, no extra key."""
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    model = EvalCNN(rngs=nnx.Rngs(0))
    flat = _flat(model)
    if set(tensors) != set(flat):
        raise ValueError(f"{path}: keys {sorted(set(tensors) ^ set(flat))} missing or unexpected")
    for k, var in flat.items():
        if tensors[k].shape != var.get_value().shape:
            raise ValueError(f"{path}: {k} has shape {tensors[k].shape}, expected {var.get_value().shape}")
        var.set_value(jnp.asarray(tensors[k], jnp.float32))
    return model


@lru_cache(maxsize=4)
def load_evaluator(path: str | None = None) -> EvalCNN:
    """The committed frozen evaluator (cached)."""
    return load_evaluator_from(path or EVALUATOR_PATH)


# ----------------------------------------------------------------------------------------------
# Scoring


def _as_unit(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.shape[-2:] != (28, 28) or x.ndim != 3:
        raise ValueError(f"expected (N, 28, 28) images, got {x.shape}")
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


@lru_cache(maxsize=4)
def _jitted(model: EvalCNN) -> Callable:
    """One compiled function giving (features, logits), so scoring compiles once per batch shape."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(state: Any, x: jax.Array) -> jax.Array:
        m = nnx.merge(graphdef, state)
        f = m.features(x)
        return jnp.concatenate([f, m.fc2(f)], axis=-1)

    return lambda x: both(state, x)


def _batched(fn: Callable, x: np.ndarray, batch: int) -> np.ndarray:
    outs = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        n = len(xb)
        if n < batch and len(x) > batch:  # keep one compiled shape
            xb = np.concatenate([xb, np.zeros((batch - n, *xb.shape[1:]), xb.dtype)])
        outs.append(np.asarray(fn(jnp.asarray(xb)))[:n])
    return np.concatenate(outs)


def features_and_logits(
    images: np.ndarray, model: EvalCNN | None = None, batch: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 128) penultimate features and (N, 10) logits in one pass."""
    out = _batched(_jitted(model or load_evaluator()), _as_unit(images), batch)
    return out[:, :FEATURE_DIM], out[:, FEATURE_DIM:]


def features(images: np.ndarray, model: EvalCNN | None = None, batch: int = 512) -> np.ndarray:
    """(N, 128) float32 penultimate features."""
    return features_and_logits(images, model, batch)[0]


def logits(images: np.ndarray, model: EvalCNN | None = None, batch: int = 512) -> np.ndarray:
    return features_and_logits(images, model, batch)[1]


def predict(images: np.ndarray, model: EvalCNN | None = None) -> np.ndarray:
    return logits(images, model).argmax(-1)


def accuracy(images: np.ndarray, labels: np.ndarray, model: EvalCNN | None = None) -> float:
    """Top-1 accuracy of the evaluator on (images, labels)."""
    return float(np.mean(predict(images, model) == np.asarray(labels)))


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    ``tr sqrt(Ca Cb)`` is computed as ``sum sqrt(eig(sqrt(Ca) Cb sqrt(Ca)))``: both matrices are
    symmetric PSD, so this is stable even when ReLU features leave the covariances singular.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (N, D) feature sets of one width, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    sa = _sqrtm_psd(ca)
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(sa @ cb @ sa), 0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * tr_covmean)


def bootstrap_ci(
    feats: np.ndarray,
    correct: np.ndarray,
    ref_feats: np.ndarray,
    reps: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Bias-corrected percentile bootstrap intervals of class accuracy and FID_cls over the samples.

    ``feats`` (N, D) are the samples' evaluator features and ``correct`` (N,) whether each was classified as its
    conditioning label; each replicate redraws N samples with replacement (same draw for both metrics). The
    reference set (``ref_feats``, the test subset) is held fixed: the interval is the sampling noise of the
    model's own samples, which is what separates two rows computed against the same reference. The reference
    covariance's square root is computed once (``tr sqrt(Ca Cb) = sum sqrt(eig(sqrt(Cb) Ca sqrt(Cb)))``).
    Returns ``{"class_acc": (lo, hi), "fid_cls": (lo, hi)}``."""
    a = np.asarray(feats, np.float64)
    b = np.asarray(ref_feats, np.float64)
    ok = np.asarray(correct, np.float64)
    if a.ndim != 2 or len(ok) != len(a):
        raise ValueError(f"expected features (N, D) and N correctness flags, got {a.shape} and {ok.shape}")
    mu_b, cb = b.mean(0), np.cov(b, rowvar=False)
    sb, tr_b = _sqrtm_psd(cb), np.trace(cb)
    rng = np.random.default_rng(seed)
    accs, fids = np.empty(reps), np.empty(reps)
    for r in range(reps):
        idx = rng.integers(0, len(a), len(a))
        x = a[idx]
        mu, ca = x.mean(0), np.cov(x, rowvar=False)
        tr_cov = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(sb @ ca @ sb), 0, None)))
        fids[r] = np.sum((mu - mu_b) ** 2) + np.trace(ca) + tr_b - 2 * tr_cov
        accs[r] = ok[idx].mean()
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    # a replicate repeats samples, which lowers the rank of its covariance and biases its FID upward (by more
    # than the spread at N = 200, D = 128), so plain percentiles of the replicates can miss the estimate itself:
    # the replicates are shifted by their mean bias (mean - estimate) first; accuracy's bias is ~0
    out = {}
    for name, t, r_ in (("class_acc", ok.mean(), accs), ("fid_cls", fid(a, b), fids)):
        lo, hi = np.percentile(r_ - (r_.mean() - t), q)
        out[name] = (float(lo), float(hi))
    return out


# ----------------------------------------------------------------------------------------------
# Training (runs on the GPU in scripts/train_teachers.py; a few seconds of compute)


def train_evaluator(
    train: Split,
    test: Split,
    *,
    epochs: int = 15,
    batch: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[EvalCNN, dict[str, float]]:
    """AdamW + cosine decay, dropout 0.25, random horizontal flips; returns (model, metrics)."""
    import optax

    model = EvalCNN(rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    n = len(train)
    steps_per_epoch = n // batch
    total = epochs * steps_per_epoch
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(500, total // 10 + 1), total), weight_decay=1e-4)
    opt_state = tx.init(params)
    x_all = jnp.asarray(_as_unit(train.images))
    y_all = jnp.asarray(train.labels, jnp.int32)

    def loss_fn(p: Any, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
        out = nnx.merge(graphdef, p)(x, key, 0.25)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    @jax.jit
    def epoch_fn(p: Any, o: Any, key: jax.Array, x_all: jax.Array, y_all: jax.Array) -> tuple[Any, Any, jax.Array]:
        kp, key = jax.random.split(key)
        perm = jax.random.permutation(kp, n)[: steps_per_epoch * batch].reshape(steps_per_epoch, batch)

        def step(carry: tuple, idx: jax.Array) -> tuple:
            p, o, key = carry
            key, kf, kd = jax.random.split(key, 3)
            x = x_all[idx]
            flip = jax.random.bernoulli(kf, 0.5, (batch, 1, 1))
            x = jnp.where(flip, x[:, :, ::-1], x)
            loss, g = jax.value_and_grad(loss_fn)(p, x, y_all[idx], kd)
            upd, o = tx.update(g, o, p)
            return (optax.apply_updates(p, upd), o, key), loss

        (p, o, _), losses = jax.lax.scan(step, (p, o, key), perm)
        return p, o, losses.mean()

    key = jax.random.PRNGKey(seed)
    t0 = time.time()
    for ep in range(epochs):
        key, k = jax.random.split(key)
        params, opt_state, loss = epoch_fn(params, opt_state, k, x_all, y_all)
        log(f"evaluator epoch {ep + 1}/{epochs} loss {float(loss):.4f} ({time.time() - t0:.1f}s)")
    model = nnx.merge(graphdef, params)
    acc = accuracy(test.images, test.labels, model)
    log(f"evaluator test accuracy {acc:.4f}")
    return model, {"test_accuracy": acc, "train_seconds": time.time() - t0}
