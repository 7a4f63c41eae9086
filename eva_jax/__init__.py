"""eva_jax: EVA (arXiv 2211.07636) masked CLIP-feature pretraining in JAX/Flax NNX."""
# from eva_jax.api import load_encoder, load_teacher

__version__ = '0.1.0'
