"""HunyuanImage-3.0 text backbone against transformers' HunYuanMoEV1ForCausalLM, and the file-level
official-layout round trip (official safetensors -> Flax -> official safetensors, VAE/ViT carried)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from converters.engine import SafetensorsReader, save_model  # noqa: E402
from converters.hunyuan import hunyuan_key_table, load_hunyuan  # noqa: E402
from tmp_jax import arch  # noqa: E402
from tmp_jax.models.hunyuan_image3.config import TINY  # noqa: E402

pytestmark = pytest.mark.torch
H = arch.get("hunyuan")


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, np.float32))


def _to_transformers(model) -> dict[str, torch.Tensor]:
    """Our parameters -> transformers' hunyuan_v1_moe keys (experts gate_up_proj = [gate; up] rows)."""
    sd = {
        "model.embed_tokens.weight": _t(model.model.wte.embedding[...]),
        "model.norm.weight": _t(model.model.ln_f.weight[...]),
        "lm_head.weight": _t(model.lm_head.kernel[...]).T,
    }
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        att, mlp = layer.self_attn, layer.mlp
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = _t(getattr(att, n).kernel[...]).T
        sd[p + "self_attn.query_layernorm.weight"] = _t(att.query_layernorm.weight[...])
        sd[p + "self_attn.key_layernorm.weight"] = _t(att.key_layernorm.weight[...])
        sd[p + "input_layernorm.weight"] = _t(layer.input_layernorm.weight[...])
        sd[p + "post_attention_layernorm.weight"] = _t(layer.post_attention_layernorm.weight[...])
        sd[p + "mlp.gate.wg.weight"] = _t(mlp.gate.wg.kernel[...]).T
        up, gate, down = (_t(getattr(mlp.experts, n)[...]) for n in ("up_proj", "gate_proj", "down_proj"))
        sd[p + "mlp.experts.gate_up_proj"] = torch.cat([gate.transpose(1, 2), up.transpose(1, 2)], dim=1)
        sd[p + "mlp.experts.down_proj"] = down.transpose(1, 2)
        for n in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.shared_mlp.{n}.weight"] = _t(getattr(mlp.shared_mlp, n).kernel[...]).T
    return sd


def test_text_logits_match_transformers():
    from transformers import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM

    ours = H.init_random(TINY, jnp.float32, 3)
    c = TINY
    cfg = HunYuanMoEV1Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.moe_intermediate_size[0],
        moe_intermediate_size=c.moe_intermediate_size[0],
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.attention_head_dim,
        num_experts=c.num_experts[0],
        moe_topk=c.moe_topk[0],
        num_shared_expert=1,
        use_qk_norm=True,
        rms_norm_eps=c.rms_norm_eps,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    ref = HunYuanMoEV1ForCausalLM(cfg).eval()
    missing, unexpected = ref.load_state_dict(_to_transformers(ours), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    ids = np.random.default_rng(0).integers(3, c.vocab_size, size=(2, 11))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(ours.forward_text(jnp.asarray(ids)))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= 1e-5, err


def test_official_layout_file_round_trip_with_passthrough(tmp_path):
    """official safetensors (+ VAE / ViT / aligner keys) -> Flax -> official safetensors, bit-identical."""
    model = H.init_random(TINY, jnp.float32, 5)
    table = hunyuan_key_table(TINY)
    src = tmp_path / "src"
    conf = TINY.to_hf_config()
    save_model(model, table, src, prefix="model", config=conf, max_shard_bytes=200_000)
    # add modules we do not port: they must be recognised and carried through untouched
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    extra = {
        "vae.decoder.conv_out.weight": rng.standard_normal((3, 4, 3, 3, 3)).astype(np.float32),
        "vision_model.embeddings.patch_embedding.weight": rng.standard_normal((8, 3)).astype(np.float32),
        "vision_aligner.layers.0.weight": rng.standard_normal((4, 8)).astype(np.float32),
    }
    save_file(extra, str(src / "model-extra.safetensors"))
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    idx["weight_map"].update({k: "model-extra.safetensors" for k in extra})
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    loaded = load_hunyuan(src)
    out = tmp_path / "out"
    save_model(
        loaded,
        table,
        out,
        prefix="model",
        config=conf,
        passthrough_from=SafetensorsReader(src),
        max_shard_bytes=200_000,
    )
    a, b = SafetensorsReader(src), SafetensorsReader(out)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert a.read(k).tobytes() == b.read(k).tobytes() and a.infos[k].dtype == b.infos[k].dtype, k
    assert loaded.model.layers[0].mlp.gate.wg.kernel[...].dtype == jnp.float32
