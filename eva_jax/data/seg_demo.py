"""A synthetic semantic-segmentation task built from the bundled demo photos (data/demo.py).

Each example is a crop of one photo (the background) with a crop of another photo pasted inside a
random ellipse or box (the foreground). The label of a pixel is the class of the photo it came
from (the demo set's 8 photos = 8 classes, in its sorted folder order), so the masks are exact.
The pixels come from the demo set's cached crops (data/demo.py, 48 per photo): train composites
from the first 75% of each class's crops, test composites from the rest. Everything is drawn from
np.random.default_rng([seed, split, index]): an example depends only on those three numbers.
Those crops overlap in content (random crops of one photo), so the test set holds out images and
compositions, not the photos themselves.

  images, labels = seg_demo.make_split(64, image_size=(112, 112), seed=0, split='train')
  # uint8 [64, 112, 112, 3], int32 [64, 112, 112] in [0, num_classes)
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
from PIL import Image

from eva_jax.data import demo
from eva_jax.data.config import image_hw

SHAPES = ('ellipse', 'box')
SPLITS = {'train': 0, 'test': 1}


# The share of each class's demo crops whose pixels make the train composites; the test composites
# are made of the other crops (the demo set's 48 random crops per photo overlap in content, so this
# holds out images, not the photos themselves).
TRAIN_SHARE = 0.75


@functools.lru_cache(maxsize=4)
def sources(cache_dir: str = '') -> tuple[tuple[str, tuple[str, ...]], ...]:
  """(class name, sorted crop files) of the demo set (data/demo.py, built on first use), in its
  folder order. RuntimeError when it holds fewer than 2 classes."""
  root = demo.ensure_demo_set(cache_dir)
  out = []
  for name in sorted(os.listdir(root)):
    folder = os.path.join(root, name)
    if os.path.isdir(folder):
      files = tuple(sorted(os.path.join(folder, f) for f in os.listdir(folder)))
      if len(files) >= 2:
        out.append((name, files))
  if len(out) < 2:
    raise RuntimeError(f'the demo set {root} holds fewer than 2 classes; delete it to rebuild.')
  return tuple(out)


def class_names(cache_dir: str = '') -> tuple[str, ...]:
  """The class of label k is class_names()[k]."""
  return tuple(name for name, _ in sources(cache_dir))


@functools.lru_cache(maxsize=512)
def _open(path: str) -> Image.Image:
  with Image.open(path) as img:
    return img.convert('RGB')


def _pick(files: tuple[str, ...], split: str, rng: np.random.Generator) -> Image.Image:
  cut = max(1, min(len(files) - 1, int(round(TRAIN_SHARE * len(files)))))
  part = files[:cut] if split == 'train' else files[cut:]
  return _open(part[int(rng.integers(len(part)))])


def random_crop(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator,
                scale=(0.1, 0.6)) -> np.ndarray:
  """A crop of `scale` of the photo's area with the aspect of `size` (height, width), bicubic-
  resized to it: uint8 [h, w, 3]."""
  h, w = size
  pw, ph = photo.size
  area = pw * ph * rng.uniform(*scale)
  cw = min(pw, int(round(math.sqrt(area * w / h))))
  ch = min(ph, int(round(math.sqrt(area * h / w))))
  left, top = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
  crop = photo.crop((left, top, left + cw, top + ch))
  if rng.random() < 0.5:
    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(crop.resize((w, h), Image.Resampling.BICUBIC), np.uint8)


def shape_mask(size: tuple[int, int], rng: np.random.Generator, shape: str = 'ellipse',
               area=(0.15, 0.45)) -> np.ndarray:
  """bool [h, w]: a random ellipse (rotated) or axis-aligned box covering about U(area) of the
  image (less where it is clipped by the border), aspect log-uniform in [1/2, 2]."""
  if shape not in SHAPES:
    raise ValueError(f'shape={shape!r} must be one of {", ".join(SHAPES)}.')
  h, w = size
  a = rng.uniform(*area) * h * w
  aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5          # pixel centres
  if shape == 'box':
    bw = min(w, max(1, int(round(math.sqrt(a * aspect)))))
    bh = min(h, max(1, int(round(math.sqrt(a / aspect)))))
    top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    m = np.zeros((h, w), bool)
    m[top:top + bh, left:left + bw] = True
    return m
  ry = math.sqrt(a / (math.pi * aspect))                        # semi-axes: pi * rx * ry = a
  rx = ry * aspect
  cy, cx = rng.uniform(0.25 * h, 0.75 * h), rng.uniform(0.25 * w, 0.75 * w)
  theta = rng.uniform(0.0, math.pi)
  dy, dx = yy - cy, xx - cx
  u = (dx * math.cos(theta) + dy * math.sin(theta)) / rx
  v = (-dx * math.sin(theta) + dy * math.cos(theta)) / ry
  return u * u + v * v <= 1.0


def composite(index: int, *, image_size, seed: int = 0, split: str = 'train',
              shape: str = 'ellipse', area=(0.15, 0.45),
              cache_dir: str = '') -> tuple[np.ndarray, np.ndarray]:
  """Example `index` of `split`: (uint8 image [h, w, 3], int32 labels [h, w]). Background and
  foreground classes differ; both are random crops (with the image's aspect) of demo crops of
  that split."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r} must be one of {", ".join(SPLITS)}.')
  size = image_hw(image_size, 'image_size')
  rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
  classes = sources(cache_dir)
  bg = int(rng.integers(len(classes)))
  fg = int(rng.integers(len(classes) - 1))
  fg += fg >= bg                                              # any class but the background
  back = random_crop(_pick(classes[bg][1], split, rng), size, rng)
  front = random_crop(_pick(classes[fg][1], split, rng), size, rng)
  m = shape_mask(size, rng, shape, area)
  image = np.where(m[..., None], front, back)
  labels = np.where(m, fg, bg).astype(np.int32)
  return image, labels


def make_split(n: int, *, image_size, seed: int = 0, split: str = 'train',
               shape: str = 'ellipse', area=(0.15, 0.45),
               cache_dir: str = '') -> tuple[np.ndarray, np.ndarray]:
  """`n` examples of `split`: (uint8 images [n, h, w, 3], int32 labels [n, h, w])."""
  if n < 1:
    raise ValueError(f'the number of {split} images must be >= 1, got {n}.')
  pairs = [composite(i, image_size=image_size, seed=seed, split=split, shape=shape, area=area,
                     cache_dir=cache_dir) for i in range(n)]
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
