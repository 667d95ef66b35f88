"""Z-Image execution for calibration and candidate evaluation.

``forward_blockwise`` runs the stem, each block and the final layer as separately jitted functions
whose static part is the sub-module's graph (its widths). A candidate is therefore compiled per
(block kind, width level) once and reused by every later candidate: after warm-up there are zero
recompilations. ``collect_stats`` runs the whole forward once with statistics sown by the modules.

Candidate evaluation on the permuted teacher: ``forward_pruned`` slices each kept sub-layer to its prefix
inside per-width jitted functions; ``forward_masked`` (traceable, jitted by :mod:`tmp_jax.masked_eval`) runs
the whole teacher at full width with the candidate's head / channel masks and branch gates as runtime data.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax import aot
from tmp_jax.masked_eval import MaskView
from tmp_jax.materialize import Cut, Refits, apply_cut, prefix_cut, prefix_shapes, with_refits
from tmp_jax.models.z_image.config import BlockSpec, ZImageConfig
from tmp_jax.models.z_image.layout import key_mask, make_layout
from tmp_jax.models.z_image.model import ZImageTransformer, ZImageTransformerBlock, attn_branch, ffn_branch
from tmp_jax.models.z_image.spec import pruned_config
from tmp_jax.stats import flatten_intermediates, run_collecting, split_collecting
from tmp_jax.tree import Assignment, Tree


def prepare_batch(cfg: ZImageConfig, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Calibration batch (latents (B,C,F,H,W), cap_feats (B,L,D), cap_lens (B,), t (B,)) -> inputs."""
    lat, cap, lens, t = batch["latents"], batch["cap_feats"], batch["cap_lens"], batch["t"]
    layout = make_layout(cfg, list(lat), [cap[i, : int(n)] for i, n in enumerate(lens)])
    T = layout.arrays["uni_idx"].shape[1]
    out_mask = np.arange(T)[None, :] < np.asarray(layout.ori_lens)[:, None]  # image tokens only
    return {
        "arrays": layout.arrays,
        "t": np.asarray(t, np.float32),
        "patch_key": layout.patch_key,
        "mask": out_mask,
    }


class _Stem(nnx.Module):
    """View of the parameters outside the blocks; its config is width-free so candidates share it."""

    def __init__(self, m: ZImageTransformer):
        self.t_embedder = m.t_embedder
        self.all_x_embedder = m.all_x_embedder
        self.all_final_layer = m.all_final_layer
        self.cap_embedder = m.cap_embedder
        self.x_pad_token = m.x_pad_token
        self.cap_pad_token = m.cap_pad_token
        c = m.config
        # width- and depth-free: candidates that drop blocks must share the stem's compiled functions
        stock = {k: getattr(c, k) for k in c.to_hf_config(include_pruning=False)}
        self.config = ZImageConfig(**{**stock, "n_layers": 0, "n_refiner_layers": 0})


@partial(jax.jit, static_argnums=(0, 4))
def _stem_embed(gd: Any, state: Any, arrays: dict, t: jax.Array, pk: str) -> dict:
    stem = nnx.merge(gd, state)
    return ZImageTransformer.embed(stem, arrays, t, pk)


class _Sub(nnx.Module):
    """View of one sub-layer and its two norms: its graph depends only on that sub-layer's width."""

    def __init__(self, layer: nnx.Module, norm1: nnx.Module, norm2: nnx.Module):
        self.layer, self.norm1, self.norm2 = layer, norm1, norm2


class _Mod(nnx.Module):
    """View of a block's adaLN projection (width-independent)."""

    def __init__(self, blk: ZImageTransformerBlock):
        self.modulation = blk.modulation
        self.adaLN_modulation = blk.adaLN_modulation


@partial(jax.jit, static_argnums=(0,))
def _mod(gd: Any, state: Any, c: jax.Array) -> tuple:
    return ZImageTransformerBlock.modulation_terms(nnx.merge(gd, state), c)


@partial(jax.jit, static_argnums=(0,))
def _attn(gd: Any, state: Any, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array, s: Any, g: Any):
    v = nnx.merge(gd, state)
    return attn_branch(v.layer, v.norm1, v.norm2, x, mask, cos, sin, s, g)


@partial(jax.jit, static_argnums=(0,))
def _ffn(gd: Any, state: Any, x: jax.Array, s: Any, g: Any) -> jax.Array:
    v = nnx.merge(gd, state)
    return ffn_branch(v.layer, v.norm1, v.norm2, x, s, g)


def _run_block(blk: ZImageTransformerBlock, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array, c: Any):
    """One block as separately compiled pieces: adaLN, attention branch, FFN branch (each cached by width)."""
    if blk.modulation:
        gd, st = nnx.split(_Mod(blk))
        s_msa, g_msa, s_mlp, g_mlp = _mod(gd, st, c)
    else:
        s_msa = g_msa = s_mlp = g_mlp = None
    if blk.attention is not None:
        gd, st = nnx.split(_Sub(blk.attention, blk.attention_norm1, blk.attention_norm2))
        x = _attn(gd, st, x, mask, cos, sin, s_msa, g_msa)
    if blk.feed_forward is not None:
        gd, st = nnx.split(_Sub(blk.feed_forward, blk.ffn_norm1, blk.ffn_norm2))
        x = _ffn(gd, st, x, s_mlp, g_mlp)
    return x


@jax.jit
def _unify(arrays: dict, img: jax.Array, cap: jax.Array, e: dict) -> tuple:
    return ZImageTransformer.unify(None, arrays, img, cap, e)


@partial(jax.jit, static_argnums=(0, 4))
def _final(gd: Any, state: Any, x: jax.Array, c: jax.Array, pk: str) -> jax.Array:
    return nnx.merge(gd, state).all_final_layer[pk](x, c)


def compile_count() -> int:
    """Compiled variants of the blockwise functions so far (for zero-recompile checks)."""
    fns = (_stem_embed, _mod, _attn, _ffn, _unify, _final, _attn_cut, _ffn_cut)
    return sum(f._cache_size() for f in fns)


def forward_blockwise(model: ZImageTransformer, inputs: dict[str, Any], features: bool = False) -> Any:
    """Same result as ``forward_padded``; returns (B, T, patch_dim) (and per-main-block features).

    Each block runs as adaLN + attention branch + FFN branch, compiled once per sub-layer width, so the
    number of compiled variants grows with the number of width LEVELS, not with their combinations.
    """
    a, t, pk = inputs["arrays"], jnp.asarray(inputs["t"]), inputs["patch_key"]
    gd, st = nnx.split(_Stem(model))
    e = _stem_embed(gd, st, a, t, pk)
    c = e["c"]
    img, cap = e["img"], e["cap"]
    m_img, m_cap = key_mask(jnp.asarray(a["img_valid"])), key_mask(jnp.asarray(a["cap_valid"]))
    for blk in model.noise_refiner:
        img = _run_block(blk, img, m_img, *e["img_cs"], c)
    for blk in model.context_refiner:
        cap = _run_block(blk, cap, m_cap, *e["cap_cs"], c)
    x, cos, sin, mask = _unify(a, img, cap, e)
    feats = []
    for blk in model.layers:
        x = _run_block(blk, x, mask, cos, sin, c)
        if features:
            feats.append(x)
    out = _final(gd, st, x, c, pk)
    return (out, feats) if features else out


# ----------------------------------------------------------------------------------------------
# Candidate evaluation on the permuted teacher: prefixes sliced inside the jitted sub-layers


@partial(jax.jit, static_argnums=(0, 1))
def _attn_cut(gd: Any, cut: Cut, state: Any, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array, s, g):  # noqa: ANN001
    v = nnx.merge(gd, apply_cut(state, cut))
    return attn_branch(v.layer, v.norm1, v.norm2, x, mask, cos, sin, s, g)


@partial(jax.jit, static_argnums=(0, 1))
def _ffn_cut(gd: Any, cut: Cut, state: Any, x: jax.Array, s: Any, g: Any) -> jax.Array:
    v = nnx.merge(gd, apply_cut(state, cut))
    return ffn_branch(v.layer, v.norm1, v.norm2, x, s, g)


_SUB_NAMES = {
    "attention": ("attention", "attention_norm1", "attention_norm2"),
    "feed_forward": ("feed_forward", "ffn_norm1", "ffn_norm2"),
}
_PRUNED: dict[tuple, tuple[Any, Any]] = {}  # (sub-layer, width, dim-defining config) -> (graphdef, abstract state)
_CUTS: dict[tuple, Cut] = {}  # (stack, block, sub-layer, width, config) -> static cut


def _pruned_view(cfg: ZImageConfig, sub: str, width: int) -> tuple[Any, Any]:
    """Graphdef + abstract state of a ``_Sub`` view of one sub-layer at ``width`` (cached; nothing allocated)."""
    key = (sub, width, cfg)
    if key not in _PRUNED:
        spec = BlockSpec(0, width, 0) if sub == "attention" else BlockSpec(0, 0, width)
        blk = nnx.eval_shape(
            lambda: ZImageTransformerBlock(cfg, spec, modulation=False, rngs=nnx.Rngs(0), dtype=jnp.float32)
        )
        names = _SUB_NAMES[sub]
        _PRUNED[key] = nnx.split(_Sub(*(getattr(blk, n) for n in names)))
    return _PRUNED[key]


def _sub_cut(cfg: ZImageConfig, stack: str, pos: int, sub: str, width: int, state: Any, shapes: Any) -> tuple[Any, Cut]:
    """(pruned graphdef, static cut) of one sub-layer of the teacher's block ``stack[pos]`` at ``width``."""
    key = (stack, pos, sub, width, cfg)
    gd, want = _pruned_view(cfg, sub, width)
    if key not in _CUTS:
        _CUTS[key] = prefix_cut(state, _src(sub, stack, pos), shapes(), want)
    return gd, _CUTS[key]


def _src(sub: str, stack: str, pos: int) -> Any:
    """``_Sub`` view path -> the teacher's parameter path (block ``stack[pos]``, sub-layer ``sub``)."""
    names = dict(zip(("layer", "norm1", "norm2"), _SUB_NAMES[sub]))
    return lambda p: (stack, pos, names[p[0]], *p[1:])


class PrunedStacks:
    """Runs the kept blocks of candidate ``a`` of the PERMUTED teacher ``model``, stack by stack, without
    building the candidate: each sub-layer function takes the teacher's FULL sub-layer state and slices it
    inside the jit to the prefix shapes of the tree's slice plan (computed only when a new (block, width)
    cut is first needed). Shared by the T2I and the omni (TI2I) candidate evaluation."""

    def __init__(self, model: ZImageTransformer, tree: Tree, a: Assignment, refits: Refits | None = None):
        cfg = model.config
        if cfg.is_pruned:
            raise ValueError("forward_pruned evaluates candidates of the UNPRUNED (permuted) teacher")
        self.model, self.cfg = model, cfg
        self.new = pruned_config(cfg, tree, a)
        self._tree, self._a, self._plan = tree, a, {}
        self.refits = refits  # compensated pruning: re-fitted to_out / w2 per kept width

    def _shapes(self) -> dict:
        if not self._plan:
            self._plan.update(prefix_shapes(self._tree, self._a))
        return self._plan

    def run(self, stack: str, x: jax.Array, mask: Any, cos: jax.Array, sin: jax.Array, c: Any) -> jax.Array:
        """The kept blocks of ``stack`` on ``x``; ``c`` is the block conditioning (T2I: the adaLN input;
        omni: the per-token (c_noisy, c_clean, noise) triple), passed to the adaLN projection as is."""
        cfg, blocks = self.cfg, getattr(self.model, stack)
        for b in self.new.stack(stack):
            blk = blocks[b.index]  # the teacher is unpruned: position == original index
            if blk.modulation:
                gd_m, st_m = nnx.split(_Mod(blk))
                s_msa, g_msa, s_mlp, g_mlp = aot.call(_mod, gd_m, st_m, c)
            else:
                s_msa = g_msa = s_mlp = g_mlp = None
            if b.heads:
                st_a = nnx.state(_Sub(blk.attention, blk.attention_norm1, blk.attention_norm2))
                gd_a, cut = _sub_cut(cfg, stack, b.index, "attention", b.heads, st_a, self._shapes)
                st_a = with_refits(st_a, _src("attention", stack, b.index), self.refits, b.heads)
                x = aot.call(_attn_cut, gd_a, cut, st_a, x, mask, cos, sin, s_msa, g_msa)
            if b.ffn_dim:
                st_f = nnx.state(_Sub(blk.feed_forward, blk.ffn_norm1, blk.ffn_norm2))
                gd_f, cut = _sub_cut(cfg, stack, b.index, "feed_forward", b.ffn_dim, st_f, self._shapes)
                st_f = with_refits(st_f, _src("feed_forward", stack, b.index), self.refits, b.ffn_dim)
                x = aot.call(_ffn_cut, gd_f, cut, st_f, x, s_mlp, g_mlp)
        return x


def forward_pruned(
    model: ZImageTransformer, tree: Tree, a: Assignment, inputs: dict[str, Any], refits: Refits | None = None
) -> jax.Array:
    """The candidate ``a`` of the PERMUTED teacher ``model``, evaluated without building it.

    Same result as ``forward_blockwise(materialize(model, tree, a), inputs)``: every kept set is a prefix
    (:func:`tmp_jax.materialize.permute`), so each sub-layer function takes the teacher's FULL sub-layer
    state and slices it inside the jit to the prefix shapes of the tree's slice plan
    (:func:`tmp_jax.materialize.prefix_shapes`), merged into the pruned sub-layer's graph (cached per
    width). Compiled once per (sub-layer kind, width); no per-candidate model, copy or host work.
    ``refits``: compensated pruning's re-fitted consumers (same shapes: the same compiled functions).
    """
    stacks = PrunedStacks(model, tree, a, refits)
    arrs, t, pk = inputs["arrays"], jnp.asarray(inputs["t"]), inputs["patch_key"]
    gd, st = nnx.split(_Stem(model))
    e = aot.call(_stem_embed, gd, st, arrs, t, pk)
    c = e["c"]
    m_img, m_cap = key_mask(jnp.asarray(arrs["img_valid"])), key_mask(jnp.asarray(arrs["cap_valid"]))
    img = stacks.run("noise_refiner", e["img"], m_img, *e["img_cs"], c)
    cap = stacks.run("context_refiner", e["cap"], m_cap, *e["cap_cs"], c)
    x, cos, sin, mask = aot.call(_unify, arrs, img, cap, e)
    x = stacks.run("layers", x, mask, cos, sin, c)
    return aot.call(_final, gd, st, x, c, pk)


# ----------------------------------------------------------------------------------------------
# Masked candidate evaluation: the whole permuted teacher at full width, the decisions as runtime data


def block_masks(blk: ZImageTransformerBlock, name: str, m: MaskView) -> dict[str, jax.Array]:
    """Candidate ``m``'s decisions for block ``name`` (``stack.index``): head / FFN-channel 0/1 masks and the
    two sub-layers' 0/1 gates (only for the sub-layers the block has)."""
    out = {}
    if blk.attention is not None:
        out["heads"], out["attn_gate"] = m.keep(f"{name}.attention", "heads"), m.gate(f"{name}.attention")
    if blk.feed_forward is not None:
        out["ffn"], out["ffn_gate"] = m.keep(f"{name}.feed_forward", "ffn"), m.gate(f"{name}.feed_forward")
    return out


def masked_block_with(
    blk: ZImageTransformerBlock,
    masks: dict[str, jax.Array],
    x: jax.Array,
    mask: jax.Array | None,
    cos: jax.Array,
    sin: jax.Array,
    c: Any,
) -> jax.Array:
    """One block of the permuted teacher under the decisions ``masks`` (:func:`block_masks`): the first kept
    heads' outputs before ``to_out`` and the first kept FFN channels before ``w2`` (0/1 masks), each branch's
    whole residual contribution (adaLN gate and post-norm included) times its sub-layer's 0/1 gate, so a
    skipped sub-layer or dropped block (whose sub-layers are dropped with it) is exactly the identity."""
    s_msa, g_msa, s_mlp, g_mlp = blk.modulation_terms(c)
    if blk.attention is not None:
        x = attn_branch(
            blk.attention,
            blk.attention_norm1,
            blk.attention_norm2,
            x,
            mask,
            cos,
            sin,
            s_msa,
            g_msa,
            head_mask=masks["heads"],
            keep=masks["attn_gate"],
        )
    if blk.feed_forward is not None:
        x = ffn_branch(
            blk.feed_forward,
            blk.ffn_norm1,
            blk.ffn_norm2,
            x,
            s_mlp,
            g_mlp,
            channel_mask=masks["ffn"],
            keep=masks["ffn_gate"],
        )
    return x


def masked_block(
    blk: ZImageTransformerBlock,
    name: str,
    m: MaskView,
    x: jax.Array,
    mask: jax.Array | None,
    cos: jax.Array,
    sin: jax.Array,
    c: Any,
) -> jax.Array:
    """Block ``name`` (``stack.index``) of the permuted teacher as candidate ``m`` has it
    (:func:`masked_block_with` of :func:`block_masks`)."""
    return masked_block_with(blk, block_masks(blk, name, m), x, mask, cos, sin, c)


# Masked stacks of identical blocks run as one lax.scan over their stacked parameters, so the program holds ONE
# block body (embedded DiT: 156 fusions in XLA:CPU's optimised module instead of 249). Default: on accelerators,
# off on the CPU (TMP_JAX_MASKED_SCAN=1 / 0 forces it). Measured (docs/benchmarks.md section 9): on an H100 the
# embedded DiT's masked program compiled in 20.6 s scanned vs 34.5 s unrolled (cold search 40.4 s vs 59.5 s,
# same evaluation rate within noise); on the 2-core CPU it compiled 1-4 s SLOWER scanned (7.8-9.9 s vs 5.9-6.8 s).
_SCAN_ENV = os.environ.get("TMP_JAX_MASKED_SCAN")
SCAN_STACKS: bool | None = None if _SCAN_ENV is None else _SCAN_ENV == "1"  # None: by backend


def _scan_stacks() -> bool:
    return SCAN_STACKS if SCAN_STACKS is not None else jax.default_backend() != "cpu"


def masked_stack(
    model: ZImageTransformer,
    stack: str,
    m: MaskView,
    x: jax.Array,
    mask: jax.Array | None,
    cos: jax.Array,
    sin: jax.Array,
    c: Any,
) -> jax.Array:
    """Every block of ``stack`` through :func:`masked_block` (the teacher is unpruned: position == index).

    With :func:`_scan_stacks` (on accelerators by default), two or more blocks of one structure (an unpruned
    teacher's stack: same widths, same modulation) go through one ``lax.scan``: their parameters and decisions
    are stacked on a leading axis and the scan body is one block, so the program holds one block however deep
    the stack is. Same arithmetic per block as the unrolled loop."""
    blocks = list(getattr(model, stack))
    names = [f"{stack}.{b.index}" for b in model.config.stack(stack)]
    if _scan_stacks() and len(blocks) > 1:
        parts = [nnx.split(blk) for blk in blocks]
        gd = parts[0][0]
        if all(p[0] == gd for p in parts[1:]):
            params = jax.tree.map(lambda *xs: jnp.stack(xs), *[p[1] for p in parts])
            decisions = [block_masks(blk, n, m) for blk, n in zip(blocks, names)]
            masks = jax.tree.map(lambda *xs: jnp.stack(xs), *decisions)

            def body(h: jax.Array, per: tuple) -> tuple[jax.Array, None]:
                st, mk = per
                return masked_block_with(nnx.merge(gd, st), mk, h, mask, cos, sin, c), None

            return jax.lax.scan(body, x, (params, masks))[0]
    for blk, name in zip(blocks, names):
        x = masked_block(blk, name, m, x, mask, cos, sin, c)
    return x


def forward_masked(model: ZImageTransformer, m: MaskView, inputs: dict[str, Any]) -> jax.Array:
    """Candidate ``m`` of the PERMUTED teacher ``model`` on T2I ``inputs``, traceable (the
    ``ArchHooks.forward_masked`` hook; :mod:`tmp_jax.masked_eval` jits and batches it).

    Same result as :func:`forward_pruned` (and the materialised candidate): every kept set is a prefix, so
    masking the units past it at full width computes what slicing them away does."""
    a, t, pk = inputs["arrays"], jnp.asarray(inputs["t"]), inputs["patch_key"]
    e = model.embed(a, t, pk)
    c = e["c"]
    m_img, m_cap = key_mask(a["img_valid"]), key_mask(a["cap_valid"])
    img = masked_stack(model, "noise_refiner", m, e["img"], m_img, *e["img_cs"], c)
    cap = masked_stack(model, "context_refiner", m, e["cap"], m_cap, *e["cap_cs"], None)
    x, cos, sin, mask = model.unify(a, img, cap, e)
    x = masked_stack(model, "layers", m, x, mask, cos, sin, c)
    return model.all_final_layer[pk](x, c)


@partial(jax.jit, static_argnums=(0, 4))
def _stats_jit(gd: Any, state: Any, arrays: dict, t: jax.Array, pk: str) -> tuple:
    model = nnx.merge(gd, state)
    out = model.forward_padded(arrays, t, pk)
    inter = nnx.pop(model, nnx.Intermediate)
    return out, inter


def _stats_body(model: ZImageTransformer, pk: str, arrays: dict, t: jax.Array) -> jax.Array:
    return model.forward_padded(arrays, t, pk)


def collect_stats(model: ZImageTransformer, inputs: dict[str, Any]) -> tuple[jax.Array, dict]:
    """Teacher output and sown statistics {module path + stat name: summed array}.

    :func:`tmp_jax.stats.run_collecting`: the model goes in as a pytree, the program is cached per model
    structure and all statistics come back in one device-to-host copy (same values as
    ``split_collecting`` + :func:`_stats_jit` + ``flatten_intermediates``, kept as the reference path).
    """
    return run_collecting(model, _stats_body, inputs["arrays"], jnp.asarray(inputs["t"]), static=(inputs["patch_key"],))


def collect_stats_reference(model: ZImageTransformer, inputs: dict[str, Any]) -> tuple[jax.Array, dict]:
    """The previous path (graph-mode split with flags, graphdef as a static argument, a batched copy of the
    sown tree): same statistics as :func:`collect_stats`; kept for its test and the benchmark's before/after."""
    gd, st = split_collecting(model)
    out, inter = _stats_jit(gd, st, inputs["arrays"], jnp.asarray(inputs["t"]), inputs["patch_key"])
    return out, flatten_intermediates(jax.device_get(inter))


# ----------------------------------------------------------------------------------------------
# Training (distillation): a traceable forward with block features and per-block remat


def _call_block(blk: nnx.Module, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array, c: jax.Array):
    return blk(x, mask, cos, sin, c)


_remat_block = nnx.remat(_call_block)


def forward_train(model: ZImageTransformer, inputs: dict[str, Any], remat: bool = True) -> tuple:
    """(B, T, patch_dim) output and the list of main-block outputs; every block rematerialised."""
    a = inputs["arrays"]
    pk = inputs.get("patch_key", model.config.patch_keys()[0])
    call = _remat_block if remat else _call_block
    e = model.embed(a, jnp.asarray(inputs["t"]), pk)
    c = e["c"]
    img, cap = e["img"], e["cap"]
    m_img, m_cap = key_mask(a["img_valid"]), key_mask(a["cap_valid"])
    for blk in model.noise_refiner:
        img = call(blk, img, m_img, *e["img_cs"], c)
    for blk in model.context_refiner:
        cap = call(blk, cap, m_cap, *e["cap_cs"], c)
    x, cos, sin, mask = model.unify(a, img, cap, e)
    feats = []
    for blk in model.layers:
        x = call(blk, x, mask, cos, sin, c)
        feats.append(x)
    return model.all_final_layer[pk](x, c), feats


def matched_features(student_cfg: ZImageConfig) -> tuple[int, ...]:
    """Student main block j matches the teacher's main block with its ORIGINAL index."""
    return tuple(b.index for b in student_cfg.stack("layers"))


def training_batch(cfg: ZImageConfig, data: str | None, batch_size: int, seed: int, step: int) -> dict:
    """Noised training inputs for step ``step`` (a pure function of seed and step, for exact resume).

    ``data``: an .npz with clean ``latents`` (N,C,F,H,W), ``cap_feats`` (N,L,D), ``cap_lens`` (N,); None =
    the embedded Fashion-MNIST train subset with per-class captions (10% null captions).
    Noise: sigma ~ logit-normal(0, 1); x_t = (1 - sigma) x0 + sigma eps; t = 1 - sigma (1 = clean).
    """
    rng = np.random.default_rng([seed, step])
    if data is None:
        from tmp_jax import fmnist as fm

        if cfg.in_channels != fm.LATENT_CHANNELS:
            raise ValueError(f"the embedded data has {fm.LATENT_CHANNELS} latent channels, model has {cfg.in_channels}")
        split = _subset_train()
        idx = rng.integers(0, len(split), batch_size)
        x0 = fm.to_latents(split.images[idx])[:, :, None]  # [B, C, 1, 14, 14]
        labels = np.where(rng.random(batch_size) < 0.1, fm.NULL_LABEL, split.labels[idx])
        cap = fm.caption_features(labels, cfg.cap_feat_dim)
        lens = np.full(batch_size, cap.shape[1], np.int32)
    else:
        from tmp_jax import fmnist as fm

        want = "latents (N, C, F, H, W), cap_feats (N, L, D) and cap_lens (N,)"
        z = fm.load_training_npz(data, ("latents", "cap_feats", "cap_lens"), want)  # read once, then cached
        n = len(z["latents"])
        if not n or len(z["cap_feats"]) != n or len(z["cap_lens"]) != n:
            shapes = {k: tuple(v.shape) for k, v in z.items()}
            raise ValueError(f"{data}: arrays {shapes}: expected {want} with the same N > 0")
        idx = rng.integers(0, n, batch_size)
        x0, cap, lens = z["latents"][idx].astype(np.float32), z["cap_feats"][idx], z["cap_lens"][idx]
    sigma = 1.0 / (1.0 + np.exp(-rng.standard_normal(batch_size)))
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    xt = ((1.0 - s) * x0 + s * eps).astype(np.float32)
    return {
        "latents": xt,
        "cap_feats": cap.astype(np.float32),
        "cap_lens": lens.astype(np.int32),
        "t": (1.0 - sigma).astype(np.float32),
    }


def guided_batch(cfg: ZImageConfig, latents: np.ndarray, sigma: np.ndarray, labels: np.ndarray) -> dict:
    """The class-captioned states ``latents`` (P, C, H, W) at noise ``sigma`` (P,), then the same with the null
    caption: a calibration micro-batch of 2P samples whose outputs give the CFG direction (tmp_jax.trajectory)."""
    from tmp_jax import fmnist as fm

    p = len(latents)
    lab = np.concatenate([np.asarray(labels, np.int64), np.full(p, fm.NULL_LABEL, np.int64)])
    cap = fm.caption_features(lab, cfg.cap_feat_dim)
    lat = np.concatenate([latents, latents]).astype(np.float32)[:, :, None]  # [2P, C, 1, H, W]
    t = 1.0 - np.concatenate([sigma, sigma]).astype(np.float32)  # t = 1 - sigma (1 = clean)
    return {
        "latents": lat,
        "cap_feats": cap.astype(np.float32),
        "cap_lens": np.full(2 * p, cap.shape[1], np.int32),
        "t": t,
    }


_SUBSET = {}


def _subset_train() -> Any:
    if "train" not in _SUBSET:
        from tmp_jax import fmnist as fm

        _SUBSET["train"] = fm.load_subset("train")
    return _SUBSET["train"]
