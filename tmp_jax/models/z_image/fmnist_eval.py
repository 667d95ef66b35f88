"""What ``tmp_jax.evaluate`` needs of a Z-Image model on the embedded Fashion-MNIST task (registered on the arch
as ``heldout_inputs`` / ``heldout_predictions``): held-out inputs in token space and the model's predictions.

Z-Image works on patch tokens: ``x0`` (N, tokens, patch_dim) is the patchified latent, the conditioning is the
class caption table, and the model predicts ``x0 - noise`` (its target).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def heldout_inputs(cfg: Any, latents: np.ndarray, labels: np.ndarray, noise_seed: int) -> dict[str, np.ndarray]:
    """Inputs on the sigma grid [0.05, 0.95] with fixed noise: ``x0``, ``noise``, ``sigma``, ``xt``, the captions
    ``cap`` of ``labels`` and the flow-matching ``target`` (``x0 - noise``). ``latents``: (N, C, H, W)."""
    from tmp_jax import fmnist as fm
    from tmp_jax.sampling import patchify

    x0 = np.asarray(patchify(jnp.asarray(latents), cfg.all_patch_size[0]))  # [N, tokens, patch_dim]
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(noise_seed), x0.shape, jnp.float32))
    sigma = np.linspace(0.05, 0.95, len(x0), dtype=np.float32)
    s = sigma.reshape(-1, 1, 1)
    cap = fm.caption_table(cfg.cap_feat_dim)[labels]
    return {"x0": x0, "noise": noise, "sigma": sigma, "xt": (1 - s) * x0 + s * noise, "cap": cap, "target": x0 - noise}


@partial(jax.jit, static_argnums=(0, 1))
def _predict(graphdef: Any, lay_key: tuple, state: Any, arrays: dict, xt: jax.Array, sigma: jax.Array, cap: jax.Array):
    from tmp_jax.sampling import FixedLayout, predict_tokens

    lay = FixedLayout(arrays, *lay_key)
    return predict_tokens(nnx.merge(graphdef, state), lay, xt, sigma, cap).astype(jnp.float32)


def heldout_predictions(model: Any, inp: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """The model's prediction (``x0 - noise``, (N, tokens, patch_dim), float32) on ``inp['xt']``, in batches of one
    compiled shape (the last batch padded)."""
    from tmp_jax.sampling import fixed_layout

    n = len(inp["xt"])
    bs = min(batch, n)
    lay = fixed_layout(model.config, bs)
    key = (lay.n_img, lay.patch, lay.channels, lay.hw)
    graphdef, state = nnx.split(model)
    out = []
    for i in range(0, n, bs):
        xt, sg, cap = (inp[k][i : i + bs] for k in ("xt", "sigma", "cap"))
        m = len(xt)
        if m < bs:  # keep one compiled shape
            pad = lambda a, k=bs - m: np.concatenate([a, np.repeat(a[-1:], k, 0)])  # noqa: E731
            xt, sg, cap = pad(xt), pad(sg), pad(cap)
        out.append(np.asarray(_predict(graphdef, key, state, lay.arrays, xt, sg, cap))[:m])
    return np.concatenate(out)
