"""Every training program records its training listing (checkpoint meta 'train_data',
data/sources.py listing_fingerprint) and a resume on a changed listing is refused before anything
in the workdir is written: the loader's saved position is an index into that listing.

Real tiny runs for pretraining and image fine-tuning on a folder; the pair sources of contrastive
training (folder, webdataset, packed ArrayRecord) at the source level.
"""
import hashlib
import os
import shutil

import pytest

from eva_jax import checkpoint as ckpt_lib
from eva_jax.data import pack, pair_sources, pairs, sources
from eva_jax.training import clip, finetune, pretrain, resume

import support


def _reference_listing(root):
  """The fingerprint computed here from the folder itself: sorted classes, files depth-first in
  name order, (relative path, label) lines hashed -- independently of the walk's code."""
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  lines = [f'{c}/{f}\t{i}\n' for i, c in enumerate(classes)
           for f in sorted(os.listdir(os.path.join(root, c)))]
  return {'images': len(lines),
          'listing': hashlib.sha256(''.join(lines).encode()).hexdigest()[:16]}


def _pretrain_cfg(folder):
  cfg = support.recipe('pretrain_demo', image_size=56, batch_size=4, total_steps=4,
                       checkpoint_every=2, log_every=1, eval_batches=0)
  cfg.data.source = f'folder:{folder}'
  cfg.data.mask.num_masking_patches, cfg.data.mask.min_num_patches = 6, 2
  # test_robust_resume.py's tiny run: the same compiled step (one compile per test session).
  cfg.optim.warmup_steps, cfg.optim.min_lr = 1, cfg.optim.lr
  return cfg


def _finetune_cfg(folder):
  # tests/convert/test_robust_weights.py's EMA run (8 classes, batch 8): the same compiled steps.
  cfg = support.recipe('finetune_demo', image_size=56, batch_size=8, total_steps=4,
                       checkpoint_every=2, log_every=1, eval_batches=1, ema_decay=0.5)
  cfg.data.source = f'folder:{folder}'
  cfg.data.randaug = ''
  cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 1
  return cfg


PROGRAMS = {'pretrain': (pretrain.train, _pretrain_cfg),
            'finetune': (finetune.train, _finetune_cfg)}


def _back_to_step_2(run):
  """The workdir as a run stopped after step 2 leaves it. Every run here has total_steps=4 (the lr
  schedule is part of the compiled step), so the resumes reuse the first run's compiled step."""
  shutil.rmtree(run / 'checkpoints' / '4')
  assert ckpt_lib.finished_steps(run / 'checkpoints') == [2]


@pytest.mark.parametrize('name', sorted(PROGRAMS))
def test_resume_on_a_changed_folder_is_refused(tmp_path, demo_dir, name):
  train, make_cfg = PROGRAMS[name]
  data = tmp_path / 'data'
  for c in sorted(os.listdir(demo_dir)):   # 8 classes x 2 images
    os.makedirs(data / c)
    for f in sorted(os.listdir(os.path.join(demo_dir, c)))[:2]:
      shutil.copy(os.path.join(demo_dir, c, f), data / c / f)
  run = tmp_path / 'run'
  train(make_cfg(data), str(run))
  _, meta, _ = ckpt_lib.restore_params(str(run))
  assert meta['train_data'] == _reference_listing(data) and meta['train_data']['images'] == 16
  _back_to_step_2(run)
  copy = shutil.copytree(data, tmp_path / 'elsewhere')

  # One image more: the saved position would index another listing. Refused naming the field,
  # before anything (config.json included) is written.
  cls = sorted(os.listdir(data))[0]
  shutil.copy(data / cls / sorted(os.listdir(data / cls))[0], data / cls / 'zz_added.jpg')
  before = support.snapshot(run)
  with pytest.raises(ValueError, match=r'Resume refused: train_data\.images was 16 in checkpoint '
                                       r'step 2 .* is 17 in this run \(and 1 more: '
                                       r'train_data\.listing\).*resume_accept'):
    train(make_cfg(data), str(run))
  assert support.snapshot(run) == before

  # The same tree copied elsewhere (relative paths) resumes.
  train(make_cfg(copy), str(run))
  assert ckpt_lib.finished_steps(run / 'checkpoints') == [2, 4]
  _back_to_step_2(run)

  # On purpose: resume_accept=train_data continues on the changed folder, and records it.
  cfg = make_cfg(data)
  cfg.resume_accept = ('train_data',)
  train(cfg, str(run))
  _, meta, step = ckpt_lib.restore_params(str(run))
  assert step == 4 and meta['train_data'] == _reference_listing(data)
  assert meta['train_data']['images'] == 17


def test_pair_source_listings(tmp_path, demo_dir):
  """The pair sources of contrastive training: a folder (images with captions, a caption alone),
  webdataset shards and the same pairs packed to ArrayRecord."""
  folder = tmp_path / 'pairs'
  folder.mkdir()
  names = sorted(os.listdir(os.path.join(demo_dir, 'chelsea')))[:5]
  for i, f in enumerate(names):
    shutil.copy(os.path.join(demo_dir, 'chelsea', f), folder / f)
    (folder / f'{f[:-4]}.txt').write_text(f'a cat, crop {i}')
  (folder / 'sub').mkdir()
  (folder / 'sub' / 'orphan.txt').write_text('a caption without its image')
  src = pair_sources.open_pair_source(f'folder:{folder}')
  lines = ''.join(f'{f}\t{f[:-4]}.txt\n' for f in names) + '\tsub/orphan.txt\n'
  want = {'pairs': 6, 'listing': hashlib.sha256(lines.encode()).hexdigest()[:16]}
  assert sources.listing_fingerprint(src) == want
  moved = shutil.copytree(folder, tmp_path / 'moved')
  assert sources.listing_fingerprint(pair_sources.open_pair_source(f'folder:{moved}')) == want
  os.rename(moved / 'sub' / 'orphan.txt', moved / 'sub' / 'orphan2.txt')
  assert sources.listing_fingerprint(
      pair_sources.open_pair_source(f'folder:{moved}'))['listing'] != want['listing']

  # Shards: base names and pairs per shard, so the shards may move but not change.
  records = [(f'k{i}', (folder / names[i % 5]).read_bytes(), f'caption {i}') for i in range(7)]
  shards = pair_sources.write_webdataset(records, str(tmp_path / 'wds'), 'part', pairs_per_shard=3)
  wds = pair_sources.open_pair_source(f'webdataset:{tmp_path}/wds')
  lines = 'part-00000.tar\t3\npart-00001.tar\t3\npart-00002.tar\t1\n'
  want = {'pairs': 7, 'shards': 3, 'listing': hashlib.sha256(lines.encode()).hexdigest()[:16]}
  assert sources.listing_fingerprint(wds) == want
  os.makedirs(tmp_path / 'wds2')
  for s in shards[:2]:
    shutil.copy(s, tmp_path / 'wds2')
  assert sources.listing_fingerprint(
      pair_sources.open_pair_source(f'webdataset:{tmp_path}/wds2'))['pairs'] == 6
  pack.pack_pairs(f'webdataset:{tmp_path}/wds', str(tmp_path / 'packed'), pairs_per_shard=4,
                  progress=False)
  packed = pair_sources.open_pair_source(f'arrayrecord:{tmp_path}/packed')
  fp = sources.listing_fingerprint(packed)
  # The counts the reader took on opening equal each shard's own footer.
  assert packed.shard_records() == [sources._num_records(f) for f in packed.files] == [3, 4]
  lines = 'train-00000-of-00002.array_record\t3\ntrain-00001-of-00002.array_record\t4\n'
  assert fp == {'pairs': 7, 'shards': 2,
                'listing': hashlib.sha256(lines.encode()).hexdigest()[:16]}
  # What contrastive training records: its program's opened sources (a mixture with weights).
  cfg = support.recipe('clip_demo')
  cfg.data.mixture = ((f'folder:{folder}', 3.0), (f'webdataset:{tmp_path}/wds', 1.0))
  opened = clip.ClipProgram(cfg).train_sources()
  assert [type(s) for s, _ in opened] == [pair_sources.PairFolderSource,
                                          pair_sources.WebDatasetSource]
  assert sources.train_data_fingerprint(opened) == {'mixture': [
      {**sources.listing_fingerprint(src), 'weight': 3.0}, {**want, 'weight': 1.0}]}
  assert len(pairs.open_pair_sources(cfg.data)) == 2


def test_changed_source_kind_is_refused_without_an_older_version_warning(capsys, caplog):
  # A folder run resumed on a TFDS source: the fingerprints have different keys. The refusal names
  # the first differing field; the "written by an older eva_jax" warning (for fields an old
  # checkpoint never recorded) would misdirect here and is not printed.
  saved = {'kind': 'pretrain', 'train_data': {'images': 16, 'listing': '0123456789abcdef'}}
  now = {'kind': 'pretrain', 'train_data': {'records': 1000, 'name': 'tfds:imagenet2012:train'}}
  with pytest.raises(ValueError, match=r"Resume refused: train_data.images was 16 .* is "
                                       r"\(not recorded\)"):
    resume.check_meta(saved, now, 2, '/w/checkpoints/2')
  assert 'older eva_jax' not in caplog.text and 'records no' not in capsys.readouterr().out
  # Accepted on purpose: the fields the old checkpoint lacks are then said once.
  assert resume.check_meta(saved, now, 2, '/w/checkpoints/2', accept=('train_data',))
  assert 'records no train_data.name, train_data.records' in capsys.readouterr().out
