"""RandAugment with timm's semantics ("rand-m9-mstd0.5-inc1"), on PIL, torch-free.

timm's own implementation cannot be imported without torch (`import timm` loads its models), and it
draws from the global `random` / `np.random` state; this one takes a `np.random.Generator`. The
draws happen in timm's order (op choice, then per op: apply?, magnitude, sign), so feeding both
the same random stream gives pixel-identical results (tests/data/test_data_augment.py checks it).
"""
from __future__ import annotations

import re

from PIL import Image, ImageEnhance, ImageOps

_LEVEL_DENOM = 10.0   # 'm9' is a magnitude on a 0..10 scale


def _negate_half(v, rng):
  return -v if rng.random() > 0.5 else v


# Magnitude (0..10) -> op argument. `rng` is used only for the random sign.
def _rotate_arg(m, rng, hp): return _negate_half(m / _LEVEL_DENOM * 30.0, rng)
def _shear_arg(m, rng, hp): return _negate_half(m / _LEVEL_DENOM * 0.3, rng)
def _translate_rel_arg(m, rng, hp): return _negate_half(m / _LEVEL_DENOM * hp['translate_pct'], rng)
def _translate_abs_arg(m, rng, hp):
  return _negate_half(m / _LEVEL_DENOM * hp['translate_const'], rng)
def _enhance_arg(m, rng, hp): return m / _LEVEL_DENOM * 1.8 + 0.1
def _enhance_inc_arg(m, rng, hp): return max(0.1, 1.0 + _negate_half(m / _LEVEL_DENOM * 0.9, rng))
def _posterize_arg(m, rng, hp): return int(m / _LEVEL_DENOM * 4)
def _posterize_inc_arg(m, rng, hp): return 4 - int(m / _LEVEL_DENOM * 4)
def _solarize_arg(m, rng, hp): return min(256, int(m / _LEVEL_DENOM * 256))
def _solarize_inc_arg(m, rng, hp): return 256 - min(256, int(m / _LEVEL_DENOM * 256))
def _solarize_add_arg(m, rng, hp): return min(128, int(m / _LEVEL_DENOM * 110))


def _affine(img, matrix, hp):
  return img.transform(img.size, Image.Transform.AFFINE, matrix,
                       resample=hp['resample'], fillcolor=hp['fill'])


def _posterize(img, bits, hp):
  # Keep the top `bits` bits. Written as a LUT because Pillow >= 13 rejects bits=0, which
  # PosterizeIncreasing reaches at magnitude 10 (old Pillow, which timm assumes, gave black).
  if bits >= 8:
    return img
  keep = ~(2 ** (8 - bits) - 1) & 0xFF
  return img.point([i & keep for i in range(256)] * len(img.getbands()))


def _solarize_add(img, add, hp, thresh=128):
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return img.point(lut * len(img.getbands())) if img.mode in ('L', 'RGB') else img


_ENHANCERS = {'Color': ImageEnhance.Color, 'Contrast': ImageEnhance.Contrast,
              'Brightness': ImageEnhance.Brightness, 'Sharpness': ImageEnhance.Sharpness}

# name -> (level->arg or None, op(img, arg, hparams))
OPS = {
    'AutoContrast': (None, lambda img, _, hp: ImageOps.autocontrast(img)),
    'Equalize': (None, lambda img, _, hp: ImageOps.equalize(img)),
    'Invert': (None, lambda img, _, hp: ImageOps.invert(img)),
    'Rotate': (_rotate_arg, lambda img, deg, hp: img.rotate(
        deg, resample=hp['resample'], fillcolor=hp['fill'])),
    'Posterize': (_posterize_arg, _posterize),
    'PosterizeIncreasing': (_posterize_inc_arg, _posterize),
    'Solarize': (_solarize_arg, lambda img, t, hp: ImageOps.solarize(img, t)),
    'SolarizeIncreasing': (_solarize_inc_arg, lambda img, t, hp: ImageOps.solarize(img, t)),
    'SolarizeAdd': (_solarize_add_arg, _solarize_add),
    'ShearX': (_shear_arg, lambda img, f, hp: _affine(img, (1, f, 0, 0, 1, 0), hp)),
    'ShearY': (_shear_arg, lambda img, f, hp: _affine(img, (1, 0, 0, f, 1, 0), hp)),
    'TranslateXRel': (_translate_rel_arg,
                      lambda img, p, hp: _affine(img, (1, 0, p * img.size[0], 0, 1, 0), hp)),
    'TranslateYRel': (_translate_rel_arg,
                      lambda img, p, hp: _affine(img, (1, 0, 0, 0, 1, p * img.size[1]), hp)),
    'TranslateX': (_translate_abs_arg, lambda img, px, hp: _affine(img, (1, 0, px, 0, 1, 0), hp)),
    'TranslateY': (_translate_abs_arg, lambda img, px, hp: _affine(img, (1, 0, 0, 0, 1, px), hp)),
}
for _name, _enhancer in _ENHANCERS.items():
  OPS[_name] = (_enhance_arg, lambda img, f, hp, e=_enhancer: e(img).enhance(f))
  OPS[_name + 'Increasing'] = (_enhance_inc_arg, lambda img, f, hp, e=_enhancer: e(img).enhance(f))

_SHEAR_TRANSLATE = ['ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel']
# timm's op lists ('inc1' swaps in the variants whose severity grows with the magnitude).
RAND_TRANSFORMS = (['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
                    'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness']
                   + _SHEAR_TRANSLATE)
RAND_INCREASING_TRANSFORMS = (['AutoContrast', 'Equalize', 'Invert', 'Rotate',
                               'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd',
                               'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
                               'SharpnessIncreasing'] + _SHEAR_TRANSLATE)


class RandAugment:
  """`RandAugment('rand-m9-mstd0.5-inc1', fill=..., resample=..., translate_const=...)`.

  Config keys as in timm: m (magnitude), n (ops per image, default 2), p (per-op probability,
  default 0.5), mstd (magnitude noise std; >100 = uniform in [0, m]), mmax (magnitude clip,
  default 10), inc (severity-increasing op set). timm's weighted op sets ('t...') are not supported.
  """

  def __init__(self, config: str, fill=(128, 128, 128), resample=Image.Resampling.BICUBIC,
               translate_const: int = 250, translate_pct: float = 0.45):
    parts = config.split('-')
    if parts[0] != 'rand':
      raise ValueError(f'RandAugment config must start with "rand", got {config!r}')
    self.magnitude, self.num_layers, self.prob = _LEVEL_DENOM, 2, 0.5
    self.magnitude_std, self.magnitude_max, increasing = 0.0, _LEVEL_DENOM, False
    for part in parts[1:]:
      key, val = (re.split(r'(\d.*)', part) + ['', ''])[:2]
      if not val:
        raise ValueError(f'Unsupported RandAugment option {part!r} in {config!r}')
      if key == 'm':
        self.magnitude = int(val)
      elif key == 'n':
        self.num_layers = int(val)
      elif key == 'p':
        self.prob = float(val)
      elif key == 'mstd':
        self.magnitude_std = float('inf') if float(val) > 100 else float(val)
      elif key == 'mmax':
        self.magnitude_max = int(val)
      elif key == 'inc':
        increasing = bool(int(val))
      else:
        raise ValueError(f'Unsupported RandAugment option {part!r} in {config!r}')
    self.op_names = list(RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS)
    self.hparams = dict(fill=tuple(fill), resample=resample,
                        translate_const=translate_const, translate_pct=translate_pct)

  def apply_op(self, img: Image.Image, name: str, rng) -> Image.Image:
    """One op as timm's AugmentOp: apply with prob p, noisy magnitude clipped to [0, mmax]."""
    if self.prob < 1.0 and rng.random() > self.prob:
      return img
    m = self.magnitude
    if self.magnitude_std == float('inf'):
      m = rng.uniform(0, m)
    elif self.magnitude_std > 0:
      m = rng.normal(m, self.magnitude_std)
    m = max(0.0, min(m, self.magnitude_max))
    level_fn, op = OPS[name]
    arg = level_fn(m, rng, self.hparams) if level_fn is not None else None
    return op(img, arg, self.hparams)

  def __call__(self, img: Image.Image, rng) -> Image.Image:
    # Ops are drawn with replacement, uniformly, like timm's unweighted RandAugment.
    for i in rng.choice(len(self.op_names), self.num_layers, replace=True, p=None):
      img = self.apply_op(img, self.op_names[int(i)], rng)
    return img
