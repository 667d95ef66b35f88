"""HunyuanImage-3.0-Instruct (TI2I) / Instruct-Distil path (``tmp_jax.models.hunyuan_image3.instruct``).

No PyTorch reference implements image conditioning or the guidance / timestep_r embeddings (nemo-automodel
0.7.0 has neither), so:

* the pieces nemo does implement are compared with nemo on the same weights: a condition image's latents
  through ``patch_embed`` with t = 0, and the TimestepEmbedder architecture that the guidance / timestep_r
  / condition-timestep slots use (fp32, relative error <= 1e-5);
* the rest is checked against explicit hand-computed cases: the token layout, the 2D RoPE positions and the
  attention mask of small TI2I layouts (numbers worked out by hand from the layout rule in the module
  docstring), the aligner against a float64 numpy computation, and the slot filling token by token;
* without condition images and with the new flags off the TI2I forward is bit-identical to the T2I forward
  (which the nemo parity tests cover);
* converter round trip with the new keys (strict both ways) and exact pruning accounting.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from converters.engine import CheckpointError, SafetensorsReader, export_arrays, load_into  # noqa: E402
from converters.hunyuan import hunyuan_key_table  # noqa: E402
from tmp_jax.materialize import count_params, materialize  # noqa: E402
from tmp_jax.models.hunyuan_image3 import TINY, HunyuanImage3Config  # noqa: E402
from tmp_jax.models.hunyuan_image3.instruct import (  # noqa: E402
    TI2ILayout,
    TI2ITokens,
    build_ti2i_batch,
    check_ti2i_layout,
    ti2i_attention_mask,
    ti2i_embed,
    ti2i_forward,
    ti2i_positions,
)
from tmp_jax.models.hunyuan_image3.kernels import t2i_attention_split  # noqa: E402
from tmp_jax.models.hunyuan_image3.structure import build_spec, init_abstract, init_random  # noqa: E402
from tmp_jax.tree import Tree  # noqa: E402

IMG, TS, PAD, BOS, EOS = 100, 101, 0, 1, 2
TOK = TI2ITokens(boi=102, eoi=103, joint_img_sep=104, guidance=105, timestep_r=106)
VIT_DIM = 24
ALIGNER = {"projector_type": "mlp_gelu", "input_dim": VIT_DIM, "n_embed": 64, "depth": 2}
CFG_T2I = TINY.replace(vae={"latent_channels": 4})
CFG = CFG_T2I.replace(
    cfg_distilled=True,
    use_meanflow=True,
    ti2i=True,
    cond_image_type="vae_vit",
    cond_token_attn_type="joint_full",
    vit_aligner=ALIGNER,
)
# Extra (unprunable) parameters of CFG over CFG_T2I, counted by hand: two TimestepEmbedders
# (256 -> 64 -> 64, with biases) and the aligner (24 -> 64 -> 64, with biases).
N_EMBEDDER = 256 * 64 + 64 + 64 * 64 + 64
N_ALIGNER = VIT_DIM * 64 + 64 + 64 * 64 + 64
N_EXTRA = 2 * N_EMBEDDER + N_ALIGNER

# Layout A: one condition image (VAE 2x3, ViT 2x2), target 2x2, all slots; one row, 2 padding tokens.
LAYOUT_A = TI2ILayout(target_hw=(2, 2), cond_vae_hw=((2, 3),), cond_vit_hw=((2, 2),))
# Layout B: two condition images (VAE 1x2 / ViT 1x1, VAE 1x1 / ViT 2x1), target 1x2: 1-row / 1-column grids
# with half-integer centring offsets on both axes.
LAYOUT_B = TI2ILayout(target_hw=(1, 2), cond_vae_hw=((1, 2), (1, 1)), cond_vit_hw=((1, 1), (2, 1)))


@pytest.fixture(scope="module")
def model():
    return init_random(CFG, jnp.float32, 1)


@pytest.fixture(scope="module")
def model_t2i():
    return init_random(CFG_T2I, jnp.float32, 0)


def inputs(rng, b, layout, channels=4):
    lat = rng.standard_normal((b, channels, *layout.target_hw)).astype(np.float32)
    conds = tuple(rng.standard_normal((b, channels, *hw)).astype(np.float32) for hw in layout.cond_vae_hw)
    vits = tuple(rng.standard_normal((b, h * w, VIT_DIM)).astype(np.float32) for h, w in layout.cond_vit_hw)
    return lat, conds, vits


# ----------------------------------------------------------------------------------------------------------
# (a) no condition image, flags off: bit-identical to the T2I forward
# ----------------------------------------------------------------------------------------------------------
def test_no_condition_is_bit_identical_to_t2i(model_t2i):
    rng = np.random.default_rng(0)
    h, w = 2, 3
    rows = [np.concatenate([[BOS], rng.integers(3, IMG, n), [TS], np.full(h * w, IMG), [EOS]]) for n in (3, 7)]
    ids = np.full((2, max(map(len, rows)) + 2), PAD, np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    valid = np.array([len(r) for r in rows], np.int32)
    target_start = np.array([5, 9], np.int32)  # [bos] + text + <timestep>
    lat = rng.standard_normal((2, 4, h, w)).astype(np.float32)
    t = np.array([137.0, 802.5], np.float32)

    graphdef, state = nnx.split(model_t2i)
    t2i = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    layout = TI2ILayout(target_hw=(h, w))
    ti2i = jax.jit(
        lambda s, ids, lat, t, vl, ts: ti2i_forward(
            nnx.merge(graphdef, s), ids, lat, t, layout=layout, target_start=ts, valid_lengths=vl
        )
    )
    want = np.asarray(t2i(state, ids, lat, t, valid))
    got = np.asarray(ti2i(state, ids, lat, t, valid, target_start))
    np.testing.assert_array_equal(got, want)
    check_ti2i_layout(ids, CFG_T2I, layout, target_start, None)  # the T2I rows are a valid K = 0 layout


def test_release_fields_without_ti2i_keep_the_t2i_model():
    """The release's Instruct fields are read and round-trip but build nothing while the flags are off."""
    release = {**CFG_T2I.to_hf_config(), "cond_image_type": "vae_vit", "cond_token_attn_type": "joint_full"}
    release.update(vit_aligner=ALIGNER, cfg_distilled=False, use_meanflow=False)
    cfg = HunyuanImage3Config.from_hf_config(release)
    assert not cfg.ti2i and cfg.vit_aligner["depth"] == 2
    assert HunyuanImage3Config.from_hf_config(cfg.to_hf_config()) == cfg
    assert set(CFG_T2I.to_hf_config()) == set(TINY.to_hf_config())  # no new keys for T2I configs
    shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(init_abstract(cfg), nnx.Param))}
    base = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(init_abstract(CFG_T2I), nnx.Param))}
    assert shapes == base
    table = hunyuan_key_table(cfg)
    assert set(table.by_key) == set(hunyuan_key_table(CFG_T2I).by_key)
    assert table.is_passthrough("vision_aligner.layers.0.weight")
    assert not hunyuan_key_table(CFG).is_passthrough("vision_aligner.layers.0.weight")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vit_aligner": None}, "ti2i needs vit_aligner"),
        ({"vit_aligner": {**ALIGNER, "n_embed": 32}}, "must equal hidden_size"),
        ({"vit_aligner": {**ALIGNER, "projector_type": "linear"}}, "mlp_gelu"),
        ({"cond_token_attn_type": "causal"}, "joint_full"),
        ({"cond_image_type": "vae"}, "vae_vit"),
    ],
)
def test_ti2i_config_validation(change, message):
    with pytest.raises(ValueError, match=message):
        CFG.replace(**change)


# ----------------------------------------------------------------------------------------------------------
# (b) hand-computed layout, positions, mask, aligner, slots
# ----------------------------------------------------------------------------------------------------------
def test_layout_a_ids_positions_and_mask():
    batch = build_ti2i_batch(CFG, TOK, LAYOUT_A, [[[BOS, 5], [7], [EOS]]], pad_to=29)
    # fmt: off
    want_ids = [
        BOS, 5,                                  # 0-1   text
        102, TS, *[IMG] * 6, 104, *[IMG] * 4, 103,  # 2-15  <boi> <timestep> VAE(4-9) <sep>(10) ViT(11-14) <eoi>
        7,                                       # 16    text
        102, TS, 105, 106, *[IMG] * 4, 103,      # 17-25 <boi> <timestep> <guidance> <timestep_r> target(21-24) <eoi>
        EOS, PAD, PAD,                           # 26-28
    ]
    # fmt: on
    np.testing.assert_array_equal(batch["input_ids"][0], want_ids)
    assert batch["target_start"].tolist() == [21] and batch["cond_start"].tolist() == [[4]]
    assert batch["valid_lengths"].tolist() == [27]
    check_ti2i_layout(batch["input_ids"], CFG, LAYOUT_A, batch["target_start"], batch["cond_start"], TOK)

    ts, cs = jnp.asarray(batch["target_start"]), jnp.asarray(batch["cond_start"])
    pos = np.asarray(ti2i_positions(29, LAYOUT_A, ts, cs))[0]
    # VAE 2x3 at L=4: y = floor(4 + (6-2)/2) + row = 6 + row, x = floor(4 + (6-3)/2) + col = 5 + col.
    # ViT 2x2 at L=11: y = 12 + row, x = 12 + col.  Target 2x2 at L=21: y = 22 + row, x = 22 + col.
    # fmt: off
    want_pos = [
        (0, 0), (1, 1), (2, 2), (3, 3),
        (6, 5), (6, 6), (6, 7), (7, 5), (7, 6), (7, 7),
        (10, 10),
        (12, 12), (12, 13), (13, 12), (13, 13),
        (15, 15), (16, 16), (17, 17), (18, 18), (19, 19), (20, 20),
        (22, 22), (22, 23), (23, 22), (23, 23),
        (25, 25), (26, 26), (27, 27), (28, 28),
    ]
    # fmt: on
    np.testing.assert_array_equal(pos, np.array(want_pos))

    mask = np.asarray(ti2i_attention_mask(29, LAYOUT_A, ts, cs, jnp.asarray(batch["valid_lengths"])))[0, 0]
    want = np.tril(np.ones((29, 29), bool))  # causal
    want[4:15, 4:15] = True  # the joint span: VAE 4-9, <joint_img_sep> 10, ViT 11-14
    want[21:25, 21:25] = True  # the target block
    want[:, 27:] = False  # padded keys
    want[np.arange(29), np.arange(29)] = True  # padded queries see themselves
    np.testing.assert_array_equal(mask, want)
    # Spot checks of what the rule means.
    assert not mask[3, 4]  # the condition <timestep> is outside the joint span
    assert mask[4, 14] and mask[11, 9] and mask[10, 14]  # VAE <-> ViT <-> separator
    assert not mask[14, 15] and not mask[9, 21]  # <eoi> and the target are not visible to the condition
    assert mask[21, 24] and mask[21, 9] and not mask[19, 21]  # target block; <guidance> is causal text


def test_layout_b_two_conditions_positions_and_mask():
    batch = build_ti2i_batch(CFG, TOK, LAYOUT_B, [[[BOS], [], [], [EOS]]])
    # fmt: off
    want_ids = [
        BOS,
        102, TS, IMG, IMG, 104, IMG, 103,       # 1-7   cond 0: VAE 3-4, <sep> 5, ViT 6
        102, TS, IMG, 104, IMG, IMG, 103,       # 8-14  cond 1: VAE 10, <sep> 11, ViT 12-13
        102, TS, 105, 106, IMG, IMG, 103,       # 15-21 target 19-20
        EOS,
    ]
    # fmt: on
    np.testing.assert_array_equal(batch["input_ids"][0], want_ids)
    assert batch["cond_start"].tolist() == [[3, 10]] and batch["target_start"].tolist() == [19]
    ts, cs = jnp.asarray(batch["target_start"]), jnp.asarray(batch["cond_start"])
    pos = np.asarray(ti2i_positions(23, LAYOUT_B, ts, cs))[0]
    want_pos = [(i, i) for i in range(23)]
    # cond 0 VAE 1x2 at 3: y = floor(3 + 1/2) = 3, x = 3 + col.  ViT 1x1 at 6: (6, 6).
    want_pos[3:5] = [(3, 3), (3, 4)]
    # cond 1 VAE 1x1 at 10: (10, 10).  ViT 2x1 at 12: y = 12 + row, x = floor(12 + 1/2) = 12.
    want_pos[12:14] = [(12, 12), (13, 12)]
    # target 1x2 at 19: (19, 19), (19, 20).
    want_pos[19:21] = [(19, 19), (19, 20)]
    np.testing.assert_array_equal(pos, np.array(want_pos))

    mask = np.asarray(ti2i_attention_mask(23, LAYOUT_B, ts, cs, jnp.asarray(batch["valid_lengths"])))[0, 0]
    want = np.tril(np.ones((23, 23), bool))
    want[3:7, 3:7] = True
    want[10:14, 10:14] = True
    want[19:21, 19:21] = True
    np.testing.assert_array_equal(mask, want)
    assert mask[10, 3] and not mask[3, 10]  # two condition images see each other only causally


def test_aligner_matches_numpy(model):
    x = np.random.default_rng(3).standard_normal((2, 5, VIT_DIM)).astype(np.float32)
    got = np.asarray(model.vision_aligner(jnp.asarray(x)), np.float64)
    layers = model.vision_aligner.layers
    w0, b0 = (np.asarray(v[...], np.float64) for v in (layers[0].kernel, layers[0].bias))
    w2, b2 = (np.asarray(v[...], np.float64) for v in (layers[2].kernel, layers[2].bias))
    h = x.astype(np.float64) @ w0 + b0
    h = 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))  # exact GELU (torch nn.GELU default)
    want = h @ w2 + b2
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


def two_rows():
    """Layout A with two rows of different text lengths (row 1: condition image 2, target 3 tokens later)."""
    segments = [[[BOS, 5], [7], [EOS]], [[BOS, 5, 6, 9], [7, 8], [EOS]]]
    return build_ti2i_batch(CFG, TOK, LAYOUT_A, segments)


def test_every_slot_receives_exactly_its_embedding(model):
    batch = two_rows()
    rng = np.random.default_rng(4)
    lat, conds, vits = inputs(rng, 2, LAYOUT_A)
    t, g, r = np.array([600.0, 250.0], np.float32), np.array([4500.0, 1200.0], np.float32), np.array([400.0, 60.0])
    e = ti2i_embed(
        model,
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(lat),
        jnp.asarray(t),
        layout=LAYOUT_A,
        target_start=jnp.asarray(batch["target_start"]),
        cond_start=jnp.asarray(batch["cond_start"]),
        cond_latents=conds,
        vit_features=vits,
        guidance=jnp.asarray(g),
        timestep_r=jnp.asarray(r, np.float32),
        valid_lengths=jnp.asarray(batch["valid_lengths"]),
    )
    got = np.asarray(e["embeds"])
    zero = jnp.zeros((2,), jnp.float32)
    want = np.array(model.model.wte(jnp.asarray(batch["input_ids"])))
    target = np.asarray(model.patch_embed(jnp.asarray(lat), model.time_embed(jnp.asarray(t))))
    cond = np.asarray(model.patch_embed(jnp.asarray(conds[0]), model.time_embed(zero)))
    vit = np.asarray(model.vision_aligner(jnp.asarray(vits[0])))
    # Slot indices worked out by hand (see test_layout_a_ids_positions_and_mask); row 1 has 2 more tokens
    # before the condition image and 3 more before the target.
    for b, (c, s) in enumerate(((0, 0), (2, 3))):
        want[b, 18 + s] = np.asarray(model.timestep_emb(jnp.asarray(t)))[b]
        want[b, 19 + s] = np.asarray(model.guidance_emb(jnp.asarray(g)))[b]
        want[b, 20 + s] = np.asarray(model.timestep_r_emb(jnp.asarray(r, np.float32)))[b]
        want[b, 21 + s : 25 + s] = target[b]
        want[b, 3 + c] = np.asarray(model.timestep_emb(zero))[b]  # condition <timestep>: t = 0
        want[b, 4 + c : 10 + c] = cond[b]
        want[b, 11 + c : 15 + c] = vit[b]
    np.testing.assert_array_equal(got, want)
    assert e["mask"].image_start.tolist() == [21, 24] and e["mask"].num_image == 4
    np.testing.assert_array_equal(np.asarray(e["image_index"]), [[21, 22, 23, 24], [24, 25, 26, 27]])
    # Target queries see exactly the keys before the end of the target block (what the cuDNN split assumes).
    dense = np.asarray(e["mask"].dense)
    for b, start in enumerate((21, 24)):
        for q in range(start, start + 4):
            np.testing.assert_array_equal(dense[b, 0, q], np.arange(dense.shape[-1]) < start + 4)
    # ... so the split path (cuDNN on GPU; its XLA twin here) equals dense masked attention on this mask.
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    seq = dense.shape[-1]
    q = jax.random.normal(kq, (2, seq, 4, 16))
    k, v = jax.random.normal(kk, (2, seq, 2, 16)), jax.random.normal(kv, (2, seq, 2, 16))
    split = t2i_attention_split(q, k, v, e["mask"], 0.25, implementation="xla")
    ref = jax.nn.dot_product_attention(q, k, v, mask=e["mask"].dense, scale=0.25)
    np.testing.assert_allclose(np.asarray(split), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_forward_uses_conditions_and_checks_inputs(model):
    batch = two_rows()
    rng = np.random.default_rng(5)
    lat, conds, vits = inputs(rng, 2, LAYOUT_A)
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, vit, g):
        return ti2i_forward(
            nnx.merge(graphdef, state),
            jnp.asarray(batch["input_ids"]),
            jnp.asarray(lat),
            jnp.array([600.0, 250.0]),
            layout=LAYOUT_A,
            target_start=jnp.asarray(batch["target_start"]),
            cond_start=jnp.asarray(batch["cond_start"]),
            cond_latents=conds,
            vit_features=(vit,),
            guidance=g,
            timestep_r=jnp.array([400.0, 60.0]),
            valid_lengths=jnp.asarray(batch["valid_lengths"]),
        )

    g = jnp.array([4500.0, 1200.0])
    base = np.asarray(fwd(state, jnp.asarray(vits[0]), g))
    assert base.shape == lat.shape and np.isfinite(base).all()
    assert np.abs(np.asarray(fwd(state, jnp.asarray(vits[0]) + 1.0, g)) - base).max() > 1e-4  # ViT reaches it
    assert np.abs(np.asarray(fwd(state, jnp.asarray(vits[0]), g * 0.5)) - base).max() > 1e-4  # guidance too

    kw = dict(layout=LAYOUT_A, target_start=batch["target_start"], cond_start=batch["cond_start"])
    with pytest.raises(ValueError, match="needs `guidance`"):
        ti2i_embed(model, batch["input_ids"], lat, np.ones(2), cond_latents=conds, vit_features=vits, **kw)
    bad = batch["input_ids"].copy()
    bad[1, 14] = 7  # a ViT slot of row 1 that is not an <img> token
    with pytest.raises(ValueError, match=r"row 1: cond 0 ViT span"):
        check_ti2i_layout(bad, CFG, LAYOUT_A, batch["target_start"], batch["cond_start"], TOK)
    bad = batch["input_ids"].copy()
    bad[0, 19] = 106  # <timestep_r> where <guidance> belongs
    with pytest.raises(ValueError, match=r"row 0: target <guidance>"):
        check_ti2i_layout(bad, CFG, LAYOUT_A, batch["target_start"], batch["cond_start"], TOK)


def test_condition_images_need_the_aligner(model_t2i):
    lat, conds, vits = inputs(np.random.default_rng(6), 1, LAYOUT_A)
    batch = build_ti2i_batch(CFG_T2I, TOK, LAYOUT_A, [[[BOS], [], [EOS]]])
    with pytest.raises(ValueError, match="config.ti2i=True"):
        ti2i_embed(
            model_t2i,
            batch["input_ids"],
            lat,
            np.ones(1, np.float32),
            layout=LAYOUT_A,
            target_start=batch["target_start"],
            cond_start=batch["cond_start"],
            cond_latents=conds,
            vit_features=vits,
        )


# ----------------------------------------------------------------------------------------------------------
# (d) converter round trip with the new keys
# ----------------------------------------------------------------------------------------------------------
def flat_params(m) -> dict:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}


NEW_KEYS = {
    **{f"{e}.mlp.0.weight": (64, 256) for e in ("guidance_emb", "timestep_r_emb")},
    **{f"{e}.mlp.0.bias": (64,) for e in ("guidance_emb", "timestep_r_emb")},
    **{f"{e}.mlp.2.weight": (64, 64) for e in ("guidance_emb", "timestep_r_emb")},
    **{f"{e}.mlp.2.bias": (64,) for e in ("guidance_emb", "timestep_r_emb")},
    "vision_aligner.layers.0.weight": (64, VIT_DIM),
    "vision_aligner.layers.0.bias": (64,),
    "vision_aligner.layers.2.weight": (64, 64),
    "vision_aligner.layers.2.bias": (64,),
}


def test_converter_round_trip_with_instruct_keys(model, tmp_path):
    table = hunyuan_key_table(CFG)
    flat = flat_params(model)
    # export_arrays yields transposed views; safetensors.numpy needs C-contiguous arrays.
    official = {k: np.ascontiguousarray(v) for k, v in export_arrays(table, lambda p: flat[p])}
    assert set(official) == set(hunyuan_key_table(CFG_T2I).by_key) | set(NEW_KEYS)
    assert {k: official[k].shape for k in NEW_KEYS} == NEW_KEYS
    np.testing.assert_array_equal(
        official["vision_aligner.layers.0.weight"], flat[("vision_aligner", "layers", 0, "kernel")].T
    )
    np.testing.assert_array_equal(official["guidance_emb.mlp.2.bias"], flat[("guidance_emb", "mlp", 2, "bias")])
    assert table.num_params() == count_params(model) == count_params(init_abstract(CFG_T2I)) + N_EXTRA

    extra = {"vae.decoder.conv_out.weight": np.zeros((3, 4, 3, 3, 3), np.float32)}
    extra["vision_model.embeddings.patch_embedding.weight"] = np.zeros((8, 8), np.float32)
    save_file({**official, **extra}, str(tmp_path / "model.safetensors"))
    loaded = load_into(init_abstract(CFG), table, SafetensorsReader(tmp_path))
    back = flat_params(loaded)
    assert set(back) == set(flat)
    for p, v in flat.items():
        np.testing.assert_array_equal(back[p], v, err_msg=str(p))

    # Strict both ways: keys without the flag, flag without the keys.
    no_guidance = CFG.replace(cfg_distilled=False)
    with pytest.raises(CheckpointError, match="unknown key 'guidance_emb"):
        load_into(init_abstract(no_guidance), hunyuan_key_table(no_guidance), SafetensorsReader(tmp_path))
    # Without ti2i the aligner keys are passthrough again: the same file loads, the aligner is not ported.
    no_aligner = CFG.replace(ti2i=False)
    m = load_into(init_abstract(no_aligner), hunyuan_key_table(no_aligner), SafetensorsReader(tmp_path))
    assert m.vision_aligner is None
    missing = tmp_path / "missing"
    missing.mkdir()
    save_file(
        {k: v for k, v in {**official, **extra}.items() if "vision_aligner" not in k}, str(missing / "m.safetensors")
    )
    with pytest.raises(CheckpointError, match="missing key 'vision_aligner.layers.0"):
        load_into(init_abstract(CFG), table, SafetensorsReader(missing))


# ----------------------------------------------------------------------------------------------------------
# (e) pruning accounting
# ----------------------------------------------------------------------------------------------------------
def test_pruning_spec_counts_instruct_modules_as_unprunable(model):
    tree, base = Tree(build_spec(CFG)), Tree(build_spec(CFG_T2I))
    assert tree.full["params"] == count_params(model) == base.full["params"] + N_EXTRA
    assert tree.floor()["params"] == base.floor()["params"] + N_EXTRA  # never pruned
    root = tree.spec.root
    extra = {p for p in tree.spec.shapes if p[0] in ("guidance_emb", "timestep_r_emb", "vision_aligner")}
    assert len(extra) == 12 and extra <= set(root.params)
    assert not any(s.path in extra for n in tree.spec.nodes() for u in n.units for s in u.slices)
    # A pruned Instruct model keeps the modules unchanged, and its accounting and key table stay exact.
    flat = flat_params(model)
    for genome in (tree.max_levels() // 2, np.zeros(tree.n_genes, np.int32)):
        a = tree.decode(genome)
        small = materialize(model, tree, a)
        assert count_params(small) == tree.count(a)["params"] == hunyuan_key_table(small.config).num_params()
        assert small.config.ti2i and small.config.cfg_distilled and small.config.use_meanflow
        small_flat = flat_params(small)
        for path in extra:
            np.testing.assert_array_equal(small_flat[path], flat[path])


# ----------------------------------------------------------------------------------------------------------
# (c) reference check of the pieces nemo-automodel implements
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.torch
def test_condition_patch_embed_and_embedders_match_nemo(model, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("nemo_automodel")
    from nemo_automodel.components.models.hunyuan_image3.layers import TimestepEmbedder, UNetDown

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref = {
        "patch_embed": UNetDown(4, 64, 32, 64, dtype=torch.float32),
        **{
            n: TimestepEmbedder(64, dtype=torch.float32)
            for n in ("time_embed", "timestep_emb", "guidance_emb", "timestep_r_emb")
        },
    }
    sd = {}
    with torch.no_grad():
        for prefix, module in ref.items():
            for name, p in module.named_parameters():
                if p.ndim == 1 and name.endswith("weight"):  # GroupNorm scales
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                elif p.ndim == 1:
                    p.copy_(0.1 * torch.randn_like(p))
                else:
                    p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            sd.update({f"{prefix}.{k}": v.numpy().copy() for k, v in module.state_dict().items()})
    # Our model with nemo's weights for these modules (through the key table), every other tensor unchanged.
    table = hunyuan_key_table(CFG)
    flat = flat_params(model)
    official = {k: np.ascontiguousarray(v) for k, v in export_arrays(table, lambda p: flat[p])}
    assert set(sd) <= set(official)
    official.update(sd)
    save_file(official, str(tmp_path / "model.safetensors"))
    ours = load_into(init_abstract(CFG), table, SafetensorsReader(tmp_path))

    batch = two_rows()
    lat, conds, vits = inputs(np.random.default_rng(7), 2, LAYOUT_A)
    # Guidance inside [0, 1000] like the timesteps: for larger values the fp32 sinusoid arguments (t * freq)
    # already differ between torch.exp and XLA's exp by an ulp of the frequency, ~1e-5 after the MLP.
    t, g, r = (
        np.array([600.0, 250.0], np.float32),
        np.array([875.0, 120.0], np.float32),
        np.array([400.0, 60.0], np.float32),
    )
    e = ti2i_embed(
        ours,
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(lat),
        jnp.asarray(t),
        layout=LAYOUT_A,
        target_start=jnp.asarray(batch["target_start"]),
        cond_start=jnp.asarray(batch["cond_start"]),
        cond_latents=conds,
        vit_features=vits,
        guidance=jnp.asarray(g),
        timestep_r=jnp.asarray(r),
        valid_lengths=jnp.asarray(batch["valid_lengths"]),
    )
    got = np.asarray(e["embeds"])
    with torch.no_grad():
        zero = torch.zeros(2)
        want_cond = ref["patch_embed"](torch.from_numpy(conds[0]), ref["time_embed"](zero)).numpy()  # t = 0
        want_target = ref["patch_embed"](torch.from_numpy(lat), ref["time_embed"](torch.from_numpy(t))).numpy()
        # (index in row 0, whether it moves with the condition image or the target in row 1, reference)
        want_slots = {
            "cond <timestep>": (3, "c", ref["timestep_emb"](zero).numpy()),
            "<timestep>": (18, "s", ref["timestep_emb"](torch.from_numpy(t)).numpy()),
            "<guidance>": (19, "s", ref["guidance_emb"](torch.from_numpy(g)).numpy()),
            "<timestep_r>": (20, "s", ref["timestep_r_emb"](torch.from_numpy(r)).numpy()),
        }

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    for b, (c, s) in enumerate(((0, 0), (2, 3))):  # row offsets as in test_every_slot_receives_exactly_...
        assert rel(got[b, 4 + c : 10 + c], want_cond[b]) <= 1e-5
        assert rel(got[b, 21 + s : 25 + s], want_target[b]) <= 1e-5
        for what, (i, moves, want) in want_slots.items():
            assert rel(got[b, i + (c if moves == "c" else s)], want[b]) <= 1e-5, what


def test_full_size_instruct_key_table_counts():
    """Release shapes (hand count): each extra TimestepEmbedder 256 -> 4096 -> 4096 = 17,833,984 (the
    reference's 3 timestep embedders = 53.5 M), the aligner 1152 -> 4096 -> 4096 = 21,504,000."""
    from tmp_jax.models.hunyuan_image3 import FULL

    release = {"projector_type": "mlp_gelu", "input_dim": 1152, "n_embed": 4096, "depth": 2}
    full = FULL.replace(cfg_distilled=True, use_meanflow=True, ti2i=True, vit_aligner=release)
    embedder = 256 * 4096 + 4096 + 4096 * 4096 + 4096
    assert embedder == 17_833_984
    aligner = 1152 * 4096 + 4096 + 4096 * 4096 + 4096
    assert hunyuan_key_table(full).num_params() - hunyuan_key_table(FULL).num_params() == 2 * embedder + aligner
    assert hunyuan_key_table(full).by_key["vision_aligner.layers.0.weight"].torch_shapes == ((4096, 1152),)
