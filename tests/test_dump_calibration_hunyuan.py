"""scripts/dump_calibration_hunyuan.py end to end on a tiny random nemo-automodel ``HunyuanImage3ForCausalMM``:
release-layout checkpoint -> streamed layer-by-layer load -> CFG sampling with a stand-in prompt tokenizer ->
calibration set; the set loads with ``load_calib``, follows the T2I layout, records a real Euler trajectory,
and calibrates our JAX model to the PyTorch model's outputs.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # nemo's weighted_swiglu is torch.compile'd

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("nemo_automodel")
torch.set_num_threads(1)

from safetensors.numpy import save_file  # noqa: E402

from tmp_jax.calibration import calibrate, load_calib  # noqa: E402

pytestmark = pytest.mark.torch
ROOT = Path(__file__).resolve().parents[1]
IMG, TS, PAD, BOS, EOS, CFG_TOK, BOI, EOI = 100, 101, 0, 1, 2, 103, 104, 105
KW = dict(
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
    bos_token_id=BOS,
    eos_token_id=EOS,
    vae={"latent_channels": 32},
    torch_dtype="float32",
    model_type="hunyuan_image_3_moe",
    architectures=["HunyuanImage3ForCausalMM"],
)


def _script():
    spec = importlib.util.spec_from_file_location(
        "dump_calibration_hunyuan", ROOT / "scripts/dump_calibration_hunyuan.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class StandInTokenizer:
    """The release prompt format's shape with a toy vocabulary: ``<bos> words <boi> <size> <ratio> <timestep>``
    before the image, ``<eoi> <eos>`` after; the unconditional row has ``<cfg>`` in place of every word."""

    def target_size(self, width, height):
        return width, height

    def __call__(self, prompt, height, width):
        words = [3 + (sum(map(ord, w)) % 90) for w in prompt.split()]
        size, ratio = 106 + height // 64 % 10, 116 + (width * 4 // height) % 10
        head, tail = [BOI, size, ratio, TS], [EOI, EOS]
        return {
            "prompt_input_ids": torch.tensor([BOS, *words, *head]),
            "uncond_prompt_input_ids": torch.tensor([BOS, *[CFG_TOK] * len(words), *head]),
            "prompt_suffix_ids": torch.tensor(tail),
        }


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny release-layout folder: official keys (nemo's own adapter), config.json, generation_config.json,
    plus VAE / vision keys the denoiser must skip."""
    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.models.hunyuan_image3.config import HunyuanImage3Config
    from nemo_automodel.components.models.hunyuan_image3.model import HunyuanImage3ForCausalMM

    torch.manual_seed(0)
    backend = BackendConfig(
        attn="sdpa", linear="torch", experts="torch", dispatcher="torch", gate_precision=torch.float32
    )
    model = HunyuanImage3ForCausalMM(HunyuanImage3Config(**KW), backend=backend)
    model.initialize_weights(buffer_device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():  # every parameter random (norm scales and biases too)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                fan_in = p[0].numel() if p.ndim != 3 else p.shape[1]
                p.copy_(torch.randn_like(p) / fan_in**0.5)
    model.eval()
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict_adapter.to_hf(model.state_dict()).items()}
    sd["vae.decoder.conv_out.weight"] = np.zeros((3, 4, 3, 3, 3), np.float32)
    sd["vision_model.embeddings.patch_embedding.weight"] = np.zeros((8, 8), np.float32)
    folder = tmp_path_factory.mktemp("release") / "HunyuanImage-3.0-tiny"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(KW))
    (folder / "generation_config.json").write_text(json.dumps({"flow_shift": 3.0}))
    return folder, model


def test_dump_end_to_end(release, tmp_path, monkeypatch):
    folder, ref = release
    script = _script()
    loaded = script.load_transformer(folder, ["cpu"])
    ids = torch.tensor([[BOS, 5, 6, BOI, 107, 118, TS, *[IMG] * 16, EOI, EOS]])
    lat, t = torch.randn(1, 32, 4, 4), torch.tensor([700.0])
    torch.testing.assert_close(loaded(ids, lat, t)[0], ref(ids, lat, t)[0], rtol=0, atol=0)  # streamed load is exact

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\n\nan old lighthouse at dusk\n")
    monkeypatch.setattr(script, "load_prompt_tokenizer", lambda d: StandInTokenizer())
    out = tmp_path / "calib"
    argv = ["--model", str(folder), "--prompts", str(prompts), "--out", str(out), "--height", "64", "--width", "64"]
    assert (
        script.main([*argv, "--steps", "4", "--every", "1", "--guidance", "4", "--batch", "3", "--device", "cpu"]) == 0
    )

    batches = load_calib(out, "hunyuan")
    assert len(batches) == 8  # 2 prompts x 4 steps x (cond, uncond) = 16 rows; --batch 3 holds one whole pair
    # the trajectory fitness keys: the release's CFG scale, and per pair a weight falling with the step
    assert all(float(b["cfg_guidance"][0]) == 4.0 and b["sample_weight"].shape == (1,) for b in batches)
    w = np.array([float(b["sample_weight"][0]) for b in batches[:4]])  # prompt 0, steps 0..3
    assert np.all(np.diff(w) < 0) and abs(np.mean([float(b["sample_weight"][0]) for b in batches]) - 1) < 1e-5
    rows_ids = np.concatenate([b["input_ids"] for b in batches])
    lat_all = np.concatenate([b["latents"] for b in batches])
    t_all = np.concatenate([b["timestep"] for b in batches])
    vl = np.concatenate([b["valid_lengths"] for b in batches])
    assert len({b["input_ids"].shape[1] for b in batches}) == 1 and rows_ids.dtype == np.int32
    assert lat_all.shape == (16, 32, 4, 4) and vl.dtype == np.int32
    for ids_r, n in zip(rows_ids, vl):  # the T2I layout: <timestep> then h*w <img>, padding after valid_lengths
        start = int(np.argmax(ids_r == IMG))
        assert ids_r[start - 1] == TS and np.all(ids_r[start : start + 16] == IMG) and np.all(ids_r[n:] == PAD)
    assert np.any(vl < rows_ids.shape[1])  # the two prompts differ in length: right padding is exercised
    sig = 3.0 * np.linspace(1, 0, 5) / (1 + 2.0 * np.linspace(1, 0, 5))  # shifted schedule, flow_shift 3
    np.testing.assert_allclose(t_all[:8:2], 1000 * sig[:4], rtol=1e-6)  # a spread of timesteps
    assert np.all(rows_ids[1, 1:5] == CFG_TOK)  # the unconditional row next to each conditional one

    # the recorded latents follow a real CFG Euler trajectory of the PyTorch model
    with torch.no_grad():
        for k in range(3):
            i = 2 * k  # prompt 0, step k: rows (cond, uncond)
            v = ref(
                torch.from_numpy(rows_ids[i : i + 2, : vl[i]]).long(),
                torch.from_numpy(lat_all[i : i + 2]),
                torch.from_numpy(t_all[i : i + 2]),
            )[0]
            v = v[1] + 4.0 * (v[0] - v[1])
            step = lat_all[i] + v.numpy() * (sig[k + 1] - sig[k])
            np.testing.assert_allclose(lat_all[i + 2], step, rtol=1e-5, atol=1e-5)

    # the set calibrates our JAX model (streamed from the same release folder) to the PyTorch outputs
    cal = calibrate(folder, batches, streamed=True)
    with torch.no_grad():
        for b, y in zip(batches, cal.teacher):
            want = ref(
                *(torch.from_numpy(b[k]) for k in ("input_ids", "latents", "timestep")),
                torch.from_numpy(b["valid_lengths"]).long(),
            )[0]
            np.testing.assert_allclose(y, want.numpy(), rtol=1e-4, atol=1e-5)
    assert any(k[-1] == "unit_stat_experts" for k in cal.stats)


def test_pack_keeps_cfg_pairs_conditional_first():
    """With CFG a micro-batch holds whole (conditional, unconditional) pairs: conditional rows first, partners in the
    same order after them (the halves the guided fitness compares); without CFG rows stay in order, unmarked."""
    script = _script()
    rows = []
    for k, t in enumerate((900.0, 600.0, 300.0)):
        for cond in (True, False):
            rows.append(
                {"ids": np.array([k, int(cond)], np.int32), "latents": np.zeros((2, 2, 2)), "timestep": t, "cond": cond}
            )
    b = script.pack(rows, 4, 0, guidance=5.0)
    assert [x["input_ids"][:, 0].tolist() for x in b] == [[0, 1, 0, 1], [2, 2]]
    assert [x["input_ids"][:, 1].tolist() for x in b] == [[1, 1, 0, 0], [1, 0]]
    assert float(b[0]["cfg_guidance"][0]) == 5.0 and b[0]["sample_weight"].shape == (2,)
    assert b[0]["sample_weight"][0] > b[0]["sample_weight"][1] > b[1]["sample_weight"][0]
    plain = script.pack([{**r, "cond": None} for r in rows], 4, 0)
    assert [len(x["input_ids"]) for x in plain] == [4, 2] and "cfg_guidance" not in plain[0]
    with pytest.raises(ValueError, match="pairs"):
        script.pack(rows[1:] + rows[:1], 4, 0, guidance=5.0)
