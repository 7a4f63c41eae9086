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


def register_open_clip(cfg, folder, tag: str) -> str:
  """Registers a timm trunk entrypoint building `cfg`'s image tower and an open_clip model config
  naming it (open_clip_export.open_clip_model_config, json written to `folder`); returns the
  open_clip model name for open_clip.create_model(name, pretrained=None)."""
  import json
  import open_clip
  from timm.models import eva, register_model
  from eva_jax.convert import open_clip_export
  kwargs = open_clip_export.trunk_timm_kwargs(cfg)
  trunk = f'eva_jax_test_trunk_{tag}'

  def entry(pretrained=False, **kw):   # open_clip passes num_classes / global_pool (+ registry kw)
    del pretrained
    return eva.Eva(**{**kwargs, **{k: v for k, v in kw.items() if k in kwargs}})
  entry.__name__ = trunk
  register_model(entry)
  name = f'eva-jax-test-{tag}'
  f = folder / f'{name}.json'
  f.write_text(json.dumps(open_clip_export.open_clip_model_config(cfg, trunk)))
  open_clip.add_model_config(str(f))
  return name


def open_clip_features(oc, image_size: int, seed: int = 0):
  """(images [3, S, S, 3] NHWC, tokens [3, 77], open_clip image features, text features): random
  images and CLIP-like token rows (EOT 49407 at varying places, zero padding) through the torch
  model `oc`, float32 numpy."""
  import torch
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(3, image_size, image_size, 3)).astype(np.float32)
  tokens = rng.integers(1, 49000, size=(3, 77))
  tokens[np.arange(3), [5, 30, 76]] = 49407
  tokens[0, 6:] = 0
  with torch.no_grad():
    want_i = oc.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    want_t = oc.encode_text(torch.from_numpy(tokens)).numpy()
  return images, tokens, want_i, want_t
