"""The grain pipeline end to end on real encoded photos (the demo set), TFDS mock data, packed
ArrayRecord shards, mixtures, sharding, resumption and bad data."""
import importlib.util
import json
import os

import numpy as np
from PIL import Image
import pytest

from eva_jax.data import (build_classification_loader, build_pretrain_loader,
                          default_data_config, eval_mask, source_num_classes)
from eva_jax.data import demo
from eva_jax.data.sources import FolderSource, open_source
from eva_jax.data.masking import BlockMaskGenerator
from eva_jax.data.randaugment import RandAugment
from eva_jax.data.transforms import resize_center_crop, resized_crop, rrc_params

import support

HOST = dict(process_index=0, process_count=1)


@pytest.fixture(scope='module')
def demo_cache(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('demo_cache'))
  demo.ensure_demo_set(cache)
  return cache


def _cfg(demo_cache, **kw):
  cfg = default_data_config()
  cfg.cache_dir = demo_cache
  cfg.threads = 2
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def _take(it, n):
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def _small_mask(cfg):
  """Mask settings that fit a 2x2 grid (32 px images, patch 16) for tests that need many images."""
  cfg.mask.num_masking_patches, cfg.mask.min_num_patches = 2, 1
  return cfg


def test_demo_set_real_photos_built_once(demo_cache):
  root = demo.ensure_demo_set(demo_cache)
  src = FolderSource(root)
  assert src.num_classes == 8 and len(src) == 8 * 48
  assert src.classes == sorted(demo.PHOTOS)
  sizes = [Image.open(p).size for p in src.paths[::40]]
  assert all(256 <= min(s) <= 400 for s in sizes), sizes
  assert all(Image.open(p).format == 'JPEG' for p in src.paths[::40])
  mtime = os.path.getmtime(src.paths[0])
  assert demo.ensure_demo_set(demo_cache) == root and os.path.getmtime(src.paths[0]) == mtime


def test_pretrain_batches_on_demo_photos(demo_cache):
  b, = _take(build_pretrain_loader(_cfg(demo_cache), image_size=224, patch_size=14,
                                   batch_size=8, seed=0, **HOST), 1)
  assert b['image'].shape == (8, 224, 224, 3) and b['image'].dtype == np.float32
  assert b['mask'].shape == (8, 256) and b['mask'].dtype == bool
  assert b['valid'].all() and b['skipped'] == 0
  # CLIP-normalized real photos: roughly zero-mean, unit-scale, within the normalized range.
  assert abs(b['image'].mean()) < 0.8 and 0.4 < b['image'].std() < 1.5
  assert b['image'].min() >= -1.8 and b['image'].max() <= 2.2
  counts = b['mask'].sum(1)
  assert counts.max() <= 105 and counts.min() >= 80
  assert len({x.tobytes() for x in b['image']}) == 8     # 8 different crops
  assert len({m.tobytes() for m in b['mask']}) == 8      # independent masks


def test_pretrain_example_is_flip_rrc_normalize_mask_from_seed_and_index(demo_cache):
  """Example i of the stream is exactly: rng = default_rng([seed, i]); flip 0.5; RRC(0.2-1,
  3/4-4/3, bicubic); CLIP normalize; BEiT mask from the same rng (unshuffled, so file i)."""
  cfg = _cfg(demo_cache, shuffle=False)
  b, = _take(build_pretrain_loader(cfg, image_size=224, patch_size=14, batch_size=4, seed=5,
                                   **HOST), 1)
  paths = FolderSource(demo.ensure_demo_set(demo_cache)).paths
  masker = BlockMaskGenerator((16, 16), 105, 16, 1 / 0.3)
  for i in range(4):
    img = Image.open(paths[i]).convert('RGB')
    rng = np.random.default_rng([5, i])
    if rng.random() < 0.5:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = resized_crop(img, rrc_params(*img.size, (0.2, 1.0), (3 / 4, 4 / 3), rng), 224)
    ref = (np.asarray(crop, np.float64) / 255 - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(b['image'][i], ref, atol=2e-5)
    np.testing.assert_array_equal(b['mask'][i], masker(rng).reshape(-1))


def test_determinism_and_seed(demo_cache):
  kw = dict(image_size=64, patch_size=16, batch_size=8, **HOST)
  cfg = _cfg(demo_cache)
  cfg.mask.num_masking_patches, cfg.mask.min_num_patches = 6, 2
  a = _take(build_pretrain_loader(cfg, seed=1, **kw), 3)
  b = _take(build_pretrain_loader(cfg, seed=1, **kw), 3)
  c = _take(build_pretrain_loader(cfg, seed=2, **kw), 1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['mask'], y['mask'])
  assert not np.array_equal(a[0]['image'], c[0]['image'])


@pytest.mark.parametrize('consumed', [5, 26])   # mid-epoch; just past the first epoch (384/16=24)
def test_resume_yields_identical_next_batches(demo_cache, consumed):
  cfg = _small_mask(_cfg(demo_cache))
  kw = dict(image_size=32, patch_size=16, batch_size=16, seed=3, **HOST)
  it = build_pretrain_loader(cfg, **kw)
  for _ in range(consumed):
    next(it)
  state = json.loads(json.dumps(it.get_state()))     # what a checkpoint stores
  expected = _take(it, 3)
  restored = build_pretrain_loader(cfg, **kw)
  restored.set_state(state)
  for e, g in zip(expected, _take(restored, 3)):
    np.testing.assert_array_equal(e['image'], g['image'])
    np.testing.assert_array_equal(e['mask'], g['mask'])


def test_host_shards_interleave_the_global_stream(demo_cache):
  """Augmentation depends on (seed, global index) only: host h of 2 sees global examples h, h+2.."""
  cfg = _small_mask(_cfg(demo_cache))
  kw = dict(image_size=32, patch_size=16, seed=4)
  glob = np.concatenate([b['image'] for b in _take(
      build_pretrain_loader(cfg, batch_size=8, process_index=0, process_count=1, **kw), 2)])
  for h in range(2):
    host = np.concatenate([b['image'] for b in _take(
        build_pretrain_loader(cfg, batch_size=4, process_index=h, process_count=2, **kw), 2)])
    np.testing.assert_array_equal(host, glob[h::2])


def test_eval_pass_is_ordered_padded_and_sharded(demo_cache):
  cfg = _cfg(demo_cache)
  labels, valid = [], 0
  for h in range(2):
    batches = list(build_classification_loader(cfg, image_size=32, batch_size=10, seed=0,
                                               train=False, process_index=h, process_count=2))
    assert len(batches) == 20       # 384 padded to 400 = 2 hosts x 20 batches of 10
    for b in batches:
      labels += list(b['label'][b['valid']])
      valid += int(b['valid'].sum())
  assert valid == 384
  np.testing.assert_array_equal(np.bincount(labels), [48] * 8)
  # Pretraining eval: no flip, resize + center crop of the file, the fixed mask.
  first = next(build_pretrain_loader(cfg, image_size=224, patch_size=14, batch_size=2, seed=0,
                                     train=False, **HOST))
  src = FolderSource(demo.ensure_demo_set(demo_cache))
  ref = np.asarray(resize_center_crop(Image.open(src.paths[0]).convert('RGB'), 224), np.float32)
  ref = (ref / 255 - np.array(cfg.mean)) / np.array(cfg.std)
  np.testing.assert_allclose(first['image'][0], ref, atol=1e-5)
  np.testing.assert_array_equal(first['mask'], np.stack([eval_mask((16, 16)).reshape(-1)] * 2))


def test_finetune_example_is_rrc_flip_randaugment_from_seed_and_index(demo_cache):
  """timm's create_transform order: RRC(finetune_scale) -> flip -> RandAugment -> normalize."""
  cfg = _cfg(demo_cache, shuffle=False)
  b, = _take(build_classification_loader(cfg, image_size=224, batch_size=4, seed=9, train=True,
                                         **HOST), 1)
  src = FolderSource(demo.ensure_demo_set(demo_cache))
  fill = tuple(min(255, round(255 * x)) for x in cfg.mean)
  ra = RandAugment('rand-m9-mstd0.5-inc1', fill=fill, translate_const=int(224 * 0.45))
  for i in range(4):
    img = Image.open(src.paths[i]).convert('RGB')
    rng = np.random.default_rng([9, i])
    img = resized_crop(img, rrc_params(*img.size, (0.08, 1.0), (3 / 4, 4 / 3), rng), 224)
    if rng.random() < 0.5:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    ref = (np.asarray(ra(img, rng), np.float64) / 255 - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(b['image'][i], ref, atol=2e-5)
    assert b['label'][i] == src.labels[i]


def test_classification_labels_and_mixup(demo_cache):
  cfg = _cfg(demo_cache)
  assert source_num_classes(cfg) == 8
  b, = _take(build_classification_loader(cfg, image_size=64, batch_size=8, seed=0, train=True,
                                         **HOST), 1)
  assert b['label'].dtype == np.int32 and b['label'].min() >= 0 and b['label'].max() < 8
  cfg.mixup, cfg.cutmix, cfg.label_smoothing = 0.8, 1.0, 0.1
  batches = _take(build_classification_loader(cfg, image_size=64, batch_size=8, seed=0,
                                              train=True, **HOST), 4)
  for b in batches:
    y = b['label']
    assert y.shape == (8, 8) and y.dtype == np.float32
    np.testing.assert_allclose(y.sum(1), 1.0, atol=1e-5)
    assert y.min() >= 0.1 / 8 - 1e-6      # smoothing floor
  assert any(np.sort(b['label'], 1)[:, -2].max() > 0.02 for b in batches)   # two classes mixed


def _solid_folder(path, color, n):
  os.makedirs(path)
  for i in range(n):
    Image.new('RGB', (40, 30), color).save(os.path.join(path, f'{i}.png'))
  return path


@pytest.mark.parametrize('weights', [(3, 1), (1, 1)])
def test_mixture_respects_weights(tmp_path, weights):
  red = _solid_folder(str(tmp_path / 'red'), (255, 0, 0), 20)
  blue = _solid_folder(str(tmp_path / 'blue'), (0, 0, 255), 30)
  cfg = _small_mask(_cfg('', mixture=((f'folder:{red}', weights[0]),
                                      (f'folder:{blue}', weights[1]))))
  batches = _take(build_pretrain_loader(cfg, image_size=32, patch_size=16, batch_size=40, seed=0,
                                        **HOST), 10)
  is_red = np.concatenate([b['image'][..., 0].mean((1, 2)) > 0 for b in batches])
  assert abs(is_red.mean() - weights[0] / sum(weights)) < 0.02, is_red.mean()


def tfds_mock_checks():
  """The body of test_tfds_source_with_mock_data, run in a subprocess: tfds' mock data imports
  TensorFlow, which must stay out of the test process (conftest.py says why)."""
  import tensorflow_datasets as tfds   # pylint: disable=g-import-not-at-top
  cfg = _cfg('', source='tfds:imagenet2012:train')
  with tfds.testing.mock_data(num_examples=24):
    assert source_num_classes(cfg) == 1000
    b, = _take(build_classification_loader(cfg, image_size=64, batch_size=8, seed=0, train=False,
                                           **HOST), 1)
    assert b['image'].shape == (8, 64, 64, 3) and b['valid'].all() and b['skipped'] == 0
    assert b['label'].min() >= 0 and b['label'].max() < 1000 and len(set(b['label'])) > 1
    assert b['image'].std() > 0.1        # decoded pixels, not padding
    p, = _take(build_pretrain_loader(cfg, image_size=224, patch_size=14, batch_size=4, seed=0,
                                     **HOST), 1)
    assert p['mask'].shape == (4, 256) and p['mask'].sum(1).max() <= 105


def test_tfds_source_with_mock_data():
  if importlib.util.find_spec('tensorflow_datasets') is None:
    pytest.skip('tensorflow_datasets is not installed')
  out = support.run_python('from data.test_data_pipeline import tfds_mock_checks\n'
                           'tfds_mock_checks()\nprint("checked")')
  assert out.strip().splitlines()[-1] == 'checked'


def test_tfds_unprepared_or_unknown_dataset_says_what_to_do(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  cfg = _cfg('', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r'tfds build mnist --file_format=array_record'):
    open_source('tfds:mnist', cfg)
  with pytest.raises(ValueError, match='no dataset named "no_such_dataset_xyz"'):
    open_source('tfds:no_such_dataset_xyz', cfg)


def test_read_threads_capped_only_where_the_step_shares_the_cpu(monkeypatch):
  """Decode threads never outnumber the cores the CPU step runs on (all worker processes
  together); an accelerator host keeps data.threads."""
  import os
  from eva_jax.data.pipeline import read_threads
  cores = len(os.sched_getaffinity(0))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert read_threads(16) == min(16, cores)
  assert read_threads(16, workers=2) == max(1, min(16, cores // 2))
  assert read_threads(1, workers=8) == 1
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert read_threads(16, workers=2) == 16
