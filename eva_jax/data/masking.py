"""BEiT block-wise masking (EVA-SPEC, "Masking") and the fixed validation mask.

Runs on the host next to each image. All randomness comes from the `np.random.Generator` passed
in, so a mask is a pure function of (seed, example index) in the pipeline.
"""
from __future__ import annotations

import math

import numpy as np


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
    self.min_num_patches = min_num_patches
    # BEiT exposes max_num_patches but EVA never sets it: it defaults to the target.
    self.max_num_patches = self.num_masking_patches
    max_aspect = max_aspect or 1 / min_aspect
    self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

  @classmethod
  def from_config(cls, grid: tuple[int, int], m) -> 'BlockMaskGenerator':
    """From a `config.data.mask` block (a ConfigDict or a plain dict with the same keys)."""
    return cls(grid, m['num_masking_patches'], m['min_num_patches'], m['max_aspect'],
               m.get('min_aspect', 0.3))

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


def eval_mask(grid: tuple[int, int]) -> np.ndarray:
  """The validation mask: every even flattened index (128 of 256 patches on 16x16)."""
  mask = np.zeros(grid[0] * grid[1], dtype=bool)
  mask[::2] = True
  return mask.reshape(grid)
