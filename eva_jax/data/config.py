"""Input-pipeline settings (the `config.data` block), image sizes and the paper's merged-30M
mixture."""
from __future__ import annotations

import re

import ml_collections
from ml_collections import config_dict
import numpy as np

# OpenAI CLIP normalization: the student and the CLIP teacher see the same tensor (EVA-SPEC).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Nominal sizes of the merged-30M parts as published by each dataset (IN-21K fall11, CC12M and
# CC3M as released, COCO train2017, ADE20K train, Objects365 v1 train). Web datasets lose dead
# links, so what you download is smaller (the paper counts ~29.6M in all); pass `sizes` with your
# own counts (e.g. from the `*-meta.json` written by `eva_jax.data.pack`) to weight by them.
MERGED30M_SIZES = {
    'imagenet21k': 14_197_122,
    'cc12m': 12_423_374,
    'cc3m': 3_318_333,
    'coco_train2017': 118_287,
    'ade20k_train': 20_210,
    'objects365_train': 608_606,
}


# `config.image_size`: an int S (S x S pixels), a (height, width) pair in Python or config.json, or
# 'HxW' on the command line (--config.image_size=224x336; also '(224, 336)').
_HW = re.compile(r'^\s*(\d+)\s*[xX]\s*(\d+)\s*$')


def image_size_field(default):
  """A config field holding an image size of any accepted form. ml_collections fixes a field's
  type at its first value, so an int field could never take '224x336' from the command line; this
  one is typed `object` (an int, a pair or an 'HxW' string may follow)."""
  return config_dict.FieldReference(default, field_type=object)


def image_hw(value, field: str = 'config.image_size') -> tuple[int, int]:
  """(height, width) in pixels of an image-size setting: an int S (square S x S), a (height,
  width) pair (tuple or list) or an 'HxW' string ('224x336' = 224 high, 336 wide).

  Raises ValueError naming `field` and the accepted forms for anything else, or a size < 1."""
  hw = None
  if isinstance(value, str):
    m = _HW.match(value)
    if m:
      hw = (int(m.group(1)), int(m.group(2)))
    elif value.strip().isdigit():
      hw = (int(value),) * 2
  elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    hw = (int(value),) * 2
  elif (isinstance(value, (tuple, list)) and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
    hw = (int(value[0]), int(value[1]))
  if hw is None:
    raise ValueError(f'{field}={value!r} is not an image size: give an int (224: 224 x 224), '
                     "'HxW' on the command line (--config.image_size=224x336: 224 high, 336 wide) "
                     'or a (height, width) pair of ints in a config file.')
  if min(hw) < 1:
    raise ValueError(f'{field}={value!r}: height and width must be >= 1 pixel, got {hw[0]}x'
                     f'{hw[1]}.')
  return hw


def format_hw(hw: tuple[int, int]) -> str:
  """'224' for a square size, '224x336' (height x width) otherwise: for messages and records."""
  return str(hw[0]) if hw[0] == hw[1] else f'{hw[0]}x{hw[1]}'


def default_data_config() -> ml_collections.ConfigDict:
  """The `config.data` block read by `eva_jax.data.pipeline`."""
  return ml_collections.ConfigDict(dict(
      # One source string (see eva_jax.data.sources.open_source) ...
      source='demo',
      # ... or a weighted mixture, a sequence of (source, weight); when non-empty it wins.
      mixture=(),
      data_dir='',           # TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets)
      cache_dir='',          # demo set location ('' = $EVA_JAX_CACHE/demo or ~/.cache/eva_jax/demo)
      image_key='',          # TFDS feature holding the image ('' = the first Image feature)
      label_key='label',     # TFDS feature holding the class ('' = unlabeled)
      workers=0,             # grain worker processes (0 = decode in this process)
      threads=16,            # read/decode threads per process (PIL releases the GIL)
      prefetch=2,            # batches buffered ahead (per worker when workers > 0)
      device_prefetch=2,     # batches put on the devices ahead of the step by a thread (0 = off)
      shuffle=True,
      mean=CLIP_MEAN,
      std=CLIP_STD,
      # Pretraining augmentation (EVA-SPEC): flip 0.5, RandomResizedCrop bicubic.
      hflip=0.5,
      scale=(0.2, 1.0),
      ratio=(3 / 4, 4 / 3),
      # BEiT block-wise masking on the patch grid. The masked count follows the grid: ratio *
      # cells (105/256 is the recipe: exactly 105 of 16x16 at 224 px, patch 14). A
      # num_masking_patches > 0 is an absolute count instead (exact recipes); one far from
      # ratio * cells is warned about (eva_jax.data.masking.BlockMaskGenerator.from_config).
      mask=ml_collections.ConfigDict(dict(
          ratio=105 / 256,
          num_masking_patches=0,
          min_num_patches=16,
          max_aspect=1 / 0.3,
          min_aspect=0.3,
      )),
      # Fine-tuning (timm semantics).
      randaug='rand-m9-mstd0.5-inc1',   # '' disables RandAugment
      mixup=0.0,                        # mixup alpha (0 = off)
      cutmix=0.0,                       # cutmix alpha (0 = off)
      mixup_prob=1.0,                   # probability of mixing a batch
      mixup_switch_prob=0.5,            # P(cutmix) when both are on
      label_smoothing=0.0,              # folded into the soft labels when mixup/cutmix is on
      crop_pct=1.0,                     # eval: resize shorter side to size/crop_pct, center crop
      finetune_scale=(0.08, 1.0),
  ))


def merged30m_mixture(root: str = '~/data/merged30m',
                      sizes: dict[str, int] | None = None) -> list[tuple[str, float]]:
  """The paper's merged-30M pretraining data as a `config.data.mixture`.

  Each part is expected as ArrayRecord shards packed by `python -m eva_jax.data.pack --src
  <image folder> --out <root>/<part>`. Weights are proportional to dataset size, so every image is
  seen about once per pass, as when the paper concatenated the sets.
  """
  sizes = dict(MERGED30M_SIZES if sizes is None else sizes)
  root = root.rstrip('/')
  return [(f'arrayrecord:{root}/{name}/*.array_record', float(n)) for name, n in sizes.items()]
