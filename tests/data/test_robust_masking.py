"""Masking follows the grid (issue 12, kind D): data.mask.ratio masks the same fraction at every
image size; an absolute num_masking_patches far from it is warned about; the mean is measured."""
import logging

import numpy as np
import pytest

from eva_jax.data import config as data_config
from eva_jax.data import masking
from eva_jax.data.masking import BlockMaskGenerator


def _mask_cfg(**kw):
  m = data_config.default_data_config().mask.to_dict()
  m.update(kw)
  return m


def _mean(gen, n=200, seed=1):
  rng = np.random.default_rng(seed)
  return float(np.mean([gen(rng).mean() for _ in range(n)]))


@pytest.mark.parametrize('image_size', [112, 168, 224, 448])
def test_default_ratio_masks_the_recipe_fraction_at_every_size(image_size, caplog):
  masking._warned.clear()
  grid = (image_size // 14,) * 2
  with caplog.at_level(logging.INFO, logger='eva_jax.data.masking'):
    gen = BlockMaskGenerator.from_config(grid, _mask_cfg())
  n = grid[0] * grid[1]
  assert gen.num_masking_patches == round(105 / 256 * n)
  measured = _mean(gen)     # 200 masks from another seed than the logged estimate
  print(f'\n[mask] {image_size}px grid {grid}: {gen.num_masking_patches}/{n} asked '
        f'({gen.num_masking_patches / n:.3f}), mean {measured:.3f} over 200 masks')
  assert abs(measured - 105 / 256) < 0.02
  assert abs(gen.mean_ratio - measured) < 0.01
  assert f'mean masked ratio {gen.mean_ratio:.3f} over 200' in caplog.text
  assert 'WARNING' not in caplog.text
  if image_size == 224:   # the recipe, exactly
    assert gen.num_masking_patches == 105


def test_absolute_count_off_the_grid_warns_once_naming_the_numbers(caplog):
  masking._warned.clear()
  with caplog.at_level(logging.WARNING, logger='eva_jax.data.masking'):
    gen = BlockMaskGenerator.from_config((12, 12), _mask_cfg(num_masking_patches=105))
    BlockMaskGenerator.from_config((12, 12), _mask_cfg(num_masking_patches=105))
  msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  print(f'\n[warning] {msgs}')
  assert len(msgs) == 1
  assert 'num_masking_patches=105 masks 73% of the 12x12 patch grid' in msgs[0]
  assert 'ratio is 0.410' in msgs[0] and 'num_masking_patches=0' in msgs[0]
  assert gen.num_masking_patches == 105 and abs(_mean(gen) - 105 / 144) < 0.03
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='eva_jax.data.masking'):
    BlockMaskGenerator.from_config((32, 32), _mask_cfg(num_masking_patches=105))   # 448 px: 10%
  assert 'masks 10% of the 32x32 patch grid' in caplog.text


def test_bad_mask_settings_name_the_field():
  with pytest.raises(ValueError, match=r'config.data.mask.ratio must be in \[0, 1\)'):
    BlockMaskGenerator.from_config((16, 16), _mask_cfg(ratio=41))
  with pytest.raises(ValueError, match='num_masking_patches=300 does not fit the 16x16'):
    BlockMaskGenerator.from_config((16, 16), _mask_cfg(num_masking_patches=300))
  with pytest.raises(ValueError, match='both 0'):
    BlockMaskGenerator.from_config((16, 16), _mask_cfg(ratio=0.0))
  with pytest.raises(ValueError, match='masks no patch'):
    BlockMaskGenerator.from_config((2, 2), _mask_cfg(ratio=0.1))


def test_blocks_too_large_for_the_grid_are_reported(caplog):
  masking._warned.clear()
  with caplog.at_level(logging.WARNING, logger='eva_jax.data.masking'):
    gen = BlockMaskGenerator.from_config((4, 4), _mask_cfg(ratio=0.4, min_num_patches=16))
  print(f'\n[mask] 4x4, min block 16: asked {gen.num_masking_patches / 16:.3f}, mean '
        f'{gen.mean_ratio:.3f}; warnings: {caplog.text.strip()}')
  assert abs(gen.mean_ratio - gen.num_masking_patches / 16) > masking.RATIO_TOLERANCE
  assert 'lower config.data.mask.min_num_patches' in caplog.text


def test_exact_count_path_is_the_beit_generator():
  """from_config with an absolute count builds exactly the generator test_data_masking checks
  against the BEiT reference (same draws, same masks)."""
  a = BlockMaskGenerator.from_config((16, 16), _mask_cfg(num_masking_patches=105))
  b = BlockMaskGenerator((16, 16), 105, min_num_patches=16, max_aspect=1 / 0.3)
  r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
  assert all(np.array_equal(a(r1), b(r2)) for _ in range(20))
