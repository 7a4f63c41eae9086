"""Bad data never stops a run; odd formats are converted; misconfiguration errors say what to do.
Also: ArrayRecord packing, the merged-30M entry and the benchmark CLI."""
import importlib.util
import io
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest
import skimage.data

from eva_jax.data import (build_classification_loader, build_pretrain_loader,
                          default_data_config, merged30m_mixture)
from eva_jax.data.config import MERGED30M_SIZES
from eva_jax.data.decode import BadImageError, decode_image
from eva_jax.data.pipeline import open_sources
from eva_jax.data.sources import ArrayRecordSource, FolderSource, decode_record, open_source
from eva_jax.data.pack import pack_folder

import support

HOST = dict(process_index=0, process_count=1)
BAD = ('corrupt.jpg', 'truncated.jpg', 'empty.jpg', 'notes.png')


def _jpeg(arr, **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, 'JPEG', quality=90, **kw)
  return buf.getvalue()


def _write(path, data: bytes):
  with open(path, 'wb') as f:
    f.write(data)


@pytest.fixture(scope='module')
def messy_folder(tmp_path_factory):
  """12 real photo crops, the 4 bad files of BAD, and 8 files in odd formats/sizes (unlabeled)."""
  root = tmp_path_factory.mktemp('messy')
  photo = skimage.data.astronaut()
  for i in range(12):
    _write(root / f'good{i:02d}.jpg', _jpeg(photo[i * 20:i * 20 + 300, i * 15:i * 15 + 280]))
  good = _jpeg(photo)
  _write(root / 'corrupt.jpg', np.random.default_rng(0).bytes(5000))
  _write(root / 'truncated.jpg', good[:len(good) * 2 // 5])
  _write(root / 'empty.jpg', b'')
  _write(root / 'notes.png', b'these are my notes, not a PNG\n' * 20)
  gray = skimage.data.camera()
  Image.fromarray(gray).save(root / 'odd_gray.jpg')
  Image.new('CMYK', (64, 48), (255, 0, 0, 0)).save(root / 'odd_cmyk.jpg')     # pure cyan
  Image.fromarray(np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)])).save(
      root / 'odd_rgba.png')
  Image.fromarray(np.full((40, 50), 32768, np.uint16)).save(root / 'odd_16bit.png')
  pal = Image.fromarray(photo[:64, :64]).convert('P')
  pal.info['transparency'] = 0
  pal.save(root / 'odd_palette.png', transparency=0)
  Image.new('RGB', (1, 1), (10, 200, 30)).save(root / 'odd_tiny1x1.png')
  Image.fromarray(photo[:5, :3]).save(root / 'odd_tiny3x5.jpg')
  Image.fromarray(photo).save(root / 'odd_photo.webp')
  return str(root)


def test_decoder_converts_odd_formats(messy_folder):
  def dec(name):
    with open(os.path.join(messy_folder, name), 'rb') as f:
      img = decode_image(f.read())
    assert img.mode == 'RGB'
    return np.asarray(img)

  g = dec('odd_gray.jpg')
  assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all() and g.std() > 20
  np.testing.assert_allclose(dec('odd_cmyk.jpg').reshape(-1, 3).mean(0), [0, 255, 255], atol=3)
  assert dec('odd_16bit.png').max() == 128 == dec('odd_16bit.png').min()   # 32768/257, not clipped
  np.testing.assert_array_equal(dec('odd_rgba.png'), skimage.data.astronaut())
  assert dec('odd_palette.png').shape == (64, 64, 3)
  assert dec('odd_tiny1x1.png').tolist() == [[[10, 200, 30]]]
  assert dec('odd_photo.webp').shape == (512, 512, 3)
  for name in BAD:
    with open(os.path.join(messy_folder, name), 'rb') as f:
      data = f.read()
    with pytest.raises(BadImageError):
      decode_image(data)


@pytest.mark.parametrize('workers', [0, 2])
def test_bad_records_are_skipped_counted_and_resumable(messy_folder, workers):
  """One eval pass visits every record once: exactly the 4 bad files are skipped (padding rows,
  not scored), counted through worker processes too, and the count survives a save/restore of the
  iterator."""
  cfg = default_data_config()
  cfg.source, cfg.workers, cfg.threads = f'folder:{messy_folder}', workers, 2
  kw = dict(image_size=224, patch_size=14, batch_size=4, seed=0, train=False, **HOST)
  it = build_pretrain_loader(cfg, **kw)
  first = [next(it) for _ in range(2)]
  state = json.loads(json.dumps(it.get_state()))
  rest = list(it)
  it.close()
  batches = first + rest
  assert len(batches) == 6        # 24 files, nothing dropped, no padding needed
  assert batches[-1]['skipped'] == 4
  assert sum(int((~b['valid']).sum()) for b in batches) == 4   # the bad files, left out
  assert all(np.isfinite(b['image']).all() for b in batches)
  # Tiny images are upscaled by the crop.
  assert all(b['image'].shape == (4, 224, 224, 3) for b in batches)
  restored = build_pretrain_loader(cfg, **kw)
  restored.set_state(state)
  again = list(restored)
  restored.close()
  assert [b['skipped'] for b in again] == [b['skipped'] for b in rest]
  for a, b in zip(again, rest):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_train_mode_survives_bad_data(messy_folder):
  cfg = default_data_config()
  cfg.source, cfg.threads = f'folder:{messy_folder}', 2
  it = build_pretrain_loader(cfg, image_size=224, patch_size=14, batch_size=8, seed=0,
                             num_epochs=2, **HOST)
  batches = list(it)
  assert len(batches) == 6 and batches[-1]['skipped'] == 8    # 2 epochs x 4 bad, all visited


def test_all_bad_source_fails_with_a_clear_message(tmp_path):
  for i in range(3):
    _write(tmp_path / f'{i}.jpg', b'not an image')
  cfg = default_data_config()
  cfg.source, cfg.threads, cfg.prefetch = f'folder:{tmp_path}', 0, 0
  for train in (True, False):   # evaluation leaves a bad record out, but refuses a junk source
    with pytest.raises(ValueError, match='3 consecutive records .* could not be decoded'):
      list(build_pretrain_loader(cfg, image_size=224, patch_size=14, batch_size=2, seed=0,
                                 train=train, **HOST))


def test_misconfiguration_errors_name_the_fix(tmp_path):
  cfg = default_data_config()
  with pytest.raises(FileNotFoundError, match='/no/such/dir.*does not exist'):
    open_source('folder:/no/such/dir', cfg)
  # Opened through a config field, the error names that field (the evaluation split's too).
  cfg.source = 'folder:/no/such/dir'
  with pytest.raises(FileNotFoundError, match=r"^config.data.source='folder:/no/such/dir': Image "
                     'folder /no/such/dir does not exist'):
    open_sources(cfg)
  cfg.source, cfg.mixture = 'demo', (('demo', 1.0), ('folder:/no/such/dir', 2.0))
  with pytest.raises(FileNotFoundError, match=r"^config.data.mixture\[1\]='folder:/no/such/dir'"):
    open_sources(cfg)
  cfg.mixture = ()
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='No images .* found under .*empty'):
    open_source(f'folder:{tmp_path}/empty', cfg)
  with pytest.raises(FileNotFoundError, match='eva_jax.data.pack'):
    open_source(f'arrayrecord:{tmp_path}/*.array_record', cfg)
  with pytest.raises(ValueError, match='Unknown data source "imagenet"'):
    open_source('imagenet', cfg)
  _write(tmp_path / 'a.jpg', _jpeg(skimage.data.coffee()))
  cfg.source = f'folder:{tmp_path}'
  with pytest.raises(ValueError, match='has no labels'):
    build_classification_loader(cfg, image_size=224, batch_size=2, seed=0, train=True, **HOST)
  cfg.mask.num_masking_patches = 105   # an absolute count (the default is a ratio of the grid)
  with pytest.raises(ValueError, match='num_masking_patches=105 exceeds the 4x4 patch grid'):
    build_pretrain_loader(cfg, image_size=64, patch_size=16, batch_size=2, seed=0, **HOST)


def test_pack_roundtrip(tmp_path):
  src = tmp_path / 'src'
  photos = {'coffee': skimage.data.coffee(), 'rocket': skimage.data.rocket()}
  for name, arr in photos.items():
    (src / name).mkdir(parents=True)
    for i in range(5):
      _write(src / name / f'{i}.jpg', _jpeg(arr[i * 10:, i * 12:]))
  proc = support.run_cli('pack', f'--src={src}', f'--out={tmp_path / "out"}', '--images_per_shard=4')
  assert proc.returncode == 0, proc.stderr
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary['num_records'] == 10 and summary['num_shards'] == 3
  assert summary['num_classes'] == 2
  folder, packed = FolderSource(str(src)), ArrayRecordSource(str(tmp_path / 'out'))
  assert len(packed) == 10 and packed.num_classes == 2 and packed.classes == ['coffee', 'rocket']
  assert [packed[i] for i in range(10)] == [folder[i] for i in range(10)]
  # The loaders see identical examples through either source.
  cfg = default_data_config()
  cfg.threads = 2
  kw = dict(image_size=64, batch_size=10, seed=0, train=False, **HOST)
  cfg.source = f'folder:{src}'
  a = next(build_classification_loader(cfg, **kw))
  cfg.source = f'arrayrecord:{tmp_path}/out/*.array_record'
  b = next(build_classification_loader(cfg, **kw))
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['label'], [0] * 5 + [1] * 5)
  np.testing.assert_array_equal(a['label'], b['label'])
  # Shards of bare encoded images (no labels) are read too.
  raw = _jpeg(skimage.data.coffee())
  assert decode_record(raw) == (raw, -1)
  # Packing over a pack is refused (nothing saved is replaced); a second pack in the same folder
  # is fine, but reading the folder as one source would mix them: refused, naming one. A pack
  # with a shard missing is refused too.
  out = tmp_path / 'out'
  proc = support.run_cli('pack', f'--src={src}', f'--out={out}', '--images_per_shard=5')
  assert proc.returncode == 2 and "already holds a pack named 'train' (3 shards)" in proc.stderr
  assert sorted(p.name for p in out.iterdir())[0] == 'train-00000-of-00003.array_record'
  pack_folder(str(src / 'coffee'), str(out), name='val', images_per_shard=5, progress=False)
  with pytest.raises(ValueError, match=r'holds 2 packs \(train, val\).*arrayrecord:.*/train-\*'):
    ArrayRecordSource(str(out))
  assert len(ArrayRecordSource(f'{out}/val-*.array_record')) == 5
  # (a copy: the loaders above may still hold readers on these shards)
  broken = tmp_path / 'broken'
  broken.mkdir()
  for i in (0, 2):
    shutil.copy(out / f'train-0000{i}-of-00003.array_record', broken)
  with pytest.raises(ValueError, match=r'train-\*-of-\* are not one whole pack \(2 files'):
    ArrayRecordSource(str(broken))


def test_merged30m_mixture_entry():
  mix = merged30m_mixture('/data/m30')
  assert [s for s, _ in mix] == [f'arrayrecord:/data/m30/{n}/*.array_record'
                                 for n in MERGED30M_SIZES]
  weights = dict(zip(MERGED30M_SIZES, (w for _, w in mix)))
  assert weights['imagenet21k'] / weights['coco_train2017'] == pytest.approx(14_197_122 / 118_287)
  assert 29e6 < sum(weights.values()) < 31e6
  assert merged30m_mixture('/d', sizes={'a': 3, 'b': 1}) == [
      ('arrayrecord:/d/a/*.array_record', 3.0), ('arrayrecord:/d/b/*.array_record', 1.0)]
  cfg = default_data_config()
  cfg.mixture = tuple(mix)     # the config accepts it as is
  assert len(cfg.mixture) == 6


def test_benchmark_cli_reports_grain_and_tfdata(tmp_path):
  if importlib.util.find_spec('tensorflow') is None:   # not imported here: conftest.py says why
    pytest.skip('tensorflow is not installed')
  cache = tmp_path / 'cache'
  out = support.run_cli('data_benchmark', '--config=data_bench', '--config.batch_size=8',
                        '--config.num_batches=2', '--config.warmup_batches=1',
                        '--config.data.threads=1', f'--config.data.cache_dir={cache}',
                        '--compare_tfdata', timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['workers'] == 0 and result['images_per_s'] > 1
  assert result['images_per_cpu_s'] > 1 and result['tfdata_images_per_s'] > 1
  assert result['skipped'] == 0 and result['source'] == 'demo'
  shutil.rmtree(cache)
