"""Z-Image's hooks for block-by-block calibration with streamed weights (:mod:`tmp_jax.streamed_calibration`,
registered as the arch's ``streamed``): embed -> noise_refiner (image stream) -> context_refiner (caption
stream) -> unify -> layers -> head. The op steps run on the runner's stem view; every step function is a
module-level function (traced under ``jax.jit`` with the function static).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tmp_jax.arch import StreamHooks, StreamStep
from tmp_jax.models.z_image.checkpoint import open_reader
from tmp_jax.models.z_image.layout import key_mask
from tmp_jax.models.z_image.model import ZImageTransformer

Carry = dict[str, Any]  # one micro-batch's activations between steps


def stem_view(m: Any) -> nnx.Module:
    """The runner's stem view (embedders, pad tokens, final layers, width-free config)."""
    from tmp_jax.models.z_image.runner import _Stem

    return _Stem(m)


def _embed(stem: Any, inp: dict, carry: None) -> Carry:
    a = inp["arrays"]
    e = ZImageTransformer.embed(stem, a, jnp.asarray(inp["t"]), inp["patch_key"])
    return {
        "c": e["c"],
        "img": e["img"],
        "cap": e["cap"],
        "img_cos": e["img_cs"][0],
        "img_sin": e["img_cs"][1],
        "cap_cos": e["cap_cs"][0],
        "cap_sin": e["cap_cs"][1],
        "m_img": key_mask(a["img_valid"]),
        "m_cap": key_mask(a["cap_valid"]),
    }


def _noise_refiner(blk: Any, c: Carry) -> Carry:
    return {**c, "img": blk(c["img"], c["m_img"], c["img_cos"], c["img_sin"], c["c"])}


def _context_refiner(blk: Any, c: Carry) -> Carry:
    return {**c, "cap": blk(c["cap"], c["m_cap"], c["cap_cos"], c["cap_sin"])}


def _unify(stem: Any, inp: dict, c: Carry) -> Carry:
    e = {"img_cs": (c["img_cos"], c["img_sin"]), "cap_cs": (c["cap_cos"], c["cap_sin"])}
    x, cos, sin, mask = ZImageTransformer.unify(None, inp["arrays"], c["img"], c["cap"], e)
    return {"c": c["c"], "x": x, "cos": cos, "sin": sin, "mask": mask}


def _layer(blk: Any, c: Carry) -> Carry:
    return {**c, "x": blk(c["x"], c["mask"], c["cos"], c["sin"], c["c"])}


def _head(stem: Any, inp: dict, c: Carry) -> jax.Array:
    return stem.all_final_layer[inp["patch_key"]](c["x"], c["c"])


def schedule(cfg: Any) -> list[StreamStep]:
    s = [StreamStep("op", _embed)]
    s += [StreamStep("block", _noise_refiner, ("noise_refiner", i)) for i in range(len(cfg.stack("noise_refiner")))]
    s += [
        StreamStep("block", _context_refiner, ("context_refiner", i)) for i in range(len(cfg.stack("context_refiner")))
    ]
    s.append(StreamStep("op", _unify))
    s += [StreamStep("block", _layer, ("layers", i)) for i in range(len(cfg.stack("layers")))]
    return [*s, StreamStep("op", _head)]


HOOKS = StreamHooks("zimage", reader=open_reader, stem_view=stem_view, schedule=schedule)
