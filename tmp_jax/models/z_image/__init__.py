"""Z-Image DiT (diffusers ``ZImageTransformer2DModel``) in Flax NNX."""

from tmp_jax.models.z_image.config import TINY, TURBO, BlockSpec, ZImageConfig
from tmp_jax.models.z_image.layout import make_layout, unpatchify
from tmp_jax.models.z_image.model import ZImageTransformer, init_abstract

__all__ = [
    "TINY",
    "TURBO",
    "BlockSpec",
    "ZImageConfig",
    "ZImageTransformer",
    "init_abstract",
    "make_layout",
    "unpatchify",
]
