"""HunyuanImage-3.0's hooks for block-by-block calibration with streamed weights
(:mod:`tmp_jax.streamed_calibration`, registered as the arch's ``streamed``): T2I embed -> decoder layers ->
image head. The op steps run on the runner's stem view (``lm_head`` / ``ln_f`` are not in it, so never loaded);
every step function is a module-level function (traced under ``jax.jit`` with the function static).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tmp_jax.arch import StreamHooks, StreamStep
from tmp_jax.models.hunyuan_image3.model import t2i_embed, t2i_head
from tmp_jax.safetensors_io import SafetensorsReader

Carry = dict[str, Any]  # one micro-batch's activations between steps


def stem_view(m: Any) -> nnx.Module:
    """The runner's stem view (``lm_head`` / ``ln_f`` are not in it, so never loaded)."""
    from tmp_jax.models.hunyuan_image3.runner import _Stem

    return _Stem(m)


def _embed(stem: Any, inp: dict, carry: None) -> Carry:
    e = t2i_embed(
        stem.wte,
        stem.patch_embed,
        stem.time_embed,
        stem.timestep_emb,
        inp["input_ids"],
        inp["latents"],
        jnp.asarray(inp["timestep"]),
        inp["valid_lengths"],
        image_token_id=stem.image_token_id,
        head_dim=stem.head_dim,
        rope_theta=stem.rope_theta,
    )
    return {"x": e.pop("embeds"), **e}


def _layer(blk: Any, c: Carry) -> Carry:
    return {**c, "x": blk(c["x"], c["cos"], c["sin"], c["mask"], c["token_mask"])}


def _head(stem: Any, inp: dict, c: Carry) -> jax.Array:
    _, _, th, tw = inp["latents"].shape
    return t2i_head(stem.final_layer, stem.time_embed_2, c["x"], c["image_index"], jnp.asarray(inp["timestep"]), th, tw)


def schedule(cfg: Any) -> list[StreamStep]:
    layers = [StreamStep("block", _layer, ("model", "layers", i)) for i in range(cfg.num_hidden_layers)]
    return [StreamStep("op", _embed), *layers, StreamStep("op", _head)]


HOOKS = StreamHooks("hunyuan", reader=SafetensorsReader, stem_view=stem_view, schedule=schedule)
