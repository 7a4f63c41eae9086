"""eva_jax: EVA (arXiv 2211.07636) masked CLIP-feature pretraining in JAX/Flax NNX.

Public entry points: eva_jax.load_teacher(path) and eva_jax.load_encoder(path) (eva_jax/api.py),
imported on first use so that `import eva_jax` stays light (and never imports torch).
"""

__version__ = '0.1.0'
__all__ = ['load_teacher', 'load_encoder']


def __getattr__(name):
  if name in __all__:
    from eva_jax import api
    return getattr(api, name)
  raise AttributeError(f'module eva_jax has no attribute {name!r}')
