"""Z-Image parity against the REAL diffusers ZImageTransformer2DModel (tiny, every parameter random)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safetensors.numpy import save_file  # noqa: E402
from zimage_ref import TINY_KW, inputs, rel_err, save_diffusers, tiny_diffusers, torch_forward  # noqa: E402

from converters.zimage import load_zimage  # noqa: E402
from tmp_jax.models.z_image import ZImageConfig, ZImageTransformer  # noqa: E402
from tmp_jax.models.z_image.model import rope_cos_sin  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = tiny_diffusers(seed=0)
    folder = save_diffusers(ref, tmp_path_factory.mktemp("zi") / "transformer")
    return ref, ZImageTransformer.from_pretrained(str(folder)), folder


def _t(a):
    return torch.from_numpy(np.array(a))


def test_full_model_ragged_batch(pair):
    ref, jm, _ = pair
    # different image sizes and caption lengths (7: not a multiple of 32; 40: two segments)
    x, t, cap = inputs(seed=1, sizes=((8, 12), (12, 8), (4, 4)), cap_lens=(7, 40, 32))
    want = torch_forward(ref, x, t, cap)
    got = jm(x, t, cap)
    assert len(got) == 3
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) <= TOL


def test_submodules(pair):
    ref, jm, _ = pair
    rng = np.random.default_rng(3)
    cfg = jm.config
    t = np.array([0.3, 0.9], np.float32)
    with torch.no_grad():
        c_ref = ref.t_embedder(_t(t) * 1000.0).numpy()
    c = np.asarray(jm.t_embedder(jnp.asarray(t) * 1000.0))
    assert rel_err(c, c_ref) <= TOL
    cap = rng.standard_normal((2, 9, 32)).astype(np.float32)
    with torch.no_grad():
        want = ref.cap_embedder(_t(cap)).numpy()
    got = jm.cap_embedder[1](jm.cap_embedder[0](jnp.asarray(cap)))
    assert rel_err(got, want) <= TOL
    # one modulated block, one context-refiner block, final layer: same inputs, same RoPE positions
    T = 40
    pos = np.stack([rng.integers(0, 200, T), rng.integers(0, 60, T), rng.integers(0, 60, T)], -1).astype(np.int32)
    pos = np.broadcast_to(pos, (2, T, 3))
    h = rng.standard_normal((2, T, cfg.dim)).astype(np.float32)
    valid = np.ones((2, T), bool)
    valid[1, 30:] = False
    with torch.no_grad():
        freqs = ref.rope_embedder(_t(pos[0])).unsqueeze(0).repeat(2, 1, 1)
        mask_t = _t(valid)
        outs_ref = [
            ref.layers[1](_t(h), mask_t, freqs, _t(c_ref)).numpy(),
            ref.context_refiner[0](_t(h), mask_t, freqs).numpy(),
            ref.all_final_layer["2-1"](_t(h), c=_t(c_ref)).numpy(),
        ]
    cos, sin = rope_cos_sin(cfg, jnp.asarray(pos))
    mask = jnp.asarray(valid)[:, None, None, :]
    outs = [
        jm.layers[1](jnp.asarray(h), mask, cos, sin, jnp.asarray(c)),
        jm.context_refiner[0](jnp.asarray(h), mask, cos, sin),
        jm.all_final_layer["2-1"](jnp.asarray(h), jnp.asarray(c)),
    ]
    for g, w in zip(outs, outs_ref):
        assert rel_err(np.asarray(g)[0], w[0]) <= TOL  # sample 0: all keys valid
        assert rel_err(np.asarray(g)[1, :30], w[1, :30]) <= TOL  # sample 1: masked tail


def test_bf16_close(pair):
    _, _, folder = pair
    m16 = ZImageTransformer.from_pretrained(str(folder), dtype=jnp.bfloat16)
    assert m16.layers[0].attention.to_q.kernel[...].dtype == jnp.bfloat16
    x, t, cap = inputs(seed=1)
    ref32 = ZImageTransformer.from_pretrained(str(folder))(x, t, cap)
    got = m16([v.astype(jnp.bfloat16) for v in x], t, [c.astype(jnp.bfloat16) for c in cap])
    for g, w in zip(got, ref32):
        assert rel_err(np.asarray(g, np.float32), w) <= 5e-2  # bf16 tolerance (8-bit mantissa)


def _prune_state(sd: dict[str, np.ndarray], cfg: ZImageConfig, keep: dict) -> dict[str, np.ndarray]:
    """Slice a full diffusers state dict down to a heterogeneous config (kept heads / channels / blocks)."""
    hd = cfg.head_dim
    out = {k: v for k, v in sd.items() if not k.startswith(("layers.", "noise_refiner.", "context_refiner."))}
    for stack in ("noise_refiner", "context_refiner", "layers"):
        for new_i, b in enumerate(cfg.stack(stack)):
            src, dst = f"{stack}.{b.index}.", f"{stack}.{new_i}."
            heads, chans = keep[(stack, b.index)]
            rows = np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in heads]) if len(heads) else []
            for k, v in sd.items():
                if not k.startswith(src):
                    continue
                rest = k[len(src) :]
                if rest.startswith("attention") and not len(heads):
                    continue
                if rest.startswith(("feed_forward", "ffn_norm")) and not len(chans):
                    continue
                if rest.startswith(("attention.to_q", "attention.to_k", "attention.to_v")):
                    v = v[rows]
                elif rest.startswith("attention.to_out"):
                    v = v[:, rows]
                elif rest.startswith(("feed_forward.w1", "feed_forward.w3")):
                    v = v[chans]
                elif rest.startswith("feed_forward.w2"):
                    v = v[:, chans]
                out[dst + rest] = np.ascontiguousarray(v)
    return out


def test_heterogeneous_widths_match_zeroed_diffusers(tmp_path):
    """Per-block heads / FFN widths / dropped blocks == the stock model with those weights zeroed."""
    ref = tiny_diffusers(seed=5, n_layers=3, n_heads=4, axes_dims=[4, 6, 6])
    cfg0 = ZImageConfig.from_hf_config(dict(ref.config))
    hd, F = cfg0.head_dim, cfg0.ffn_dim
    rng = np.random.default_rng(0)
    keep = {
        ("noise_refiner", 0): (np.array([0, 2, 3]), np.sort(rng.choice(F, 64, replace=False))),
        ("context_refiner", 0): (np.array([]), np.sort(rng.choice(F, 100, replace=False))),  # no attention
        ("layers", 0): (np.array([1]), np.array([])),  # no FFN
        ("layers", 2): (np.array([0, 1, 2, 3]), np.sort(rng.choice(F, 7, replace=False))),
    }  # layers.1 dropped entirely
    cfg = cfg0.replace(
        noise_refiner_heads=(3,),
        noise_refiner_ffn_dims=(64,),
        context_refiner_heads=(0,),
        context_refiner_ffn_dims=(100,),
        n_layers=2,
        layers_kept=(0, 2),
        layers_heads=(1, 4),
        layers_ffn_dims=(0, 7),
    )
    sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    folder = tmp_path / "pruned"
    folder.mkdir()
    save_file(_prune_state(sd, cfg, keep), str(folder / "diffusion_pytorch_model.safetensors"))
    pruned = load_zimage(folder, config=cfg)
    # zero the stock model's weights so it computes exactly the pruned function
    with torch.no_grad():
        p = dict(ref.named_parameters())
        for (stack, i), (heads, chans) in keep.items():
            drop_h = [h for h in range(cfg0.n_heads) if h not in set(heads.tolist())]
            for h in drop_h:
                p[f"{stack}.{i}.attention.to_out.0.weight"][:, h * hd : (h + 1) * hd] = 0
            if not len(heads):
                p[f"{stack}.{i}.attention_norm2.weight"].zero_()
            drop_c = np.setdiff1d(np.arange(F), chans)
            p[f"{stack}.{i}.feed_forward.w2.weight"][:, torch.from_numpy(drop_c)] = 0
            if not len(chans):
                p[f"{stack}.{i}.ffn_norm2.weight"].zero_()
        d = cfg0.dim  # drop layers.1: zero its gate rows (adaLN chunks 1 and 3)
        for chunk in (1, 3):
            p["layers.1.adaLN_modulation.0.weight"][chunk * d : (chunk + 1) * d] = 0
            p["layers.1.adaLN_modulation.0.bias"][chunk * d : (chunk + 1) * d] = 0
    x, t, cap = inputs(seed=2)
    for g, w in zip(pruned(x, t, cap), torch_forward(ref, x, t, cap)):
        assert rel_err(g, w) <= TOL


def test_round_trip_bit_identical(pair, tmp_path):
    ref, _, folder = pair
    m = ZImageTransformer.from_pretrained(str(folder))
    out = tmp_path / "rt"
    m.save_pretrained(str(out), max_shard_bytes=60_000)  # force several shards + index
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    from converters.engine import SafetensorsReader

    a, b = SafetensorsReader(folder), SafetensorsReader(out)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        x, y = a.read(k), b.read(k)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k
    # the written folder loads in the real diffusers class and matches
    from diffusers import ZImageTransformer2DModel

    back = ZImageTransformer2DModel.from_pretrained(str(out)).eval()
    x, t, cap = inputs(seed=4)
    for g, w in zip(torch_forward(back, x, t, cap), torch_forward(ref, x, t, cap)):
        assert np.array_equal(g, w)


def test_bf16_round_trip_bit_identical(tmp_path):
    folder = save_diffusers(tiny_diffusers(seed=0).to(torch.bfloat16), tmp_path / "bf16")
    m = ZImageTransformer.from_pretrained(str(folder), dtype=jnp.bfloat16)
    m.save_pretrained(str(tmp_path / "out"))
    from converters.engine import SafetensorsReader

    a, b = SafetensorsReader(folder), SafetensorsReader(tmp_path / "out")
    for k in a.keys():
        assert a.infos[k].dtype == "BF16" and a.read(k).tobytes() == b.read(k).tobytes(), k


def test_comfyui_single_file(pair, tmp_path):
    """The ComfyUI layout (fused qkv, attention.out, q_norm/k_norm, prefix) loads to the same model."""
    ref, jm, folder = pair
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    comfy = {}
    for k, v in sd.items():
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if ".attention.to_q." in k:
            base = k.replace(".attention.to_q.weight", "")
            v = np.concatenate([v, sd[f"{base}.attention.to_k.weight"], sd[f"{base}.attention.to_v.weight"]])
            k = f"{base}.attention.qkv.weight"
        k = k.replace(".attention.to_out.0.", ".attention.out.").replace(".norm_q.", ".q_norm.")
        comfy["model.diffusion_model." + k.replace(".norm_k.", ".k_norm.")] = v
    f = tmp_path / "z_image_comfy.safetensors"
    save_file(comfy, str(f))
    cfg = ZImageConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in TINY_KW.items()})
    m = load_zimage(f, config=cfg)
    x, t, cap = inputs(seed=1)
    for g, w in zip(m(x, t, cap), jm(x, t, cap)):
        assert np.array_equal(np.asarray(g), np.asarray(w))


def test_config_roundtrip_and_errors():
    cfg = ZImageConfig.from_hf_config({**TINY_KW, "_class_name": "ZImageTransformer2DModel"})
    assert cfg.to_hf_config()["axes_lens"] == [256, 64, 64]
    assert len(cfg.to_hf_config()) == 16
    with pytest.raises(ValueError, match="sum\\(axes_dims\\)"):
        ZImageConfig.from_hf_config({**TINY_KW, "axes_dims": [8, 12, 10]})
    with pytest.raises(ValueError, match="even"):
        ZImageConfig.from_hf_config({**TINY_KW, "axes_dims": [7, 13, 12]})
    with pytest.raises(ValueError, match="unknown Z-Image field 'bogus'"):
        ZImageConfig.from_hf_config({**TINY_KW, "bogus": 1})
    with pytest.raises(ValueError, match="layers_heads has 1 entries"):
        ZImageConfig.from_hf_config({**TINY_KW, "layers_heads": [1]})


def test_bad_forward_inputs(pair):
    _, jm, _ = pair
    x, t, cap = inputs()
    with pytest.raises(ValueError, match="cap_feats\\[0\\]"):
        jm(x, t, [c[:, :5] for c in cap])
    with pytest.raises(ValueError, match="not divisible by patch"):
        jm([np.zeros((16, 1, 7, 8), np.float32)], t[:1], cap[:1])
    with pytest.raises(ValueError, match="axes_lens"):
        jm([np.zeros((16, 1, 8, 200), np.float32)], t[:1], cap[:1])


def test_dense_batch_runs_unmasked_and_matches_diffusers(pair):
    """Equal-size samples: the layout is dense, the forward drops the key mask; still == diffusers."""
    from tmp_jax.models.z_image.layout import make_layout

    ref, jm, _ = pair
    x, t, cap = inputs(seed=3, sizes=((8, 8), (8, 8)), cap_lens=(20, 20))
    lay = make_layout(jm.config, [np.asarray(v) for v in x], [np.asarray(c) for c in cap])
    assert lay.dense
    x2, _, cap2 = inputs(seed=3, sizes=((8, 8), (8, 8)), cap_lens=(20, 40))  # captions pad to 32 vs 64
    assert not make_layout(jm.config, [np.asarray(v) for v in x2], [np.asarray(c) for c in cap2]).dense
    want = torch_forward(ref, x, t, cap)
    got = jm(x, t, cap)  # dense -> forward_padded(dense=True)
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL
    arrs = {k: jnp.asarray(v) for k, v in lay.arrays.items()}
    tt = jnp.asarray(np.asarray(t), jnp.float32)
    masked = jm.forward_padded(arrs, tt, lay.patch_key, dense=False)
    unmasked = jm.forward_padded(arrs, tt, lay.patch_key, dense=True)
    np.testing.assert_allclose(np.asarray(unmasked), np.asarray(masked), rtol=0, atol=1e-5)


def test_fuse_projections_same_forward(pair):
    """The inference layout (q|k|v and w1|w3 fused) computes the same function, ragged batch included."""
    import copy

    from tmp_jax.models.z_image.fusion import fuse_projections

    ref, jm, _ = pair
    x, t, cap = inputs(seed=4, sizes=((8, 12), (4, 4)), cap_lens=(7, 40))
    fused = fuse_projections(copy.deepcopy(jm))
    blk = fused.layers[0]
    assert blk.attention.to_q is None and blk.feed_forward.w1 is None
    assert blk.attention.to_qkv.kernel.shape == (jm.config.dim, 3 * jm.config.dim)
    assert jm.layers[0].attention.to_q is not None  # the original is untouched
    want = torch_forward(ref, x, t, cap)
    for g, u, w in zip(fused(x, t, cap), jm(x, t, cap), want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(u), rtol=0, atol=1e-5)
        assert rel_err(g, w) < TOL
