"""Augmentations against the references the official EVA code used (timm, torchvision).

Our versions draw from a np.random.Generator; timm draws from the global `random`/`np.random`.
The adapters below route our draws to those global streams, so identical seeds must give
identical pixels and targets.
"""
import random
import subprocess
import sys

import numpy as np
from PIL import Image, ImageOps
import pytest
import skimage.data

from eva_jax.data.config import CLIP_MEAN, CLIP_STD
from eva_jax.data.mixup import Mixup, smooth_one_hot
from eva_jax.data.randaugment import OPS, RAND_INCREASING_TRANSFORMS, RandAugment
from eva_jax.data.transforms import (NormalizeBatch, resize_center_crop, resized_crop,
                                     rrc_params)

import support

torch = pytest.importorskip('torch')
timm_aa = pytest.importorskip('timm.data.auto_augment')
timm_mixup = pytest.importorskip('timm.data.mixup')
TF = pytest.importorskip('torchvision.transforms.functional')

FILL = tuple(min(255, round(255 * x)) for x in CLIP_MEAN)   # what timm derives from the mean


@pytest.fixture(scope='module')
def photo():
  return Image.fromarray(skimage.data.chelsea()).convert('RGB')   # a real 451x300 photo


@pytest.fixture(scope='module')
def photo224(photo):
  return photo.resize((224, 224), Image.Resampling.BICUBIC)


class _TimmStreams:
  """Our RandAugment's Generator calls, served from the global streams timm uses."""

  def choice(self, n, size, replace, p):
    return np.random.choice(n, size, replace=replace, p=p)

  def random(self):
    return random.random()

  def normal(self, loc, scale):
    return random.gauss(loc, scale)

  def uniform(self, a, b):
    return random.uniform(a, b)


def _timm_hparams():
  return dict(translate_const=int(224 * 0.45), img_mean=FILL,
              interpolation=Image.Resampling.BICUBIC)


def test_randaugment_matches_timm_end_to_end(photo224):
  ours = RandAugment('rand-m9-mstd0.5-inc1', fill=FILL, resample=Image.Resampling.BICUBIC,
                     translate_const=int(224 * 0.45))
  theirs = timm_aa.rand_augment_transform('rand-m9-mstd0.5-inc1', _timm_hparams())
  assert [op.name for op in theirs.ops] == ours.op_names
  changed = crashed = 0
  for seed in range(60):
    random.seed(seed)
    np.random.seed(seed)
    try:
      expected = np.asarray(theirs(photo224))
    except ValueError:   # timm's posterize(bits=0) on Pillow >= 13; ours is tested below
      crashed += 1
      continue
    random.seed(seed)
    np.random.seed(seed)
    got = np.asarray(ours(photo224, _TimmStreams()))
    np.testing.assert_array_equal(got, expected, err_msg=f'seed {seed}')
    changed += not np.array_equal(got, np.asarray(photo224))
  assert crashed <= 3 and changed > 40   # most images were augmented (p=0.5 per op, 2 ops)


def test_posterize_all_bit_depths(photo224):
  x = np.asarray(photo224)
  posterize = OPS['PosterizeIncreasing'][1]
  for bits in (1, 2, 4, 7):
    np.testing.assert_array_equal(np.asarray(posterize(photo224, bits, {})),
                                  np.asarray(ImageOps.posterize(photo224, bits)))
  # Magnitude 10 keeps 0 bits: black, as Pillow < 13 (which timm was written for) produced.
  np.testing.assert_array_equal(np.asarray(posterize(photo224, 0, {})), np.zeros_like(x))
  ours = RandAugment('rand-m10-inc1-p1')    # magnitude 10, no noise, always applied
  assert np.asarray(ours.apply_op(photo224, 'PosterizeIncreasing',
                                  np.random.default_rng(0))).max() == 0


@pytest.mark.parametrize('name', RAND_INCREASING_TRANSFORMS)
def test_each_randaugment_op_matches_timm(photo224, name):
  # Fixed magnitude 9, always applied (the noisy magnitude is covered end to end above).
  ours = RandAugment('rand-m9-inc1-p1', fill=FILL, translate_const=int(224 * 0.45))
  op = timm_aa.AugmentOp(name, prob=1.0, magnitude=9, hparams=_timm_hparams())
  for seed in range(3):
    random.seed(seed)
    expected = np.asarray(op(photo224))
    random.seed(seed)
    got = np.asarray(ours.apply_op(photo224, name, _TimmStreams()))
    np.testing.assert_array_equal(got, expected)
    if name not in ('AutoContrast', 'Equalize'):   # no-ops on some photos by nature
      assert not np.array_equal(got, np.asarray(photo224)), name


class _MixupStreams:
  def random(self):
    return np.random.rand()

  def beta(self, a, b):
    return np.random.beta(a, b)

  def integers(self, low, high):
    return np.random.randint(low, high)


@pytest.mark.parametrize('mixup_alpha,cutmix_alpha', [(0.8, 1.0), (0.0, 1.0), (0.8, 0.0)])
def test_mixup_cutmix_match_timm(mixup_alpha, cutmix_alpha):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 32, 40, 3)).astype(np.float32)   # NHWC, non-square: catches H/W swaps
  y = rng.integers(0, 10, size=8)
  ours = Mixup(mixup_alpha, cutmix_alpha, prob=1.0, switch_prob=0.5, label_smoothing=0.1,
               num_classes=10)
  theirs = timm_mixup.Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=1.0,
                            switch_prob=0.5, mode='batch', label_smoothing=0.1, num_classes=10)
  changed = 0
  for seed in range(8):
    np.random.seed(seed)
    tx, ty = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y))
    np.random.seed(seed)
    gx, gy = ours(x.copy(), y, _MixupStreams())
    np.testing.assert_allclose(gx, tx.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(gy, ty.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(gy.sum(1), 1.0, atol=1e-5)
    changed += not np.allclose(gx, x)
  assert changed >= 6    # a cutmix box can round to nothing when lambda is near 1


def test_smooth_one_hot_values():
  y = smooth_one_hot(np.array([2, 0]), 4, 0.1)
  np.testing.assert_allclose(y[0], [0.025, 0.025, 0.925, 0.025])
  assert y.dtype == np.float32


def test_resized_crop_matches_torchvision(photo):
  rng = np.random.default_rng(0)
  for _ in range(5):
    left, top, w, h = rrc_params(*photo.size, (0.2, 1.0), (3 / 4, 4 / 3), rng)
    expected = TF.resized_crop(photo, top, left, h, w, [224, 224],
                               interpolation=TF.InterpolationMode.BICUBIC)
    np.testing.assert_array_equal(np.asarray(resized_crop(photo, (left, top, w, h), 224)),
                                  np.asarray(expected))


class _TorchStreams:
  """Our rrc_params' Generator calls, served from torch's global RNG as torchvision draws."""

  def uniform(self, a, b):
    return torch.empty(1).uniform_(a, b).item()

  def integers(self, low, high):
    return int(torch.randint(low, high, size=(1,)).item())


def test_rrc_params_match_torchvision_draw_for_draw(photo):
  T = pytest.importorskip('torchvision.transforms')
  for seed in range(200):
    torch.manual_seed(seed)
    top, left, h, w = T.RandomResizedCrop.get_params(photo, [0.2, 1.0], [3 / 4, 4 / 3])
    torch.manual_seed(seed)
    assert rrc_params(*photo.size, (0.2, 1.0), (3 / 4, 4 / 3), _TorchStreams()) == (left, top, w, h)


def test_rrc_params_respect_scale_and_ratio():
  rng = np.random.default_rng(1)
  for _ in range(2000):
    left, top, w, h = rrc_params(640, 480, (0.2, 1.0), (3 / 4, 4 / 3), rng)
    assert 0 <= left and left + w <= 640 and 0 <= top and top + h <= 480
    assert 0.19 < w * h / (640 * 480) <= 1.0 and 0.74 < w / h < 1.34
  # A 1x1 image cannot host any sampled crop: central fallback, then upscaled by the resize.
  assert rrc_params(1, 1, (0.2, 1.0), (3 / 4, 4 / 3), rng) == (0, 0, 1, 1)


@pytest.mark.parametrize('crop_pct', [1.0, 0.875])
def test_eval_transform_matches_torchvision(photo, crop_pct):
  size = 224
  expected = TF.center_crop(TF.resize(photo, int(size / crop_pct),
                                      interpolation=TF.InterpolationMode.BICUBIC), size)
  np.testing.assert_array_equal(np.asarray(resize_center_crop(photo, size, crop_pct)),
                                np.asarray(expected))


def test_normalize_batch_matches_formula(photo224):
  img = np.asarray(photo224)
  batch = NormalizeBatch(CLIP_MEAN, CLIP_STD)([{'image': img, 'label': 3}] * 2)
  ref = (img / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
  assert batch['image'].dtype == np.float32 and batch['image'].shape == (2, 224, 224, 3)
  np.testing.assert_allclose(batch['image'][1], ref, atol=2e-6)
  np.testing.assert_array_equal(batch['label'], [3, 3])


def test_importing_eva_jax_data_loads_neither_torch_nor_tensorflow():
  code = ('import sys, eva_jax.data; '
          'print(sorted(m for m in ("torch", "tensorflow", "timm") if m in sys.modules))')
  repo = support.ROOT
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=repo)
  assert out.stdout.strip() == '[]', out.stdout
