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


# ------------------------------------------------------------------------ captioned demo pairs --
# Our own short captions for the demo photos (issue 15): a class name for zero-shot prompts and a
# few descriptive phrases per photo, put into varied caption templates.
PAIRS_VERSION = 'pairs-v1'    # bump when the captions or the split change
TRAIN_PER_CLASS = 36          # crops 0..35 train, the rest are held out (as tests/conftest.py)
CAPTIONS_PER_VAL_IMAGE = 3
CLASSNAMES = {
    'astronaut': 'an astronaut',
    'chelsea': 'a cat',
    'coffee': 'a cup of coffee',
    'rocket': 'a rocket',
    'hubble_deep_field': 'galaxies in deep space',
    'immunohistochemistry': 'stained tissue under a microscope',
    'stereo_motorcycle': 'a motorcycle',
    'retina': 'the retina of an eye',
}
PHRASES = {
    'astronaut': ('an astronaut in a white spacesuit', 'a smiling astronaut in front of a flag',
                  'portrait of a woman astronaut', 'a nasa astronaut posing for a photo'),
    'chelsea': ('a tabby cat', 'a striped cat looking to the side', "a close-up of a cat's face",
                'a ginger house cat with whiskers'),
    'coffee': ('a cup of coffee on a saucer', 'a white coffee cup seen from above',
               'a hot drink in a cup with a spoon', 'coffee with milk foam'),
    'rocket': ('a rocket on the launch pad', 'a space rocket ready for launch',
               'a tall white rocket beside its tower', 'a rocket against the sky'),
    'hubble_deep_field': ('a deep field image full of distant galaxies',
                          'many small galaxies on a black background',
                          'a space telescope view of faraway galaxies',
                          'colorful galaxies and stars'),
    'immunohistochemistry': ('a microscope image of stained tissue', 'cells stained brown and blue',
                             'a histology slide seen under the microscope',
                             'a tissue sample with stained nuclei'),
    'stereo_motorcycle': ('a parked motorcycle', 'a motorbike seen up close',
                          'the engine and wheel of a motorcycle', 'a motorcycle indoors'),
    'retina': ('a photo of the retina of an eye', 'a fundus image with blood vessels',
               'the back of the eye seen through an ophthalmoscope',
               'an orange retina with red vessels'),
}
CAPTION_TEMPLATES = ('{}', 'a photo of {}.', 'a cropped photo of {}.', '{}, close-up.',
                     'an image showing {}.', 'a picture of {}')
# Zero-shot prompts for CLASSNAMES (which carry their own article).
ZERO_SHOT_TEMPLATES = ('a photo of {}.', 'a cropped photo of {}.', 'a close-up photo of {}.',
                       'a picture of {}.', '{}.')


def demo_captions(photo: str, index: int, count: int = 1, seed: int = 0) -> list[str]:
  """`count` distinct captions of crop `index` of `photo`: a phrase (or the class name) in a
  template, drawn from np.random.default_rng([seed, crc of photo, index])."""
  import zlib   # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng([seed, zlib.crc32(photo.encode()), index])
  subjects = PHRASES[photo] + (CLASSNAMES[photo],)
  combos = [(s, t) for s in subjects for t in CAPTION_TEMPLATES]
  return [CAPTION_TEMPLATES[t].format(subjects[s]) for s, t in
          (divmod(int(i), len(CAPTION_TEMPLATES))
           for i in rng.choice(len(combos), size=count, replace=False))]


def demo_classnames(root: str) -> list[str]:
  """CLASSNAMES of the class folders under `root` in label order (sorted folder names, as the
  folder: source assigns labels)."""
  return [CLASSNAMES[c] for c in sorted(os.listdir(root)) if c in CLASSNAMES]


def build_demo_pairs(out_dir: str, demo_dir: str, shard_size: int = 64) -> int:
  """The captioned demo set from the demo photo set at `demo_dir`:
    out/train/<photo>/<i>.jpg + .txt   one caption each, crops 0..TRAIN_PER_CLASS-1
    out/val/<photo>/<i>.jpg + .txt     held-out crops, CAPTIONS_PER_VAL_IMAGE captions (one a line)
    out/shards/train-00000.tar ...     the train pairs as img2dataset webdataset shards
  Returns the number of training pairs."""
  from eva_jax.data import pair_sources   # pylint: disable=g-import-not-at-top
  train = []
  for photo in sorted(os.listdir(demo_dir)):
    if photo not in CLASSNAMES:
      continue
    files = sorted(os.listdir(os.path.join(demo_dir, photo)))
    for i, name in enumerate(files):
      split = 'train' if i < TRAIN_PER_CLASS else 'val'
      captions = demo_captions(photo, i, 1 if split == 'train' else CAPTIONS_PER_VAL_IMAGE)
      folder = os.path.join(out_dir, split, photo)
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(demo_dir, photo, name), 'rb') as f:
        image = f.read()
      stem = os.path.splitext(name)[0]
      with open(os.path.join(folder, stem + '.jpg'), 'wb') as f:
        f.write(image)
      with open(os.path.join(folder, stem + '.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(captions))
      if split == 'train':
        train.append((f'{photo}_{stem}', image, captions[0]))
  order = np.random.default_rng(0).permutation(len(train))   # shards hold mixed classes
  pair_sources.write_webdataset([train[i] for i in order], os.path.join(out_dir, 'shards'),
                                'train', shard_size)
  return len(train)


def ensure_demo_pairs(cache_dir: str = '') -> str:
  """The captioned demo set (see build_demo_pairs), built on first use next to the demo photos.
  Sources: pair folder:<it>/train, folder:<it>/val, webdataset:<it>/shards (or `demo`)."""
  demo_dir = ensure_demo_set(cache_dir)
  final = os.path.join(os.path.dirname(demo_dir), PAIRS_VERSION)
  if os.path.isdir(final):
    return final
  tmp = tempfile.mkdtemp(prefix='.building-', dir=os.path.dirname(final))
  try:
    build_demo_pairs(tmp, demo_dir)
    try:
      os.rename(tmp, final)    # atomic: readers never see a half-written set
    except OSError:
      if not os.path.isdir(final):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final
