"""What ``tmp_jax.evaluate`` needs of a HunyuanImage-3.0 model on the embedded Fashion-MNIST task (registered on
the arch as ``heldout_inputs`` / ``heldout_predictions``): held-out inputs and the model's predictions.

HunyuanImage works on latents (N, 4, 14, 14) inside a token sequence: the conditioning is the class prompt's
token ids and the model predicts the velocity ``noise - x0`` (its target).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def heldout_inputs(cfg: Any, latents: np.ndarray, labels: np.ndarray, noise_seed: int) -> dict[str, np.ndarray]:
    """Inputs on the sigma grid [0.05, 0.95] with fixed noise: ``x0``, ``noise``, ``sigma``, ``xt``, the prompt
    token ``ids`` of ``labels`` and the flow-matching ``target`` (``noise - x0``)."""
    from tmp_jax.models.hunyuan_image3.train import t2i_ids

    x0 = np.asarray(latents, np.float32)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(noise_seed), x0.shape, jnp.float32))
    sigma = np.linspace(0.05, 0.95, len(x0), dtype=np.float32)
    s = sigma.reshape(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    return {"x0": x0, "noise": noise, "sigma": sigma, "xt": xt, "ids": t2i_ids(labels, cfg), "target": noise - x0}


def heldout_predictions(model: Any, inp: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """The model's velocity (``noise - x0``, (N, C, h, w), float32) on ``inp['xt']``."""
    from tmp_jax.sampling import hunyuan_velocity

    return hunyuan_velocity(model, inp["ids"], inp["xt"], inp["sigma"], batch)
