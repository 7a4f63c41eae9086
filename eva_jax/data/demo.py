"""The `demo` source: a few hundred real JPEG photos with labels, built offline on first use.

scikit-image ships a handful of real photographs inside its wheel. Each becomes one class; each
class gets random crops/flips of its photo re-encoded as ImageNet-sized JPEGs. The set is written
once to the cache folder and then read like any image folder, so the default run needs no download
and fine-tuning has labels.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from PIL import Image

VERSION = 'v1'     # bump when the recipe below changes: a new folder is built, old ones unused
IMAGES_PER_CLASS = 48
# skimage.data loaders whose files are bundled in the wheel (no pooch download), all colour photos.
PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field',
          'immunohistochemistry', 'stereo_motorcycle', 'retina')


def default_cache_dir() -> str:
  root = os.environ.get('EVA_JAX_CACHE') or os.path.join('~', '.cache', 'eva_jax')
  return os.path.join(os.path.expanduser(root), 'demo')


def _load_photo(name: str) -> np.ndarray:
  import skimage.data   # pylint: disable=g-import-not-at-top
  img = getattr(skimage.data, name)()
  return img[0] if isinstance(img, tuple) else img    # stereo_motorcycle -> (left, right, disp)


def _variant(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
  """A random crop (25-100% of the area, aspect 3/4..4/3), maybe flipped, short side 256-400."""
  w, h = photo.size
  area = w * h * rng.uniform(0.25, 1.0)
  aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
  cw, ch = min(w, int(round(np.sqrt(area * aspect)))), min(h, int(round(np.sqrt(area / aspect))))
  left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
  crop = photo.crop((left, top, left + cw, top + ch))
  if rng.random() < 0.5:
    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  short = int(rng.integers(256, 401))
  scale = short / min(cw, ch)
  size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
  return crop.resize(size, Image.Resampling.BICUBIC)


def build_demo_set(out_dir: str, images_per_class: int = IMAGES_PER_CLASS, seed: int = 0) -> int:
  """Writes <out_dir>/<photo>/<i>.jpg; returns the number of classes written."""
  written = 0
  for c, name in enumerate(PHOTOS):
    try:
      photo = Image.fromarray(_load_photo(name)).convert('RGB')
    except Exception:  # pylint: disable=broad-except
      continue    # a photo missing from this skimage build (would need a download): skip it
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    for i in range(images_per_class):
      rng = np.random.default_rng([seed, c, i])
      _variant(photo, rng).save(os.path.join(out_dir, name, f'{i:03d}.jpg'), quality=90)
    written += 1
  return written


def ensure_demo_set(cache_dir: str = '') -> str:
  """The demo folder, building it on first use. Safe when several processes race to build it."""
  final = os.path.join(os.path.expanduser(cache_dir) if cache_dir else default_cache_dir(), VERSION)
  if os.path.isdir(final):
    return final
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.building-', dir=parent)
  try:
    if build_demo_set(tmp) < 2:
      raise RuntimeError('scikit-image ships fewer than 2 of the demo photos '
                         f'{PHOTOS}; install scikit-image>=0.19 or use another source.')
    try:
      os.rename(tmp, final)    # atomic: readers never see a half-written set
    except OSError:
      if not os.path.isdir(final):   # lost the race only if someone else finished
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final
