"""EVA-CLIP model (eva_jax.models.clip): FLIP patch dropout with RoPE against timm's Eva, causal
text attention, logit parameters and image-tower init from an EVA MIM file."""
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_support
from eva_jax.convert import clip_text, common, eva_torch, open_clip_export
from eva_jax.convert.common import CheckpointError
from eva_jax.models import resample
from eva_jax.models import clip, vit
from eva_jax.models import config as config_lib

torch = pytest.importorskip('torch')


@pytest.fixture(scope='module')
def eva02():
  cfg = clip.clip_config('eva02-clip-tiny', image_size=56, patch_dropout=0.5)
  return cfg, clip_support.random_clip(cfg, 3)   # clip.create compiles the init: ~15 s CPU


def test_patch_dropout_with_rope_equals_timm(eva02):
  """Kept patches and their RoPE rows follow the same indices as timm's PatchDropoutWithIndices."""
  cfg, model = eva02
  from timm.models import eva
  sd = open_clip_export.open_clip_state_dict(model)
  trunk = eva.Eva(**open_clip_export.trunk_timm_kwargs(cfg), patch_drop_rate=0.5)
  trunk.load_state_dict({k[len('visual.trunk.'):]: torch.from_numpy(v.copy()) for k, v in sd.items()
                         if k.startswith('visual.trunk.')}, strict=True)
  images = np.random.default_rng(0).normal(size=(3, 56, 56, 3)).astype(np.float32)
  key = jax.random.key(7)
  idx = np.asarray(vit.patch_dropout_indices(key, 3, 16, 0.5))
  assert idx.shape == (3, 8) and all(len(set(r)) == 8 for r in idx)
  assert len({tuple(r) for r in idx}) == 3   # a fresh subset per example

  class Fixed(torch.nn.Module):   # timm's patch dropout with our indices
    def forward(self, x):
      i = torch.from_numpy(idx.copy()).long()
      kept = torch.gather(x[:, 1:], 1, i[..., None].expand(-1, -1, x.shape[-1]))
      return torch.cat([x[:, :1], kept], 1), i

  trunk.patch_drop = Fixed()
  trunk.eval()
  with torch.no_grad():
    want = trunk(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  enc = jax.jit(lambda m, x, k: (m.encode_image(x, patch_dropout_key=k), m.encode_image(x)))
  got, full = enc(model, images, key)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  assert np.abs(np.asarray(full) - want).max() > 1e-3   # dropout changed the features


def test_causal_text_and_logit_params(eva02):
  cfg, model = eva02
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, 49000, size=(2, 77)).astype(np.int32)
  tokens[:, 10] = 49407   # EOT
  later, earlier = tokens.copy(), tokens.copy()
  later[:, 11:] = rng.integers(1, 49000, size=(2, 66))   # after EOT: invisible under the mask
  earlier[:, 3] += 1
  f = jax.jit(lambda m, t: m.encode_text(t))
  base = np.asarray(f(model, tokens))
  np.testing.assert_array_equal(np.asarray(f(model, later)), base)
  assert np.abs(np.asarray(f(model, earlier)) - base).max() > 1e-4
  assert abs(cfg.logit_scale_init - math.log(1 / 0.07)) < 1e-12
  assert model.logit_bias is None
  model.logit_scale[...] = jnp.float32(6.0)   # beyond log(100): used clamped
  assert abs(float(model.logit_params()[0]) - 100.0) < 1e-3
  siglip = clip.clip_config('eva-clip-tiny', logit_bias=True)
  assert abs(siglip.logit_scale_init - math.log(10)) < 1e-9 and siglip.logit_bias_init == -10.0
  with pytest.raises(ValueError, match='exceeds the context length'):
    model.encode_text(np.zeros((1, 78), np.int32))


def test_image_tower_from_official_mim_file(tmp_path, caplog):
  cfg = clip.clip_config('eva-clip-tiny', image_size=28)
  model = clip_support.random_clip(cfg)
  enc_cfg = config_lib.encoder_config('tiny')
  enc_cfg.image_size = 28
  enc = clip_support.fill_random(vit.abstract(enc_cfg), 5)
  flat = common.model_params_numpy(enc)
  flat['lm_head/kernel'] = np.ones((64, 32), np.float32)
  flat['lm_head/bias'] = np.zeros((32,), np.float32)
  sd = eva_torch.to_torch_state_dict(flat, enc_cfg, 'eva')
  f = tmp_path / 'eva_mim.pth'
  torch.save({'model': {k: torch.from_numpy(v.copy()) for k, v in sd.items()}}, f)
  with caplog.at_level(logging.INFO):
    info = clip_text.load_image_tower(model, str(f), facts={'heads': 4, 'rope': False})
  assert any('mask_token' in s for s in info['skipped'])
  assert 'lm_head' in caplog.text
  ours = common.model_params_numpy(model)
  for k, v in common.model_params_numpy(enc).items():
    if k != 'mask_token':
      np.testing.assert_array_equal(ours[f'visual/{k}'], v)

  # EVA02-CLIP-B/16 from EVA-02-B/14: a /16 tower from the /14 file, the patch embedding resampled
  # (official bicubic by default, models/resample.py), the 2x2 grid kept (28/14 = 32/16).
  p16 = clip.clip_config('eva-clip-tiny', image_size=28)
  p16.vision.patch_size, p16.vision.image_size = 16, 32
  model16 = clip_support.random_clip(p16)
  info = clip_text.load_image_tower(model16, str(f), facts={'heads': 4, 'rope': False})
  assert any('patch_kernel resampled 14->16 (bicubic)' in s for s in info['skipped'])
  got = common.model_params_numpy(model16)['visual/patch_kernel']
  src = common.model_params_numpy(enc)['patch_kernel']
  np.testing.assert_allclose(got, resample.resample_patch_kernel(src, 16, 'bicubic'), atol=1e-6)
  assert got.shape == (16, 16, 3, 64)

  wide = clip.clip_config('eva-clip-tiny', image_size=28)
  wide.vision.mlp_dim = 128
  with pytest.raises(CheckpointError, match='vision.mlp_dim: file 256 vs config 128'):
    clip_text.load_image_tower(clip.abstract(wide), str(f), facts={'heads': 4, 'rope': False})


def test_contrastive_step_flops():
  """EVA-CLIP g/14 without patch dropout: the vision part is the spec's g/14 training (1.60 TFLOP
  per image, blocks 3x forward) plus patch embedding and head; 50% FLIP halves the patch tokens."""
  from eva_jax import benchmark
  cfg = clip.clip_config('eva01-clip-g/14')
  v, t = cfg.vision, cfg.text
  full = benchmark.clip_step_flops_per_pair(cfg, patch_dropout=0.0)
  blocks = benchmark.forward_flops(v, with_embed=False)
  assert abs(3 * blocks / 1e12 - 1.60) < 0.01
  embed_head = 2 * 256 * 14 * 14 * 3 * 1408 + 2 * 1408 * 1024
  assert abs(full['vision_train'] - 3 * (blocks + embed_head)) < 1
  d, f, T = 768, 3072, 77
  assert abs(full['text_train'] - 3 * (12 * (8 * T * d * d + 4 * T * d * f + 4 * T * T * d)
                                       + 2 * d * 1024)) < 1
  half = benchmark.clip_step_flops_per_pair(cfg, patch_dropout=0.5, global_batch=1000)
  T2 = 1 + 128
  assert abs(half['vision_train'] - 3 * (40 * (8 * T2 * 1408 ** 2 + 4 * T2 * 1408 * 6144
                                               + 4 * T2 * T2 * 1408) + embed_head)) < 1
  assert half['loss_train'] == 3 * 2 * 2 * 1000 * 1024
  assert half['total'] == sum(half[k] for k in ('vision_train', 'text_train', 'loss_train'))
