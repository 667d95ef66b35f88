"""Active parameters per token of the full-size HunyuanImage-3.0 tree (config / eval_shape only), by hand.

The project's definition (``Tree.count``): every parameter a token's forward touches, i.e. everything except
the routed experts outside its top-k. The router (``mlp.gate.wg``) scores ALL experts for every token, so its
columns are active in full; embeddings, ``lm_head``, the T2I heads and the norms count in full too.
"""

from __future__ import annotations

import numpy as np
from test_hunyuan_shapes import ATTENTION, EMBED, FINAL_LAYER, NORMS, PATCH_EMBED, TIMESTEP

from search.budget import CostModel
from tmp_jax import arch
from tmp_jax.models.hunyuan_image3 import FULL
from tmp_jax.tree import Tree

H = arch.get("hunyuan")
L, HID, INTER, E, TOPK = 32, 4096, 3072, 64, 8
HEADS = PATCH_EMBED + FINAL_LAYER + 3 * TIMESTEP


def _hand_active(experts: int, width: int, layers: int = L, kv: int = 8) -> int:
    """Active per token with ``experts`` kept per layer (top-8 routed), expert width ``width`` (the shared MLP
    keeps 3072), ``kv`` KV groups of 4 query heads and ``layers`` layers kept."""
    expert = 3 * HID * width  # up, gate (H x I) and down (I x H)
    routed = TOPK * expert  # only the top-8 routed experts run for a token
    router = HID * experts  # every kept expert's router column is scored for every token
    shared = 3 * HID * INTER
    attn = ATTENTION // L * kv // 8  # q, k, v and o all scale with the KV groups kept
    norms = (NORMS - HID) // L  # two layer norms + q/k norms per layer; ln_f is non-layer
    return layers * (routed + router + shared + attn + norms) + 2 * EMBED + HID + HEADS


def test_full_size_active_equals_hand_count():
    tree = Tree(H.build_spec(FULL))
    assert tree.full["active"] == _hand_active(E, INTER)
    assert round((tree.full["active"] - HEADS) / 1e9, 1) == 13.3  # the reference's "active per token ~13.3 B"
    # a pruned assignment: 16 experts of width 1536 per layer, 4 of 8 KV groups, layer 5 dropped
    names = [g.name for g in tree.genes]
    g = tree.full_genome()
    for i, gene in enumerate(tree.genes):
        if gene.kind == "experts":
            g[i] = gene.counts.index(16)
        if gene.kind == "expert_ffn":
            g[i] = gene.counts.index(1536)
    g[names.index("tie:kv_groups")] = tree.genes[names.index("tie:kv_groups")].counts.index(4)
    g[names.index("model.layers.5:keep")] = 0
    a = tree.decode(g)
    want = _hand_active(16, 1536, layers=31, kv=4)
    assert tree.count(a)["active"] == want
    # the search's vectorised cost model agrees with the tree (full and pruned)
    cm = CostModel(tree, "active")
    assert cm(np.stack([tree.full_genome(), g])).tolist() == [tree.full["active"], want]
