"""Z-Image's prunable structure (the TMP tree spec) and its architecture hooks.

Tree: model → stages (noise_refiner over image tokens, context_refiner over caption tokens, layers
over the unified sequence) → blocks (droppable) → sub-layers ``attention`` (heads) and
``feed_forward`` (FFN channels), each droppable (level 0 skips the residual branch).

Coupled slices: a head = columns ``[h*hd, (h+1)*hd)`` of to_q / to_k / to_v kernels (``(in, out)``
layout) and rows of to_out.0; an FFN channel = a column of w1 and w3 and a row of w2.
Export constraint: the stock diffusers class has ONE refiner count for both refiner stacks, uniform
widths and contiguous layers; anything else exports through our per-block subclass.

Omni/Edit models (``siglip_feat_dim`` set): the ``siglip_refiner`` blocks are deliberately UNPRUNABLE.
They form one stage node ``siglip_refiner`` (token stream ``siglip``) that owns all their parameters
and has no genes, so parameter accounting stays exact and the stack always keeps
``n_refiner_layers`` full-width blocks (the count diffusers ties to the other refiners). Why: T2I
calibration has no SigLIP tokens, so importance for these blocks cannot be measured there, and they
are ~5% of the Omni model. The SigLIP embedder and pad token are root parameters like the caption
embedder. FLOPs: the stage's matmuls count ``tokens['siglip']`` (else 'all') tokens; its attention
scores are not counted (no attention node).
"""

from __future__ import annotations

import importlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from tmp_jax import arch
from tmp_jax.models.z_image.config import ZImageConfig
from tmp_jax.models.z_image.spec import (  # noqa: F401 - re-exported: the spec's old import path
    TOKENS,
    _shapes,
    build_spec,
    init_abstract,
    init_random,
    path_map,
    pruned_config,
    synthetic_calib,
)


def _runner():
    from tmp_jax.models.z_image import runner

    return runner


def _ti2i():
    from tmp_jax.models.z_image import ti2i

    return ti2i


# TI2I (Omni/Edit) micro-batches: the omni path's hooks, picked per micro-batch by its task tag
TI2I_HOOKS: dict[str, Any] = {
    "prepare_batch": lambda cfg, b: _ti2i().prepare_batch(cfg, b),
    "forward": lambda m, x: _ti2i().forward(m, x),
    "forward_pruned": lambda m, tree, a, x, refits=None: _ti2i().forward_pruned(m, tree, a, x, refits),
    "forward_masked": lambda m, view, x: _ti2i().forward_masked(m, view, x),
    "collect_stats": lambda m, x: _ti2i().collect_stats(m, x),
    "forward_train": lambda m, x, remat=True: _ti2i().forward_train(m, x, remat),
    "synthetic_calib": lambda cfg, n, batch=4, seed=0: _ti2i().synthetic_ti2i_calib(cfg, n, batch, seed),
    "training_batch": None,  # no TI2I data pipeline: distil TI2I from a calibration set
}


def _fmnist_eval():
    from tmp_jax.models.z_image import fmnist_eval

    return fmnist_eval


def _checkpoint() -> Any:  # key table, config reader, save (lazy: it reaches safetensors_io)
    from tmp_jax.models.z_image import checkpoint

    return checkpoint


def _load(path: str, dtype: Any = jnp.float32, mesh: Any = None) -> Any:
    from tmp_jax.models.z_image.model import load_zimage

    return load_zimage(path, dtype=dtype, mesh=mesh)


HOOKS = arch.register(
    arch.ArchHooks(
        name="zimage",
        build_spec=build_spec,
        pruned_config=pruned_config,
        path_map=path_map,
        init_abstract=init_abstract,
        init_random=init_random,
        **arch.runner_hooks("tmp_jax.models.z_image.runner"),
        forward_masked=lambda m, view, x: _runner().forward_masked(m, view, x),
        synthetic_calib=synthetic_calib,
        load=_load,
        forward_train=lambda m, x, remat=True: _runner().forward_train(m, x, remat),
        matched_features=lambda c: _runner().matched_features(c),
        training_batch=lambda *a: _runner().training_batch(*a),
        guided_batch=lambda *a: _runner().guided_batch(*a),
        save=lambda m, p, overwrite=False: m.save_pretrained(str(p), overwrite=overwrite),
        config_from_dict=ZImageConfig.from_hf_config,
        config_type=ZImageConfig,
        read_config=lambda folder: _checkpoint().read_config(folder),
        key_table=lambda cfg: _checkpoint().zimage_key_table(cfg),
        weights_prefix="diffusion_pytorch_model",
        streamed=lambda: importlib.import_module("tmp_jax.models.z_image.streamed").HOOKS,
        config_file_kind=lambda d: d.get("_class_name") == "ZImageTransformer2DModel" or "all_patch_size" in d,
        tasks={"ti2i": TI2I_HOOKS},
        task_of=lambda b: "ti2i" if "cond_latents" in b else "t2i",
        noise_levels=lambda b: 1.0 - np.asarray(b["t"], np.float64).reshape(-1),  # t is 1 - sigma
        embedded=("zimage-fmnist",),
        student_fields=("in_channels", "all_patch_size", "cap_feat_dim"),
        heldout_inputs=lambda *a: _fmnist_eval().heldout_inputs(*a),
        heldout_predictions=lambda *a: _fmnist_eval().heldout_predictions(*a),
        quantize_rules=(
            r"(noise_refiner|context_refiner|layers)\.\d+\.attention\.(to_q|to_k|to_v|to_out\.0)\.weight",
            r"(noise_refiner|context_refiner|layers)\.\d+\.feed_forward\.(w1|w2|w3)\.weight",
            r"(noise_refiner|layers)\.\d+\.adaLN_modulation\.0\.weight",
        ),
        memory_model=lambda: importlib.import_module("tmp_jax.models.z_image.memory"),
    )
)
