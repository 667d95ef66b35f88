"""HunyuanImage-3.0 at full size, abstractly (``nnx.eval_shape``): parameter counts, dtypes, logical axes,
partition specs and the key table's official shapes; plus config validation. No weights are materialised.

The reference gives component sizes in millions (tencent/HunyuanImage-3.0, 83,009.2 M total with ViT and
VAE); the exact integers below are computed from the shapes and checked to round to those values.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from converters.hunyuan import hunyuan_key_table
from tmp_jax.models.hunyuan_image3 import FULL, TINY, HunyuanImage3, HunyuanImage3Config
from tmp_jax.sharding import logical_to_pspec, make_mesh

# Exact counts of the released 80B model (32 layers, 64 experts of 3 x 4096 x 3072, GQA 32/8 x 128).
ROUTED = 32 * 64 * 3 * 4096 * 3072  # 77,309.4 M
ATTENTION = 32 * (4096 * (32 + 2 * 8) * 128 + 32 * 128 * 4096)  # qkv 25.17 M + o 16.78 M per layer
SHARED = 32 * 3 * 4096 * 3072  # 1,208.0 M
ROUTERS = 32 * 64 * 4096  # 8.39 M
EMBED = 133120 * 4096  # wte = lm_head = 545.3 M
NORMS = 32 * (2 * 4096 + 2 * 128) + 4096  # input / post-attention / q / k norms + ln_f
BACKBONE = ROUTED + ATTENTION + SHARED + ROUTERS + 2 * EMBED + NORMS  # 80,958.7 M
TIMESTEP = 256 * 4096 + 4096 + 4096 * 4096 + 4096  # one TimestepEmbedder


def _conv(cin: int, cout: int, k: int) -> int:
    return cout * cin * k * k + cout


def _res_block(cin: int, emb: int, cout: int) -> int:
    skip = _conv(cin, cout, 1) if cin != cout else 0
    return 2 * cin + _conv(cin, cout, 3) + emb * 2 * cout + 2 * cout + 2 * cout + _conv(cout, cout, 3) + skip


PATCH_EMBED = _conv(32, 1024, 3) + _res_block(1024, 4096, 4096)  # 226.8 M
FINAL_LAYER = _res_block(4096, 4096, 1024) + 2 * 1024 + _conv(1024, 32, 3)  # 60.1 M


@pytest.fixture(scope="module")
def full_params() -> dict[tuple, nnx.Variable]:
    abstract = nnx.eval_shape(lambda: HunyuanImage3(FULL, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def _component(path: tuple) -> str:
    if path[0] != "model":
        return {"timestep_emb": "timestep", "time_embed": "timestep", "time_embed_2": "timestep"}.get(path[0], path[0])
    if path[1] in ("wte", "ln_f"):
        return {"wte": "wte", "ln_f": "norms"}[path[1]]
    sub = path[3:]
    if sub[0] == "self_attn":
        return "attention" if sub[1].endswith("_proj") else "norms"
    if sub[0] == "mlp":
        return {"experts": "routed", "shared_mlp": "shared", "gate": "routers"}[sub[1]]
    return "norms"  # input_layernorm / post_attention_layernorm


def test_reference_values_round_to_the_published_millions():
    published = {
        ROUTED: 77_309.4,
        ATTENTION: 1_342.2,
        SHARED: 1_208.0,
        ROUTERS: 8.39,
        EMBED: 545.3,
        BACKBONE: 80_958.7,
        PATCH_EMBED: 226.8,
        FINAL_LAYER: 60.1,
        3 * TIMESTEP: 53.5,
    }
    for count, millions in published.items():
        digits = 2 if millions < 10 else 1
        assert round(count / 1e6, digits) == millions, (count, millions)
    # With ViT + aligner (449.4 M) and VAE (1,260.7 M) the release totals 83,009.2 M.
    assert round((BACKBONE + PATCH_EMBED + FINAL_LAYER + 3 * TIMESTEP) / 1e6 + 449.4 + 1_260.7, 1) == 83_009.2
    # Active per token: everything but 56 of the 64 routed experts (~13.3 B).
    assert round((BACKBONE - ROUTED + ROUTED // 8) / 1e9, 1) == 13.3


def test_full_parameter_counts_are_exact(full_params):
    counts: dict[str, int] = {}
    for path, var in full_params.items():
        counts[_component(path)] = counts.get(_component(path), 0) + math.prod(var.get_value().shape)
    assert counts == {
        "routed": ROUTED,
        "attention": ATTENTION,
        "shared": SHARED,
        "routers": ROUTERS,
        "wte": EMBED,
        "lm_head": EMBED,
        "norms": NORMS,
        "patch_embed": PATCH_EMBED,
        "final_layer": FINAL_LAYER,
        "timestep": 3 * TIMESTEP,
    }
    backbone = sum(v for k, v in counts.items() if k not in ("patch_embed", "final_layer", "timestep"))
    assert backbone == BACKBONE == 80_958_730_240


def test_full_shapes_dtypes_and_axes(full_params):
    layer = ("model", "layers", 31)
    expect = {
        (*layer, "self_attn", "q_proj", "kernel"): (4096, 4096),
        (*layer, "self_attn", "k_proj", "kernel"): (4096, 1024),
        (*layer, "self_attn", "o_proj", "kernel"): (4096, 4096),
        (*layer, "self_attn", "query_layernorm", "weight"): (128,),
        (*layer, "mlp", "gate", "wg", "kernel"): (4096, 64),
        (*layer, "mlp", "experts", "up_proj"): (64, 4096, 3072),
        (*layer, "mlp", "experts", "down_proj"): (64, 3072, 4096),
        (*layer, "mlp", "shared_mlp", "gate_proj", "kernel"): (4096, 3072),
        ("model", "wte", "embedding"): (133120, 4096),
        ("lm_head", "kernel"): (4096, 133120),
        ("patch_embed", "model", 0, "kernel"): (3, 3, 32, 1024),
        ("final_layer", "model", 1, 2, "kernel"): (3, 3, 1024, 32),
    }
    for path, shape in expect.items():
        assert full_params[path].get_value().shape == shape, path
    for path, var in full_params.items():
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var.get_value().ndim, path
        router = path[-3:] == ("gate", "wg", "kernel")
        assert var.get_value().dtype == (jnp.float32 if router else jnp.bfloat16), path


def test_partition_specs():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = make_mesh("expert:4,model:2")
    assert logical_to_pspec(("exp", "embed", "exp_mlp"), (64, 4096, 3072), mesh) == PartitionSpec(
        "expert", None, "model"
    )
    assert logical_to_pspec(("embed", "exp_router"), (4096, 64), mesh) == PartitionSpec(None, None)
    assert logical_to_pspec(("embed", "heads"), (4096, 4096), mesh) == PartitionSpec(None, "model")


def test_key_table_official_shapes():
    table = hunyuan_key_table(FULL)
    shapes = {k: s for e in table.entries for k, s in zip(e.torch_keys, e.torch_shapes)}
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (6144, 4096)
    assert shapes["model.layers.7.mlp.experts.63.gate_and_up_proj.weight"] == (6144, 4096)
    assert shapes["model.layers.7.mlp.experts.63.down_proj.weight"] == (4096, 3072)
    assert shapes["model.layers.0.mlp.shared_mlp.gate_and_up_proj.weight"] == (6144, 4096)
    assert shapes["model.layers.0.mlp.gate.wg.weight"] == (64, 4096)
    assert shapes["patch_embed.model.1.emb_layers.1.weight"] == (8192, 4096)
    assert shapes["final_layer.model.1.2.weight"] == (32, 1024, 3, 3)
    assert table.num_params() == BACKBONE + PATCH_EMBED + FINAL_LAYER + 3 * TIMESTEP
    assert table.is_passthrough("vae.decoder.conv_out.weight")
    assert table.is_passthrough("vision_aligner.layers.0.weight")
    assert not table.is_passthrough("model.vae.weight")


@pytest.mark.parametrize("experts, billions", [(16, 22.97), (14, 20.55), (13, 19.35)])
def test_uniformly_pruned_backbone_sizes(experts, billions):
    """Uniform expert pruning at full size (the reference's 22.97 / 20.55 / 19.35 B): each removed expert
    takes its 3 x 4096 x 3072 weights and its router row. Counted from the key table, whose shapes the
    full-size test above ties to the model (an eval_shape of the full model costs ~6 s on CPU)."""
    cfg = FULL.replace(num_experts=(experts,) * 32)
    backbone = hunyuan_key_table(cfg).num_params() - (PATCH_EMBED + FINAL_LAYER + 3 * TIMESTEP)
    assert backbone == BACKBONE - 32 * (64 - experts) * (4096 + 3 * 4096 * 3072)
    assert round(backbone / 1e9, 2) == billions


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------
def test_config_normalises_per_layer_fields():
    cfg = HunyuanImage3Config.from_hf_config(
        {
            **TINY.to_hf_config(),
            "num_experts": [4, 3],
            "moe_topk": 2,
            "head_dim": 16,
            "rope_scaling": {"type": "custom", "factor": 1.0},
            "auto_map": {"AutoConfig": "x"},  # unknown keys are ignored
            "vit": {"hidden_size": 1152},
        }
    )
    assert cfg.num_experts == (4, 3) and cfg.moe_topk == (2, 2) and cfg.num_shared_expert == (1, 1)
    assert cfg.latent_channels == 32 and cfg.shared_intermediate_size(1) == 32
    assert HunyuanImage3Config.from_hf_config(cfg.to_hf_config()) == cfg
    assert hash(cfg) == hash(HunyuanImage3Config.from_hf_config(cfg.to_hf_config()))
    assert FULL.num_experts == (64,) * 32 and FULL.moe_topk == (8,) * 32


@pytest.mark.parametrize(
    "change, message",
    [
        ({"moe_topk": [2, 5]}, r"moe_topk\[1\] = 5"),
        ({"num_experts": [4, 4, 4]}, "num_experts has 3 entries"),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "not divisible by num_key_value_heads"),
        ({"hidden_size": 48}, "multiple of 32"),
        ({"patch_embed_hidden_dim": 40}, "multiple of 32"),
        ({"attention_head_dim": 18}, "divisible by 4"),
        ({"norm_topk_prob": False}, "renormalises"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "custom"),
        ({"moe_layer_num_skipped": 1}, "moe_layer_num_skipped"),
        ({"head_dim": 32}, "head_dim"),
        ({"image_token_id": 500}, "outside the vocabulary"),
    ],
)
def test_config_validation(change, message):
    with pytest.raises(ValueError, match=message):
        HunyuanImage3Config.from_hf_config({**TINY.to_hf_config(), **change})


def test_t2i_layout_is_checked_on_concrete_inputs():
    model = nnx.eval_shape(lambda: HunyuanImage3(TINY, rngs=nnx.Rngs(0)))
    ids = np.array([[1, 5, 100, 100, 100, 100, 2]])  # no <timestep> before the image span
    with pytest.raises(ValueError, match="timestep"):
        model(ids, jnp.zeros((1, 32, 2, 2)), jnp.zeros((1,)))
