"""Run denoising steps of an export in PyTorch, quantised or not, optionally under a 24 GB memory plan.

    python -m converters.run_torch --model EXPORT_DIR [--steps N] [--resolution 1024] [--memory-plan plan.json]
        [--device cuda] [--dtype bf16|fp32] [--cap-memory 24GiB] [--out latents.safetensors]

Reads only config.json, safetensors and the memory plan JSON. Quantised Linear weights (``X.weight`` int8 /
float8_e4m3fn + ``X.weight_scale``, docs/quantized-format.md) stay quantised in memory and are dequantised per
Linear at forward time (:class:`QLinear`: ``float32(q) * scale`` cast to the compute dtype, then ``F.linear``).

Modules. Z-Image: diffusers' ``ZImageTransformer2DModel`` (stock configs) or our per-block subclass
(``converters.remote.transformer_z_image_pruned``, imported from this package, never from the export folder),
built on the meta device; every quantised ``nn.Linear`` is swapped for a :class:`QLinear` before the strict
``load_state_dict(assign=True)``. HunyuanImage-3.0: :class:`HunyuanDenoiser`, assembled from nemo-automodel's
``HunyuanImage3ForCausalMM`` building blocks (attention, RMSNorm, shared MLP, timestep embedders, UNetDown /
UNetUp, 2D RoPE, joint mask) with our own routed-expert layer (:class:`RoutedExperts`) so that experts can be
quantised and offloaded; it equals nemo's full model on tiny configs (tests/test_run_torch.py).

Memory plan (``converters.memory_plan``): tensors listed in ``cpu_resident`` (``model.wte``) stay in CPU RAM
(the prompt's rows are gathered there), the experts in ``offloaded_experts`` are kept in pinned CPU memory and
ALL offloaded experts of a layer are copied to the GPU on a side stream when that layer starts (overlapping its
attention), used by the MoE and freed at the end of the layer; everything else is resident. Offloading changes
where a tensor lives, not the arithmetic: outputs equal the non-offloaded run exactly.

Sampling: flow-matching Euler over ``sigma_schedule(steps, shift)``. Prompts are synthetic (the text encoder
and VAE are not part of an export's denoiser): seeded token ids (HunyuanImage) or seeded caption features
(Z-Image). ``--out`` writes the final latents.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from converters import quantize as qz
from converters.engine import CheckpointError, SafetensorsReader, read_json

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
NOT_LOADED = ("lm_head.weight", "model.ln_f.weight")
_VIEW = {"BF16": (np.uint16, torch.bfloat16), "F8_E4M3": (np.uint8, torch.float8_e4m3fn)}


def to_torch(reader: SafetensorsReader, key: str) -> torch.Tensor:
    """One stored tensor as a CPU torch tensor of its stored dtype (bf16 / fp8 through a bit view)."""
    arr = reader.read(key)
    tag = reader.infos[key].dtype
    if tag in _VIEW:
        bits, dt = _VIEW[tag]
        return torch.from_numpy(arr.view(bits)).view(dt)
    return torch.from_numpy(arr)


class QLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored weight-only quantised (or plain); dequantised at each call.

    State dict keys are those of the export: ``weight`` (int8 / float8_e4m3fn / float), ``weight_scale`` (fp32
    ``[out]``, absent for a plain weight), ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, quantized: bool, qdtype: Any = torch.int8):
        super().__init__()
        self.in_features, self.out_features, self.quantized = in_features, out_features, quantized
        dev = torch.device("meta")
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=qdtype, device=dev))
        if quantized:
            self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=dev))
        self.bias = nn.Parameter(torch.empty(out_features, device=dev), requires_grad=False) if bias else None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self.quantized:
            return qz.dequantize_torch(self.weight, self.weight_scale, dtype)
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), b)


def swap_linears(module: nn.Module, quantized_keys: set[str], prefix: str = "") -> int:
    """Replace every ``nn.Linear`` whose ``{name}.weight`` is quantised in the export by a :class:`QLinear`."""
    n = 0
    for name, child in list(module.named_children()):
        full = f"{prefix}{name}"
        if isinstance(child, nn.Linear) and f"{full}.weight" in quantized_keys:
            setattr(module, name, QLinear(child.in_features, child.out_features, child.bias is not None, True))
            n += 1
        else:
            n += swap_linears(child, quantized_keys, f"{full}.")
    return n


@dataclass
class Export:
    """An export folder: config, reader, quantisation method and the set of quantised keys."""

    folder: Path
    conf: dict[str, Any]
    reader: SafetensorsReader
    method: str
    quantized: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, folder: Path) -> Export:
        folder = Path(folder)
        conf = read_json(folder / "config.json", "an export folder needs config.json", CheckpointError)
        method = qz.read_quantization(conf, str(folder / "config.json"))
        reader = SafetensorsReader(folder)
        quantized = {k[: -len(qz.SCALE_SUFFIX)] for k in reader.keys() if k.endswith(".weight" + qz.SCALE_SUFFIX)}
        if quantized and method == "none":
            raise CheckpointError(
                f"{folder}: has {len(quantized)} '*{qz.SCALE_SUFFIX}' tensors (e.g. {qz.scale_key(min(quantized))!r}) "
                "but config.json has no quantization_config"
            )
        for k in quantized:
            if k not in reader:
                raise CheckpointError(f"{folder}: scale {qz.scale_key(k)!r} has no weight {k!r}")
            want = qz.TAGS.get(method)
            if reader.infos[k].dtype != want:
                raise CheckpointError(f"{reader.infos[k].file}: {k!r} is {reader.infos[k].dtype}, config says {want}")
        # a quantised value tensor without its scale would be loaded as raw integers / fp8 codes
        for k, info in reader.infos.items():
            if info.dtype in qz.TAGS.values() and k not in quantized:
                raise CheckpointError(f"{info.file}: {k!r} is {info.dtype} but has no {qz.scale_key(k)!r}")
        return cls(folder, conf, reader, method, quantized)

    def tensor(self, key: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """A tensor ready for the module: quantised values / scales as stored, floats cast to ``dtype``."""
        t = to_torch(self.reader, key)
        if key not in self.quantized and t.is_floating_point() and not key.endswith(qz.SCALE_SUFFIX):
            t = t.to(dtype)
        return t.to(device)


# ----------------------------------------------------------------------------------------------------------
# Z-Image
# ----------------------------------------------------------------------------------------------------------
def build_zimage(ex: Export, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The diffusers module of a Z-Image export with its (possibly quantised) weights, strictly loaded."""
    from diffusers import ZImageTransformer2DModel

    from converters.remote.transformer_z_image_pruned import ZImagePrunedTransformer2DModel

    conf = {k: v for k, v in ex.conf.items() if not k.startswith("_") and k not in ("auto_map", "quantization_config")}
    cls = ZImagePrunedTransformer2DModel if "auto_map" in ex.conf else ZImageTransformer2DModel
    with torch.device("meta"):
        model = cls.from_config(conf)
    swap_linears(model, ex.quantized)
    sd = {k: ex.tensor(k, dtype, device) for k in ex.reader.keys()}
    load_strict(model, sd, ex.folder)
    return model.eval()


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], where: Path) -> None:
    """``model.load_state_dict(sd, strict=True, assign=True)``; a key or shape mismatch is a one-line
    CheckpointError naming the export folder and the first missing / unexpected key (not torch's traceback)."""
    want = set(model.state_dict())
    missing, unexpected = sorted(want - set(sd)), sorted(set(sd) - want)
    if missing or unexpected:
        parts = [f"{len(missing)} missing (e.g. {missing[0]!r})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})"] if unexpected else []
        raise CheckpointError(f"{where}: tensors do not match {type(model).__name__}: {', '.join(parts)}")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:  # size mismatches
        raise CheckpointError(f"{where}: {' '.join(str(e).split())}") from None


# ----------------------------------------------------------------------------------------------------------
# HunyuanImage-3.0
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    latents: torch.Tensor
    seconds_per_step: list[float]
    peak_bytes: int | None


def load(
    folder: Path, *, device: str = "cpu", dtype: str = "fp32", memory_plan: dict[str, Any] | None = None
) -> tuple[Export, nn.Module]:
    ex = Export.open(folder)
    dev, dt = torch.device(device), TORCH_DTYPES[dtype]
    from converters.memory_plan import arch_of

    arch = arch_of(ex.conf, str(ex.folder / "config.json"))
    if memory_plan is not None and memory_plan["arch"] != arch:
        raise ValueError(f"memory plan is for {memory_plan['arch']}, the export is {arch}")
    if arch == "hunyuan":
        return ex, build_hunyuan(ex, dt, dev, memory_plan)
    return ex, build_zimage(ex, dt, dev)


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


def sample(
    ex: Export,
    model: nn.Module,
    *,
    steps: int = 1,
    resolution: int = 1024,
    text_tokens: int = 32,
    seed: int = 0,
    shift: float = 3.0,
    device: str = "cpu",
) -> RunResult:
    """Flow-matching Euler from seeded noise; returns the final latents and seconds per step."""
    from tmp_jax.sampling import sigma_schedule

    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    sig = [float(s) for s in sigma_schedule(steps, shift)]
    times: list[float] = []
    conf = ex.conf
    with torch.no_grad():
        if "num_experts" in conf:
            down = conf.get("vae_downsample_factor", [16, 16])
            grid = (resolution // down[0], resolution // down[1])
            c = model.latent_channels
            x = torch.randn((1, c, *grid), generator=g).to(dev)
            ids = hunyuan_inputs(conf, grid, text_tokens, seed).to(dev)
            for s, s_next in zip(sig[:-1], sig[1:]):
                t0 = time.perf_counter()
                v = model(ids, x, torch.full((1,), s * 1000.0, device=dev))  # velocity noise - x0
                x = x + (s_next - s) * v.float()
                _sync(dev)
                times.append(time.perf_counter() - t0)
        else:
            hw = resolution // 8  # the Z-Image VAE downsamples by 8
            x = torch.randn((conf["in_channels"], 1, hw, hw), generator=g).to(dev)
            cap = torch.randn((text_tokens, conf["cap_feat_dim"]), generator=g).to(dev)
            wdt = model.x_pad_token.dtype
            for s, s_next in zip(sig[:-1], sig[1:]):
                t0 = time.perf_counter()
                out = model([x.to(wdt)], torch.full((1,), 1.0 - s, device=dev), [cap.to(wdt)]).sample[0]  # x0 - noise
                x = x - (s_next - s) * out.float()
                _sync(dev)
                times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return RunResult(x.cpu(), times, peak)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv: list[str] | None = None) -> int:
    from converters.memory_plan import check_resolution, parse_bytes, read_plan

    p = argparse.ArgumentParser(
        prog="python -m converters.run_torch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, type=Path, help="an export folder (plain, int8 or fp8)")
    p.add_argument("--steps", type=int, default=1, help="denoising steps (default 1)")
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--memory-plan", type=Path, help="memory_plan.json (python -m converters.memory_plan)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(TORCH_DTYPES), help="compute dtype (plan's, else bf16)")
    p.add_argument("--text-tokens", type=int, default=32, help="synthetic prompt length (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, default=3.0, help="flow-matching schedule shift (default 3)")
    p.add_argument("--cap-memory", help="cap this process's CUDA allocator, e.g. 24GiB (emulates a smaller card)")
    p.add_argument("--out", type=Path, help="write the final latents (safetensors)")
    a = p.parse_args(argv)
    try:
        check_resolution(a.resolution)  # else a reshape error deep in the model's patchify
        if a.steps < 1:
            raise ValueError(f"--steps {a.steps}: expected >= 1")
        plan = read_plan(a.memory_plan) if a.memory_plan else None
        if plan is not None and a.resolution > int(plan.get("resolution", a.resolution)):
            # the plan's activation estimate was made for its resolution: larger images void its guarantee
            raise ValueError(
                f"--resolution {a.resolution} exceeds the {plan['resolution']}px the memory plan "
                f"{a.memory_plan} was made for; re-plan with python -m converters.memory_plan --resolution"
            )
        if a.out is not None and not a.out.parent.is_dir():
            raise ValueError(f"--out {a.out}: folder {a.out.parent} does not exist")
        dtype = (
            a.dtype
            or {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[plan["compute_dtype"] if plan else "bfloat16"]
        )
        if a.cap_memory:
            cap_memory(parse_bytes(a.cap_memory), torch.device(a.device))
        t0 = time.perf_counter()
        ex, model = load(a.model, device=a.device, dtype=dtype, memory_plan=plan)
        load_s = time.perf_counter() - t0
        res = sample(
            ex,
            model,
            steps=a.steps,
            resolution=a.resolution,
            text_tokens=a.text_tokens,
            seed=a.seed,
            shift=a.shift,
            device=a.device,
        )
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.out:
        from safetensors.torch import save_file

        tmp = a.out.with_name(f".{a.out.name}.tmp")
        save_file({"latents": res.latents.contiguous()}, str(tmp))
        os.replace(tmp, a.out)
    peak = f", peak {res.peak_bytes / 2**30:.2f} GiB allocated" if res.peak_bytes is not None else ""
    print(json.dumps({"load_s": round(load_s, 2), "seconds_per_step": [round(t, 3) for t in res.seconds_per_step]}))
    print(f"{len(res.seconds_per_step)} step(s) at {a.resolution}px on {a.device}{peak}", file=sys.stderr)
    return 0


def cap_memory(nbytes: int, device: torch.device) -> None:
    """Cap the CUDA caching allocator of this process at ``nbytes`` (``set_per_process_memory_fraction``)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, nbytes / total), index)


if __name__ == "__main__":
    raise SystemExit(main())
