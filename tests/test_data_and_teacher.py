"""Fashion-MNIST subset, latents, conditioning, the committed evaluator and the Z-Image teacher (CPU)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.zimage import read_config
from tmp_jax import data
from tmp_jax import evaluator as ev
from tmp_jax.models.z_image import ZImageTransformer
from tmp_jax.models.z_image.layout import make_layout
from tmp_jax.models.z_image.model import init_abstract
from tmp_jax.sampling import fill, fixed_layout, heldout_fm_mse, patchify, sigma_schedule, unpatchify

TEACHER = Path(data.ASSETS) / "zimage-fmnist"


@pytest.fixture(scope="module")
def test_split() -> data.Split:
    return data.load_subset("test")


def test_subset_shapes_and_balance():
    for split, n in (("train", 4096), ("test", 2048)):
        s = data.load_subset(split)
        assert s.images.shape == (n, 28, 28) and s.images.dtype == np.uint8
        assert s.labels.shape == (n,)
        counts = np.bincount(s.labels, minlength=data.NUM_CLASSES)
        assert len(counts) == data.NUM_CLASSES and counts.max() - counts.min() <= 1 and counts.sum() == n
        assert s.images.std() > 50  # real images, not blanks
    assert data.SUBSET_PATH.stat().st_size < 8e6


def test_unshuffle_round_trip_exact(test_split):
    imgs = test_split.images[:64]
    lat = data.to_latents(imgs)
    assert lat.shape == (64, 4, 14, 14) and lat.dtype == np.float32
    assert lat.min() >= -1.0 and lat.max() <= 1.0
    np.testing.assert_array_equal(data.from_latents(lat), imgs)
    # channel 2*dy + dx holds pixel (2i + dy, 2j + dx)
    for dy in (0, 1):
        for dx in (0, 1):
            np.testing.assert_allclose(lat[:, 2 * dy + dx], imgs[:, dy::2, dx::2] / 127.5 - 1, atol=1e-6)
    grid = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(1, 28, 28)  # every uint8 value
    np.testing.assert_array_equal(data.from_latents(data.to_latents(grid)), grid)


def test_conditioning_is_fixed_and_distinct():
    t1, t2 = data.caption_table(32), data.caption_table(32)
    np.testing.assert_array_equal(t1, t2)
    assert t1.shape == (data.NUM_CLASSES + 1, data.CAPTION_LEN, 32)
    flat = t1.reshape(len(t1), -1)
    d = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
    assert (d + np.eye(len(t1)) * 1e9).min() > 1.0  # every class and the null caption differ
    caps = data.caption_features([0, data.NULL_LABEL], 32)
    np.testing.assert_array_equal(caps[1], t1[data.NULL_LABEL])
    ids = data.hunyuan_prompt_ids([3, data.NULL_LABEL], bos_id=1, eos_id=2, vocab_size=128)
    assert ids.shape == (2, data.HUNYUAN_PROMPT_LEN)
    assert ids[0, 0] == 1 and ids[0, -1] == 2 and ids[0, 5] == data.HUNYUAN_CLASS_BASE + 3
    assert (ids[1, 1:-1] == data.HUNYUAN_WORD_IDS["null"]).all()
    with pytest.raises(ValueError):
        data.hunyuan_prompt_ids([0], bos_id=20, eos_id=2, vocab_size=128)


def test_fixed_layout_matches_make_layout(test_split):
    cfg = read_config(TEACHER)
    lat = data.to_latents(test_split.images[:3])
    caps = data.caption_features(test_split.labels[:3], cfg.cap_feat_dim)
    ref = make_layout(cfg, [x[:, None] for x in lat], list(caps))
    tok = patchify(jnp.asarray(lat), 2)
    got = fill(fixed_layout(cfg, 3).arrays, tok, jnp.asarray(caps))
    for k, v in ref.arrays.items():
        np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)
    np.testing.assert_array_equal(np.asarray(unpatchify(tok, 2, 4, (14, 14))), lat)
    s = sigma_schedule(10, shift=3.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and np.all(np.diff(s) < 0)


def random_init_like(cfg, seed: int = 12345) -> ZImageTransformer:
    """A model of ``cfg`` with the default init distribution (Linear kernels N(0, 1/fan_in), zero
    biases and pad tokens, unit norms), drawn with numpy: eager ``jax.random`` init of ~100 tensors
    costs several CPU seconds of tiny compilations."""
    model = init_abstract(cfg)
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        shape, name = var.get_value().shape, path[-1]
        if name == "kernel":
            val = rng.standard_normal(shape, np.float32) / np.sqrt(shape[0])
        elif name == "weight":
            val = np.ones(shape, np.float32)
        else:  # biases, pad tokens
            val = np.zeros(shape, np.float32)
        var.set_value(jnp.asarray(val))
    nnx.update(model, state)
    return model


def test_teacher_beats_random_init(test_split):
    teacher = ZImageTransformer.from_pretrained(str(TEACHER))
    cfg = teacher.config
    assert cfg.in_channels == 4 and cfg.cap_feat_dim == 32 and cfg.head_dim == sum(cfg.axes_dims)
    rand = random_init_like(cfg)
    imgs, labels = test_split.images[:256], test_split.labels[:256]
    mse_t = heldout_fm_mse(teacher, imgs, labels)
    mse_r = heldout_fm_mse(rand, imgs, labels)
    # trained: ~0.18; random init: ~2.6 (target x0 - eps has variance ~1.5)
    assert mse_t < 0.3, mse_t
    assert mse_t < 0.2 * mse_r, (mse_t, mse_r)


def test_evaluator_accuracy_and_fid(test_split):
    feats, logits = ev.features_and_logits(test_split.images)
    assert feats.shape == (2048, ev.FEATURE_DIM) and logits.shape == (2048, data.NUM_CLASSES)
    acc = float(np.mean(logits.argmax(-1) == test_split.labels))
    assert acc >= 0.9, acc
    assert ev.accuracy(test_split.images[:512], test_split.labels[:512]) == np.mean(
        logits[:512].argmax(-1) == test_split.labels[:512]
    )
    assert abs(ev.fid(feats, feats)) < 1e-3
    # a real distribution shift (inverted images) is much farther than two halves of the test set
    same = ev.fid(feats[:1024], feats[1024:])
    shifted = ev.fid(feats[:512], ev.features(255 - test_split.images[:512]))
    assert shifted > 10 * same, (same, shifted)


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_n(test_split):
    feats, logits = ev.features_and_logits(test_split.images)
    correct = logits.argmax(-1) == test_split.labels
    ref = feats[1024:]
    small = ev.bootstrap_ci(feats[:200], correct[:200], ref, reps=200)
    big = ev.bootstrap_ci(feats[:1024], correct[:1024], ref, reps=200)
    for ci, n in ((small, 200), (big, 1024)):
        lo, hi = ci["class_acc"]
        assert lo <= float(np.mean(correct[:n])) <= hi
        lo, hi = ci["fid_cls"]
        assert lo < ev.fid(feats[:n], ref) < hi and hi > 0
    width = lambda ci, k: ci[k][1] - ci[k][0]  # noqa: E731
    assert width(big, "class_acc") < 0.6 * width(small, "class_acc")
    assert width(big, "fid_cls") < 0.6 * width(small, "fid_cls")
    assert ev.bootstrap_ci(feats[:200], correct[:200], ref, reps=200) == small  # seeded: reproducible
