"""Patch-size resampling (FlexiViT pseudo-inverse = timm resample_patch_embed; the official
bicubic interpolate_patch_14to16.py), pos-embed re-gridding, and their use from export and
fine-tuning's init_from."""
import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')
F = torch.nn.functional

from eva_jax import checkpoint as ckpt_lib  # noqa: E402
from eva_jax.convert import common, export  # noqa: E402
from eva_jax.models import encoder_config, resample  # noqa: E402
from eva_jax.training import finetune  # noqa: E402
from test_intermediates import random_params  # noqa: E402


def _kernel(p, seed=0, c=3, d=8):
  return np.random.default_rng(seed).standard_normal((p, p, c, d)).astype(np.float32)


def _torch_layout(k):   # ours [p, p, C, D] -> torch [D, C, p, p]
  return torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))


@pytest.mark.parametrize('old,new', [(14, 16), (16, 14), (16, 8)])
def test_pinv_matches_timm_resample_patch_embed(old, new):
  from timm.layers import resample_patch_embed
  k = _kernel(old)
  ref = resample_patch_embed(_torch_layout(k), [new, new]).numpy().transpose(2, 3, 1, 0)
  got = resample.resample_patch_kernel(k, new, 'pinv')
  assert got.shape == (new, new, 3, 8)
  diff = float(np.abs(got - ref).max() / np.abs(ref).max())
  print(f'\n[pinv {old}->{new}] max rel |ours - timm| = {diff:.2e}', end='')
  assert diff < 1e-4


@pytest.mark.parametrize('old,new', [(14, 16), (16, 14)])
def test_bicubic_matches_official_interpolate_patch_14to16(old, new):
  k = _kernel(old, 1)
  ref = F.interpolate(_torch_layout(k), size=(new, new), mode='bicubic', align_corners=False)
  got = resample.resample_patch_kernel(k, new, 'bicubic')
  np.testing.assert_allclose(got, ref.numpy().transpose(2, 3, 1, 0), atol=1e-5)


def test_pinv_keeps_the_token_of_a_resized_patch():
  """FlexiViT's property: <resize(x), w'> = <x, w> for upsampling (resize injective)."""
  k = _kernel(14, 2)
  x = np.random.default_rng(3).standard_normal((5, 3, 14, 14)).astype(np.float32)
  big = F.interpolate(torch.from_numpy(x), size=(16, 16), mode='bicubic', antialias=True,
                      align_corners=False).numpy()
  for method, close in (('pinv', True), ('bicubic', False)):
    w = resample.resample_patch_kernel(k, 16, method)
    a = np.einsum('bchw,hwcd->bd', x, k)
    b = np.einsum('bchw,hwcd->bd', big, w)
    err = float(np.abs(a - b).max() / np.abs(a).max())
    print(f'\n[{method} 14->16] token error on resized patches: {err:.2e}', end='')
    assert (err < 1e-4) == close


def test_encoder_pos_embed_matches_official_interpolate_pos_embed():
  cfg = encoder_config('tiny')
  cfg.image_size = 56                                      # 4x4 at patch 14
  p = random_params(cfg)
  out, new_cfg, line = resample.resample_encoder(p, cfg, patch_size=16, image_size=112,
                                                 method='bicubic')
  assert new_cfg.patch_size == 16 and new_cfg.image_size == 112 and cfg.patch_size == 14
  assert line == ('Resampled the encoder: patch kernel 14->16 (bicubic); pos-embed grid 4x4->7x7 '
                  '(bicubic)')
  pos = torch.from_numpy(p['pos_embed'][1:]).reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
  ref = F.interpolate(pos, size=(7, 7), mode='bicubic', align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(49, -1).numpy()
  np.testing.assert_allclose(out['pos_embed'][1:], ref, atol=1e-5)
  np.testing.assert_array_equal(out['pos_embed'][0], p['pos_embed'][0])
  with pytest.raises(ValueError, match=r"one of \('pinv', 'bicubic'\).*got 'nearest'"):
    resample.resample_patch_kernel(p['patch_kernel'], 16, 'nearest')
  with pytest.raises(ValueError, match=r'image size 100 is not a multiple of patch size 16; '
                     r'choose a multiple of 16, e\.g\. 96 or 112'):
    resample.resample_encoder(p, cfg, patch_size=16, image_size=100)


def test_init_from_resamples_patch_size():
  """finetune: kernel by resample_patch_size, then pretrained_into re-grids the pos-embed."""
  cfg = encoder_config('tiny')
  cfg.image_size = 56
  p = common.unflatten(random_params(cfg))
  moved = finetune.resample_patch_size(p, 16, 'pinv')
  np.testing.assert_array_equal(moved['patch_kernel'],
                                resample.resample_patch_kernel(p['patch_kernel'], 16, 'pinv'))
  cfg16 = encoder_config('tiny')
  cfg16.image_size, cfg16.patch_size, cfg16.mask_token = 64, 16, False
  abstract = {'encoder': common.unflatten({k: np.zeros(s, np.float32) for k, s in
                                           common.model_params_abstract(cfg16).items()})}
  enc, dropped = finetune.pretrained_into(abstract, moved, grid_from=(4, 4), grid_to=(4, 4))
  assert enc['patch_kernel'].shape == (16, 16, 3, 64) and 'mask_token' in dropped
  with pytest.raises(ValueError, match="got 'area'"):
    finetune.resample_patch_size(p, 16, 'area')


def test_export_patch_size_and_detectron2_format(tmp_path, monkeypatch):
  """export.export with --patch_size (timm: 14 -> 16, dynamic_img_size recorded) and
  --format=detectron2 (official EVA-01 det names, kwargs json)."""
  from timm.models.eva import Eva
  from safetensors.torch import load_file
  cfg = encoder_config('tiny')
  cfg.image_size = 112                                     # 8x8 at 14, 7x7 at 16
  p = random_params(cfg)
  fake = ckpt_lib.EncoderWeights(params=common.unflatten(p), extra={}, config=cfg.to_dict(),
                                 meta={'kind': 'eva_pretrain', 'student': cfg.to_dict()},
                                 source='test', step=7, weights='raw')
  monkeypatch.setattr(ckpt_lib, 'read_encoder', lambda path, weights='auto': fake)
  out = tmp_path / 'm16.safetensors'
  s = export.export('ignored', 'timm', str(out), patch_size=16)
  assert 'patch kernel 14->16 (pinv)' in s['resampled'] and 'grid 8x8->7x7' in s['resampled']
  kw = json.loads((tmp_path / 'm16.safetensors.json').read_text())
  assert kw['patch_size'] == 16 and kw['dynamic_img_size'] is True and kw['img_size'] == 112
  m = Eva(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
  sd = load_file(str(out))
  m.load_state_dict(sd, strict=True)
  np.testing.assert_allclose(sd['patch_embed.proj.weight'].numpy().transpose(2, 3, 1, 0),
                             resample.resample_patch_kernel(p['patch_kernel'], 16), atol=1e-6)
  det = tmp_path / 'det.pth'
  s = export.export('ignored', 'detectron2', str(det), det_image_size=112, window_size=4,
                    global_blocks=[1])
  kw = json.loads((tmp_path / 'det.pth.json').read_text())
  assert kw['window_block_indexes'] == [0] and kw['beit_like_qkv_bias'] is True
  sd = torch.load(det)['model']
  assert 'backbone.net.blocks.1.attn.qkv.weight' in sd and 'backbone.net.cls_token' not in sd
  assert s['not_exported'] == ['cls_token', 'mask_token', 'norm.bias', 'norm.weight']
