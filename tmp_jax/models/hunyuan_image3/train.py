"""HunyuanImage-3.0 on Fashion-MNIST: the embedded teacher's config and token layout, training forward
(with the router load-balancing loss), the calibration / distillation data hook. The official-layout ``save``
lives in ``checkpoint`` (re-exported here).

The tiny teacher (:data:`FMNIST_CONFIG`, ``tmp_jax/assets/hunyuan-fmnist``) denoises pixel-unshuffled
28x28 images, i.e. ``(4, 14, 14)`` "latents" (:func:`tmp_jax.fmnist.to_latents`); HunyuanImage's UNet patch
embedding has patch size 1, so every latent pixel is one ``<img>`` token (196 per image). Each sequence is::

    [bos] a photo of a <CLASS> [eos] <boi> <img_size> <img_ratio> <timestep> <img> * 196 <eoi>

(the release's ``prompt <boi> <img_size_k> <img_ratio_k> <timestep> <img>*(h*w) <eoi>``, with the prompt of
:func:`tmp_jax.fmnist.hunyuan_prompt_ids`; label :data:`~tmp_jax.fmnist.NULL_LABEL` gives the null prompt used
for classifier-free guidance). Every row has the same length (:data:`SEQ_LEN`), so there is no padding.

Flow matching in the HunyuanImage convention: ``x_sigma = (1 - sigma) x0 + sigma * noise``, the model gets
``timestep = 1000 * sigma`` and predicts the velocity ``noise - x0``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax import fmnist as fm
from tmp_jax.models.hunyuan_image3.checkpoint import CONFIG_EXTRA, save  # noqa: F401 (the save hook lives there)
from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config
from tmp_jax.models.hunyuan_image3.model import HunyuanImage3, attn_branch, t2i_embed, t2i_head

# Special token ids of the tiny vocabulary (the prompt words / classes use 10..29, see tmp_jax.fmnist).
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BOI_ID, IMG_SIZE_ID, IMG_RATIO_ID, EOI_ID = 40, 41, 42, 43
IMAGE_TOKEN_ID, TIMESTEP_TOKEN_ID = 44, 45
VOCAB_SIZE = 64
NUM_IMAGE_TOKENS = fm.LATENT_SIZE * fm.LATENT_SIZE  # 196
SEQ_LEN = fm.HUNYUAN_PROMPT_LEN + 4 + NUM_IMAGE_TOKENS + 1  # 208

# The embedded teacher: 6 layers, hidden 128, 8 heads of 16 in 4 KV groups, 8 routed experts of width 192
# (top-2) plus one shared expert of width 192, UNet heads of width 64; 4.85M parameters.
FMNIST_CONFIG = HunyuanImage3Config(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=192,
    moe_intermediate_size=192,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    attention_head_dim=16,
    num_experts=8,
    moe_topk=2,
    num_shared_expert=1,
    patch_embed_hidden_dim=64,
    image_base_size=fm.IMAGE_SIZE,
    vae_downsample_factor=(2, 2),
    image_token_id=IMAGE_TOKEN_ID,
    timestep_token_id=TIMESTEP_TOKEN_ID,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    max_position_embeddings=256,
    vae={"latent_channels": fm.LATENT_CHANNELS},
)


def _check_cfg(cfg: HunyuanImage3Config) -> None:
    if cfg.latent_channels != fm.LATENT_CHANNELS:
        raise ValueError(
            f"the Fashion-MNIST data has {fm.LATENT_CHANNELS} latent channels, the model has {cfg.latent_channels}"
        )
    if (cfg.image_token_id, cfg.timestep_token_id) != (IMAGE_TOKEN_ID, TIMESTEP_TOKEN_ID):
        raise ValueError(
            f"image/timestep token ids ({cfg.image_token_id}, {cfg.timestep_token_id}) are not the Fashion-MNIST "
            f"layout's ({IMAGE_TOKEN_ID}, {TIMESTEP_TOKEN_ID})"
        )


def t2i_ids(labels: np.ndarray | list[int], cfg: HunyuanImage3Config = FMNIST_CONFIG) -> np.ndarray:
    """int32 ``(B, SEQ_LEN)`` T2I sequences for class ``labels`` (:data:`~tmp_jax.fmnist.NULL_LABEL` = null)."""
    _check_cfg(cfg)
    prompt = fm.hunyuan_prompt_ids(labels, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id, vocab_size=cfg.vocab_size)
    b = prompt.shape[0]
    head = np.tile(np.array([BOI_ID, IMG_SIZE_ID, IMG_RATIO_ID, TIMESTEP_TOKEN_ID], np.int32), (b, 1))
    img = np.full((b, NUM_IMAGE_TOKENS), IMAGE_TOKEN_ID, np.int32)
    return np.concatenate([prompt, head, img, np.full((b, 1), EOI_ID, np.int32)], axis=1)


def ids_table(cfg: HunyuanImage3Config = FMNIST_CONFIG) -> np.ndarray:
    """``(NUM_CLASSES + 1, SEQ_LEN)``: row ``c`` is class ``c``'s sequence, the last row the null one."""
    return t2i_ids(np.arange(fm.NUM_CLASSES + 1), cfg)


# ----------------------------------------------------------------------------------------------------------
# Training forward (features + router load balancing)


def load_balance_loss(logits: jax.Array, topk: int, token_mask: jax.Array | None = None) -> jax.Array:
    """Switch-style auxiliary loss ``E * sum_e f_e * P_e`` of one router (1 when perfectly balanced).

    ``logits`` [N, E] fp32; ``f_e`` = fraction of the (token, slot) assignments that go to expert ``e``
    (top-k of the softmax, not differentiable), ``P_e`` = mean router probability of ``e`` (differentiable);
    padding tokens (``token_mask`` [N] false) are excluded.
    """
    n, e = logits.shape
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [N, E]
    _, idx = jax.lax.top_k(probs, topk)  # [N, k]
    w = jnp.ones((n,), jnp.float32) if token_mask is None else token_mask.reshape(n).astype(jnp.float32)
    assign = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32), axis=1) * w[:, None]  # [N, E]
    denom = jnp.maximum(jnp.sum(w), 1.0)
    f = jax.lax.stop_gradient(jnp.sum(assign, axis=0) / (denom * topk))  # [E]
    p = jnp.sum(probs * w[:, None], axis=0) / denom  # [E]
    return e * jnp.sum(f * p)


def _layer_train(layer: nnx.Module, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, tm: jax.Array):
    """One decoder layer (the same computation as ``DecoderLayer.__call__``) and its router's balance loss."""
    x = attn_branch(layer.self_attn, layer.input_layernorm, x, cos, sin, mask, tm)
    h = layer.post_attention_layernorm(x)
    moe = layer.mlp
    logits = moe.gate(h.reshape(-1, h.shape[-1]))  # [N, E] fp32, the router's own input
    if moe.expert_mask is not None:
        logits = jnp.where(moe.expert_mask[...], logits, -jnp.inf)
    aux = load_balance_loss(logits, moe.moe_topk, tm.reshape(-1))
    return x + moe(h, tm), aux


_layer_remat = nnx.remat(_layer_train)


def forward_train_aux(model: HunyuanImage3, inputs: dict[str, Any], remat: bool = False) -> tuple:
    """Traceable T2I forward: velocity [B, C, h, w], the hidden states after every decoder layer, and the
    mean router load-balancing loss over layers (0 for a model without layers).

    ``inputs``: ``input_ids`` [B, S], ``latents`` [B, C, h, w], ``timestep`` [B] (= 1000 sigma),
    ``valid_lengths`` [B] (what :func:`tmp_jax.models.hunyuan_image3.runner.prepare_batch` returns)."""
    cfg = model.config
    lat = jnp.asarray(inputs["latents"])
    _, _, th, tw = lat.shape
    t = jnp.asarray(inputs["timestep"])
    e = t2i_embed(
        model.model.wte,
        model.patch_embed,
        model.time_embed,
        model.timestep_emb,
        jnp.asarray(inputs["input_ids"]),
        lat,
        t,
        jnp.asarray(inputs["valid_lengths"]),
        image_token_id=cfg.image_token_id,
        head_dim=cfg.attention_head_dim,
        rope_theta=cfg.rope_theta,
    )
    call = _layer_remat if remat else _layer_train
    x, feats, aux = e["embeds"], [], []
    for layer in model.model.layers:
        x, a = call(layer, x, e["cos"], e["sin"], e["mask"], e["token_mask"])
        feats.append(x)
        aux.append(a)
    out = t2i_head(model.final_layer, model.time_embed_2, x, e["image_index"], t, th, tw)
    balance = jnp.mean(jnp.stack(aux)) if aux else jnp.zeros((), jnp.float32)
    return out, feats, balance


def forward_train(model: HunyuanImage3, inputs: dict[str, Any], remat: bool = True) -> tuple:
    """The distillation hook: (velocity [B, C, h, w], hidden states after every decoder layer)."""
    out, feats, _ = forward_train_aux(model, inputs, remat)
    return out, feats


def matched_features(student_cfg: HunyuanImage3Config) -> tuple[int, ...]:
    """Student layer j matches the teacher layer with its ORIGINAL index."""
    if student_cfg.layers_kept is not None:
        return tuple(student_cfg.layers_kept)
    return tuple(range(student_cfg.num_hidden_layers))


# ----------------------------------------------------------------------------------------------------------
# Data


_SUBSET: dict[str, fm.Split] = {}


def _subset(split: str) -> fm.Split:
    if split not in _SUBSET:
        _SUBSET[split] = fm.load_subset(split)
    return _SUBSET[split]


def _load_data(data: str) -> dict[str, np.ndarray]:
    """The ``--data`` .npz (no pickles), its arrays checked: one-line errors naming the file and the array."""
    want = f"latents (N, {fm.LATENT_CHANNELS}, {fm.LATENT_SIZE}, {fm.LATENT_SIZE}) and labels (N,)"
    arrays = fm.load_training_npz(data, ("latents", "labels"), want)  # read once, then cached
    lat, lab = arrays["latents"].shape, arrays["labels"].shape
    if len(lat) != 4 or tuple(lat[1:]) != (fm.LATENT_CHANNELS, fm.LATENT_SIZE, fm.LATENT_SIZE) or not lat[0]:
        raise ValueError(f"{data}: latents has shape {lat}, expected {want}")
    if lab != (lat[0],):
        raise ValueError(f"{data}: labels has shape {lab}, expected ({lat[0]},) (one label per latent)")
    return arrays


def training_batch(cfg: HunyuanImage3Config, data: str | None, batch_size: int, seed: int, step: int) -> dict:
    """Noised training inputs for step ``step`` in the calibration format (a pure function of seed and step).

    ``data``: an .npz with clean ``latents`` (N, 4, 14, 14) and ``labels`` (N,); None = the embedded
    Fashion-MNIST train subset. 10% of the labels become the null prompt. sigma ~ logit-normal(0, 1),
    ``x_t = (1 - sigma) x0 + sigma eps``, ``timestep = 1000 sigma``.
    """
    _check_cfg(cfg)
    rng = np.random.default_rng([seed, step])
    if data is None:
        split = _subset("train")
        idx = rng.integers(0, len(split), batch_size)
        x0 = fm.to_latents(split.images[idx])  # [B, 4, 14, 14]
        labels = split.labels[idx]
    else:
        z = _load_data(data)
        idx = rng.integers(0, len(z["latents"]), batch_size)
        x0, labels = z["latents"][idx].astype(np.float32), z["labels"][idx]
    labels = np.where(rng.random(batch_size) < 0.1, fm.NULL_LABEL, labels)
    sigma = 1.0 / (1.0 + np.exp(-rng.standard_normal(batch_size)))
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    s = sigma.reshape(-1, 1, 1, 1)
    return {
        "input_ids": t2i_ids(labels, cfg),
        "latents": ((1.0 - s) * x0 + s * eps).astype(np.float32),
        "timestep": (1000.0 * sigma).astype(np.float32),
        "valid_lengths": np.full(batch_size, SEQ_LEN, np.int32),
    }


def guided_batch(cfg: HunyuanImage3Config, latents: np.ndarray, sigma: np.ndarray, labels: np.ndarray) -> dict:
    """The class-prompted states ``latents`` (P, 4, 14, 14) at noise ``sigma`` (P,), then the same with the null
    prompt: a calibration micro-batch of 2P samples whose outputs give the CFG direction (tmp_jax.trajectory)."""
    _check_cfg(cfg)
    p = len(latents)
    lab = np.concatenate([np.asarray(labels, np.int64), np.full(p, fm.NULL_LABEL, np.int64)])
    return {
        "input_ids": t2i_ids(lab, cfg),
        "latents": np.concatenate([latents, latents]).astype(np.float32),
        "timestep": (1000.0 * np.concatenate([sigma, sigma])).astype(np.float32),
        "valid_lengths": np.full(2 * p, SEQ_LEN, np.int32),
    }
