"""HunyuanImage-3.0 parity against nemo-automodel 0.7.0's ``HunyuanImage3ForCausalMM`` (tiny, fp32, CPU).

Every parameter of the PyTorch reference is randomised (norm weights and biases too). Its weights are
converted to the OFFICIAL checkpoint keys with nemo's own ``state_dict_adapter.to_hf``, written to a
safetensors file (plus VAE / vision keys that must be passed through) and loaded through OUR key table and
the streaming engine, so the test covers the converter as well as the model.

nemo 0.7.0 limits worked around here (see the reference notes): per-layer MoE fields are built by replacing
decoder blocks (and converting each layer with its own adapter), and its Gate skips the renormalisation at
``moe_topk == 1`` that the official eager MoE does, so ``Gate._route_scores`` is patched to renormalise.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # nemo's weighted_swiglu is torch.compile'd

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("nemo_automodel")
torch.set_num_threads(1)

from nemo_automodel.components.models.common import BackendConfig  # noqa: E402
from nemo_automodel.components.models.hunyuan_image3.config import (  # noqa: E402
    HunyuanImage3Config as NemoConfig,
)
from nemo_automodel.components.models.hunyuan_image3.model import (  # noqa: E402
    HunyuanImage3Block,
    HunyuanImage3ForCausalMM,
    build_moe_config,
)
from nemo_automodel.components.models.hunyuan_image3.state_dict_adapter import (  # noqa: E402
    HunyuanImage3StateDictAdapter,
)
from nemo_automodel.components.moe.layers import Gate  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from converters.engine import SafetensorsReader, export_arrays, load_into  # noqa: E402
from converters.hunyuan import hunyuan_key_table  # noqa: E402
from tmp_jax.models.hunyuan_image3 import HunyuanImage3, HunyuanImage3Config  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-5
IMG, TS, PAD = 100, 101, 0

# Uniform MoE, 32 latent channels (the release's VAE), top-2.
KW_A = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=32,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    attention_head_dim=16,
    num_experts=4,
    moe_topk=2,
    num_shared_expert=1,
    patch_embed_hidden_dim=32,
    image_token_id=IMG,
    timestep_token_id=TS,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
    vae={"latent_channels": 32},
    torch_dtype="float32",
)
# Per-layer MoE as pruning leaves it (layer 0 top-1), 4 latent channels, 4 query heads per KV head.
KW_B = {
    **KW_A,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_experts": [4, 6],
    "moe_topk": [1, 2],
    "moe_intermediate_size": [32, 16],
    "num_shared_expert": [1, 2],
    "vae": {"latent_channels": 4},
}
PER_LAYER = ("num_experts", "moe_topk", "moe_intermediate_size", "num_shared_expert")


def rel_errs(got, want) -> tuple[float, float]:
    """(max-abs relative, norm relative) error of ``got`` against ``want``."""
    a, b = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return (
        float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)),
        float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
    )


# ----------------------------------------------------------------------------------------------------------
# The PyTorch reference
# ----------------------------------------------------------------------------------------------------------
def _layer_kw(kw: dict, layer: int) -> dict:
    return {k: (v[layer] if k in PER_LAYER and isinstance(v, list) else v) for k, v in kw.items()}


def build_reference(kw: dict, seed: int) -> tuple[HunyuanImage3ForCausalMM, dict[str, np.ndarray]]:
    """nemo model with every parameter random, and its weights under the official checkpoint keys."""
    torch.manual_seed(seed)
    backend = BackendConfig(
        attn="sdpa", linear="torch", experts="torch", dispatcher="torch", gate_precision=torch.float32
    )
    layer_cfgs = [NemoConfig(**_layer_kw(kw, i)) for i in range(kw["num_hidden_layers"])]
    model = HunyuanImage3ForCausalMM(layer_cfgs[0], backend=backend)
    moe_cfgs = [build_moe_config(c) for c in layer_cfgs]
    for i in range(1, len(layer_cfgs)):  # nemo has no per-layer MoE lists: swap in per-layer blocks
        model.model.layers[str(i)] = HunyuanImage3Block(layer_cfgs[i], moe_cfgs[i], backend, torch.float32)
    model.initialize_weights(buffer_device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # RMSNorm / GroupNorm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:  # biases
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # router: well-separated top-k choices
                p.copy_(0.5 * torch.randn_like(p))
            else:
                fan_in = p[0].numel() if p.ndim != 3 else p.shape[1]  # grouped experts are [E, in, out]
                p.copy_(torch.randn_like(p) / fan_in**0.5)
    model.eval()
    adapters = [HunyuanImage3StateDictAdapter(c, m, backend, dtype=torch.float32) for c, m in zip(layer_cfgs, moe_cfgs)]
    official: dict[str, np.ndarray] = {}
    for key, value in model.state_dict().items():
        match = re.match(r"model\.layers\.(\d+)\.", key)
        adapter = adapters[int(match.group(1)) if match else 0]
        for k, v in adapter.to_hf({key: value.detach().clone()}).items():
            official[k] = v.numpy().copy()
    return model, official


@pytest.fixture(scope="module", autouse=True)
def renormalised_top1():
    """The official eager MoE renormalises top-k weights for k = 1 too; nemo 0.7.0 skips it."""
    original = Gate._route_scores

    def route(self, scores):
        weights, indices, scores_out = original(self, scores)
        if self.topk == 1 and self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, indices, scores_out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Gate, "_route_scores", route)
        yield


# ----------------------------------------------------------------------------------------------------------
# Our model, loaded through the key table + engine
# ----------------------------------------------------------------------------------------------------------
def load_ours(kw: dict, official: dict[str, np.ndarray], folder) -> HunyuanImage3:
    cfg = HunyuanImage3Config.from_hf_config(kw)  # unknown keys (torch_dtype) ignored
    sd = dict(official)
    # Release modules we do not port must be recognised and skipped.
    sd["vae.decoder.conv_out.weight"] = np.zeros((3, 4, 3, 3, 3), np.float32)
    sd["vision_model.embeddings.patch_embedding.weight"] = np.zeros((8, 8), np.float32)
    sd["vision_aligner.layers.0.weight"] = np.zeros((8, 8), np.float32)
    save_file(sd, str(folder / "model.safetensors"))
    abstract = nnx.eval_shape(lambda: HunyuanImage3(cfg, rngs=nnx.Rngs(0)))
    return load_into(abstract, hunyuan_key_table(cfg), SafetensorsReader(folder))


def jitted(model: HunyuanImage3):
    """One jitted T2I forward and one text forward per model (recompiled only per input shape)."""
    graphdef, state = nnx.split(model)
    t2i = jax.jit(lambda s, ids, lat, t, vl: nnx.merge(graphdef, s)(ids, lat, t, vl))
    text = jax.jit(lambda s, ids: nnx.merge(graphdef, s).forward_text(ids))
    return (lambda *a: np.asarray(t2i(state, *a))), (lambda ids: np.asarray(text(state, ids)))


class Pair:
    def __init__(self, kw: dict, seed: int, folder):
        self.kw = kw
        self.ref, self.official = build_reference(kw, seed)
        self.ours = load_ours(kw, self.official, folder)
        self.t2i, self.text = jitted(self.ours)

    def reference(self, ids, lat, t, vl) -> np.ndarray:
        with torch.no_grad():
            out = self.ref(torch.from_numpy(ids), torch.from_numpy(lat), torch.from_numpy(t), torch.from_numpy(vl))
        return out[0].numpy()


@pytest.fixture(scope="module")
def pair_a(tmp_path_factory) -> Pair:
    return Pair(KW_A, seed=0, folder=tmp_path_factory.mktemp("hy_a"))


@pytest.fixture(scope="module")
def pair_b(tmp_path_factory) -> Pair:
    return Pair(KW_B, seed=1, folder=tmp_path_factory.mktemp("hy_b"))


def t2i_inputs(rng, text_lens, grid, channels, extra_pad=0):
    """Right-padded ``[bos] text <timestep> <img>*h*w <eoi>`` rows, latents, timesteps, valid lengths."""
    h, w = grid
    rows = []
    for n in text_lens:
        text = rng.integers(3, IMG, size=n)  # ordinary tokens below the special ids
        rows.append(np.concatenate([[1], text, [TS], np.full(h * w, IMG), [2]]))
    seq = max(map(len, rows)) + extra_pad
    ids = np.full((len(rows), seq), PAD, np.int64)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    valid = np.array([len(r) for r in rows], np.int64)
    lat = rng.standard_normal((len(rows), channels, h, w)).astype(np.float32)
    t = rng.uniform(0, 1000, size=len(rows)).astype(np.float32)
    return ids, lat, t, valid


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text_lens, grid, extra_pad",
    [
        ((5,), (2, 3), 0),  # half-integer RoPE grid offsets (x: (6 - 3) / 2)
        ((3, 9), (4, 4), 2),  # padded batch: different text lengths, valid_lengths, trailing padding
        ((6, 1), (1, 5), 0),  # single-row image, 1-token prompt
    ],
)
def test_t2i_parity_uniform_moe(pair_a, text_lens, grid, extra_pad):
    rng = np.random.default_rng(hash((text_lens, grid)) % 2**32)
    ids, lat, t, valid = t2i_inputs(rng, text_lens, grid, 32, extra_pad)
    want = pair_a.reference(ids, lat, t, valid)
    got = pair_a.t2i(ids, lat, t, valid)
    assert got.shape == want.shape == lat.shape
    max_rel, norm_rel = rel_errs(got, want)
    assert max_rel <= TOL and norm_rel <= TOL, (max_rel, norm_rel)


def test_t2i_parity_per_layer_moe_top1(pair_b):
    """Per-layer experts / top-k / widths / shared counts, top-1 in layer 0, 4 latent channels, padded."""
    rng = np.random.default_rng(7)
    ids, lat, t, valid = t2i_inputs(rng, (4, 8), (3, 2), 4, extra_pad=1)
    want = pair_b.reference(ids, lat, t, valid)
    got = pair_b.t2i(ids, lat, t, valid)
    assert got.shape == want.shape == lat.shape
    max_rel, norm_rel = rel_errs(got, want)
    assert max_rel <= TOL and norm_rel <= TOL, (max_rel, norm_rel)


@pytest.mark.parametrize("which", ["a", "b"])
def test_text_logits_parity(request, which):
    pair = request.getfixturevalue(f"pair_{which}")
    ids = np.random.default_rng(11).integers(0, 128, size=(2, 9))
    with torch.no_grad():
        want = pair.ref.forward_text(torch.from_numpy(ids)).numpy()
    got = pair.text(ids)
    assert got.shape == want.shape == (2, 9, 128)
    max_rel, norm_rel = rel_errs(got, want)
    assert max_rel <= TOL and norm_rel <= TOL, (max_rel, norm_rel)


def test_export_round_trip_is_exact(pair_b):
    """The same table exports our parameters back to the official keys, bit for bit."""
    cfg = HunyuanImage3Config.from_hf_config(KW_B)
    table = hunyuan_key_table(cfg)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(pair_b.ours, nnx.Param))}
    exported = dict(export_arrays(table, lambda p: np.asarray(flat[p].get_value())))
    assert set(exported) == set(pair_b.official)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, pair_b.official[key], err_msg=key)
    assert table.num_params() == sum(v.size for v in pair_b.official.values())


def test_ragged_matches_dense_experts(pair_b):
    """The grouped-matmul MoE equals the dense every-expert reference path."""
    rng = np.random.default_rng(5)
    ids, lat, t, valid = t2i_inputs(rng, (4, 8), (3, 2), 4, extra_pad=1)
    ragged = pair_b.t2i(ids, lat, t, valid)
    pair_b.ours.set_moe_impl("dense")
    try:
        dense_t2i, _ = jitted(pair_b.ours)
        dense = dense_t2i(ids, lat, t, valid)
    finally:
        pair_b.ours.set_moe_impl("ragged")
    assert rel_errs(ragged, dense)[0] <= TOL
