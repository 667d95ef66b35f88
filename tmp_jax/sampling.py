"""Fixed-shape Z-Image batches and Euler / CFG sampling for the Fashion-MNIST teachers (Z-Image and, at the
end of the file, HunyuanImage-3.0).

Every Fashion-MNIST latent is ``(4, 1, 14, 14)`` and every caption has :data:`~tmp_jax.fmnist.CAPTION_LEN`
tokens, so one :func:`~tmp_jax.models.z_image.layout.make_layout` serves every batch of a given size:
:func:`fixed_layout` builds it once on the host, and :func:`fill` substitutes the (noisy) image tokens
and caption features inside jitted code. Work happens in token space: :func:`patchify` is the same
permutation as ``make_layout`` (channel fastest), so Gaussian noise can be drawn per token.

Flow-matching convention (Z-Image / diffusers): ``x_sigma = (1 - sigma) x0 + sigma * noise``, the model
gets ``t = 1 - sigma`` (1 = clean) and predicts ``x0 - noise`` (the pipeline negates it into the
velocity ``d x / d sigma = noise - x0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax.fmnist import (
    CAPTION_LEN,
    LATENT_CHANNELS,
    LATENT_SIZE,
    NULL_LABEL,
    caption_table,
    from_latents,
    to_latents,
)
from tmp_jax.models.z_image.config import ZImageConfig
from tmp_jax.models.z_image.layout import make_layout


@dataclass(frozen=True)
class FixedLayout:
    """Layout arrays for ``batch`` samples of one latent size and caption length."""

    arrays: dict[str, np.ndarray]
    n_img: int  # image tokens per sample (before padding to 32)
    patch: int
    channels: int
    hw: tuple[int, int]

    @property
    def patch_key(self) -> str:
        return f"{self.patch}-1"

    @property
    def batch(self) -> int:
        return self.arrays["img"].shape[0]


def fixed_layout(
    cfg: ZImageConfig,
    batch: int,
    cap_len: int = CAPTION_LEN,
    hw: tuple[int, int] = (LATENT_SIZE, LATENT_SIZE),
    patch: int | None = None,
) -> FixedLayout:
    p = patch or cfg.all_patch_size[0]
    x = [np.zeros((cfg.in_channels, 1, *hw), np.float32)] * batch
    caps = [np.zeros((cap_len, cfg.cap_feat_dim), np.float32)] * batch
    lay = make_layout(cfg, x, caps, p, 1)
    return FixedLayout(lay.arrays, lay.ori_lens[0], p, cfg.in_channels, hw)


def patchify(latents: jax.Array, patch: int) -> jax.Array:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C), the token order and layout of ``make_layout``."""
    B, C, H, W = latents.shape
    x = latents.reshape(B, C, H // patch, patch, W // patch, patch).transpose(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(tokens: jax.Array, patch: int, channels: int, hw: tuple[int, int]) -> jax.Array:
    """Inverse of :func:`patchify`."""
    B = tokens.shape[0]
    H, W = hw
    x = tokens.reshape(B, H // patch, W // patch, patch, patch, channels).transpose(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, H, W)


def fill(arrays: dict[str, Any], img_tokens: jax.Array, cap: jax.Array) -> dict[str, Any]:
    """Substitute image tokens (B, n, patch_dim) and captions (B, L, cap_dim) into layout arrays.

    Pad rows are filled by repeating the last row like ``make_layout`` (the model replaces them by
    its pad tokens anyway)."""
    a = dict(arrays)
    for k, v in (("img", img_tokens), ("cap", cap)):
        pad = a[k].shape[1] - v.shape[1]
        a[k] = jnp.concatenate([v, jnp.repeat(v[:, -1:], pad, axis=1)], axis=1).astype(a[k].dtype)
    return a


def predict_tokens(
    model: Any,
    lay: FixedLayout | dict[str, Any],
    x_tok: jax.Array,
    sigma: jax.Array,
    cap: jax.Array,
    n_img: int | None = None,
    patch_key: str | None = None,
) -> jax.Array:
    """Model output (= predicted ``x0 - noise``) on the image tokens, (B, n, patch_dim)."""
    arrays = lay.arrays if isinstance(lay, FixedLayout) else lay
    n = n_img if n_img is not None else lay.n_img
    key = patch_key or lay.patch_key
    out = model.forward_padded(fill(arrays, x_tok, cap), 1.0 - sigma, key)
    return out[:, :n]


def flow_matching_loss(
    model: Any, lay: FixedLayout, x0_tok: jax.Array, noise: jax.Array, sigma: jax.Array, cap: jax.Array
) -> jax.Array:
    """Mean squared error of the prediction against ``x0 - noise`` at ``x_sigma``."""
    s = sigma[:, None, None]
    xt = (1.0 - s) * x0_tok + s * noise
    pred = predict_tokens(model, lay, xt, sigma, cap).astype(jnp.float32)
    return jnp.mean(jnp.square(pred - (x0_tok - noise)))


@partial(jax.jit, static_argnums=(0, 1))
def _fm_loss_jit(
    graphdef: Any,
    lay_key: tuple,
    state: Any,
    arrays: dict,
    x0: jax.Array,
    noise: jax.Array,
    sigma: jax.Array,
    cap: jax.Array,
) -> jax.Array:
    n_img, patch, channels, hw = lay_key
    lay = FixedLayout(arrays, n_img, patch, channels, hw)
    return flow_matching_loss(nnx.merge(graphdef, state), lay, x0, noise, sigma, cap)


def heldout_fm_mse(model: Any, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Flow-matching MSE on uint8 ``images`` with sigma on a fixed grid in [0.05, 0.95] (one value per
    image, in order) and fixed Gaussian noise from ``seed``: a deterministic held-out quality number.
    Z-Image or HunyuanImage (each in its own flow-matching convention)."""
    if _is_hunyuan(model):
        return _hunyuan_heldout_fm_mse(model, images, labels, seed)
    cfg: ZImageConfig = model.config
    x0 = patchify(jnp.asarray(to_latents(images)), cfg.all_patch_size[0])
    noise = jax.random.normal(jax.random.PRNGKey(seed), x0.shape, jnp.float32)
    sigma = jnp.linspace(0.05, 0.95, x0.shape[0], dtype=jnp.float32)
    cap = jnp.asarray(caption_table(cfg.cap_feat_dim)[np.asarray(labels)])
    lay = fixed_layout(cfg, x0.shape[0])
    graphdef, state = nnx.split(model)
    key = (lay.n_img, lay.patch, lay.channels, lay.hw)
    return float(_fm_loss_jit(graphdef, key, state, lay.arrays, x0, noise, sigma, cap))


def sigma_schedule(steps: int, shift: float = 1.0) -> np.ndarray:
    """``steps + 1`` sigmas from 1 to 0 (linear, then the FlowMatch shift ``s*x / (1 + (s-1) x)``)."""
    s = np.linspace(1.0, 0.0, steps + 1)
    return (shift * s / (1.0 + (shift - 1.0) * s)).astype(np.float32)


@partial(jax.jit, static_argnums=(0, 3, 4, 5, 11))
def _euler(
    graphdef: Any,
    state: Any,
    arrays: dict[str, Any],
    n_img: int,
    patch_key: str,
    use_cfg: bool,
    noise: jax.Array,
    cap: jax.Array,
    null_cap: jax.Array,
    sigmas: jax.Array,
    guidance: jax.Array,
    record: bool = False,
) -> Any:
    """Final tokens; ``record``: (final tokens, the state before every step [steps, B, tokens, dim])."""
    model = nnx.merge(graphdef, state)
    B = noise.shape[0]

    def step(x: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
        s, s_next = sigmas[i], sigmas[i + 1]
        if use_cfg:
            both = predict_tokens(
                model,
                arrays,
                jnp.concatenate([x, x]),
                jnp.full((2 * B,), s),
                jnp.concatenate([cap, null_cap]),
                n_img,
                patch_key,
            )
            cond, unc = both[:B], both[B:]
            pred = unc + guidance * (cond - unc)
        else:
            pred = predict_tokens(model, arrays, x, jnp.full((B,), s), cap, n_img, patch_key)
        # velocity d x / d sigma = noise - x0 = -pred
        return x - (s_next - s) * pred.astype(jnp.float32), x if record else None

    x, states = jax.lax.scan(step, noise, jnp.arange(sigmas.shape[0] - 1))
    return (x, states) if record else x


def sample_latents(
    model: Any,
    labels: np.ndarray | list[int],
    *,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 3.0,
    shift: float = 1.0,
    batch: int = 256,
    record: bool = False,
) -> Any:
    """Euler sampling with classifier-free guidance -> float32 latents (N, 4, 14, 14).

    The initial noise of sample ``i`` depends only on ``(seed, i)``-ordered draws of the whole set,
    so results do not depend on ``batch``. ``guidance == 1`` skips the unconditional pass. Z-Image or
    HunyuanImage (class token sequences, the null prompt for CFG). ``record``: ``(latents, states)`` with
    ``states`` (N, steps, 4, 14, 14) the sampler's state before each step (at ``sigma_schedule(steps,
    shift)[i]``, pure noise first): the teacher's own trajectory (:mod:`tmp_jax.trajectory`).
    """
    labels = np.asarray(labels, np.int64).reshape(-1)
    if _is_hunyuan(model):
        return _hunyuan_sample_latents(
            model, labels, seed=seed, steps=steps, guidance=guidance, shift=shift, batch=batch, record=record
        )
    cfg: ZImageConfig = model.config
    N = len(labels)
    table = caption_table(cfg.cap_feat_dim)
    hw = (LATENT_SIZE, LATENT_SIZE)
    p = cfg.all_patch_size[0]
    n_tok, pdim = (hw[0] // p) * (hw[1] // p), p * p * cfg.in_channels
    noise_all = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (N, n_tok, pdim), jnp.float32))
    use_cfg = guidance != 1.0
    bs = min(batch, N)
    lay = fixed_layout(cfg, 2 * bs if use_cfg else bs, hw=hw)
    graphdef, state = nnx.split(model)
    sig = jnp.asarray(sigma_schedule(steps, shift))
    out, traj = [], []
    for i in range(0, N, bs):
        lab = labels[i : i + bs]
        nz = noise_all[i : i + bs]
        n = len(lab)
        if n < bs:  # keep one compiled shape
            lab = np.concatenate([lab, np.zeros(bs - n, np.int64)])
            nz = np.concatenate([nz, np.zeros((bs - n, n_tok, pdim), np.float32)])
        x = _euler(
            graphdef,
            state,
            lay.arrays,
            lay.n_img,
            lay.patch_key,
            use_cfg,
            jnp.asarray(nz),
            jnp.asarray(table[lab]),
            jnp.asarray(np.repeat(table[NULL_LABEL : NULL_LABEL + 1], bs, 0)),
            sig,
            jnp.float32(guidance),
            record,
        )
        if record:
            x, st = x  # st [steps, B, tokens, dim] -> [B, steps, C, H, W]
            st = unpatchify(st.reshape(-1, *st.shape[2:]), p, cfg.in_channels, hw)
            traj.append(np.swapaxes(np.asarray(st).reshape(steps, bs, *st.shape[1:]), 0, 1)[:n])
        out.append(np.asarray(unpatchify(x, p, cfg.in_channels, hw))[:n])
    lat = np.concatenate(out).astype(np.float32)
    return (lat, np.concatenate(traj).astype(np.float32)) if record else lat


def sample_images(model: Any, labels: np.ndarray | list[int], **kw: Any) -> np.ndarray:
    """:func:`sample_latents` decoded to uint8 (N, 28, 28) images."""
    lat = sample_latents(model, labels, **kw)
    if lat.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"expected {LATENT_CHANNELS}-channel latents, got {lat.shape}")
    return from_latents(lat)


# ----------------------------------------------------------------------------------------------
# HunyuanImage-3.0 (tmp_jax.models.hunyuan_image3.train has the token layout)
#
# Convention there: x_sigma = (1 - sigma) x0 + sigma * noise, timestep = 1000 * sigma, the model predicts
# the velocity noise - x0 directly on (B, 4, 14, 14) latents; conditioning is a class token sequence and
# CFG uses the null prompt's sequence.


def _is_hunyuan(model: Any) -> bool:
    return getattr(model, "ARCH", None) == "hunyuan"


@partial(jax.jit, static_argnums=(0,))
def _hy_velocity(graphdef: Any, state: Any, ids: jax.Array, xt: jax.Array, sigma: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    return model(ids, xt, 1000.0 * sigma).astype(jnp.float32)


def hunyuan_velocity(model: Any, ids: np.ndarray, xt: np.ndarray, sigma: np.ndarray, batch: int = 256) -> np.ndarray:
    """The model's velocity (``noise - x0``) on ``xt`` (N, C, h, w), in batches of one compiled shape."""
    n = len(xt)
    bs = min(batch, n)
    graphdef, state = nnx.split(model)
    out = []
    for i in range(0, n, bs):
        a, x, s = ids[i : i + bs], xt[i : i + bs], sigma[i : i + bs]
        m = len(x)
        if m < bs:  # keep one compiled shape
            a, x, s = (np.concatenate([v, np.repeat(v[-1:], bs - m, 0)]) for v in (a, x, s))
        out.append(np.asarray(_hy_velocity(graphdef, state, jnp.asarray(a), jnp.asarray(x), jnp.asarray(s)))[:m])
    return np.concatenate(out)


def _hunyuan_heldout_fm_mse(model: Any, images: np.ndarray, labels: np.ndarray, seed: int) -> float:
    from tmp_jax.models.hunyuan_image3.train import t2i_ids

    x0 = to_latents(images)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), x0.shape, jnp.float32))
    sigma = np.linspace(0.05, 0.95, x0.shape[0], dtype=np.float32)
    s = sigma[:, None, None, None]
    v = hunyuan_velocity(model, t2i_ids(labels, model.config), (1 - s) * x0 + s * noise, sigma)
    return float(np.mean(np.square(v - (noise - x0))))


@partial(jax.jit, static_argnums=(0, 2, 8))
def _hy_euler(
    graphdef: Any,
    state: Any,
    use_cfg: bool,
    noise: jax.Array,
    ids: jax.Array,
    null_ids: jax.Array,
    sigmas: jax.Array,
    guidance: jax.Array,
    record: bool = False,
) -> Any:
    model = nnx.merge(graphdef, state)
    B = noise.shape[0]

    def step(x: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
        s, s_next = sigmas[i], sigmas[i + 1]
        if use_cfg:
            both = model(jnp.concatenate([ids, null_ids]), jnp.concatenate([x, x]), jnp.full((2 * B,), 1000.0 * s))
            cond, unc = both[:B].astype(jnp.float32), both[B:].astype(jnp.float32)
            v = unc + guidance * (cond - unc)
        else:
            v = model(ids, x, jnp.full((B,), 1000.0 * s)).astype(jnp.float32)
        return x + (s_next - s) * v, x if record else None  # v = d x / d sigma = noise - x0

    x, states = jax.lax.scan(step, noise, jnp.arange(sigmas.shape[0] - 1))
    return (x, states) if record else x


def _hunyuan_sample_latents(
    model: Any,
    labels: np.ndarray,
    *,
    seed: int,
    steps: int,
    guidance: float,
    shift: float,
    batch: int,
    record: bool = False,
) -> Any:
    from tmp_jax.models.hunyuan_image3.train import ids_table

    table = ids_table(model.config)
    N = len(labels)
    shape = (model.config.latent_channels, LATENT_SIZE, LATENT_SIZE)
    noise_all = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (N, *shape), jnp.float32))
    use_cfg = guidance != 1.0
    bs = min(batch, N)
    graphdef, state = nnx.split(model)
    sig = jnp.asarray(sigma_schedule(steps, shift))
    null_ids = jnp.asarray(np.repeat(table[NULL_LABEL : NULL_LABEL + 1], bs, 0))
    out, traj = [], []
    for i in range(0, N, bs):
        lab, nz = labels[i : i + bs], noise_all[i : i + bs]
        n = len(lab)
        if n < bs:  # keep one compiled shape
            lab = np.concatenate([lab, np.zeros(bs - n, np.int64)])
            nz = np.concatenate([nz, np.zeros((bs - n, *shape), np.float32)])
        x = _hy_euler(
            graphdef,
            state,
            use_cfg,
            jnp.asarray(nz),
            jnp.asarray(table[lab]),
            null_ids,
            sig,
            jnp.float32(guidance),
            record,
        )
        if record:
            x, st = x  # [steps, B, C, H, W] -> [B, steps, C, H, W]
            traj.append(np.swapaxes(np.asarray(st), 0, 1)[:n])
        out.append(np.asarray(x)[:n])
    lat = np.concatenate(out).astype(np.float32)
    return (lat, np.concatenate(traj).astype(np.float32)) if record else lat
