"""Z-Image's prunable structure: the TMP tree spec, pruned configs and synthetic inputs.

What the tree is and why it is shaped so: :mod:`tmp_jax.models.z_image.structure` (which registers the
architecture hooks on top of this module). Split from it so the runner can import the spec without importing
the hooks that import the runner.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax.models.z_image.config import SIGLIP_STACK, STACKS, ZImageConfig
from tmp_jax.tree import Assignment, Node, Slice, Spec, Tree, Units

TOKENS = {"noise_refiner": "image", "context_refiner": "caption", "layers": "all"}


def _shapes(cfg: ZImageConfig) -> dict[tuple, tuple[int, ...]]:
    from tmp_jax.models.z_image.model import init_abstract
    from tmp_jax.safetensors_io import flat_variables

    return {p: tuple(v.get_value().shape) for p, v in flat_variables(init_abstract(cfg)).items()}


def build_spec(cfg: ZImageConfig) -> Spec:
    """The tree of an UNPRUNED Z-Image config (paths index the full model)."""
    if cfg.is_pruned:
        raise ValueError(
            "a pruned checkpoint (its config.json lists per-block widths); pruning it again is not supported: "
            "search the unpruned source checkpoint with a smaller budget"
        )
    shapes = _shapes(cfg)
    hd = cfg.head_dim
    block_owned: set[tuple] = set()
    stages = []
    for stack in STACKS:
        blocks = []
        for b in cfg.stack(stack):
            pre: tuple = (stack, b.index)
            att = (*pre, "attention")
            attn_params = tuple(
                p for p in shapes if p[:3] == att or p[:3] in ((*pre, "attention_norm1"), (*pre, "attention_norm2"))
            )
            attn = Node(
                f"{stack}.{b.index}.attention",
                "attn",
                params=attn_params,
                units=(
                    Units(
                        "heads",
                        cfg.n_heads,
                        tuple(Slice((*att, n, "kernel"), 1, hd) for n in ("to_q", "to_k", "to_v"))
                        + (Slice((*att, "to_out", 0, "kernel"), 0, hd, consumer=True),),
                    ),
                ),
                droppable=True,
            )
            ff = (*pre, "feed_forward")
            ffn_params = tuple(p for p in shapes if p[:3] == ff or p[:3] in ((*pre, "ffn_norm1"), (*pre, "ffn_norm2")))
            ffn = Node(
                f"{stack}.{b.index}.feed_forward",
                "ffn",
                params=ffn_params,
                units=(
                    Units(
                        "ffn",
                        cfg.ffn_dim,
                        (
                            Slice((*ff, "w1", "kernel"), 1),
                            Slice((*ff, "w3", "kernel"), 1),
                            Slice((*ff, "w2", "kernel"), 0, consumer=True),
                        ),
                    ),
                ),
                droppable=True,
            )
            own = tuple(p for p in shapes if p[:2] == pre and p not in attn_params and p not in ffn_params)
            block_owned.update(attn_params, ffn_params, own)
            blocks.append(Node(f"{stack}.{b.index}", "block", params=own, children=(attn, ffn), droppable=True))
        stages.append(Node(stack, "stage", children=tuple(blocks), tokens=TOKENS[stack]))
    if cfg.siglip_feat_dim is not None:  # unprunable stage: owns every siglip_refiner parameter, no genes
        sig = tuple(p for p in shapes if p[0] == SIGLIP_STACK)
        block_owned.update(sig)
        stages.append(Node(SIGLIP_STACK, "stage", params=sig, tokens="siglip"))
    root_params = tuple(p for p in shapes if p not in block_owned)
    root = Node("zimage", "model", params=root_params, children=tuple(stages))
    return Spec(
        "zimage",
        root,
        shapes,
        dtype_bytes=2,
        constraints={"stock_export": "uniform widths, contiguous layers, equal refiner counts"},
    )


def pruned_config(cfg: ZImageConfig, tree: Tree, a: Assignment) -> ZImageConfig:
    """The smaller config an assignment describes (kept lists hold ORIGINAL block indices)."""
    kw: dict[str, Any] = {}
    for stack in STACKS:
        kept, heads, ffn = [], [], []
        for b in cfg.stack(stack):
            name = f"{stack}.{b.index}"
            if name in a.dropped:
                continue
            kept.append(b.index)
            h_drop = f"{name}.attention" in a.dropped
            f_drop = f"{name}.feed_forward" in a.dropped
            heads.append(0 if h_drop else tree.kept_count(a, f"{name}.attention", "heads"))
            ffn.append(0 if f_drop else tree.kept_count(a, f"{name}.feed_forward", "ffn"))
        kw[f"{stack}_kept"] = tuple(kept)
        kw[f"{stack}_heads"] = tuple(heads)
        kw[f"{stack}_ffn_dims"] = tuple(ffn)
    kw["n_layers"] = len(kw["layers_kept"])
    return cfg.replace(**kw)


def path_map(src: ZImageConfig, new: ZImageConfig):
    """New-model parameter path -> source-model path (block positions -> original indices)."""
    src_pos = {s: {b.index: i for i, b in enumerate(src.stack(s))} for s in STACKS}
    new_idx = {s: [b.index for b in new.stack(s)] for s in STACKS}

    def f(p: tuple) -> tuple:
        if p and p[0] in new_idx:
            return (p[0], src_pos[p[0]][new_idx[p[0]][p[1]]], *p[2:])
        return p

    return f


def init_abstract(cfg: ZImageConfig, dtype: Any = jnp.float32) -> Any:
    from tmp_jax.models.z_image.model import init_abstract as ia

    return ia(cfg, dtype)


def init_random(cfg: ZImageConfig, dtype: Any = jnp.float32, seed: int = 0) -> Any:
    """A model with every parameter random (norms around 1, pad tokens non-zero): for tests/benches."""
    from tmp_jax.models.z_image.model import ZImageTransformer

    m = ZImageTransformer(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    state = nnx.state(m, nnx.Param)
    for path, v in nnx.to_flat_state(state):
        x = v.get_value()
        r = rng.standard_normal(x.shape).astype(np.float32)
        if path[-1] == "weight":
            val = 1.0 + 0.2 * r
        elif path[-1] == "kernel":
            val = r / np.sqrt(x.shape[0])
        else:
            val = 0.5 * r
        v.set_value(jnp.asarray(val, x.dtype))
    nnx.update(m, state)
    return m


def synthetic_calib(cfg: ZImageConfig, n: int, batch: int = 4, seed: int = 0) -> list[dict]:
    """Random T2I calibration batches matching the model's input spec (tests / models without data)."""
    rng = np.random.default_rng(seed)
    hw = 8 if cfg.dim < 1024 else 128  # latent side: tiny models use 8x8, full size 1024^2 / 8
    L = 12 if cfg.dim < 1024 else 512
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        out.append(
            {
                "latents": rng.standard_normal((b, cfg.in_channels, 1, hw, hw)).astype(np.float32),
                "cap_feats": rng.standard_normal((b, L, cfg.cap_feat_dim)).astype(np.float32),
                "cap_lens": rng.integers(L // 2, L + 1, b).astype(np.int32),
                "t": rng.uniform(0.0, 1.0, b).astype(np.float32),
            }
        )
    return out
