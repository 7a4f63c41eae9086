"""BEiT block-wise masking (EVA-SPEC, "Masking") and the fixed validation mask.

Runs on the host next to each image. All randomness comes from the `np.random.Generator` passed
in, so a mask is a pure function of (seed, example index) in the pipeline.
"""
from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

# EVA's recipe masks 105 of the 16x16 patches (224 px, patch 14): EVA-SPEC "Masking".
RECIPE_RATIO = 105 / 256
# A masked fraction further than this from data.mask.ratio is warned about (once per setting).
RATIO_TOLERANCE = 0.05
_MEAN_SAMPLES = 200   # masks drawn (from a fixed seed, not the run's) to measure the mean ratio
_warned: set = set()


class BlockMaskGenerator:
  """BEiT's MaskingGenerator: masks up to `num_masking_patches` cells in rectangular blocks.

  Blocks have area ~ U(min_num_patches, remaining) and log-uniform aspect in
  [min_aspect, max_aspect]; a block is kept if it adds 1..remaining new cells; a round of 10
  failed tries ends the mask. So the masked count varies per image and never exceeds the target.
  """

  def __init__(self, grid: tuple[int, int], num_masking_patches: int,
               min_num_patches: int = 16, max_aspect: float | None = None,
               min_aspect: float = 0.3):
    self.height, self.width = int(grid[0]), int(grid[1])
    self.num_masking_patches = int(num_masking_patches)
    self.mean_ratio: float | None = None   # set by from_config (measure_mean_ratio)
    self.min_num_patches = min_num_patches
    # BEiT exposes max_num_patches but EVA never sets it: it defaults to the target.
    self.max_num_patches = self.num_masking_patches
    max_aspect = max_aspect or 1 / min_aspect
    self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

  @classmethod
  def from_config(cls, grid: tuple[int, int], m) -> 'BlockMaskGenerator':
    """From a `config.data.mask` block (a ConfigDict or a plain dict with the same keys).

    The masked count follows the grid: num_masking_patches > 0 is an absolute count (exact
    recipes), else round(ratio * cells) (`ratio` missing, as in settings dicts of older runs,
    means the recipe's 105/256). A count whose fraction of the grid is more than RATIO_TOLERANCE
    away from `ratio` is warned about once, naming the numbers; so is a measured mean that
    misses the target (e.g. blocks too large for a small grid). The mean masked ratio of
    200 masks drawn from a fixed seed (the run's randomness is untouched) is logged and kept as
    `mean_ratio`. Raises ValueError naming the field for a ratio outside [0, 1), a negative
    count, a count larger than the grid, or neither given.
    """
    h, w = int(grid[0]), int(grid[1])
    n = h * w
    count = max_masked(grid, m)
    num = int(m.get('num_masking_patches', 0) or 0)
    ratio = _ratio(m)
    if num:
      source = 'config.data.mask.num_masking_patches'
      if ratio and abs(num / n - ratio) > RATIO_TOLERANCE:
        _warn_once((h, w, num, ratio), (
            'config.data.mask.num_masking_patches=%d masks %.0f%% of the %dx%d patch grid, but '
            'config.data.mask.ratio is %.3f (%.0f%%). The count is absolute: set '
            'num_masking_patches=0 to mask ratio * cells (%d here) on any grid, or set ratio to '
            'match.'), num, 100 * num / n, h, w, ratio, 100 * ratio, round(ratio * n))
    else:
      source = f'config.data.mask.ratio={ratio:.4f}'
    gen = cls((h, w), count, m['min_num_patches'], m['max_aspect'], m.get('min_aspect', 0.3))
    gen.mean_ratio = gen.measure_mean_ratio()
    log.info('Block masking: %d of %dx%d patches (%.3f, from %s); mean masked ratio %.3f over %d '
             'sampled masks.', count, h, w, count / n, source, gen.mean_ratio, _MEAN_SAMPLES)
    if abs(gen.mean_ratio - count / n) > RATIO_TOLERANCE:
      _warn_once(('mean', h, w, count, m['min_num_patches']), (
          'Block masking on the %dx%d grid masks %.3f of the patches on average, not the %.3f '
          'asked for (min_num_patches=%s may be large for this grid; lower '
          'config.data.mask.min_num_patches).'), h, w, gen.mean_ratio, count / n,
          m['min_num_patches'])
    return gen

  def measure_mean_ratio(self, num: int = _MEAN_SAMPLES, seed: int = 0) -> float:
    """Mean masked fraction of `num` masks drawn from np.random.default_rng(seed)."""
    rng = np.random.default_rng(seed)
    return float(np.mean([self(rng).mean() for _ in range(num)]))

  def _add_block(self, mask: np.ndarray, max_mask_patches: int,
                 rng: np.random.Generator) -> int:
    delta = 0
    for _ in range(10):
      # Python's random.uniform(a, b) = a + (b - a) * U, also when a > b (few cells left, where
      # numpy's uniform refuses); BEiT relies on that.
      lo = self.min_num_patches
      target_area = lo + (max_mask_patches - lo) * rng.random()
      aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
      h = int(round(math.sqrt(target_area * aspect_ratio)))
      w = int(round(math.sqrt(target_area / aspect_ratio)))
      if w < self.width and h < self.height:
        top = int(rng.integers(0, self.height - h + 1))
        left = int(rng.integers(0, self.width - w + 1))
        block = mask[top:top + h, left:left + w]
        new_cells = h * w - int(block.sum())
        if 0 < new_cells <= max_mask_patches:
          block[...] = True
          delta += new_cells
        if delta > 0:
          break
    return delta

  def __call__(self, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((self.height, self.width), dtype=bool)
    mask_count = 0
    while mask_count < self.num_masking_patches:
      max_mask_patches = min(self.num_masking_patches - mask_count, self.max_num_patches)
      delta = self._add_block(mask, max_mask_patches, rng)
      if delta == 0:
        break
      mask_count += delta
    return mask


def _ratio(m) -> float:
  ratio = m.get('ratio', RECIPE_RATIO)
  return float(RECIPE_RATIO if ratio is None else ratio)


def max_masked(grid: tuple[int, int], m) -> int:
  """The generator's target count for `config.data.mask` block `m` on `grid`: no mask it draws
  has more masked cells (the pretraining step sizes its masked-token path by it).
  num_masking_patches > 0 is absolute, else round(ratio * cells). Raises ValueError naming the
  field for a ratio outside [0, 1), a count that does not fit the grid, or one that is 0."""
  h, w = int(grid[0]), int(grid[1])
  n = h * w
  num = int(m.get('num_masking_patches', 0) or 0)
  ratio = _ratio(m)
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f'config.data.mask.ratio must be in [0, 1) (the recipe: {RECIPE_RATIO:.4f} '
                     f'= 105/256), got {ratio}.')
  if num < 0 or num > n:
    raise ValueError(f'config.data.mask.num_masking_patches={num} does not fit the {h}x{w} patch '
                     f'grid ({n} cells). Set it to 0 and use config.data.mask.ratio (e.g. '
                     f'{RECIPE_RATIO:.4f}) to mask a fraction of any grid.')
  if num:
    return num
  if not ratio:
    raise ValueError('config.data.mask: num_masking_patches and ratio are both 0; set ratio '
                     f'(the recipe: {RECIPE_RATIO:.4f}) or an absolute num_masking_patches.')
  if round(ratio * n) == 0:
    raise ValueError(f'config.data.mask.ratio={ratio} masks no patch of the {h}x{w} grid; '
                     'raise it.')
  return int(round(ratio * n))


def _warn_once(key, msg: str, *args) -> None:
  if key not in _warned:
    _warned.add(key)
    log.warning(msg, *args)


def eval_mask(grid: tuple[int, int]) -> np.ndarray:
  """The validation mask: every even flattened index (128 of 256 patches on 16x16)."""
  mask = np.zeros(grid[0] * grid[1], dtype=bool)
  mask[::2] = True
  return mask.reshape(grid)
