"""Random EVA-CLIP models for tests without compiling the initializer (clip.create compiles the
whole init, ~15 s of CPU per model on the CI machine): the abstract model filled from numpy.
Values are random, not the real init (clip.create is tested on its own): every weight, bias and
LayerNorm differs from its init, so parity tests exercise each tensor."""
import numpy as np
from flax import nnx

from eva_jax.convert import common


def fill_random(abstract_module, seed: int = 0, std: float = 0.05):
  """Fills an nnx.eval_shape'd module (in place) with random float32 params and returns it."""
  rng = np.random.default_rng(seed)
  state = nnx.state(abstract_module, nnx.Param)
  flat = {}
  for k, v in common.flatten(nnx.to_pure_dict(state)).items():
    x = rng.normal(size=v.shape).astype(np.float32)
    if k.endswith('scale') and not k.endswith('logit_scale'):
      x = 1.0 + 0.1 * x          # LayerNorm scales
    elif k.endswith('logit_scale'):
      x = np.full(v.shape, np.log(1 / 0.07), np.float32)
    elif k.endswith('logit_bias'):
      x = np.full(v.shape, -10.0, np.float32)
    else:
      x = std * x
    flat[k] = x
  nnx.replace_by_pure_dict(state, common.unflatten(flat))
  nnx.update(abstract_module, state)
  return abstract_module


def random_clip(cfg, seed: int = 0):
  from eva_jax.models import clip
  return fill_random(clip.abstract(cfg), seed)
