"""Z-Image DiT with per-block widths, for checkpoints exported by tmp-jax (diffusers remote code).

Written next to ``config.json`` by ``python -m converters.export``; load with
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` (or through a pipeline whose
``model_index.json`` names this module). It is the stock ``ZImageTransformer2DModel`` with three
changes: each block may have its own number of attention heads and FFN width; a block with 0 heads
(0 FFN width) has no attention (FFN) sub-layer and skips that residual branch; the two refiner stacks
may have different depths. Omni models (``siglip_feat_dim``) keep a full-width ``siglip_refiner`` of
``n_refiner_layers`` blocks, so diffusers' omni forward runs unchanged. Config keys added:
``{stack}_heads``, ``{stack}_ffn_dims``, ``{stack}_kept`` (original block indices, informative) for
stack in noise_refiner, context_refiner, layers. Only torch and diffusers are imported.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_z_image import (
    ADALN_EMBED_DIM,
    FeedForward,
    ZImageTransformer2DModel,
    ZSingleStreamAttnProcessor,
    select_per_token,
)


class ZImagePrunedBlock(nn.Module):
    def __init__(self, dim, heads, head_dim, ffn_dim, norm_eps, qk_norm, modulation=True):
        super().__init__()
        self.modulation = modulation
        self.attention = None
        self.feed_forward = None
        if heads > 0:
            self.attention = Attention(
                query_dim=dim,
                cross_attention_dim=None,
                dim_head=head_dim,
                heads=heads,
                qk_norm="rms_norm" if qk_norm else None,
                eps=1e-5,
                bias=False,
                out_bias=False,
                processor=ZSingleStreamAttnProcessor(),
            )
            self.attention_norm1 = RMSNorm(dim, eps=norm_eps)
            self.attention_norm2 = RMSNorm(dim, eps=norm_eps)
        if ffn_dim > 0:
            self.feed_forward = FeedForward(dim=dim, hidden_dim=ffn_dim)
            self.ffn_norm1 = RMSNorm(dim, eps=norm_eps)
            self.ffn_norm2 = RMSNorm(dim, eps=norm_eps)
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(min(dim, ADALN_EMBED_DIM), 4 * dim, bias=True))

    def forward(self, x, attn_mask, freqs_cis, adaln_input=None, noise_mask=None, adaln_noisy=None, adaln_clean=None):
        if self.modulation:
            seq_len = x.shape[1]
            if noise_mask is not None:
                mods = []
                for c in (adaln_noisy, adaln_clean):
                    s_msa, g_msa, s_mlp, g_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
                    mods.append((1.0 + s_msa, g_msa.tanh(), 1.0 + s_mlp, g_mlp.tanh()))
                scale_msa, gate_msa, scale_mlp, gate_mlp = (
                    select_per_token(n, c, noise_mask, seq_len) for n, c in zip(*mods)
                )
            else:
                mod = self.adaLN_modulation(adaln_input)
                scale_msa, gate_msa, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(4, dim=2)
                gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
                scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
            if self.attention is not None:
                a = self.attention(self.attention_norm1(x) * scale_msa, attention_mask=attn_mask, freqs_cis=freqs_cis)
                x = x + gate_msa * self.attention_norm2(a)
            if self.feed_forward is not None:
                x = x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))
        else:
            if self.attention is not None:
                a = self.attention(self.attention_norm1(x), attention_mask=attn_mask, freqs_cis=freqs_cis)
                x = x + self.attention_norm2(a)
            if self.feed_forward is not None:
                x = x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        return x


class ZImagePrunedTransformer2DModel(ZImageTransformer2DModel):
    _no_split_modules = ["ZImagePrunedBlock"]
    _repeated_blocks = ["ZImagePrunedBlock"]

    @register_to_config
    def __init__(
        self,
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=2560,
        siglip_feat_dim=None,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=(32, 48, 48),
        axes_lens=(1024, 512, 512),
        noise_refiner_heads=None,
        noise_refiner_ffn_dims=None,
        noise_refiner_kept=None,
        context_refiner_heads=None,
        context_refiner_ffn_dims=None,
        context_refiner_kept=None,
        layers_heads=None,
        layers_ffn_dims=None,
        layers_kept=None,
    ):
        # Build the stock skeleton with empty stacks, then the per-block stacks.
        super().__init__(
            all_patch_size=all_patch_size,
            all_f_patch_size=all_f_patch_size,
            in_channels=in_channels,
            dim=dim,
            n_layers=0,
            n_refiner_layers=0,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            norm_eps=norm_eps,
            qk_norm=qk_norm,
            cap_feat_dim=cap_feat_dim,
            siglip_feat_dim=siglip_feat_dim,
            rope_theta=rope_theta,
            t_scale=t_scale,
            axes_dims=axes_dims,
            axes_lens=axes_lens,
        )
        head_dim = dim // n_heads
        full_ffn = int(dim / 3 * 8)

        def stack(heads, ffn, default_n, modulation):
            n = len(heads) if heads is not None else default_n
            heads = heads if heads is not None else [n_heads] * n
            ffn = ffn if ffn is not None else [full_ffn] * n
            return nn.ModuleList(
                [ZImagePrunedBlock(dim, h, head_dim, f, norm_eps, qk_norm, modulation) for h, f in zip(heads, ffn)]
            )

        self.noise_refiner = stack(noise_refiner_heads, noise_refiner_ffn_dims, n_refiner_layers, True)
        self.context_refiner = stack(context_refiner_heads, context_refiner_ffn_dims, n_refiner_layers, False)
        self.layers = stack(layers_heads, layers_ffn_dims, n_layers, True)
        if siglip_feat_dim is not None:  # Omni: the SigLIP refiner is never pruned (n_refiner_layers full blocks)
            self.siglip_refiner = stack(None, None, n_refiner_layers, False)
        # the stock __init__ recorded zeros for the stack sizes: record the real ones
        self.register_to_config(n_layers=n_layers, n_refiner_layers=n_refiner_layers)


__all__ = ["ZImagePrunedTransformer2DModel", "ZImagePrunedBlock", "torch"]
