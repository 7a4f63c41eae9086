"""Export of an EVA-CLIP model to open_clip: the state dict loads strictly into
open_clip.create_model(<config>, pretrained=None) and image / text features match (< 1e-4)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eva_jax.convert import common, open_clip_export
from eva_jax.models import clip

torch = pytest.importorskip('torch')
open_clip = pytest.importorskip('open_clip')


def _perturbed(cfg, seed=0):
  """A model whose biases / norms / logit params are not at their init, so each one is tested."""
  model = clip.create(cfg, seed=seed)
  rng = np.random.default_rng(seed)
  flat = common.model_params_numpy(model)
  flat = {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in flat.items()}
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, common.unflatten(flat))
  nnx.update(model, state)
  return model


def _register(cfg, tmp_path, tag):
  """A timm trunk entrypoint for the config and an open_clip model config naming it."""
  from timm.models import eva, register_model
  kwargs = open_clip_export.trunk_timm_kwargs(cfg)
  trunk = f'eva_jax_test_trunk_{tag}'

  def entry(pretrained=False, **kw):   # open_clip passes num_classes / global_pool (+ registry kw)
    return eva.Eva(**{**kwargs, **{k: v for k, v in kw.items() if k in kwargs}})
  entry.__name__ = trunk
  register_model(entry)
  name = f'eva-jax-test-{tag}'
  f = tmp_path / f'{name}.json'
  f.write_text(json.dumps(open_clip_export.open_clip_model_config(cfg, trunk)))
  open_clip.add_model_config(str(f))
  return name


@pytest.mark.parametrize('name,pool,bias', [('eva-clip-tiny', 'avg', True),
                                            ('eva02-clip-tiny', 'token', False)])
def test_export_loads_strictly_and_matches(tmp_path, name, pool, bias):
  cfg = clip.clip_config(name, image_size=28, pool=pool, logit_bias=bias)
  model = _perturbed(cfg)
  sd = open_clip_export.open_clip_state_dict(model)
  oc = open_clip.create_model(_register(cfg, tmp_path, f'{name}-{pool}'.replace('-', '_')),
                              pretrained=None)
  oc.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
  oc.eval()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 28, 28, 3)).astype(np.float32)
  tokens = rng.integers(1, 49000, size=(3, 77))
  tokens[np.arange(3), [5, 30, 76]] = 49407
  tokens[0, 6:] = 0
  with torch.no_grad():
    want_i = oc.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    want_t = oc.encode_text(torch.from_numpy(tokens)).numpy()
  got_i, got_t = jax.jit(lambda m, x, t: (m.encode_image(x), m.encode_text(t)))(
      model, images, jnp.asarray(tokens, jnp.int32))
  np.testing.assert_allclose(np.asarray(got_i), want_i, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got_t), want_t, atol=1e-4, rtol=0)
  assert abs(oc.logit_scale.item() - float(model.logit_scale[...])) < 1e-6
  if bias:
    assert abs(oc.logit_bias.item() - float(model.logit_bias[...])) < 1e-6


def test_released_config_names():
  cfg = clip.clip_config('eva02-clip-B/16')
  c = open_clip_export.open_clip_model_config(cfg)
  ref = open_clip.get_model_config('EVA02-B-16')
  assert c['embed_dim'] == ref['embed_dim']
  assert c['vision_cfg']['timm_model_name'] == ref['vision_cfg']['timm_model_name']
  for k in ('width', 'heads', 'layers', 'context_length', 'vocab_size'):
    assert c['text_cfg'][k] == ref['text_cfg'][k], k
  # The timm trunk our config names builds our vision tower: same parameter shapes.
  import timm
  trunk = timm.create_model(c['vision_cfg']['timm_model_name'], pretrained=False,
                            num_classes=c['embed_dim'], global_pool='token', device='meta')
  kw = open_clip_export.trunk_timm_kwargs(cfg)
  ours = timm.models.eva.Eva(**kw, device='meta')
  assert {k: tuple(v.shape) for k, v in trunk.state_dict().items()} == \
      {k: tuple(v.shape) for k, v in ours.state_dict().items()}
