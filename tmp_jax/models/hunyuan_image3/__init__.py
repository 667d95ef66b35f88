"""HunyuanImage-3.0 (80B MoE, text-to-image flow-matching denoiser) in Flax NNX."""

from tmp_jax.models.hunyuan_image3.config import FULL, TINY, HunyuanImage3Config
from tmp_jax.models.hunyuan_image3.model import HunyuanImage3

__all__ = ["FULL", "TINY", "HunyuanImage3", "HunyuanImage3Config"]
