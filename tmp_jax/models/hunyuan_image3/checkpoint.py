"""HunyuanImage-3.0 checkpoints: the key table (released checkpoint <-> our
:class:`~tmp_jax.models.hunyuan_image3.HunyuanImage3`), the config reader and the official-layout save
(:func:`tmp_jax.models.hunyuan_image3.model.load_hunyuan` loads). ``converters.hunyuan`` re-exports them.

One declarative table drives both directions: each :class:`Entry` names the official keys (PyTorch layouts,
Linear weights ``[out, in]``, convs ``[out, in, kh, kw]``), our NNX state paths, the official shapes
computed from the (possibly per-layer) config, and a pair of pure numpy hooks. Every transpose is written
out; nothing is guessed from ``ndim``. Layout facts the hooks encode:

* ``self_attn.qkv_proj.weight`` ``[(N + 2K) * hd, H]`` is interleaved by KV group: viewed
  ``[K, N/K + 2, hd, H]``, group ``g`` holds query heads ``g*N/K .. g*N/K + N/K - 1``, then k-head ``g``,
  then v-head ``g``. Import splits it into ``q_proj`` / ``k_proj`` / ``v_proj``; export re-interleaves.
* ``gate_and_up_proj.weight`` ``[2I, H]`` is ``[up; gate]`` (``down(up * silu(gate))``), for the shared
  expert and for every routed expert.
* Routed experts are one official key per expert; ours are stacked ``(E, H, I)`` / ``(E, I, H)``.

Keys under :data:`PASSTHROUGH_PREFIXES` (VAE, SigLIP2 vision tower, its aligner) are recognised but not
ported: a loader skips them and an exporter copies them from the source checkpoint unchanged.

Instruct (TI2I) / Instruct-Distil entries, present exactly when the config enables them (strict both ways:
a checkpoint with the keys and a config without the flag fails, and vice versa):

* ``cfg_distilled``: ``guidance_emb.mlp.{0,2}.{weight,bias}``; ``use_meanflow``: ``timestep_r_emb.mlp.*``
  (TimestepEmbedders laid out like ``timestep_emb``; the names are the release's module names).
* ``ti2i`` (our extension): ``vision_aligner.layers.{0,2,...}.{weight,bias}`` (the release's ``mlp_gelu``
  LightProjector, Linear weights ``[out, in]``) are ported instead of passed through.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config
from tmp_jax.safetensors_io import Entry, Hook, KeyTable, linear, same, save_model
from tmp_jax.safetensors_io import read_config as engine_read_config

PASSTHROUGH_PREFIXES: tuple[str, ...] = ("vae.", "vision_model.", "vision_aligner.")
WEIGHTS_PREFIX = "model"  # model-00001-of-0000N.safetensors (+ model.safetensors.index.json)

# Keys the official config.json carries besides the dataclass fields (what the release's loader reads).
CONFIG_EXTRA = {
    "architectures": ["HunyuanImage3ForCausalMM"],
    "model_type": "hunyuan_image_3_moe",
    "rope_scaling": {"type": "custom", "factor": 1.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0},
    "rope_type": "2d",
    "moe_layer_num_skipped": 0,
    "torch_dtype": "bfloat16",
}


# ----------------------------------------------------------------------------------------------------------
# Hooks (pure numpy; outputs contiguous so they can be written to safetensors directly)
# ----------------------------------------------------------------------------------------------------------
def _c(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x)


def _conv_to_flax(xs: list[np.ndarray]) -> list[np.ndarray]:
    return [_c(np.transpose(xs[0], (2, 3, 1, 0)))]  # [out, in, kh, kw] -> (kh, kw, in, out)


def _conv_to_torch(xs: list[np.ndarray]) -> list[np.ndarray]:
    return [_c(np.transpose(xs[0], (3, 2, 0, 1)))]  # (kh, kw, in, out) -> [out, in, kh, kw]


def _qkv_hooks(cfg: HunyuanImage3Config) -> tuple[Hook, Hook]:
    """De-interleave / re-interleave the fused, KV-grouped ``qkv_proj``."""
    kv, g, hd, hidden = cfg.num_key_value_heads, cfg.q_per_kv, cfg.attention_head_dim, cfg.hidden_size

    def to_flax(xs: list[np.ndarray]) -> list[np.ndarray]:
        w = xs[0].reshape(kv, g + 2, hd, hidden)  # [K, G+2, hd, H]
        q = w[:, :g].reshape(kv * g * hd, hidden)  # [N*hd, H], query head h = k*G + j
        k = w[:, g].reshape(kv * hd, hidden)  # [K*hd, H]
        v = w[:, g + 1].reshape(kv * hd, hidden)  # [K*hd, H]
        return [_c(q.T), _c(k.T), _c(v.T)]

    def to_torch(xs: list[np.ndarray]) -> list[np.ndarray]:
        q, k, v = (x.T for x in xs)  # [N*hd, H], [K*hd, H], [K*hd, H]
        w = np.concatenate(
            [
                q.reshape(kv, g, hd, hidden),
                k.reshape(kv, 1, hd, hidden),
                v.reshape(kv, 1, hd, hidden),
            ],
            axis=1,
        )  # [K, G+2, hd, H]
        return [_c(w.reshape(kv * (g + 2) * hd, hidden))]

    return to_flax, to_torch


def _shared_gate_up_hooks(inter: int) -> tuple[Hook, Hook]:
    """``gate_and_up_proj`` ``[2I, H]`` = ``[up; gate]`` <-> ``up_proj`` / ``gate_proj`` kernels (H, I)."""

    def to_flax(xs: list[np.ndarray]) -> list[np.ndarray]:
        w = xs[0]
        return [_c(w[:inter].T), _c(w[inter:].T)]

    def to_torch(xs: list[np.ndarray]) -> list[np.ndarray]:
        up, gate = xs
        return [_c(np.concatenate([up.T, gate.T], axis=0))]

    return to_flax, to_torch


def _experts_gate_up_hooks(num_experts: int, inter: int) -> tuple[Hook, Hook]:
    """E per-expert ``[2I, H]`` (``[up; gate]``) <-> stacked ``up_proj`` / ``gate_proj`` ``(E, H, I)``."""

    def to_flax(xs: list[np.ndarray]) -> list[np.ndarray]:
        w = np.stack(xs, axis=0)  # [E, 2I, H]
        up = np.transpose(w[:, :inter], (0, 2, 1))  # [E, H, I]
        gate = np.transpose(w[:, inter:], (0, 2, 1))  # [E, H, I]
        return [_c(up), _c(gate)]

    def to_torch(xs: list[np.ndarray]) -> list[np.ndarray]:
        up, gate = xs  # (E, H, I) each
        return [_c(np.concatenate([up[e].T, gate[e].T], axis=0)) for e in range(num_experts)]

    return to_flax, to_torch


def _experts_down_hooks(num_experts: int) -> tuple[Hook, Hook]:
    """E per-expert ``down_proj`` ``[H, I]`` <-> stacked ``(E, I, H)``."""

    def to_flax(xs: list[np.ndarray]) -> list[np.ndarray]:
        return [_c(np.transpose(np.stack(xs, axis=0), (0, 2, 1)))]  # [E, H, I] -> (E, I, H)

    def to_torch(xs: list[np.ndarray]) -> list[np.ndarray]:
        return [_c(xs[0][e].T) for e in range(num_experts)]

    return to_flax, to_torch


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------
def _linear(key: str, path: tuple[Any, ...], out_f: int, in_f: int, bias: bool) -> list[Entry]:
    """A Linear: weight ``[out, in]`` <-> kernel ``(in, out)`` (engine's explicit transpose), bias as is."""
    out = [linear(f"{key}.weight", (*path, "kernel"), (out_f, in_f))]
    if bias:
        out.append(same(f"{key}.bias", (*path, "bias"), (out_f,)))
    return out


def _conv(key: str, path: tuple[Any, ...], out_c: int, in_c: int, k: int) -> list[Entry]:
    """A Conv2d: weight ``[out, in, kh, kw]`` <-> kernel ``(kh, kw, in, out)``, bias as is."""
    return [
        Entry((f"{key}.weight",), ((*path, "kernel"),), ((out_c, in_c, k, k),), _conv_to_flax, _conv_to_torch),
        same(f"{key}.bias", (*path, "bias"), (out_c,)),
    ]


def _group_norm(key: str, path: tuple[Any, ...], channels: int) -> list[Entry]:
    return [
        same(f"{key}.weight", (*path, "weight"), (channels,)),
        same(f"{key}.bias", (*path, "bias"), (channels,)),
    ]


def _norm(key: str, path: tuple[Any, ...], dim: int) -> Entry:
    return same(f"{key}.weight", (*path, "weight"), (dim,))


def _res_block(key: str, path: tuple[Any, ...], in_c: int, emb_c: int, out_c: int) -> list[Entry]:
    entries = [
        *_group_norm(f"{key}.in_layers.0", (*path, "in_layers", 0), in_c),
        *_conv(f"{key}.in_layers.2", (*path, "in_layers", 2), out_c, in_c, 3),
        *_linear(f"{key}.emb_layers.1", (*path, "emb_layers", 1), 2 * out_c, emb_c, bias=True),
        *_group_norm(f"{key}.out_layers.0", (*path, "out_layers", 0), out_c),
        *_conv(f"{key}.out_layers.3", (*path, "out_layers", 3), out_c, out_c, 3),
    ]
    if in_c != out_c:
        entries += _conv(f"{key}.skip_connection", (*path, "skip_connection"), out_c, in_c, 1)
    return entries


def _timestep_embedder(name: str, hidden: int, freq: int = 256) -> list[Entry]:
    return [
        *_linear(f"{name}.mlp.0", (name, "mlp", 0), hidden, freq, bias=True),
        *_linear(f"{name}.mlp.2", (name, "mlp", 2), hidden, hidden, bias=True),
    ]


def _layer(cfg: HunyuanImage3Config, layer: int) -> list[Entry]:
    h, hd = cfg.hidden_size, cfg.attention_head_dim
    n, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    key, path = f"model.layers.{layer}", ("model", "layers", layer)
    attn_k, attn_p = f"{key}.self_attn", (*path, "self_attn")
    qkv_to_flax, qkv_to_torch = _qkv_hooks(cfg)
    entries = [
        _norm(f"{key}.input_layernorm", (*path, "input_layernorm"), h),
        Entry(
            (f"{attn_k}.qkv_proj.weight",),
            ((*attn_p, "q_proj", "kernel"), (*attn_p, "k_proj", "kernel"), (*attn_p, "v_proj", "kernel")),
            (((n + 2 * kv) * hd, h),),
            qkv_to_flax,
            qkv_to_torch,
        ),
        *_linear(f"{attn_k}.o_proj", (*attn_p, "o_proj"), h, n * hd, bias=False),
    ]
    if cfg.use_qk_norm:
        entries += [
            _norm(f"{attn_k}.query_layernorm", (*attn_p, "query_layernorm"), hd),
            _norm(f"{attn_k}.key_layernorm", (*attn_p, "key_layernorm"), hd),
        ]
    entries.append(_norm(f"{key}.post_attention_layernorm", (*path, "post_attention_layernorm"), h))

    mlp_k, mlp_p = f"{key}.mlp", (*path, "mlp")
    num_e, inter = cfg.num_experts[layer], cfg.moe_intermediate_size[layer]
    entries += _linear(f"{mlp_k}.gate.wg", (*mlp_p, "gate", "wg"), num_e, h, bias=False)
    shared = cfg.shared_intermediate_size(layer)
    if shared:
        sh_to_flax, sh_to_torch = _shared_gate_up_hooks(shared)
        entries += [
            Entry(
                (f"{mlp_k}.shared_mlp.gate_and_up_proj.weight",),
                ((*mlp_p, "shared_mlp", "up_proj", "kernel"), (*mlp_p, "shared_mlp", "gate_proj", "kernel")),
                ((2 * shared, h),),
                sh_to_flax,
                sh_to_torch,
            ),
            *_linear(f"{mlp_k}.shared_mlp.down_proj", (*mlp_p, "shared_mlp", "down_proj"), h, shared, bias=False),
        ]
    gu_to_flax, gu_to_torch = _experts_gate_up_hooks(num_e, inter)
    dn_to_flax, dn_to_torch = _experts_down_hooks(num_e)
    entries += [
        Entry(
            tuple(f"{mlp_k}.experts.{e}.gate_and_up_proj.weight" for e in range(num_e)),
            ((*mlp_p, "experts", "up_proj"), (*mlp_p, "experts", "gate_proj")),
            tuple((2 * inter, h) for _ in range(num_e)),
            gu_to_flax,
            gu_to_torch,
        ),
        Entry(
            tuple(f"{mlp_k}.experts.{e}.down_proj.weight" for e in range(num_e)),
            ((*mlp_p, "experts", "down_proj"),),
            tuple((h, inter) for _ in range(num_e)),
            dn_to_flax,
            dn_to_torch,
        ),
    ]
    return entries


def hunyuan_key_table(cfg: HunyuanImage3Config) -> KeyTable:
    """Every official denoiser / LM tensor of ``cfg`` (per-layer MoE shapes included) as import/export
    entries, plus the VAE / vision-tower prefixes as passthrough."""
    h, pe, lat = cfg.hidden_size, cfg.patch_embed_hidden_dim, cfg.latent_channels
    entries = [
        same("model.wte.weight", ("model", "wte", "embedding"), (cfg.vocab_size, h)),
    ]
    for layer in range(cfg.num_hidden_layers):
        entries += _layer(cfg, layer)
    entries += [
        _norm("model.ln_f", ("model", "ln_f"), h),
        *_linear("lm_head", ("lm_head",), cfg.vocab_size, h, bias=False),
        *_timestep_embedder("timestep_emb", h),
        *_timestep_embedder("time_embed", h),
        *_timestep_embedder("time_embed_2", h),
        # UNetDown: conv3x3 latent -> pe, ResBlock(pe -> hidden) with timestep scale/shift and a 1x1 skip.
        *_conv("patch_embed.model.0", ("patch_embed", "model", 0), pe, lat, 3),
        *_res_block("patch_embed.model.1", ("patch_embed", "model", 1), pe, h, h),
        # UNetUp: ResBlock(hidden -> pe), then [GroupNorm, SiLU, conv3x3 pe -> latent].
        *_res_block("final_layer.model.0", ("final_layer", "model", 0), h, h, pe),
        *_group_norm("final_layer.model.1.0", ("final_layer", "model", 1, 0), pe),
        *_conv("final_layer.model.1.2", ("final_layer", "model", 1, 2), lat, pe, 3),
    ]
    entries += _instruct_entries(cfg)
    passthrough = tuple(p for p in PASSTHROUGH_PREFIXES if not (cfg.ti2i and p == "vision_aligner."))
    return KeyTable(entries, passthrough=tuple(re.escape(p) + ".*" for p in passthrough))


def _instruct_entries(cfg: HunyuanImage3Config) -> list[Entry]:
    """guidance_emb (cfg_distilled), timestep_r_emb (use_meanflow), vision_aligner (ti2i); none by default."""
    h = cfg.hidden_size
    entries: list[Entry] = []
    if cfg.cfg_distilled:
        entries += _timestep_embedder("guidance_emb", h)
    if cfg.use_meanflow:
        entries += _timestep_embedder("timestep_r_emb", h)
    if cfg.ti2i:
        fan_in = int(cfg.vit_aligner["input_dim"])
        for i in range(int(cfg.vit_aligner["depth"])):  # Linear at nn.Sequential indices 0, 2, 4, ...
            entries += _linear(f"vision_aligner.layers.{2 * i}", ("vision_aligner", "layers", 2 * i), h, fan_in, True)
            fan_in = h
    return entries


# ----------------------------------------------------------------------------------------------------------
# Config / save (loading: tmp_jax.models.hunyuan_image3.model.load_hunyuan)
# ----------------------------------------------------------------------------------------------------------
def read_config(folder: Path) -> HunyuanImage3Config:
    """``config.json`` of a HunyuanImage-3.0 checkpoint folder (clear one-line errors)."""
    return engine_read_config(
        folder, HunyuanImage3Config.from_hf_config, "a HunyuanImage-3.0 checkpoint folder needs config.json"
    )


def save(model: Any, folder: Any, overwrite: bool = False, dtype: Any = None) -> Any:
    """Write ``model`` under the official keys with a config.json the release's loader (and ours) reads."""
    conf = {**CONFIG_EXTRA, **model.config.to_hf_config()}
    # the dtype the weights are written in (the router too: the loader keeps it fp32 for any dtype)
    conf["torch_dtype"] = jnp.dtype(dtype if dtype is not None else model.model.wte.embedding.get_value().dtype).name
    return save_model(
        model,
        hunyuan_key_table(model.config),
        folder,
        prefix=WEIGHTS_PREFIX,
        config=conf,
        dtype=None if dtype is None else np.dtype(jnp.dtype(dtype)),
        overwrite=overwrite,
    )
