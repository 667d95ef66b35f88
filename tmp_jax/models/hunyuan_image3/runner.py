"""HunyuanImage-3.0 execution for calibration and candidate evaluation.

``forward_blockwise`` runs the stem (token / image / timestep embeddings, RoPE tables, masks), each decoder
layer as two separately jitted halves (attention branch, MoE branch) and the final layer, each function's
static part being its sub-module's graph: the attention branch is compiled once per KV-group level (a
global count), the MoE branch once per (experts, top-k, expert width, shared width) shape, and both are
reused by every later candidate. Candidate evaluation (``forward_pruned``) keeps the expert count out of
the compiled shape: a layer's kept experts are a runtime router mask over the teacher's full expert axis, so
the MoE half compiles once per (top-k, expert width, shared width), and the warm-up grows with the SUM of the
expert-count and expert-width levels, not their product (:data:`DATA_KINDS`). ``forward_masked`` (traceable,
jitted by :mod:`tmp_jax.masked_eval`) goes further: the whole teacher at full width, every decision (KV groups,
experts, expert channels, dropped layers) runtime data, one program for every candidate. ``collect_stats``
runs the whole forward once with statistics sown by the modules.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax import aot
from tmp_jax.masked_eval import MaskView
from tmp_jax.materialize import Cut, Refits, apply_cut, prefix_cut, prefix_shapes, with_refits
from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config
from tmp_jax.models.hunyuan_image3.layout import check_t2i_layout
from tmp_jax.models.hunyuan_image3.model import (
    DecoderLayer,
    ExpertMask,
    HunyuanImage3,
    attn_branch,
    moe_branch,
    t2i_embed,
    t2i_head,
)
from tmp_jax.models.hunyuan_image3.spec import DATA_KINDS, LAYERS, _layer_name, pruned_config
from tmp_jax.stats import flatten_intermediates, split_collecting
from tmp_jax.tree import Assignment, Tree


def prepare_batch(cfg: HunyuanImage3Config, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Calibration batch (``input_ids`` (B,S), ``latents`` (B,C,h,w), ``timestep`` (B,) = sigma*1000,
    ``valid_lengths`` (B,)) -> model inputs; the layout is checked here, on the host.

    ``mask`` weights the output in the fitness (``mask[..., None]`` against the (B, C, h, w) velocity): every
    output element is an image element, so it is all ones, shape (B, C, h).
    """
    ids = np.asarray(batch["input_ids"]).astype(np.int32)
    lat = np.asarray(batch["latents"], np.float32)
    if lat.ndim != 4 or lat.shape[1] != cfg.latent_channels:
        raise ValueError(f"latents: expected (B, {cfg.latent_channels}, h, w), got {lat.shape}")
    b, _, h, w = lat.shape
    if ids.ndim != 2 or ids.shape[0] != b:
        raise ValueError(f"input_ids: expected ({b}, S), got {ids.shape}")
    check_t2i_layout(ids, h * w, cfg)
    vl = batch.get("valid_lengths")
    vl = np.full((b,), ids.shape[1], np.int32) if vl is None else np.asarray(vl).astype(np.int32)
    return {
        "input_ids": ids,
        "latents": lat,
        "timestep": np.asarray(batch["timestep"], np.float32).reshape(b),
        "valid_lengths": vl,
        "mask": np.ones((b, lat.shape[1], h), bool),
    }


class _Stem(nnx.Module):
    """View of the parameters outside the decoder layers; width-free, so every candidate shares it."""

    def __init__(self, m: HunyuanImage3):
        c = m.config
        self.wte = m.model.wte
        self.patch_embed = m.patch_embed
        self.time_embed = m.time_embed
        self.timestep_emb = m.timestep_emb
        self.time_embed_2 = m.time_embed_2
        self.final_layer = m.final_layer
        self.image_token_id = c.image_token_id
        self.head_dim = c.attention_head_dim
        self.rope_theta = c.rope_theta


@partial(jax.jit, static_argnums=(0,))
def _stem_embed(gd: Any, state: Any, ids: jax.Array, lat: jax.Array, t: jax.Array, vl: jax.Array) -> dict:
    return _stem_body(nnx.merge(gd, state), ids, lat, t, vl)


def _stem_body(s: _Stem, ids: jax.Array, lat: jax.Array, t: jax.Array, vl: jax.Array) -> dict:
    """The T2I embed through the stem view (traceable): what the blockwise and the masked forwards start from."""
    return t2i_embed(
        s.wte,
        s.patch_embed,
        s.time_embed,
        s.timestep_emb,
        ids,
        lat,
        t,
        vl,
        image_token_id=s.image_token_id,
        head_dim=s.head_dim,
        rope_theta=s.rope_theta,
    )


class _Sub(nnx.Module):
    """View of one sub-layer and its pre-norm: its graph depends only on that sub-layer's widths."""

    def __init__(self, layer: nnx.Module, norm: nnx.Module):
        self.layer, self.norm = layer, norm


@partial(jax.jit, static_argnums=(0,))
def _attn(gd: Any, state: Any, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, tm: jax.Array):
    v = nnx.merge(gd, state)
    return attn_branch(v.layer, v.norm, x, cos, sin, mask, tm)


@partial(jax.jit, static_argnums=(0,))
def _moe(gd: Any, state: Any, x: jax.Array, tm: jax.Array) -> jax.Array:
    v = nnx.merge(gd, state)
    return moe_branch(v.layer, v.norm, x, tm)


@partial(jax.jit, static_argnums=(0, 5, 6))
def _final(gd: Any, state: Any, x: jax.Array, index: jax.Array, t: jax.Array, th: int, tw: int) -> jax.Array:
    s = nnx.merge(gd, state)
    return t2i_head(s.final_layer, s.time_embed_2, x, index, t, th, tw)


def _embed(model: HunyuanImage3, inputs: dict[str, Any]) -> tuple[Any, dict]:
    """The stem's T2I embed of prepared ``inputs`` and the matching image head ``head(x, image_index)``
    (both jitted through the width-free stem view, so every candidate shares them)."""
    lat = jnp.asarray(inputs["latents"])
    _, _, th, tw = lat.shape
    gd, st = nnx.split(_Stem(model))
    t = jnp.asarray(inputs["timestep"])
    ids, vl = jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["valid_lengths"])
    e = aot.call(_stem_embed, gd, st, ids, lat, t, vl)
    return (lambda x, index: aot.call(_final, gd, st, x, index, t, th, tw)), e


def forward_blockwise(model: HunyuanImage3, inputs: dict[str, Any], features: bool = False) -> Any:
    """Same result as ``model(input_ids, latents, timestep, valid_lengths)``: the velocity (B, C, h, w)
    (and, with ``features``, the hidden states after every decoder layer)."""
    head, e = _embed(model, inputs)
    x = e["embeds"]
    feats = []
    for layer in model.model.layers:
        gd_a, st_a = nnx.split(_Sub(layer.self_attn, layer.input_layernorm))
        x = _attn(gd_a, st_a, x, e["cos"], e["sin"], e["mask"], e["token_mask"])
        gd_m, st_m = nnx.split(_Sub(layer.mlp, layer.post_attention_layernorm))
        x = _moe(gd_m, st_m, x, e["token_mask"])
        if features:
            feats.append(x)
    out = head(x, e["image_index"])
    return (out, feats) if features else out


# ----------------------------------------------------------------------------------------------
# Candidate evaluation on the permuted teacher: prefixes sliced inside the jitted halves


@partial(jax.jit, static_argnums=(0, 1))
def _attn_cut(gd: Any, cut: Cut, state: Any, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: Any, tm: jax.Array):
    v = nnx.merge(gd, apply_cut(state, cut))
    return attn_branch(v.layer, v.norm, x, cos, sin, mask, tm)


@partial(jax.jit, static_argnums=(0, 1))
def _moe_cut(gd: Any, cut: Cut, state: Any, x: jax.Array, tm: jax.Array, n_experts: jax.Array) -> jax.Array:
    """The MoE half over the FULL expert axis, experts ``>= n_experts`` (a traced scalar) masked out of the
    router: the same output as the layer with only the first ``n_experts`` (a prefix of the permuted
    teacher), since a masked logit is ``-inf`` before the softmax (``HunyuanMoE.set_expert_mask``) and a
    dropped expert gets no routed pairs; one program serves every expert count."""
    v = nnx.merge(gd, apply_cut(state, cut))
    v.layer.expert_mask = ExpertMask(jnp.arange(v.layer.num_experts) < n_experts)
    return moe_branch(v.layer, v.norm, x, tm)


_SUB_NAMES = {"self_attn": ("self_attn", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm")}
_PRUNED: dict[tuple, tuple[Any, Any]] = {}  # (sub-layer, widths, config) -> (graphdef, abstract state)
_CUTS: dict[tuple, Cut] = {}  # (layer, sub-layer, widths, config) -> static cut


def _pruned_view(cfg: HunyuanImage3Config, sub: str, widths: tuple, impl: str) -> tuple[Any, Any]:
    """Graphdef + abstract state of a ``_Sub`` view of one pruned sub-layer (cached; nothing allocated).

    ``widths``: ``(kv_groups,)`` for attention, ``(experts, top_k, expert width, shared count)`` for the MoE
    (``experts`` is the teacher's full count: the kept count is a runtime mask, see :func:`_moe_cut`).
    """
    key = (sub, widths, impl, cfg)
    if key not in _PRUNED:
        if sub == "self_attn":
            (kv,) = widths
            one = cfg.replace(num_key_value_heads=kv, num_attention_heads=kv * cfg.q_per_kv)
            e, k, w, sh = cfg.num_experts[0], cfg.moe_topk[0], cfg.moe_intermediate_size[0], cfg.num_shared_expert[0]
        else:
            one, (e, k, w, sh) = cfg, widths
        one = one.replace(
            num_hidden_layers=1,
            layers_kept=None,
            num_experts=(e,),
            moe_topk=(k,),
            moe_intermediate_size=(w,),
            num_shared_expert=(sh,),
        )
        layer = nnx.eval_shape(lambda: DecoderLayer(one, 0, dtype=jnp.float32, rngs=nnx.Rngs(0), moe_impl=impl))
        _PRUNED[key] = nnx.split(_Sub(*(getattr(layer, n) for n in _SUB_NAMES[sub])))
    return _PRUNED[key]


def forward_pruned(
    model: HunyuanImage3, tree: Tree, a: Assignment, inputs: dict[str, Any], refits: Refits | None = None
) -> jax.Array:
    """The candidate ``a`` of the PERMUTED teacher ``model``, evaluated without building it.

    Same result as ``forward_blockwise(materialize(model, tree, a), inputs)``: every kept set is a prefix
    (:func:`tmp_jax.materialize.permute`), so each half takes the teacher's FULL sub-layer state and slices
    it inside the jit to the prefix shapes of the tree's slice plan (:func:`tmp_jax.materialize.prefix_shapes`),
    merged into the pruned sub-layer's graph (cached per widths). Compiled once per (half, widths); the
    expert count is not a width here but a router mask (:data:`DATA_KINDS`), so it compiles nothing.
    ``refits``: compensated pruning's re-fitted ``o_proj`` / ``down_proj`` (same shapes and programs).
    """
    cfg = model.config
    if cfg.layers_kept is not None:
        raise ValueError("forward_pruned evaluates candidates of the UNPRUNED (permuted) teacher")
    new = pruned_config(cfg, tree, a)
    # the slice plan with every data kind at full size: those are masked at run time, not sliced
    shape_a = Assignment(a.dropped, {k: v for k, v in a.keep.items() if k[1] not in DATA_KINDS})
    plan: dict = {}

    def cut_of(pos: int, sub: str, widths: tuple, state: Any, impl: str) -> tuple[Any, Cut]:
        gd, want = _pruned_view(cfg, sub, widths, impl)
        key = (pos, sub, widths, impl, cfg)
        if key not in _CUTS:
            if not plan:
                plan.update(prefix_shapes(tree, shape_a))
            _CUTS[key] = prefix_cut(state, src_of(pos, sub), plan, want)
        return gd, _CUTS[key]

    def src_of(pos: int, sub: str) -> Any:
        names = dict(zip(("layer", "norm"), _SUB_NAMES[sub]))
        return lambda p: (*LAYERS, pos, names[p[0]], *p[1:])

    head, e = _embed(model, inputs)
    x = e["embeds"]
    kv = new.num_key_value_heads
    for j, pos in enumerate(new.layers_kept):
        layer = model.model.layers[pos]  # the teacher is unpruned: position == original index
        st_a = nnx.state(_Sub(layer.self_attn, layer.input_layernorm))
        gd_a, cut = cut_of(pos, "self_attn", (kv,), st_a, layer.mlp.impl)
        st_a = with_refits(st_a, src_of(pos, "self_attn"), refits, kv)
        x = aot.call(_attn_cut, gd_a, cut, st_a, x, e["cos"], e["sin"], e["mask"], e["token_mask"])
        full_e = cfg.num_experts[pos]
        widths = (full_e, new.moe_topk[j], new.moe_intermediate_size[j], new.num_shared_expert[j])
        st_m = nnx.state(_Sub(layer.mlp, layer.post_attention_layernorm))
        gd_m, cut = cut_of(pos, "mlp", widths, st_m, layer.mlp.impl)
        st_m = with_refits(st_m, src_of(pos, "mlp"), refits, new.moe_intermediate_size[j])
        n_e = np.int32(new.num_experts[j])  # a runtime value: every expert count shares the program
        x = aot.call(_moe_cut, gd_m, cut, st_m, x, e["token_mask"], n_e)
    return head(x, e["image_index"])


# ----------------------------------------------------------------------------------------------
# Masked candidate evaluation: the whole permuted teacher at full width, the decisions as runtime data


def forward_masked(model: HunyuanImage3, m: MaskView, inputs: dict[str, Any]) -> jax.Array:
    """Candidate ``m`` of the PERMUTED teacher ``model`` on T2I ``inputs``, traceable (the
    ``ArchHooks.forward_masked`` hook; :mod:`tmp_jax.masked_eval` jits and batches it).

    Per layer: the kept KV groups' query heads before ``o_proj`` (a group = its ``q_per_kv`` query heads), the
    kept experts as the router mask (``ExpertMask``: a masked logit is ``-inf`` before the softmax, exactly a
    removed expert), the kept expert channels of every routed expert before ``down_proj`` (the shared expert is
    never pruned), and each half's whole residual contribution times its sub-layer's gate (a dropped layer
    drops both: exactly the identity). Same result as :func:`forward_pruned` and the materialised candidate.

    The routed experts run the ``dense`` path (every expert on every token, combined by the sparse routing
    weights; the same values, an [experts, tokens, width] activation per layer): it batches under ``jax.vmap``
    with the weights shared by the candidates, where ``ragged_dot`` batches only when every operand is batched
    (and the Mosaic kernel's batching is untested), and at the sizes masked evaluation is for it is the cheaper
    one (measured on hunyuan-fmnist, CPU: 208 vs 296 ms per micro-batch; on a GPU, XLA lowers ``ragged_dot`` to
    a dense GEMM over every expert anyway).
    """
    cfg = model.config
    lat, t = inputs["latents"], inputs["timestep"]
    _, _, th, tw = lat.shape
    e = _stem_body(_Stem(model), inputs["input_ids"], lat, t, inputs["valid_lengths"])
    x, tm = e["embeds"], e["token_mask"]
    for i, layer in enumerate(model.model.layers):
        attn, mlp = f"{_layer_name(i)}.self_attn", f"{_layer_name(i)}.mlp"
        heads = jnp.repeat(m.keep(attn, "kv_groups"), cfg.q_per_kv)  # [N]: query head h is in group h // q_per_kv
        x = attn_branch(
            layer.self_attn, layer.input_layernorm, x, e["cos"], e["sin"], e["mask"], tm, heads, m.gate(attn)
        )
        moe = layer.mlp
        moe.expert_mask = ExpertMask(m.keep(mlp, "experts") > 0)
        moe.impl = "dense"  # see the docstring
        x = moe_branch(moe, layer.post_attention_layernorm, x, tm, m.keep(mlp, "expert_ffn"), m.gate(mlp))
    return t2i_head(model.final_layer, model.time_embed_2, x, e["image_index"], t, th, tw)


@partial(jax.jit, static_argnums=(0,))
def _stats_jit(gd: Any, state: Any, ids: jax.Array, lat: jax.Array, t: jax.Array, vl: jax.Array) -> tuple:
    model = nnx.merge(gd, state)
    out = model(ids, lat, t, vl)
    inter = nnx.pop(model, nnx.Intermediate)
    return out, inter


def collect_stats(model: HunyuanImage3, inputs: dict[str, Any]) -> tuple[jax.Array, dict]:
    """Teacher output and sown statistics {module path + stat name: summed array}."""
    gd, st = split_collecting(model)
    out, inter = _stats_jit(
        gd, st, inputs["input_ids"], inputs["latents"], jnp.asarray(inputs["timestep"]), inputs["valid_lengths"]
    )
    # one batched device-to-host copy of every statistic (one synchronising copy per statistic is ~0.3 ms
    # each on a GPU, and a full-width model sows hundreds)
    return out, flatten_intermediates(jax.device_get(inter))
