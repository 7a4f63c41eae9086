"""Export of an EVA-CLIP model to open_clip: the state dict loads strictly into
open_clip.create_model(<config>, pretrained=None) and image / text features match (< 1e-4);
the same weights in bfloat16 stay within 3e-2."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_support
from eva_jax.convert import open_clip_export
from eva_jax.models import clip

torch = pytest.importorskip('torch')
open_clip = pytest.importorskip('open_clip')


@pytest.mark.parametrize('name,pool,bias', [('eva-clip-tiny', 'avg', True),
                                            ('eva02-clip-tiny', 'token', False)])
def test_export_loads_strictly_and_matches(tmp_path, name, pool, bias):
  cfg = clip.clip_config(name, image_size=28, pool=pool, logit_bias=bias)
  model = clip_support.random_clip(cfg)
  sd = open_clip_export.open_clip_state_dict(model)
  tag = f'{name}-{pool}'.replace('-', '_')
  oc = open_clip.create_model(clip_support.register_open_clip(cfg, tmp_path, tag), pretrained=None)
  oc.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
  oc.eval()
  images, tokens, want_i, want_t = clip_support.open_clip_features(oc, 28)
  got_i, got_t = jax.jit(lambda m, x, t: (m.encode_image(x), m.encode_text(t)))(
      model, images, jnp.asarray(tokens, jnp.int32))
  np.testing.assert_allclose(np.asarray(got_i), want_i, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got_t), want_t, atol=1e-4, rtol=0)
  assert abs(oc.logit_scale.item() - float(model.logit_scale[...])) < 1e-6
  if bias:
    assert abs(oc.logit_bias.item() - float(model.logit_bias[...])) < 1e-6
    # The same weights computing in bfloat16 (with remat): features within bf16 rounding.
    cfg16 = clip.clip_config(name, image_size=28, pool=pool, logit_bias=bias, dtype='bfloat16',
                             remat='full')
    m16 = clip_support.random_clip(cfg16)
    i16, t16 = jax.jit(lambda m, x, t: (m.encode_image(x), m.encode_text(t)))(
        m16, images, jnp.asarray(tokens, jnp.int32))
    assert i16.dtype == t16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(i16), want_i, atol=3e-2, rtol=0)
    np.testing.assert_allclose(np.asarray(t16), want_t, atol=3e-2, rtol=0)


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
