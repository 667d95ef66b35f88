"""HunyuanImage-3.0's prunable structure: the TMP tree spec, pruned configs and synthetic inputs.

What the tree is and why it is shaped so: :mod:`tmp_jax.models.hunyuan_image3.structure` (which registers the
architecture hooks on top of this module). Split from it so the runner can import the spec without importing
the hooks that import the runner.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config
from tmp_jax.tree import Assignment, Node, Slice, Spec, Tree, Units

LAYERS = ("model", "layers")
EXPERT_FFN_MULTIPLE = 128  # hardware rounding of expert widths where the shared width is full-size


def _layer_name(i: int) -> str:
    return f"model.layers.{i}"


def _original_layers(cfg: HunyuanImage3Config) -> tuple[int, ...]:
    return cfg.layers_kept if cfg.layers_kept is not None else tuple(range(cfg.num_hidden_layers))


def _shapes(cfg: HunyuanImage3Config) -> dict[tuple, tuple[int, ...]]:
    """Parameter shapes of ``cfg``'s model (abstract: one 1-layer ``eval_shape`` per distinct layer shape,
    since a 32-layer ``eval_shape`` of the full model costs ~10 s on CPU)."""
    from tmp_jax.safetensors_io import flat_variables

    n = cfg.num_hidden_layers
    if n == 0:
        return {p: tuple(v.get_value().shape) for p, v in flat_variables(init_abstract(cfg)).items()}
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(n):
        sig = (cfg.num_experts[i], cfg.moe_topk[i], cfg.moe_intermediate_size[i], cfg.num_shared_expert[i])
        groups.setdefault(sig, []).append(i)
    root: dict[tuple, tuple[int, ...]] = {}
    layers: dict[tuple, tuple[int, ...]] = {}
    for (e, k, inter, shared), idx in groups.items():
        one = cfg.replace(
            num_hidden_layers=1,
            layers_kept=None,
            num_experts=(e,),
            moe_topk=(k,),
            moe_intermediate_size=(inter,),
            num_shared_expert=(shared,),
        )
        for p, v in flat_variables(init_abstract(one)).items():
            shape = tuple(v.get_value().shape)
            if p[:2] == LAYERS:
                for i in idx:
                    layers[(*LAYERS, i, *p[3:])] = shape
            else:
                root[p] = shape
    ordered = sorted(layers, key=lambda p: p[2])  # stable: keeps the module order inside a layer
    return {**root, **{p: layers[p] for p in ordered}}


def expert_ffn_levels(cfg: HunyuanImage3Config, layer: int) -> tuple[int, ...] | None:
    """Allowed expert widths of ``layer``: divisors of the shared width (None: no shared expert, any width)."""
    inter, shared = cfg.moe_intermediate_size[layer], cfg.shared_intermediate_size(layer)
    if shared == 0:
        return None
    m = EXPERT_FFN_MULTIPLE if shared >= 8 * EXPERT_FFN_MULTIPLE else 1
    return tuple(w for w in range(1, inter + 1) if shared % w == 0 and w % m == 0) or (inter,)


def build_spec(cfg: HunyuanImage3Config) -> Spec:
    """The tree of a HunyuanImage-3.0 config; paths index that config's model (layer POSITIONS; a pruned
    config's ``layers_kept`` maps them to original indices, see :func:`pruned_config`)."""
    shapes = _shapes(cfg)
    hd, g, kv = cfg.attention_head_dim, cfg.q_per_kv, cfg.num_key_value_heads
    block_owned: set[tuple] = set()
    blocks = []
    for i in range(cfg.num_hidden_layers):
        pre = (*LAYERS, i)
        att, mlp = (*pre, "self_attn"), (*pre, "mlp")
        attn_params = tuple(p for p in shapes if p[:4] == att)
        attn = Node(
            f"{_layer_name(i)}.self_attn",
            "attn",
            params=attn_params,
            units=(
                Units(
                    "kv_groups",
                    kv,
                    (
                        Slice((*att, "q_proj", "kernel"), 1, g * hd),
                        Slice((*att, "k_proj", "kernel"), 1, hd),
                        Slice((*att, "v_proj", "kernel"), 1, hd),
                        Slice((*att, "o_proj", "kernel"), 0, g * hd, consumer=True),
                    ),
                    tie="kv_groups",
                ),
            ),
        )
        ex = (*mlp, "experts")
        topk = cfg.moe_topk[i]
        moe_params = tuple(p for p in shapes if p[:4] == mlp)
        moe = Node(
            f"{_layer_name(i)}.mlp",
            "moe",
            params=moe_params,
            units=(
                Units(
                    "experts",
                    cfg.num_experts[i],
                    (
                        Slice((*ex, "up_proj"), 0),
                        Slice((*ex, "gate_proj"), 0),
                        Slice((*ex, "down_proj"), 0),
                        Slice((*mlp, "gate", "wg", "kernel"), 1, always_active=True),  # router scores all
                    ),
                    min_keep=topk,
                    active=topk,
                ),
                Units(
                    "expert_ffn",
                    cfg.moe_intermediate_size[i],
                    (
                        Slice((*ex, "up_proj"), 2),
                        Slice((*ex, "gate_proj"), 2),
                        Slice((*ex, "down_proj"), 1, consumer=True),
                    ),
                    multiple=EXPERT_FFN_MULTIPLE,
                    levels=expert_ffn_levels(cfg, i),
                    batch="experts",  # one channel order per expert (one kept width for all)
                ),
            ),
        )
        own = tuple(p for p in shapes if p[:3] == pre and p not in attn_params and p not in moe_params)
        block_owned.update(attn_params, moe_params, own)
        blocks.append(Node(_layer_name(i), "block", params=own, children=(attn, moe), droppable=True))
    stage = Node("model.layers", "stage", children=tuple(blocks), tokens="all")
    root = Node("hunyuan", "model", params=tuple(p for p in shapes if p not in block_owned), children=(stage,))
    return Spec(
        "hunyuan",
        root,
        shapes,
        dtype_bytes=2,
        constraints={
            "global_heads": "num_attention_heads / num_key_value_heads are global (tied kv_groups gene)",
            "shared_width": "moe_intermediate_size[l] must divide the shared-expert width",
        },
    )


def pruned_config(cfg: HunyuanImage3Config, tree: Tree, a: Assignment) -> HunyuanImage3Config:
    """The smaller config an assignment describes: per-layer MoE lists, global heads, ``layers_kept``."""
    orig = _original_layers(cfg)
    kept, experts, topk, inter, shared, groups = [], [], [], [], [], set()
    for i in range(cfg.num_hidden_layers):
        name = _layer_name(i)
        if name in a.dropped:
            continue
        kept.append(orig[i])
        groups.add(tree.kept_count(a, f"{name}.self_attn", "kv_groups"))
        e = tree.kept_count(a, f"{name}.mlp", "experts")
        w = tree.kept_count(a, f"{name}.mlp", "expert_ffn")
        s = cfg.shared_intermediate_size(i)
        if s and s % w:
            raise ValueError(f"{name}: expert width {w} does not divide the shared-expert width {s}")
        experts.append(e)
        topk.append(min(cfg.moe_topk[i], e))
        inter.append(w)
        shared.append(s // w if s else cfg.num_shared_expert[i])
    if len(groups) > 1:
        raise ValueError(f"KV groups differ between layers ({sorted(groups)}): head counts are global")
    kv = groups.pop() if groups else cfg.num_key_value_heads
    return cfg.replace(
        num_hidden_layers=len(kept),
        layers_kept=tuple(kept),
        num_experts=tuple(experts),
        moe_topk=tuple(topk),
        moe_intermediate_size=tuple(inter),
        num_shared_expert=tuple(shared),
        num_key_value_heads=kv,
        num_attention_heads=kv * cfg.q_per_kv,
    )


def path_map(src: HunyuanImage3Config, new: HunyuanImage3Config):
    """New-model parameter path -> source-model path (layer positions via original indices)."""
    src_pos = {o: p for p, o in enumerate(_original_layers(src))}
    new_orig = _original_layers(new)

    def f(p: tuple) -> tuple:
        if len(p) > 2 and p[:2] == LAYERS:
            return (*LAYERS, src_pos[new_orig[p[2]]], *p[3:])
        return p

    return f


def init_abstract(cfg: HunyuanImage3Config, dtype: Any = jnp.float32) -> Any:
    """Abstract (shape-only) model: no weights are materialised."""
    from tmp_jax.models.hunyuan_image3.model import HunyuanImage3

    return nnx.eval_shape(lambda: HunyuanImage3(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def init_random(cfg: HunyuanImage3Config, dtype: Any = jnp.float32, seed: int = 0) -> Any:
    """A model with EVERY parameter random (tests / benches): norm scales ~ 1 ± 0.2, kernels and experts
    ~ N(0, 1/fan_in), biases ~ N(0, 0.1²), embeddings ~ N(0, 1); no zero or constant tensor anywhere.

    Filled from numpy into the abstract model (no per-shape eager JAX random ops to compile)."""
    m = init_abstract(cfg, dtype)
    rng = np.random.default_rng(seed)
    state = nnx.state(m, nnx.Param)
    for path, v in nnx.to_flat_state(state):
        x = v.get_value()
        r = rng.standard_normal(x.shape).astype(np.float32)
        name = path[-1]
        if name == "weight":  # RMSNorm / QK-norm / GroupNorm scales
            val = 1.0 + 0.2 * r
        elif name == "bias":
            val = 0.1 * r
        elif name == "kernel":  # Linear (in, out) or conv (kh, kw, in, out)
            val = r / np.sqrt(int(np.prod(x.shape[:-1])))
        elif name in ("up_proj", "gate_proj", "down_proj"):  # stacked experts (E, in, out)
            val = r / np.sqrt(x.shape[1])
        else:  # token embedding
            val = r
        v.set_value(jnp.asarray(val, x.dtype))
    nnx.update(m, state)
    return m


def synthetic_calib(cfg: HunyuanImage3Config, n: int, batch: int = 4, seed: int = 0) -> list[dict]:
    """Random T2I calibration batches in the calibration format (``docs/calibration-format.md``).

    Rows are ``[bos] text <timestep> <img>*(h*w) [eos]`` right-padded with the pad id to one fixed length
    (text lengths differ, so the image span sits at a different offset per row and most rows end in
    padding); ``timestep`` = sigma * 1000, sigma ~ U(0, 1). Tiny models use a 4x4 latent grid, full-size
    ones 64x64 (a 1024² image).
    """
    rng = np.random.default_rng(seed)
    tiny = cfg.hidden_size < 1024
    h = w = 4 if tiny else cfg.image_base_size // cfg.vae_downsample_factor[0]
    lo, hi = (3, 12) if tiny else (32, 160)
    special = {cfg.image_token_id, cfg.timestep_token_id, cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id}
    vocab = np.setdiff1d(np.arange(cfg.vocab_size), [t for t in special if t is not None])
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    head = [] if cfg.bos_token_id is None else [cfg.bos_token_id]
    tail = [] if cfg.eos_token_id is None else [cfg.eos_token_id]
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        rows = []
        for _ in range(b):
            text = rng.choice(vocab, int(rng.integers(lo, hi + 1)))
            rows.append(np.concatenate([head, text, [cfg.timestep_token_id], [cfg.image_token_id] * (h * w), tail]))
        seq = len(head) + hi + 1 + h * w + len(tail)  # one length for every batch: one compile
        ids = np.full((b, seq), pad, np.int32)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = r
        out.append(
            {
                "input_ids": ids,
                "latents": rng.standard_normal((b, cfg.latent_channels, h, w)).astype(np.float32),
                "timestep": (1000.0 * rng.uniform(0.0, 1.0, b)).astype(np.float32),
                "valid_lengths": np.array([len(r) for r in rows], np.int32),
            }
        )
    return out


def masked_model(model: Any, tree: Tree, a: Assignment, order: dict | None = None) -> Any:
    """Exact oracle of a pruned model: a copy of the FULL model computing what ``materialize`` would.

    Removed experts are masked out of the router (``expert_mask``: logits -inf), removed KV groups get zero
    ``o_proj`` rows, removed expert channels zero ``down_proj`` rows (each expert its own), and a dropped layer
    zero ``o_proj`` and zero down projections (shared and routed) so it is the identity.
    """
    from tmp_jax.materialize import kept_units

    m = nnx.clone(model)
    kept = kept_units(tree, a, order)
    cfg = m.config
    width = cfg.q_per_kv * cfg.attention_head_dim
    for i, layer in enumerate(m.model.layers):
        name = _layer_name(i)
        o = layer.self_attn.o_proj.kernel
        down = layer.mlp.experts.down_proj
        if name in a.dropped:
            o[...] = jnp.zeros_like(o[...])
            down[...] = jnp.zeros_like(down[...])
            if layer.mlp.shared_mlp is not None:
                sd = layer.mlp.shared_mlp.down_proj.kernel
                sd[...] = jnp.zeros_like(sd[...])
            continue
        groups = kept[(f"{name}.self_attn", "kv_groups")]
        rows = np.ones(cfg.num_key_value_heads, bool)
        rows[groups] = False
        o[...] = jnp.where(jnp.repeat(jnp.asarray(rows), width)[:, None], 0, o[...])
        keep_e = np.zeros(cfg.num_experts[i], bool)
        keep_e[kept[(f"{name}.mlp", "experts")]] = True
        layer.mlp.set_expert_mask(keep_e)
        ids = np.asarray(kept[(f"{name}.mlp", "expert_ffn")])  # [k] (every expert) or [E, k] (per expert)
        keep_c = np.zeros((cfg.num_experts[i], cfg.moe_intermediate_size[i]), bool)
        np.put_along_axis(keep_c, np.broadcast_to(ids, (cfg.num_experts[i], ids.shape[-1])), True, axis=1)
        down[...] = jnp.where(jnp.asarray(keep_c)[:, :, None], down[...], 0)
    return m


# gene kinds whose level is runtime data in candidate evaluation (runner.forward_pruned masks the router over
# the full expert axis), so they never change a compiled shape and the warm-up need not walk them
DATA_KINDS = frozenset({"experts"})
