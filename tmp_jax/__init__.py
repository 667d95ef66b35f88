"""tmp-jax: Tree-structured Mixed-policy Pruning for MoE and DiT image generators in JAX/Flax NNX."""

__version__ = "0.1.0"
