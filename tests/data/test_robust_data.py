"""Data as users have it (issue 12, kind K): symlink loops and cross-class links in image folders,
truncated / corrupt ArrayRecord shards and truncated safetensors files, all with real files."""
import logging
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from eva_jax.data.decode import DecodedSource
from eva_jax.data.pack import pack_folder
from eva_jax.data.sources import ArrayRecordSource, FolderSource


def _jpeg(path, seed):
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path, 'JPEG')


def _classes_tree(root):
  """cat/{0,1}.jpg, cat/sub/2.jpg, dog/{3,4}.jpg: 5 images, 2 classes."""
  for i, rel in enumerate(['cat/0.jpg', 'cat/1.jpg', 'cat/sub/2.jpg', 'dog/3.jpg', 'dog/4.jpg']):
    _jpeg(os.path.join(root, rel), i)


def _labels(src):
  return {os.path.relpath(p, src.root): src.classes[l] for p, l in zip(src.paths, src.labels)}


EXPECTED = {'cat/0.jpg': 'cat', 'cat/1.jpg': 'cat', 'cat/sub/2.jpg': 'cat', 'dog/3.jpg': 'dog',
            'dog/4.jpg': 'dog'}


def test_symlink_loop_lists_each_image_once_with_its_class(tmp_path, caplog):
  root = str(tmp_path / 'data')
  _classes_tree(root)
  os.symlink('..', os.path.join(root, 'cat', 'sub', 'back'))     # cat/sub/back -> cat
  os.symlink('..', os.path.join(root, 'dog', 'up'))               # dog/up -> root: the whole tree
  with caplog.at_level(logging.WARNING):
    src = FolderSource(root)
  assert len(src) == 5 and src.classes == ['cat', 'dog']
  assert _labels(src) == EXPECTED
  assert src.skipped_links == {'loop_or_duplicate': 2, 'other_class': 0, 'dangling': 0}
  assert 'symlink loops' in caplog.text and 'cat/sub/back' in caplog.text


def test_links_never_lend_a_class(tmp_path, caplog):
  root = str(tmp_path / 'data')
  _classes_tree(root)
  outside = str(tmp_path / 'elsewhere' / 'bird')
  _jpeg(os.path.join(outside, '5.jpg'), 5)
  os.symlink(os.path.join(root, 'dog'), os.path.join(root, 'cat', 'dogs_too'))   # dir into a class
  os.symlink(os.path.join(root, 'dog', '3.jpg'), os.path.join(root, 'cat', 'x.jpg'))  # image
  os.symlink(os.path.join(root, 'cat'), os.path.join(root, 'kitty'))            # class alias
  os.symlink(outside, os.path.join(root, 'bird'))                               # linked-in data
  with caplog.at_level(logging.WARNING):
    src = FolderSource(root)
  assert src.classes == ['bird', 'cat', 'dog']
  assert _labels(src) == {**EXPECTED, 'bird/5.jpg': 'bird'}
  assert src.skipped_links['other_class'] == 3
  assert 'a link never lends a class' in caplog.text


def test_plain_tree_is_unchanged(tmp_path):
  root = str(tmp_path / 'data')
  _classes_tree(root)
  src = FolderSource(root)
  assert list(_labels(src)) == list(EXPECTED) and _labels(src) == EXPECTED   # order kept
  assert src.skipped_links == {'loop_or_duplicate': 0, 'other_class': 0, 'dangling': 0}


def test_dangling_links_are_counted_and_named(tmp_path, caplog):
  root = str(tmp_path / 'data')
  _classes_tree(root)
  gone = str(tmp_path / 'unmounted')
  os.symlink(os.path.join(gone, '9.jpg'), os.path.join(root, 'cat', '9.jpg'))   # an image
  os.symlink(os.path.join(gone, 'bird'), os.path.join(root, 'bird'))            # a class folder
  os.symlink(os.path.join(gone, 'deep'), os.path.join(root, 'dog', 'deep'))     # a sub-folder
  os.symlink(os.path.join(gone, 'notes.txt'), os.path.join(root, 'dog', 'notes.txt'))  # no image
  os.symlink('self.jpg', os.path.join(root, 'dog', 'self.jpg'))                 # a loop of links
  with caplog.at_level(logging.WARNING):
    src = FolderSource(root)
  assert _labels(src) == EXPECTED and src.classes == ['cat', 'dog']
  assert src.skipped_links == {'loop_or_duplicate': 1, 'other_class': 0, 'dangling': 3}
  assert '3 dangling links' in caplog.text and 'link to missing' in caplog.text

  only_broken = tmp_path / 'broken'
  only_broken.mkdir()
  os.symlink(os.path.join(gone, 'a.jpg'), str(only_broken / 'a.jpg'))
  with pytest.raises(ValueError, match='1 links there point at nothing'):
    FolderSource(str(only_broken))

def _pack(tmp_path, n=8, per_shard=4):
  src = tmp_path / 'src'
  for i in range(n):
    _jpeg(str(src / f'c{i % 2}' / f'{i}.jpg'), i)
  out = tmp_path / 'shards'
  pack_folder(str(src), str(out), images_per_shard=per_shard, progress=False)
  return sorted(str(p) for p in out.glob('*.array_record'))


def test_truncated_arrayrecord_shard_is_named(tmp_path):
  shards = _pack(tmp_path)
  assert len(ArrayRecordSource(str(tmp_path / 'shards'))) == 8
  data = open(shards[1], 'rb').read()
  with open(shards[1], 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError) as e:
    ArrayRecordSource(str(tmp_path / 'shards'))
  msg = str(e.value)
  print(f'\n[error] {msg}')
  assert '1 of 2 ArrayRecord shards' in msg and shards[1] in msg and shards[0] not in msg
  assert 'eva_jax.data.pack' in msg


def _scramble(path, start, end):
  data = bytearray(open(path, 'rb').read())
  for j in range(start, end, 5):
    data[j] ^= 0x5A
  with open(path, 'wb') as f:
    f.write(bytes(data))


def test_corrupt_arrayrecord_header_is_named(tmp_path):
  shards = _pack(tmp_path)
  _scramble(shards[0], 64, 4096)     # the file's first block header: the reader refuses to open
  with pytest.raises(ValueError) as e:
    ArrayRecordSource(str(tmp_path / 'shards'))
  assert shards[0] in str(e.value) and shards[1] not in str(e.value)
  assert 'Corrupted Riegeli' in str(e.value)


def test_corrupt_arrayrecord_record_is_skipped_counted_and_named(tmp_path, caplog):
  shards = _pack(tmp_path)
  _scramble(shards[0], 3000, 3400)   # inside a record chunk: found only when that record is read
  src = ArrayRecordSource(str(tmp_path / 'shards'))
  bad = []
  for i in range(len(src)):
    try:
      src[i]
    except OSError as e:
      bad.append(i)
      assert f'shard {shards[0]} record {i}' in str(e) and 're-pack' in str(e)
  print(f'\n[corrupt record] unreadable records: {bad}')
  assert bad and all(i < 4 for i in bad)          # only shard 0 (records 0-3) is damaged
  dec = DecodedSource(src)
  with caplog.at_level(logging.WARNING):
    out = [dec[i] for i in range(len(dec))]
  assert sum(o['skipped'] for o in out) == len(bad)   # counted, and the batch shape kept
  assert shards[0] in caplog.text
  # Evaluation scores each readable record once: a bad one is a padding row, counted.
  out = [DecodedSource(src, substitute=False)[i] for i in range(len(src))]
  assert [i for i, o in enumerate(out) if not o['valid']] == bad
  assert [o['skipped'] for o in out] == [int(i in bad) for i in range(len(src))]


def test_evaluation_leaves_out_an_unreadable_image_once(tmp_path):
  """An undecodable file in an evaluation split: every readable image scored exactly once, the bad
  one counted as skipped and left out (training fills its slot with the next image instead)."""
  from eva_jax.data import pipeline
  from eva_jax.data.config import default_data_config
  root = str(tmp_path / 'val')
  _classes_tree(root)
  with open(os.path.join(root, 'dog', 'zz_bad.jpg'), 'wb') as f:
    f.write(b'not a jpeg at all')
  cfg = default_data_config()
  cfg.source, cfg.workers = f'folder:{root}', 0
  loader = pipeline.build_classification_loader(cfg, image_size=16, batch_size=4, seed=0,
                                                train=False, process_index=0, process_count=1)
  batches = list(loader)
  valid = np.concatenate([b.valid for b in batches])
  images = np.concatenate([b.arrays['image'] for b in batches])[valid]
  assert len(valid) == 8 and valid.sum() == 5 and batches[-1].skipped == 1
  assert np.concatenate([b.arrays['label'] for b in batches])[valid].tolist() == [0, 0, 0, 1, 1]
  assert len({im.tobytes() for im in images}) == 5          # no image scored twice
  train = pipeline.build_classification_loader(cfg, image_size=16, batch_size=6, seed=0,
                                               train=True, process_index=0, process_count=1)
  b = next(iter(train))
  assert b.valid.all() and b.skipped == 1
  train.close()


def test_truncated_safetensors_is_named(tmp_path):
  torch = pytest.importorskip('torch')  # noqa: F841 - TensorSource reads with the torch framework
  from safetensors.numpy import save_file
  from eva_jax.convert.common import CheckpointError, TensorSource
  path = str(tmp_path / 'model.safetensors')
  save_file({'a': np.ones((64, 64), np.float32), 'b': np.zeros(8, np.float32)}, path)
  assert TensorSource(path)['a'].sum() == 64 * 64
  data = open(path, 'rb').read()
  for cut in (len(data) - 100, 40):
    with open(path, 'wb') as f:
      f.write(data[:cut])
    with pytest.raises(CheckpointError) as e:
      TensorSource(path)
    print(f'\n[error] {e.value}')
    assert repr(path) in str(e.value) and f'({cut} bytes)' in str(e.value)
    assert 'truncated' in str(e.value)


def test_sharded_safetensors_with_a_missing_shard_is_named(tmp_path):
  pytest.importorskip('torch')
  import json
  from safetensors.numpy import save_file
  from eva_jax.convert.common import CheckpointError, TensorSource
  save_file({'a': np.ones(4, np.float32)}, str(tmp_path / 'model-00001-of-00002.safetensors'))
  with open(tmp_path / 'model.safetensors.index.json', 'w') as f:
    json.dump({'weight_map': {'a': 'model-00001-of-00002.safetensors',
                              'b': 'model-00002-of-00002.safetensors'}}, f)
  with pytest.raises(CheckpointError, match=r"names the shard .*model-00002-of-00002\.safetensors'"
                     r', which does not exist'):
    TensorSource(str(tmp_path))


def test_eval_split_labels_follow_the_training_class_names(tmp_path, caplog):
  """A validation folder without 'cat' used to number 'dog' 0 and 'emu' 1, the training set's
  'cat' and 'dog': every label shifted onto the wrong class, silently."""
  from eva_jax.data.decode import DecodedSource
  from eva_jax.data.sources import RelabeledSource, align_classes
  train, val, extra = (str(tmp_path / n) for n in ('train', 'val', 'extra'))
  for i, c in enumerate(['cat', 'dog', 'emu']):
    _jpeg(os.path.join(train, c, f'{i}.jpg'), i)
  for i, c in enumerate(['dog', 'emu']):
    _jpeg(os.path.join(val, c, f'{i}.jpg'), 10 + i)
  train_src = FolderSource(train)
  src = FolderSource(val)
  assert [src[i][1] for i in range(len(src))] == [0, 1]   # its own numbering
  with caplog.at_level(logging.WARNING):
    aligned = align_classes(src, train_src, 'config.eval_source')
  assert isinstance(aligned, RelabeledSource) and aligned.num_classes == 3
  assert [aligned[i][1] for i in range(len(aligned))] == [1, 2]        # dog, emu of training
  assert [DecodedSource(aligned)[i]['label'] for i in range(2)] == [1, 2]
  shipped = pickle.loads(pickle.dumps(aligned))                        # as grain workers get it
  assert [shipped[i][1] for i in range(2)] == [1, 2] and shipped.name == src.name
  assert '2 of the 3 training classes' in caplog.text and 'dog 0->1' in caplog.text
  # The same split packed as ArrayRecord (classes from the pack's metadata) aligns the same way.
  out = tmp_path / 'packed'
  pack_folder(val, str(out), images_per_shard=4, progress=False)
  packed = align_classes(ArrayRecordSource(str(out)), train_src, 'config.eval_source')
  assert [packed[i][1] for i in range(len(packed))] == [1, 2]
  # Equal names, or no names on one side (TFDS, video lists): the source itself.
  same = FolderSource(train)
  assert align_classes(same, train_src, 'f') is same and align_classes(src, None, 'f') is src
  # A class the training set lacks cannot be matched: refused, naming it.
  _jpeg(os.path.join(extra, 'dog', '0.jpg'), 20)
  _jpeg(os.path.join(extra, 'yak', '1.jpg'), 21)
  with pytest.raises(ValueError, match=r"config.eval_source: folder:.* has 1 of 2 class names "
                     r"that the training source folder:.* \(3 classes\) does not have, e.g. 'yak'"):
    align_classes(FolderSource(extra), train_src, 'config.eval_source')
