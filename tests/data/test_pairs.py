"""Image-text pair sources (webdataset shards, folder, packed ArrayRecord, mixture), bad-pair
accounting by kind, transforms, exact resume, and the captioned demo set."""
import os
import tarfile

import ml_collections
import numpy as np
import pytest

from eva_jax.data import config as data_config
from eva_jax.data import demo, pack, pair_sources, pairs, sources
from eva_jax.data.tokenizer import tokenize

SIZE = 32
BAD = {'missing_image': 1, 'missing_text': 1, 'bad_utf8': 1, 'empty_text': 1, 'bad_image': 1,
       'unreadable': 0}


def data_cfg(source, **kw):
  cfg = data_config.default_data_config()
  cfg.source = source
  cfg.threads, cfg.prefetch, cfg.workers = 2, 0, 0
  for k, v in kw.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope='module')
def pair_sets(tmp_path_factory, demo_dir):
  """12 good pairs + one of each bad kind, written as webdataset shards, a folder and packed;
  plus a second (good-only) folder whose captions all start with 'zebra'."""
  root = tmp_path_factory.mktemp('pairs')
  images = []
  for c in sorted(os.listdir(demo_dir))[:3]:
    for f in sorted(os.listdir(os.path.join(demo_dir, c)))[:4]:
      with open(os.path.join(demo_dir, c, f), 'rb') as fh:
        images.append((f'{c}_{f[:-4]}', fh.read(), f'a photo of {c} number {f[:-4]}'))
  bad = [('x_noimage', None, 'caption without image'), ('x_notext', images[0][1], None),
         ('x_latin1', images[1][1], 'caf\xe9 cr\xe8me'.encode('latin-1')),
         ('x_empty', images[2][1], ' \n\t '), ('x_garbage', b'not a jpeg at all', 'garbage')]
  records = images[:5] + bad + images[5:]
  shards = pair_sources.write_webdataset(records, str(root / 'wds'), 'part', pairs_per_shard=4)
  folder = root / 'folder'
  folder.mkdir()
  for key, image, text in records:
    if image is not None:
      (folder / f'{key}.jpg').write_bytes(image)
    if text is not None:
      (folder / f'{key}.txt').write_bytes(text.encode() if isinstance(text, str) else text)
  other = root / 'zebra'
  other.mkdir()
  for key, image, _ in images[:6]:
    (other / f'{key}.jpg').write_bytes(image)
    (other / f'{key}.txt').write_text(f'zebra crossing {key}')
  meta = pack.pack_pairs(f'webdataset:{root}/wds/part-{{00000..{len(shards) - 1:05d}}}.tar',
                         str(root / 'packed'), progress=False)
  return {'root': root, 'good': images, 'shards': shards, 'meta': meta,
          'specs': {'webdataset': f'webdataset:{root}/wds/part-{{00000..00004}}.tar',
                    'folder': f'folder:{folder}', 'arrayrecord': f'arrayrecord:{root}/packed'},
          'zebra': f'folder:{other}'}


def test_webdataset_layout_and_braces(pair_sets):
  assert pair_sources.expand_braces('s-{08..11}{a,b}.tar') == [
      f's-{i:02d}{x}.tar' for i in (8, 9, 10, 11) for x in 'ab']
  assert len(pair_sets['shards']) == 5    # 17 pairs, 4 per shard
  with tarfile.open(pair_sets['shards'][0]) as tf:
    names = tf.getnames()
  assert names[:3] == [f'{pair_sets["good"][0][0]}.{e}' for e in ('jpg', 'txt', 'json')]
  with pytest.raises(FileNotFoundError, match='part-00005.tar .*3 of 8 shards missing'):
    pair_sources.WebDatasetSource(str(pair_sets['root'] / 'wds' / 'part-{00000..00007}.tar'))
  assert pair_sets['meta']['num_records'] == 17 and pair_sets['meta']['kind'] == 'pairs'


@pytest.mark.parametrize('kind', ['webdataset', 'folder', 'arrayrecord'])
def test_sources_read_the_same_pairs(pair_sets, kind):
  src = pair_sources.open_pair_source(pair_sets['specs'][kind])
  assert len(src) == 17
  good, kinds = {}, {}
  for i in range(len(src)):
    try:
      image, text = pairs.check_pair(src[i])
      good[text] = np.asarray(image)
    except pair_sources.BadPairError as e:
      kinds[e.kind] = kinds.get(e.kind, 0) + 1
  assert kinds == {k: v for k, v in BAD.items() if v}
  assert sorted(good) == sorted(t for _, _, t in pair_sets['good'])
  from eva_jax.data.decode import decode_image   # pylint: disable=g-import-not-at-top
  for _, image, text in pair_sets['good'][::5]:
    np.testing.assert_array_equal(good[text], np.asarray(decode_image(image)))


def test_eval_loader_counts_bad_pairs_and_matches_transform(pair_sets):
  cfg = data_cfg(pair_sets['specs']['webdataset'])
  loader = pairs.build_pair_loader(cfg, image_size=SIZE, batch_size=8, seed=0, train=False,
                                   process_index=0, process_count=1)
  batches = list(loader)
  assert len(batches) == 3   # 17 pairs padded to 24
  last = batches[-1]
  assert last.skipped == 5 and last.skipped_by_kind == BAD
  image = np.concatenate([b['image'] for b in batches])
  text = np.concatenate([b['text'] for b in batches])
  valid = np.concatenate([b.valid for b in batches])
  assert image.dtype == np.float32 and image.shape == (24, SIZE, SIZE, 3)
  # The 5 bad pairs are padding rows, counted above: each good pair is scored once.
  assert text.dtype == np.int32 and text.shape == (24, 77) and valid.sum() == 17 - 5
  assert (text[~valid] == 0).all()
  # Row 0 is the first good pair: open_clip's eval transform (resize shorter side, center crop,
  # CLIP-normalize) of its image, and its caption's tokens.
  _, data, caption = pair_sets['good'][0]
  from eva_jax.data.decode import decode_image   # pylint: disable=g-import-not-at-top
  from open_clip.transform import image_transform   # pylint: disable=g-import-not-at-top
  want = image_transform(SIZE, is_train=False, mean=data_config.CLIP_MEAN,
                         std=data_config.CLIP_STD)(decode_image(data)).numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(image[0], want, atol=1e-5)
  np.testing.assert_array_equal(text[0], tokenize(caption)[0])
  # Every good caption exactly once (training instead fills a bad pair's slot with the next).
  good_rows = tokenize([t for _, _, t in pair_sets['good']])
  want = sorted(map(tuple, np.asarray(good_rows).tolist()))
  assert sorted(map(tuple, text[valid].tolist())) == want


def test_train_loader_resumes_exactly(pair_sets):
  cfg = data_cfg(pair_sets['specs']['folder'])
  make = lambda: pairs.build_pair_loader(cfg, image_size=SIZE, batch_size=4, seed=3,
                                         process_index=0, process_count=1)
  it = make()
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(6)]    # crosses the epoch boundary (17 pairs)
  resumed = make()
  resumed.set_state(state)
  got = [next(resumed) for _ in range(6)]
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['text'], b['text'])
    assert a.skipped_by_kind == b.skipped_by_kind
  # 36 pairs read = two full epochs of 17 and 2 more: every bad pair was counted twice (or
  # three times when among the 2).
  kinds = want[-1].skipped_by_kind
  assert want[-1].skipped == sum(kinds.values()) and kinds['unreadable'] == 0
  assert all(2 <= kinds[k] <= 3 for k in BAD if BAD[k]), kinds
  assert want[0]['image'].shape == (4, SIZE, SIZE, 3)


def test_mixture_follows_weights(pair_sets):
  cfg = data_cfg('', mixture=((pair_sets['specs']['arrayrecord'], 3.0),
                              (pair_sets['zebra'], 1.0)))
  it = pairs.build_pair_loader(cfg, image_size=SIZE, batch_size=8, seed=0, process_index=0,
                               process_count=1)
  zebra = tokenize('zebra')[0, 1]
  texts = np.concatenate([next(it)['text'] for _ in range(4)])
  assert (texts[:, 1] == zebra).sum() == 8    # exactly 1 in 4 of 32
  with pytest.raises(ValueError, match='weight'):
    pairs.build_pair_loader(data_cfg('', mixture=((pair_sets['zebra'], 0.0),)), image_size=SIZE,
                            batch_size=2, seed=0, process_index=0, process_count=1)


def test_unknown_source_and_missing_folder():
  with pytest.raises(ValueError, match='webdataset:PATTERN'):
    pair_sources.open_pair_source('tfds:coco')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    pair_sources.open_pair_source('folder:/no/such/dir')


def test_demo_pairs_and_retrieval_set():
  root = demo.ensure_demo_pairs()
  classes = sources.FolderSource(os.path.join(root, 'val')).classes
  assert len(classes) >= 2 and len(set(classes)) == len(classes)
  train = pair_sources.open_pair_source('demo')
  assert len(train) == demo.TRAIN_PER_CLASS * len(classes)
  shards = pair_sources.open_pair_source(f'webdataset:{root}/shards')
  assert len(shards) == len(train)
  ret = pairs.load_retrieval_set('demo:val', ml_collections.ConfigDict(
      dict(mean=data_config.CLIP_MEAN, std=data_config.CLIP_STD)), image_size=SIZE)
  n = len(ret.keys)
  assert ret.images.shape == (n, SIZE, SIZE, 3) and n == len(classes) * (
      demo.IMAGES_PER_CLASS - demo.TRAIN_PER_CLASS)
  assert ret.tokens.shape == (3 * n, 77)
  np.testing.assert_array_equal(np.bincount(ret.text_image_index), np.full(n, 3))
  assert sum(ret.skipped_by_kind.values()) == 0
  captions = demo.demo_captions('chelsea', 40, 3)
  assert len(set(captions)) == 3 and captions == demo.demo_captions('chelsea', 40, 3)


def test_eva_pack_pairs_cli(pair_sets, tmp_path):
  import json   # pylint: disable=g-import-not-at-top
  import support   # pylint: disable=g-import-not-at-top
  proc = support.run_cli('pack', '--pairs', f'--src={pair_sets["specs"]["folder"][7:]}',
                         f'--out={tmp_path}', '--images_per_shard=8')
  assert proc.returncode == 0, proc.stderr
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary['num_records'] == 17 and summary['num_shards'] == 3
  packed = pair_sources.open_pair_source(f'arrayrecord:{tmp_path}')
  folder = pair_sources.open_pair_source(pair_sets['specs']['folder'])
  assert [packed[i][:2] for i in range(17)] == [folder[i][:2] for i in range(17)]


def test_unreadable_and_all_bad_sources(pair_sets, tmp_path):
  import shutil   # pylint: disable=g-import-not-at-top
  for s in pair_sets['shards']:
    shutil.copy(s, tmp_path)
  src = pair_sources.open_pair_source(f'webdataset:{tmp_path}')
  last = sorted(tmp_path.glob('*.tar'))[-1]
  os.truncate(last, 1024 + 512)   # indexed, then cut inside its first image
  decoded = pairs.DecodedPairSource(src)
  first_in_last = 4 * (len(pair_sets['shards']) - 1)
  element = decoded[first_in_last]
  assert element['skipped'] == 1 and element['skipped_kinds'][
      pairs.SKIP_KINDS.index('unreadable')] == 1
  only_text = pair_sources.write_webdataset([(f'k{i}', None, 'caption') for i in range(3)],
                                            str(tmp_path / 'text_only'))
  with pytest.raises(ValueError, match='3 consecutive pairs .* missing_image'):
    pairs.DecodedPairSource(pair_sources.WebDatasetSource(only_text))[0]
