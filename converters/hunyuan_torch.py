"""HunyuanImage-3.0's PyTorch reference for ``converters.run_torch`` (registered by :mod:`converters.hunyuan`).

:class:`HunyuanDenoiser`, assembled from nemo-automodel's ``HunyuanImage3ForCausalMM`` building blocks
(attention, RMSNorm, shared MLP, timestep embedders, UNetDown / UNetUp, 2D RoPE, joint mask) with our own
routed-expert layer (:class:`RoutedExperts`) so that experts can be quantised and offloaded; it equals nemo's
full model on tiny configs (tests/test_run_torch.py).

Memory plan (``converters.memory_plan``): tensors listed in ``cpu_resident`` (``model.wte``) stay in CPU RAM
(the prompt's rows are gathered there), the experts in ``offloaded_experts`` are kept in pinned CPU memory and
ALL offloaded experts of a layer are copied to the GPU on a side stream when that layer starts (overlapping its
attention), used by the MoE and freed at the end of the layer; everything else is resident. Offloading changes
where a tensor lives, not the arithmetic: outputs equal the non-offloaded run exactly.

Sampling: seeded token ids (the text encoder and VAE are not part of an export's denoiser); the model predicts
the velocity ``noise - x0`` at ``timestep = 1000 * sigma``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from converters import quantize as qz
from converters.engine import CheckpointError
from converters.run_torch import Export, load_strict, swap_linears

NOT_LOADED = ("lm_head.weight", "model.ln_f.weight")


def _per_layer(v: Any, i: int) -> int:
    return int(v[i]) if isinstance(v, list) else int(v)


class ExpertWeights:
    """One routed expert: ``gate_and_up_proj`` ``[2I, H]`` (``[up; gate]``) and ``down_proj`` ``[H, I]``,
    each (values, scale-or-None)."""

    def __init__(self, gu: torch.Tensor, gu_s: torch.Tensor | None, dn: torch.Tensor, dn_s: torch.Tensor | None):
        self.tensors = [gu, gu_s, dn, dn_s]

    def to(self, device: torch.device, non_blocking: bool = False) -> ExpertWeights:
        return ExpertWeights(*(None if t is None else t.to(device, non_blocking=non_blocking) for t in self.tensors))

    def pin(self) -> ExpertWeights:
        return ExpertWeights(*(None if t is None else t.pin_memory() for t in self.tensors))

    def weight(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        q, s = self.tensors[2 * i], self.tensors[2 * i + 1]
        return q.to(dtype) if s is None else qz.dequantize_torch(q, s, dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors if t is not None)


class RoutedExperts(nn.Module):
    """fp32 softmax router over all experts, top-k, renormalised (the release, k = 1 included); each expert a
    SwiGLU on its routed tokens. Experts are resident on ``device`` or offloaded (CPU, pinned on CUDA)."""

    def __init__(self, hidden: int, num_experts: int, topk: int, norm_topk: bool):
        super().__init__()
        self.gate = nn.Module()
        self.gate.wg = nn.Linear(hidden, num_experts, bias=False, device="meta", dtype=torch.float32)
        self.num_experts, self.topk, self.norm_topk = num_experts, topk, norm_topk
        self.experts: list[ExpertWeights | None] = [None] * num_experts
        self.offloaded: list[int] = []

    def prefetch(self, device: torch.device, stream: Any) -> dict[int, ExpertWeights]:
        """Start copying this layer's offloaded experts to ``device`` (on ``stream`` when CUDA)."""
        if not self.offloaded:
            return {}
        if stream is None:
            return {e: self.experts[e].to(device) for e in self.offloaded}
        with torch.cuda.stream(stream):
            return {e: self.experts[e].to(device, non_blocking=True) for e in self.offloaded}

    def forward(self, h: torch.Tensor, staged: dict[int, ExpertWeights]) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])  # [T, H]
        probs = torch.softmax(F.linear(x.float(), self.gate.wg.weight.float()), dim=-1)  # [T, E] fp32
        w, idx = torch.topk(probs, self.topk, dim=-1)  # [T, k]
        if self.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        for e in range(self.num_experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)  # a token routes to an expert at most once
            if tok.numel() == 0:
                continue
            ew = staged.get(e) or self.experts[e]
            xe = x[tok]  # [n_e, H]
            up, gate = F.linear(xe, ew.weight(0, x.dtype)).chunk(2, dim=-1)  # [n_e, I] each
            y = F.linear(up * F.silu(gate), ew.weight(1, x.dtype))  # [n_e, H]
            out[tok] = out[tok] + y.float() * w[tok, slot, None]  # unique rows: deterministic (no atomics)
        return out.to(h.dtype).reshape(shape)


def attention(m: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """nemo's ``HunyuanImage3Attention.forward`` with the KV heads repeated explicitly instead of
    ``enable_gqa=True``: with a mask, SDPA's GQA path falls back to the math kernel, which materialises the
    ``[B, N, S, S]`` scores (1 GB+ at 1024^2); the repeated K / V cost ``2 * S * N * hd`` elements."""
    from nemo_automodel.components.models.hunyuan_image3.rope import apply_rope

    b, s, _ = x.shape
    qkv = m.qkv_proj(x).view(b, s, m.num_kv_heads, m.q_per_kv + 2, m.head_dim)  # [B, S, K, G+2, hd]
    q, k, v = torch.split(qkv, [m.q_per_kv, 1, 1], dim=3)
    q = q.reshape(b, s, m.num_heads, m.head_dim).transpose(1, 2)  # [B, N, S, hd], head h = k*G + j
    k = k.reshape(b, s, m.num_kv_heads, m.head_dim).transpose(1, 2)  # [B, K, S, hd]
    v = v.reshape(b, s, m.num_kv_heads, m.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # fp32
    if m.use_qk_norm:  # QK-norm after RoPE
        q, k = m.query_layernorm(q), m.key_layernorm(k)
    q, k = q.to(v.dtype), k.to(v.dtype)
    k = k.repeat_interleave(m.q_per_kv, dim=1)  # [B, N, S, hd]: query head h reads KV head h // G
    v = v.repeat_interleave(m.q_per_kv, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, N, S, hd]
    return m.o_proj(out.transpose(1, 2).reshape(b, s, m.num_heads * m.head_dim))


class HunyuanLayer(nn.Module):
    def __init__(self, cfg: SimpleNamespace, layer: int):
        from nemo_automodel.components.models.common import BackendConfig
        from nemo_automodel.components.models.hunyuan_image3.layers import (
            HunyuanImage3Attention,
            HunyuanRMSNorm,
            HunyuanSharedMLP,
        )

        super().__init__()
        backend = BackendConfig(attn="sdpa", linear="torch", experts="torch", dispatcher="torch")
        with torch.device("meta"):
            self.self_attn = HunyuanImage3Attention(cfg, backend, torch.float32)
            self.input_layernorm = HunyuanRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
            self.post_attention_layernorm = HunyuanRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
            inter = _per_layer(cfg.moe_intermediate_size, layer)
            shared = inter * _per_layer(cfg.num_shared_expert, layer)
        self.mlp = RoutedExperts(
            cfg.hidden_size, _per_layer(cfg.num_experts, layer), _per_layer(cfg.moe_topk, layer), cfg.norm_topk_prob
        )
        with torch.device("meta"):
            self.mlp.shared_mlp = HunyuanSharedMLP(cfg.hidden_size, shared, backend, bias=False, dtype=torch.float32)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, stream: Any) -> Any:
        staged = self.mlp.prefetch(x.device, stream)  # overlaps the attention below
        x = x + attention(self.self_attn, self.input_layernorm(x), cos, sin, mask)
        h = self.post_attention_layernorm(x)
        if stream is not None and staged:
            torch.cuda.current_stream().wait_stream(stream)
            for ew in staged.values():
                for t in ew.tensors:
                    if t is not None:
                        t.record_stream(torch.cuda.current_stream())
        return x + (self.mlp(h, staged) + self.mlp.shared_mlp(h))  # nemo's order: routed + shared


class HunyuanDenoiser(nn.Module):
    """The HunyuanImage-3.0 T2I denoiser (nemo's ``HunyuanImage3ForCausalMM.forward``) with per-layer MoE
    shapes, quantised Linears and offloadable experts; official checkpoint key names."""

    def __init__(self, conf: dict[str, Any]):
        from nemo_automodel.components.models.hunyuan_image3.layers import TimestepEmbedder, UNetDown, UNetUp

        super().__init__()
        self.cfg = cfg = SimpleNamespace(
            **{
                "attention_bias": False,
                "use_qk_norm": True,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "norm_topk_prob": True,
                **conf,
            }
        )
        self.latent_channels = conf.get("vae", {}).get("latent_channels", 32)
        h, pe = cfg.hidden_size, cfg.patch_embed_hidden_dim
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([HunyuanLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.wte: torch.Tensor | None = None
        with torch.device("meta"):
            self.timestep_emb = TimestepEmbedder(h)
            self.time_embed = TimestepEmbedder(h)
            self.time_embed_2 = TimestepEmbedder(h)
            self.patch_embed = UNetDown(self.latent_channels, h, pe, h, dtype=None)
            self.final_layer = UNetUp(h, h, pe, self.latent_channels, dtype=None)
        self.copy_stream = None

    def forward(self, input_ids: torch.Tensor, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """``input_ids`` [B, S] (one contiguous image span after ``<timestep>``), ``latents`` [B, C, h, w],
        ``timestep`` [B] in [0, 1000] -> velocity [B, C, h, w]."""
        from nemo_automodel.components.models.hunyuan_image3.model import build_joint_attention_mask
        from nemo_automodel.components.models.hunyuan_image3.rope import image_grid_positions_batched, rope_cos_sin

        cfg = self.cfg
        dev = latents.device
        batch, seq = input_ids.shape
        th, tw = latents.shape[-2:]
        n_img = th * tw
        is_image = input_ids == cfg.image_token_id
        starts = is_image.int().argmax(dim=1)  # [B]
        if not bool((is_image.sum(1) == n_img).all()):
            raise ValueError(f"every row needs {n_img} image tokens ({th}x{tw} latents)")
        rows = torch.arange(batch, device=dev)
        img_idx = starts[:, None] + torch.arange(n_img, device=dev)[None]  # [B, n_img]
        dtype = self.time_embed.mlp[0].weight.dtype
        embeds = F.embedding(input_ids.to(self.wte.device), self.wte).to(dev, dtype)  # [B, S, H]
        img_tok = self.patch_embed(latents.to(dtype), self.time_embed(timestep))
        embeds = embeds.index_put((rows[:, None], img_idx), img_tok.to(dtype))
        embeds = embeds.index_put((rows, starts - 1), self.timestep_emb(timestep).to(dtype))
        pos = image_grid_positions_batched(seq, starts, th, tw)
        cos, sin = rope_cos_sin(pos, cfg.attention_head_dim, cfg.rope_theta)
        mask = build_joint_attention_mask(seq, starts, n_img, torch.full((batch,), seq, device=dev))
        x = embeds
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, self.copy_stream)
        return self.final_layer(x[rows[:, None], img_idx], self.time_embed_2(timestep), th, tw)


def check_plan(plan: dict[str, Any], conf: dict[str, Any], where: str) -> None:
    """A memory plan's offloaded experts exist in this export (a plan made for another export: a clear error)."""
    layers = int(conf["num_hidden_layers"])
    for la, es in plan["offloaded_experts"].items():
        i = int(la)
        if not 0 <= i < layers:
            raise ValueError(f"{where}: offloaded experts of layer {i}, the export has {layers} layers")
        n = _per_layer(conf["num_experts"], i)
        bad = [e for e in es if not 0 <= int(e) < n]
        if bad:
            raise ValueError(f"{where}: offloaded expert {bad[0]} of layer {i}, the export's layer has {n} experts")


def build_hunyuan(ex: Export, dtype: torch.dtype, device: torch.device, plan: dict[str, Any] | None) -> nn.Module:
    """The denoiser of a HunyuanImage export, loaded tensor by tensor under ``plan`` (None: all resident)."""
    import re

    if plan is not None:
        check_plan(plan, ex.conf, "--memory-plan")
    model = HunyuanDenoiser(ex.conf)
    swap_linears(model, ex.quantized)
    cpu_keys = set(plan["cpu_resident"]) if plan else set()
    offloaded = {(int(la), e) for la, es in (plan["offloaded_experts"] if plan else {}).items() for e in es}
    pin = device.type == "cuda"
    expert_re = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_and_up_proj|down_proj)\.weight")
    sd: dict[str, torch.Tensor] = {}
    for k in ex.reader.keys():
        if k in NOT_LOADED or k.startswith(("vae.", "vision_model.", "vision_aligner.")):
            continue  # not used by the T2I denoiser (ln_f / lm_head: text head only)
        m = expert_re.fullmatch(k)
        if m or (k.endswith(qz.SCALE_SUFFIX) and expert_re.fullmatch(k[: -len(qz.SCALE_SUFFIX)])):
            continue  # experts below
        if k == "model.wte.weight":
            model.wte = ex.tensor(k, dtype, "cpu" if k in cpu_keys else device)
            continue
        want = torch.float32 if k.endswith("mlp.gate.wg.weight") else dtype  # the router stays fp32
        sd[k] = ex.tensor(k, want, device)
    load_strict(model, sd, ex.folder)
    if model.wte is None:
        raise CheckpointError(f"{ex.folder}: missing key 'model.wte.weight'")
    for i, layer in enumerate(model.model.layers):
        moe = layer.mlp
        for e in range(moe.num_experts):
            keys = [f"model.layers.{i}.mlp.experts.{e}.{n}.weight" for n in ("gate_and_up_proj", "down_proj")]
            on = "cpu" if (i, e) in offloaded else device
            parts: list[Any] = []
            for k in keys:
                if k not in ex.reader:
                    raise CheckpointError(f"{ex.folder}: missing key {k!r}")
                parts += [ex.tensor(k, dtype, on), ex.tensor(qz.scale_key(k), dtype, on) if k in ex.quantized else None]
            ew = ExpertWeights(*parts)
            moe.experts[e] = ew.pin() if (on == "cpu" and pin) else ew
        moe.offloaded = sorted(e for (la, e) in offloaded if la == i)
    if offloaded and device.type == "cuda":
        model.copy_stream = torch.cuda.Stream(device)
    return model.eval()


def build(ex: Export, dtype: torch.dtype, device: torch.device, plan: dict[str, Any] | None) -> nn.Module:
    """``converters.run_torch``'s builder (:func:`build_hunyuan`)."""
    return build_hunyuan(ex, dtype, device, plan)


def hunyuan_inputs(conf: dict[str, Any], grid: tuple[int, int], text_tokens: int, seed: int) -> torch.Tensor:
    """``[bos] text <timestep> <img>*h*w <eoi>`` with seeded ordinary token ids (below every special id)."""
    g = np.random.default_rng(seed)
    hi = min(conf["image_token_id"], conf["timestep_token_id"], conf["vocab_size"])
    text = g.integers(3, hi, size=text_tokens)
    ids = np.concatenate(
        [
            [conf["bos_token_id"]],
            text,
            [conf["timestep_token_id"]],
            np.full(grid[0] * grid[1], conf["image_token_id"]),
            [conf["eos_token_id"]],
        ]
    )
    return torch.from_numpy(ids.astype(np.int64))[None]


def euler(
    ex: Export,
    model: nn.Module,
    *,
    resolution: int,
    text_tokens: int,
    seed: int,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, Callable[[torch.Tensor, float, float], torch.Tensor]]:
    """Seeded initial latents and one flow-matching Euler step (sigma -> next sigma) of ``model``."""
    conf = ex.conf
    down = conf.get("vae_downsample_factor", [16, 16])
    grid = (resolution // down[0], resolution // down[1])
    c = model.latent_channels
    x = torch.randn((1, c, *grid), generator=generator).to(device)
    ids = hunyuan_inputs(conf, grid, text_tokens, seed).to(device)

    def step(x: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
        v = model(ids, x, torch.full((1,), s * 1000.0, device=device))  # velocity noise - x0
        return x + (s_next - s) * v.float()

    return x, step
