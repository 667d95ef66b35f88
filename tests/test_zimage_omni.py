"""Z-Image Omni/Edit (TI2I) parity against the REAL diffusers ZImageTransformer2DModel in omni mode.

Tiny configs with every parameter randomised (SigLIP pad token and norms included); ragged per-sample
condition counts, empty image / SigLIP slots, caption segments that are not multiples of 32; the
converter round trip with SigLIP keys; exact parameter accounting; the exported pruned model runs
diffusers' omni forward and matches the JAX materialised model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from plan_ref import write_plan  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from zimage_ref import (  # noqa: E402
    SIGLIP_DIM,
    omni_inputs,
    rel_err,
    save_diffusers,
    tiny_diffusers,
    torch_forward,
    torch_forward_omni,
)

from converters.engine import CheckpointError, SafetensorsReader  # noqa: E402
from converters.zimage import load_zimage  # noqa: E402
from tmp_jax import arch  # noqa: E402
from tmp_jax.materialize import count_params, materialize  # noqa: E402
from tmp_jax.models.z_image import ZImageTransformer, init_abstract  # noqa: E402
from tmp_jax.tree import Tree  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-5
# sample 0: two conditions (the second an empty slot: no latent, no SigLIP), sample 1: one, sample 2: none
CONDS = [[(8, 12), (12, 8)], [(8, 8)], []]
TARGETS = ((8, 8), (12, 12), (8, 12))


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    ref = tiny_diffusers(seed=3, siglip_feat_dim=SIGLIP_DIM)
    folder = save_diffusers(ref, tmp_path_factory.mktemp("zo") / "transformer")
    return ref, ZImageTransformer.from_pretrained(str(folder)), folder


def _batch(seed: int, siglip: bool = True):
    x, t, cap, sig, mask = omni_inputs(seed=seed, conds=CONDS, target=TARGETS, siglip=siglip)
    x[0][1] = None  # empty image slot (32 pad tokens) in the middle of sample 0
    if sig is not None:
        sig[0][1] = None
    return x, t, cap, sig, mask


def _check(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) <= TOL


def test_omni_with_siglip_matches_diffusers(omni):
    ref, jm, _ = omni
    x, t, cap, sig, mask = _batch(seed=1)
    want = torch_forward_omni(ref, x, t, cap, sig, mask)
    got = jm(x, t, cap, siglip_feats=sig, image_noise_mask=mask)
    _check(got, want)
    # the SigLIP stream and the clean-token modulation are live (a no-op path would also "match" above)
    sig0 = [[None if v is None else 0 * v for v in s] for s in sig]
    assert rel_err(jm(x, t, cap, siglip_feats=sig0, image_noise_mask=mask)[0], want[0]) > 1e-3
    noisy = [[1] * len(m) for m in mask]
    assert rel_err(jm(x, t, cap, siglip_feats=sig, image_noise_mask=noisy)[0], want[0]) > 1e-3


def test_omni_without_siglip_matches_diffusers(omni):
    """No SigLIP features (model with siglip_feat_dim) and a model without SigLIP at all, in omni mode."""
    ref, jm, _ = omni
    x, t, cap, _, mask = _batch(seed=2, siglip=False)
    want = torch_forward_omni(ref, x, t, cap, None, mask)  # diffusers gets [None] * B
    _check(jm(x, t, cap, image_noise_mask=mask), want)
    _check(jm(x, t, cap, siglip_feats=[None] * len(x), image_noise_mask=mask), want)
    plain = tiny_diffusers(seed=4)
    jp = load_zimage(save_diffusers(plain, omni[2].parent / "plain"))
    _check(jp(x, t, cap, image_noise_mask=mask), torch_forward_omni(plain, x, t, cap, None, mask))


def test_omni_model_basic_mode_unchanged(omni):
    ref, jm, _ = omni
    rng = np.random.default_rng(0)
    x = [rng.standard_normal((16, 1, 8, 12)).astype(np.float32), rng.standard_normal((16, 1, 4, 4)).astype(np.float32)]
    cap = [rng.standard_normal((n, 32)).astype(np.float32) for n in (7, 40)]
    t = np.array([0.3, 0.8], np.float32)
    _check(jm(x, t, cap), torch_forward(ref, x, t, cap))


def test_omni_round_trip_with_siglip_keys(omni, tmp_path):
    ref, jm, folder = omni
    out = tmp_path / "rt"
    jm.save_pretrained(str(out))
    a, b = SafetensorsReader(folder), SafetensorsReader(out)
    assert sorted(a.keys()) == sorted(b.keys())
    assert {"siglip_pad_token", "siglip_embedder.0.weight", "siglip_refiner.0.attention.to_q.weight"} <= set(b.keys())
    for k in a.keys():
        assert a.read(k).tobytes() == b.read(k).tobytes(), k
    # strict both ways: a missing SigLIP key and a SigLIP key the config does not declare both fail
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "miss").mkdir()
    (tmp_path / "miss" / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v for k, v in sd.items() if k != "siglip_pad_token"}, str(tmp_path / "miss" / "m.safetensors"))
    with pytest.raises(CheckpointError, match="siglip_pad_token"):
        load_zimage(tmp_path / "miss")
    (tmp_path / "extra").mkdir()
    conf = json.loads((folder / "config.json").read_text())
    conf["siglip_feat_dim"] = None
    (tmp_path / "extra" / "config.json").write_text(json.dumps(conf))
    save_file(sd, str(tmp_path / "extra" / "m.safetensors"))
    with pytest.raises(CheckpointError, match="siglip"):
        load_zimage(tmp_path / "extra")


def test_omni_accounting_matches_diffusers(omni):
    ref, jm, _ = omni
    n_ref = sum(p.numel() for p in ref.parameters())
    assert count_params(init_abstract(jm.config)) == n_ref  # eval_shape: nothing materialised
    tree = Tree(arch.get("zimage").build_spec(jm.config))
    tree.spec.validate()
    assert tree.full["params"] == n_ref
    sig_stage = tree.spec.node("siglip_refiner")
    n_sig = sum(p.numel() for k, p in ref.named_parameters() if k.startswith("siglip_refiner."))
    assert sum(int(np.prod(tree.spec.shapes[p])) for p in sig_stage.params) == n_sig
    assert not any(g.node.startswith("siglip_refiner") for g in tree.genes)  # unprunable by design
    assert tree.floor()["params"] >= n_sig


def test_omni_bad_inputs(omni):
    _, jm, _ = omni
    x, t, cap, sig, mask = _batch(seed=5)
    with pytest.raises(ValueError, match="image_noise_mask"):
        jm(x, t, cap, siglip_feats=sig)
    with pytest.raises(ValueError, match="image_noise_mask\\[1\\] has 1 flags for 2 images"):
        jm(x, t, cap, siglip_feats=sig, image_noise_mask=[mask[0], [1], mask[2]])
    bad = [[None if v is None else v[..., :5] for v in s] for s in sig]
    with pytest.raises(ValueError, match="siglip_feats\\[0\\]\\[0\\]"):
        jm(x, t, cap, siglip_feats=bad, image_noise_mask=mask)
    with pytest.raises(ValueError, match="cap_feats\\[1\\] has 1 segments"):
        jm(x, t, [cap[0], cap[1][:1], cap[2]], siglip_feats=sig, image_noise_mask=mask)


def test_exported_pruned_omni_model_runs_diffusers_omni(omni, tmp_path):
    """A heterogeneous plan on an Omni model: the remote-code export runs diffusers' omni forward == JAX."""
    from diffusers import AutoModel

    from converters.export import ExportConfig, export

    _, _, folder = omni
    src = load_zimage(folder)
    tree = Tree(arch.get("zimage").build_spec(src.config))
    rng = np.random.default_rng(7)
    order = {(n.name, u.kind): rng.permutation(u.n) for n in tree.spec.nodes() for u in n.units}
    g = rng.integers(1, tree.max_levels() + 1)
    g[[x.name for x in tree.genes].index("layers.1:keep")] = 0
    a = tree.decode(g)
    plan = write_plan(tmp_path / "plan.json", "zimage", folder, src, tree, g, order)
    out = tmp_path / "pruned"
    res = export(ExportConfig(plan=plan, model=folder, out=out, progress=False))
    small = materialize(src, tree, a, order)
    conf = json.loads((out / "config.json").read_text())
    assert conf["_class_name"] == "ZImagePrunedTransformer2DModel" and conf["siglip_feat_dim"] == SIGLIP_DIM
    pt = AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    assert sum(p.numel() for p in pt.parameters()) == res["params_after"] == count_params(small)
    assert len(pt.siglip_refiner) == src.config.n_refiner_layers
    x, t, cap, sig, mask = _batch(seed=6)
    _check(small(x, t, cap, siglip_feats=sig, image_noise_mask=mask), torch_forward_omni(pt, x, t, cap, sig, mask))


# ----------------------------------------------------------------------------------------------
# TI2I calibration inputs (tmp_jax.models.z_image.ti2i)


def _tokens(img: np.ndarray) -> np.ndarray:
    """(C, F, H, W) -> (F*H/2*W/2, 4*C) tokens, channel fastest (diffusers' patchify, patch 2x2x1)."""
    C, F, H, W = img.shape
    return img.reshape(C, F, 1, H // 2, 2, W // 2, 2).transpose(1, 3, 5, 2, 4, 6, 0).reshape(-1, 4 * C)


def test_ti2i_calibration_batches(omni, tmp_path):
    import jax.numpy as jnp

    from tmp_jax.calibration import importance, load_calib, write_calib
    from tmp_jax.models.z_image import ti2i

    ref, jm, _ = omni
    cfg = jm.config
    batches = ti2i.synthetic_ti2i_calib(cfg, n=3, batch=3, seed=0)
    assert {"siglip_feats", "siglip_sizes", "cond_latents"} <= set(batches[0])
    back = load_calib(write_calib(tmp_path / "calib", batches, "zimage", task="ti2i"), "zimage")
    assert all(np.array_equal(back[0][k], v) for k, v in batches[0].items())
    args = ti2i.model_args(cfg, back[0])
    assert [m[-1] for m in args["image_noise_mask"]] == [1, 1, 1] and args["siglip_feats"][0][-1] is None
    want = torch_forward_omni(
        ref, args["x"], args["t"], args["cap_feats"], args["siglip_feats"], args["image_noise_mask"]
    )
    inputs = ti2i.prepare_any(cfg, back[0])
    assert ti2i.is_omni_inputs(inputs)
    out, stats = ti2i.collect_stats(jm, inputs)
    out = np.asarray(out)
    for b, w in enumerate(want):  # the loss mask selects exactly the target's tokens
        assert rel_err(out[b][inputs["mask"][b]], _tokens(w)) <= TOL
    assert np.array_equal(np.asarray(ti2i.forward(jm, inputs)), out)
    tr, feats = ti2i.forward_train(jm, {**inputs, "arrays": {k: jnp.asarray(v) for k, v in inputs["arrays"].items()}})
    assert len(feats) == cfg.n_layers and rel_err(np.asarray(tr)[inputs["mask"]], out[inputs["mask"]]) <= 1e-6
    units, blocks = importance(Tree(arch.get("zimage").build_spec(cfg)), stats)
    assert units and blocks and all(np.all(np.isfinite(v)) for v in units.values())
    # T2I batches still go to the T2I runner
    t2i = arch.get("zimage").synthetic_calib(cfg, 2, 2, 0)[0]
    assert not ti2i.is_omni_inputs(ti2i.prepare_any(cfg, t2i))


def test_ti2i_bad_batches(omni):
    from tmp_jax.models.z_image import ti2i

    cfg = omni[1].config
    b = ti2i.synthetic_ti2i_calib(cfg, n=2, batch=2, seed=1)[0]
    with pytest.raises(ValueError, match="missing array 'cap_lens'"):
        ti2i.prepare_batch(cfg, {k: v for k, v in b.items() if k != "cap_lens"})
    no_cond = {**b, "cond_sizes": np.zeros_like(b["cond_sizes"])}
    with pytest.raises(ValueError, match="sample 0 has no condition image"):
        ti2i.prepare_batch(cfg, no_cond)
    short = {**b, "cap_lens": np.where(np.arange(b["cap_lens"].shape[1]) < 1, b["cap_lens"], 0).astype(np.int32)}
    with pytest.raises(ValueError, match="leading non-empty segments"):
        ti2i.prepare_batch(cfg, short)
    with pytest.raises(ValueError, match="siglip_feats and siglip_sizes go together"):
        ti2i.prepare_batch(cfg, {k: v for k, v in b.items() if k != "siglip_sizes"})


def test_omni_pieces_compose_like_the_blockwise_runner(omni):
    """embed_omni -> per-block (modulation_terms, attn_branch, ffn_branch) -> unify_omni -> final ==
    forward_omni_padded: the pieces a blockwise omni runner needs (T2I runner's signatures)."""
    import jax.numpy as jnp

    from tmp_jax.models.z_image.layout import key_mask, make_omni_layout
    from tmp_jax.models.z_image.model import attn_branch, ffn_branch

    _, jm, _ = omni
    x, t, cap, sig, mask = _batch(seed=8)
    a = {k: jnp.asarray(v) for k, v in make_omni_layout(jm.config, x, cap, sig, mask).arrays.items()}
    tt = jnp.asarray(t)

    def run(blk, h, m, cs, c):
        s_msa, g_msa, s_mlp, g_mlp = blk.modulation_terms(c)
        h = attn_branch(blk.attention, blk.attention_norm1, blk.attention_norm2, h, m, *cs, s_msa, g_msa)
        return ffn_branch(blk.feed_forward, blk.ffn_norm1, blk.ffn_norm2, h, s_mlp, g_mlp)

    e = jm.embed_omni(a, tt, "2-1")
    img, capf, sg = e["img"], e["cap"], e["sig"]
    for blk in jm.noise_refiner:
        img = run(blk, img, key_mask(a["img_valid"]), e["img_cs"], e["img_cond"])
    for blk in jm.context_refiner:
        capf = run(blk, capf, key_mask(a["cap_valid"]), e["cap_cs"], None)
    for blk in jm.siglip_refiner:
        sg = run(blk, sg, key_mask(a["sig_valid"]), e["sig_cs"], None)
    h, cos, sin, m, cond = type(jm).unify_omni(None, a, img, capf, sg, e)
    for blk in jm.layers:
        h = run(blk, h, m, (cos, sin), cond)
    got = jm.all_final_layer["2-1"](h, cond)
    want = jm.forward_omni_padded(a, tt, "2-1")
    valid = np.asarray(a["uni_valid"])
    assert rel_err(np.asarray(got)[valid], np.asarray(want)[valid]) <= 1e-6


def test_full_size_omni_accounting_matches_diffusers():
    """Z-Image Omni at full size (siglip_feat_dim=1152): tree count == the real class built on torch's meta device."""
    from diffusers import ZImageTransformer2DModel

    from tmp_jax.models.z_image import TURBO

    with torch.device("meta"):  # shapes only, no memory
        ref = ZImageTransformer2DModel(siglip_feat_dim=1152, axes_lens=[1536, 512, 512])
    n_ref = sum(p.numel() for p in ref.parameters())
    tree = Tree(arch.get("zimage").build_spec(TURBO.replace(siglip_feat_dim=1152)))
    assert tree.full["params"] == n_ref == 6_513_266_880
    n_sig = sum(p.numel() for k, p in ref.named_parameters() if k.startswith("siglip"))
    assert tree.full["params"] - n_sig == 6_154_908_736  # the T2I Turbo count


@pytest.mark.parametrize(
    "dropped, stock",
    [(("layers.1",), True), (("noise_refiner.0", "context_refiner.0"), False)],
    ids=["main-depth-stock", "refiner-depth-remote"],
)
def test_depth_only_omni_export_class(omni, tmp_path, dropped, stock):
    """Depth-only plans on an Omni model: the stock class only while the refiners keep full depth (it builds
    n_refiner_layers SigLIP refiner blocks, and that stack is never pruned); either way diffusers' omni
    forward of the export equals the JAX materialised model."""
    from diffusers import AutoModel

    from converters.export import ExportConfig, export

    _, _, folder = omni
    src = load_zimage(folder)
    tree = Tree(arch.get("zimage").build_spec(src.config))
    g = tree.max_levels().copy()
    names = [x.name for x in tree.genes]
    for d in dropped:
        g[names.index(f"{d}:keep")] = 0
    a = tree.decode(g)
    plan = write_plan(tmp_path / "plan.json", "zimage", folder, src, tree, g, None)
    out = tmp_path / "pruned"
    export(ExportConfig(plan=plan, model=folder, out=out, progress=False))
    conf = json.loads((out / "config.json").read_text())
    assert (conf["_class_name"] == "ZImageTransformer2DModel") is stock
    pt = AutoModel.from_pretrained(str(out), trust_remote_code=not stock).eval()
    assert len(pt.siglip_refiner) == src.config.n_refiner_layers
    x, t, cap, sig, mask = _batch(seed=8)
    small = materialize(src, tree, a, None)
    _check(small(x, t, cap, siglip_feats=sig, image_noise_mask=mask), torch_forward_omni(pt, x, t, cap, sig, mask))
