"""HunyuanImage-3.0's prunable structure (the TMP tree spec) and its architecture hooks.

Tree: model → stage ``model.layers`` → decoder layers ``model.layers.{i}`` (droppable: layer drop; they own
``input_layernorm`` / ``post_attention_layernorm``) → sub-layers

* ``model.layers.{i}.self_attn`` (not droppable: the official code cannot skip attention) with unit group
  ``kv_groups`` (``num_key_value_heads`` units). Head counts are GLOBAL in the official config and every KV
  group must keep the same number of query heads, so pruning removes whole KV groups (a group = its k / v
  head and its ``q_per_kv`` query heads ``h = g * q_per_kv + j``) and every layer's group gene is TIED into
  one decision. Slices: ``q_proj`` kernel columns ``[g*G*hd, (g+1)*G*hd)``, ``k_proj`` / ``v_proj`` kernel
  columns ``[g*hd, (g+1)*hd)``, ``o_proj`` kernel rows ``[g*G*hd, (g+1)*G*hd)``.
* ``model.layers.{i}.mlp`` (not droppable) owning the router, the routed experts and the (unpruned) shared
  expert, with unit groups ``experts`` (an expert = its ``up/gate/down_proj`` block, axis 0, and its router
  column ``gate.wg.kernel[:, e]``; at least ``moe_topk`` kept; ``moe_topk`` active per token) and
  ``expert_ffn`` (channels of every kept expert: ``up/gate_proj`` axis 2, ``down_proj`` axis 1; one width for
  the layer, but each expert keeps its own channels: ``Units.batch``). The official
  code ties the shared-expert width to ``moe_intermediate_size[l] * num_shared_expert[l]``, so the allowed
  expert widths ``I'`` are the divisors of the shared width ``S`` (export writes ``num_shared_expert = S / I'``
  and the shared MLP stays intact); where ``S`` is full-size (>= 1024) only multiples of 128.

Node names are module paths (``model.layers.3.mlp``): calibration reads the statistics those modules sow.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from tmp_jax import arch
from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config
from tmp_jax.models.hunyuan_image3.spec import (  # noqa: F401 - re-exported: the spec's old import path
    DATA_KINDS,
    EXPERT_FFN_MULTIPLE,
    LAYERS,
    _layer_name,
    _original_layers,
    _shapes,
    build_spec,
    expert_ffn_levels,
    init_abstract,
    init_random,
    masked_model,
    path_map,
    pruned_config,
    synthetic_calib,
)


def _checkpoint() -> Any:  # key table, config reader, official-layout save (lazy: it reaches safetensors_io)
    from tmp_jax.models.hunyuan_image3 import checkpoint

    return checkpoint


def _load(path: str, dtype: Any = jnp.float32, mesh: Any = None) -> Any:
    from tmp_jax.models.hunyuan_image3.model import load_hunyuan

    return load_hunyuan(path, dtype=dtype, mesh=mesh)


def _runner() -> Any:  # calibration / candidate evaluation (lazy import)
    from tmp_jax.models.hunyuan_image3 import runner

    return runner


def _train() -> Any:  # Fashion-MNIST data and training forward (lazy import)
    from tmp_jax.models.hunyuan_image3 import train

    return train


def _fmnist_eval() -> Any:  # held-out inputs and predictions for tmp_jax.evaluate (lazy import)
    from tmp_jax.models.hunyuan_image3 import fmnist_eval

    return fmnist_eval


def _kernels() -> Any:  # the GPU kernel dispatch, expert parallelism included (lazy import: registering stays cheap)
    from tmp_jax.models.hunyuan_image3 import kernels

    return kernels


def _instruct() -> Any:  # HunyuanImage-3.0-Instruct TI2I micro-batches (lazy import)
    from tmp_jax.models.hunyuan_image3 import instruct

    return instruct


# TI2I (Instruct) micro-batches: whole-model functions; candidates are evaluated on materialised models
# (no forward_pruned: the correct, slower fallback of PruningProblem.fitness)
TI2I_HOOKS: dict[str, Any] = {
    "prepare_batch": lambda cfg, b: _instruct().prepare_ti2i_batch(cfg, b),
    "forward": lambda m, x: _instruct().forward_ti2i(m, x),
    "forward_pruned": None,
    "forward_masked": None,
    "collect_stats": lambda m, x: _instruct().collect_stats_ti2i(m, x),
    "forward_train": lambda m, x, remat=True: _instruct().forward_train_ti2i(m, x, remat),
    "synthetic_calib": lambda cfg, n, batch=4, seed=0: _instruct().synthetic_ti2i_calib(cfg, n, batch, seed),
    "training_batch": None,  # no TI2I data pipeline: distil TI2I from a calibration set
}


HOOKS = arch.register(
    arch.ArchHooks(
        name="hunyuan",
        build_spec=build_spec,
        pruned_config=pruned_config,
        path_map=path_map,
        init_abstract=init_abstract,
        init_random=init_random,
        **arch.runner_hooks("tmp_jax.models.hunyuan_image3.runner"),
        forward_masked=lambda m, view, x: _runner().forward_masked(m, view, x),
        synthetic_calib=synthetic_calib,
        load=_load,
        forward_train=lambda m, x, remat=True: _train().forward_train(m, x, remat),
        matched_features=lambda c: _train().matched_features(c),
        training_batch=lambda *a: _train().training_batch(*a),
        guided_batch=lambda *a: _train().guided_batch(*a),
        save=lambda m, p, overwrite=False: _checkpoint().save(m, p, overwrite=overwrite),
        config_from_dict=HunyuanImage3Config.from_hf_config,
        config_type=HunyuanImage3Config,
        read_config=lambda folder: _checkpoint().read_config(folder),
        key_table=lambda cfg: _checkpoint().hunyuan_key_table(cfg),
        weights_prefix="model",
        streamed=lambda: importlib.import_module("tmp_jax.models.hunyuan_image3.streamed").HOOKS,
        config_file_kind=lambda d: (
            d.get("model_type") == "hunyuan_image_3_moe" or "HunyuanImage3ForCausalMM" in d.get("architectures", [])
        ),
        tasks={"ti2i": TI2I_HOOKS},
        task_of=lambda b: "ti2i" if "cond_start" in b else "t2i",
        data_kinds=DATA_KINDS,
        # timestep = sigma * 1000 (TI2I micro-batches: the target's, as in T2I)
        noise_levels=lambda b: np.asarray(b["timestep"], np.float64).reshape(-1) / 1000.0,
        embedded=("hunyuan-fmnist",),
        student_fields=("latent_channels", "vocab_size", "image_token_id", "timestep_token_id"),
        heldout_inputs=lambda *a: _fmnist_eval().heldout_inputs(*a),
        heldout_predictions=lambda *a: _fmnist_eval().heldout_predictions(*a),
        quantize_rules=(
            r"model\.layers\.\d+\.self_attn\.(qkv_proj|o_proj)\.weight",
            r"model\.layers\.\d+\.mlp\.shared_mlp\.(gate_and_up_proj|down_proj)\.weight",
            r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate_and_up_proj|down_proj)\.weight",
        ),
        memory_model=lambda: importlib.import_module("tmp_jax.models.hunyuan_image3.memory"),
        expert_parallel=lambda mesh: _kernels().maybe_expert_parallel(mesh),
    )
)
