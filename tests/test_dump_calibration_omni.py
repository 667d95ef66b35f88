"""``scripts/dump_calibration.py`` on editing prompts: the stock diffusers ``ZImageOmniPipeline`` built from
tiny random components (Qwen3 text encoder, bf16 AutoencoderKL, Siglip2 vision model + its PIL image
processor, the REAL Z-Image Omni transformer with every parameter randomised; a byte-level stand-in
tokenizer). The recorded micro-batches are exactly what the transformer saw: our JAX model on them
reproduces the outputs the PyTorch transformer produced during sampling (fp32, <= 1e-5), for TI2I rows
(1 and 2 reference images, CFG rows) and, in the same mixed set, T2I prompts through the stock
``ZImagePipeline`` built from the same components.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from zimage_ref import SIGLIP_DIM, rel_err, save_diffusers, tiny_diffusers  # noqa: E402

from tmp_jax import arch  # noqa: E402
from tmp_jax.calibration import load_calib, prepare, write_calib  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import dump_calibration as dump  # noqa: E402

pytestmark = pytest.mark.torch
H = arch.get("zimage")


class ByteTokenizer:
    """Stand-in tokenizer (the pipeline needs ``input_ids`` + ``attention_mask`` padded to max_length)."""

    def __call__(self, texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt"):  # noqa: ANN001, ANN204
        ids = torch.zeros((len(texts), max_length), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            b = list(t.encode())[:max_length]
            ids[i, : len(b)] = torch.tensor(b) % 97 + 1
            mask[i, : len(b)] = 1
        return type("Encoding", (), {"input_ids": ids, "attention_mask": mask})()

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kw):  # noqa: ANN001, ANN201
        # Qwen3's template shape (what ZImagePipeline asks for; the Omni pipeline writes its own)
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _tiny_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageOmniPipeline
    from transformers import Qwen3Config, Qwen3Model, Siglip2ImageProcessorPil, Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    te = Qwen3Model(
        Qwen3Config(
            vocab_size=100,
            hidden_size=32,  # = the transformer's cap_feat_dim
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(32, 32, 32),  # vae_scale_factor 4: a 64x80 image -> 16x20 latents
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=32,
        shift_factor=0.1,
        scaling_factor=0.5,
    ).eval()
    vae = vae.to(torch.bfloat16)  # the Omni pipeline encodes condition images in bf16
    sig = Siglip2VisionModel(
        Siglip2VisionConfig(
            hidden_size=SIGLIP_DIM, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, patch_size=8
        )
    ).eval()
    proc = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)
    tr = tiny_diffusers(seed=5, siglip_feat_dim=SIGLIP_DIM)
    return ZImageOmniPipeline(FlowMatchEulerDiscreteScheduler(), vae, te, ByteTokenizer(), tr, sig, proc)


def _t2i_pipeline(omni):  # noqa: ANN001, ANN202
    from diffusers import ZImagePipeline

    return ZImagePipeline(omni.scheduler, omni.vae, omni.text_encoder, omni.tokenizer, omni.transformer)


def _tokens(img: np.ndarray) -> np.ndarray:
    """(C, F, H, W) -> (F*H/2*W/2, 4*C) tokens, channel fastest (diffusers' patchify, patch 2x2x1)."""
    C, F, Hh, W = img.shape
    return img.reshape(C, F, 1, Hh // 2, 2, W // 2, 2).transpose(1, 3, 5, 2, 4, 6, 0).reshape(-1, 4 * C)


def test_omni_dump_records_what_the_transformer_sees(tmp_path):
    from PIL import Image

    from converters.zimage import load_zimage

    pipe = _tiny_pipeline()
    rng = np.random.default_rng(0)
    img = [Image.fromarray(rng.integers(0, 255, hw + (3,), dtype=np.uint8)) for hw in ((64, 80), (80, 64))]
    seen = []
    real = pipe.transformer.forward

    def spy(*a, **kw):  # the transformer's real outputs, in call order
        r = real(*a, **kw)
        seen.append([o.float().numpy() for o in r[0]])
        return r

    pipe.transformer.forward = spy
    edits = [([img[0]], "make it red"), ([img[0], img[1]], "put the second into the first")]
    call = dict(guidance_scale=2.0, max_sequence_length=64, output_type="latent")
    batches = dump.record_omni(pipe, edits, steps=2, every=1, seed=0, height=64, width=80, **call)
    t2i = _t2i_pipeline(pipe)
    batches += dump.record_t2i(t2i, ["a plain prompt"], height=64, width=80, steps=2, every=1, seed=0, **call)
    assert [b["task"] for b in batches] == ["ti2i"] * 4 + ["t2i"] * 2 and len(seen) == 6
    two = batches[2]
    assert two["cond_latents"].shape[:2] == (2, 2) and (two["cond_sizes"] > 0).all()  # CFG rows, 2 images each
    assert two["siglip_feats"].shape[-1] == SIGLIP_DIM and (two["cap_lens"] > 0).sum(1).tolist() == [4, 4]
    # a prompt without an image runs the Omni transformer in the omni layout: not a T2I micro-batch
    with pytest.raises(ValueError, match="no reference image"):
        dump.record_omni(pipe, [([], "a plain prompt")], steps=1, every=1, seed=0, **call)
    img[1].save(tmp_path / "b.png")
    (tmp_path / "edits.tsv").write_text("b.png|b.png\tswap them\n\n")
    ((ims, text),) = dump.read_edits(tmp_path / "edits.tsv")
    assert len(ims) == 2 and ims[0].size == (64, 80) and text == "swap them"

    back = load_calib(write_calib(tmp_path / "calib", batches, "zimage"), "zimage")
    jm = load_zimage(save_diffusers(pipe.transformer, tmp_path / "transformer"))
    for b, want in zip(back, seen):
        inputs = prepare(H, jm.config, b)
        out = np.asarray(H.for_task(b["task"]).forward(jm, inputs))
        assert len(want) == out.shape[0]
        for r, w in enumerate(want):  # the loss mask selects exactly the target's tokens, in patch order
            assert rel_err(out[r][inputs["mask"][r]], _tokens(w)) <= 1e-5
