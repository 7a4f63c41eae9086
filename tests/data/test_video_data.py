"""Video data (eva_jax/data/video.py): PyAV decoding, TSN sampling, clip-consistent augmentation
against torchvision, multi-view test clips, bad videos counted and skipped, list files, resume."""
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from eva_jax.data import demo, video
from eva_jax.data.config import default_data_config


def _moving(n=16, h=32, w=48, seed=0):
  """A clip whose frame i is a random image shifted 2i pixels: frames differ and are
  identifiable after a 4:2:0 codec (one tint times a random luma, so chroma subsampling --
  half-resolution colour -- loses little)."""
  luma = np.random.default_rng(seed).integers(0, 256, (h, w + 2 * n, 1))
  base = (luma * np.array([1.0, 0.85, 0.7])).astype(np.uint8)
  return np.stack([base[:, 2 * i:2 * i + w] for i in range(n)])


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
  """A class-folder set: 2 classes x 2 good clips, plus an unreadable file, an empty file and a
  container with no frames (all three in class b)."""
  root = tmp_path_factory.mktemp('videos')
  for c, cls in enumerate('ab'):
    os.makedirs(root / cls)
    for i in range(2):
      demo.write_video(str(root / cls / f'{i}.mp4'), _moving(seed=10 * c + i))
  (root / 'b' / 'garbage.mp4').write_bytes(np.random.default_rng(0).bytes(4000))
  (root / 'b' / 'empty.mp4').write_bytes(b'')
  demo.write_video(str(root / 'b' / 'noframes.mp4'), np.zeros((0, 32, 48, 3), np.uint8))
  return root


def _data_cfg(source, **video_fields):
  d = default_data_config()
  d.video = video.video_data_config()
  d.video.update(video_fields)
  d.source, d.threads, d.prefetch = source, 1, 0
  return d


def test_decode_and_subsample(clips):
  src = _moving(seed=0)
  got = video.decode_video(str(clips / 'a' / '0.mp4'))
  assert got.shape == (16, 32, 48, 3) and got.dtype == np.uint8
  assert np.abs(got.astype(float) - src).mean() < 10       # MPEG-4, 4:2:0, random pixels
  # Nearest source frame of every decoded one is itself (order and identity survive the codec).
  err = np.abs(got[:, None].astype(float) - src[None]).mean((2, 3, 4))
  assert list(err.argmin(1)) == list(range(16))
  sub = video.decode_video(str(clips / 'a' / '0.mp4'), max_frames=5, short_side=16)
  assert sub.shape == (4, 16, 24, 3)                       # every 4th frame (ceil(16/5)), scaled
  with pytest.raises(video.BadVideoError, match='min_frames=20'):
    video.decode_video(str(clips / 'a' / '0.mp4'), min_frames=20)
  for bad in ('garbage.mp4', 'empty.mp4', 'noframes.mp4'):
    with pytest.raises(video.BadVideoError):
      video.decode_video(str(clips / 'b' / bad))


def test_segment_sampling():
  # TSN: one frame per equal segment; the centre at test; short videos repeat frames.
  np.testing.assert_array_equal(video.segment_indices(16, 4, np.full(4, 0.5)), [2, 6, 10, 14])
  rng = np.random.default_rng(0)
  for _ in range(20):
    idx = video.segment_indices(30, 8, rng.random(8))
    assert all(np.floor(k * 30 / 8) <= i < (k + 1) * 30 / 8 for k, i in enumerate(idx))
  np.testing.assert_array_equal(video.segment_indices(3, 6, np.full(6, 0.5)), [0, 0, 1, 1, 2, 2])
  # 4 temporal test clips: offsets (k + 0.5) / 4 inside every segment.
  np.testing.assert_array_equal(video.segment_indices(32, 4, np.full(4, 0.125)), [1, 9, 17, 25])


def test_jitter_matches_torchvision_and_is_shared_by_frames():
  tvf = pytest.importorskip('torchvision.transforms.functional')
  frames = [Image.fromarray(f) for f in _moving(n=3, seed=5)]
  rng = np.random.default_rng(7)
  got = video._jitter(frames, (0.4, 0.4, 0.4, 0.1), rng)
  rng = np.random.default_rng(7)     # the same draws, applied with torchvision
  f = [rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(-.1, .1)]
  ops = [lambda i: tvf.adjust_brightness(i, f[0]), lambda i: tvf.adjust_contrast(i, f[1]),
         lambda i: tvf.adjust_saturation(i, f[2]), lambda i: tvf.adjust_hue(i, f[3])]
  order = rng.permutation(4)
  for g, img in zip(got, frames):
    for o in order:
      img = ops[o](img)
    assert np.abs(np.asarray(g, int) - np.asarray(img, int)).max() <= 1


def test_train_augmentation_same_for_every_frame():
  static = np.repeat(_moving(n=1, seed=3), 8, 0)            # a still clip
  d = _data_cfg('unused', color_jitter=1.0, grayscale=0.0)
  t = video.VideoTransform(d, num_frames=4, image_size=28, seed=0, train=True)
  el = {'image': static, 'label': 1, 'skipped': 0, 'valid': True}
  changed = 0
  for index in range(6):
    out = t(index, el)['image'].reshape(4, 28, 28, 3)
    assert all(np.array_equal(out[0], o) for o in out[1:])  # one crop/flip/jitter per clip
    changed += not np.array_equal(out, t(index + 100, el)['image'].reshape(4, 28, 28, 3))
  assert changed == 6                                       # ... drawn anew per example
  d.video.grayscale = 1.0
  g = video.VideoTransform(d, num_frames=4, image_size=28, seed=0, train=True)(0, el)['image']
  assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])


def test_loader_skips_bad_videos_and_resumes_exactly(clips):
  d = _data_cfg(f'video_folder:{clips}')
  d.mixup, d.cutmix, d.label_smoothing = 0.8, 1.0, 0.1
  it = video.build_video_loader(d, num_frames=4, image_size=28, batch_size=4, seed=0, train=True,
                                process_index=0, process_count=1)
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  assert want[-1].arrays['video'].shape == (4, 4, 28, 28, 3)
  assert want[-1].arrays['label'].shape == (4, 2)            # soft labels from mixup/cutmix
  # 3 of the 7 files are bad: every pass over the set counts each of them once.
  assert want[-1].skipped >= 3 and first[0].skipped <= want[-1].skipped
  it.set_state(state)
  again = [next(it) for _ in range(3)]
  for a, b in zip(want, again):
    np.testing.assert_array_equal(a.arrays['video'], b.arrays['video'])
    np.testing.assert_array_equal(a.arrays['label'], b.arrays['label'])
    assert a.skipped == b.skipped
  it.close()


def test_test_views(clips):
  d = _data_cfg(f'video_folder:{clips}', test_clips=4, test_crops=3)
  it = video.build_video_loader(d, num_frames=4, image_size=28, batch_size=4, seed=0, train=False,
                                process_index=0, process_count=1)
  b = next(it)
  assert b.arrays['video'].shape == (4, 12, 4, 28, 28, 3)
  v = b.arrays['video'][0].reshape(4, 3, 4, 28, 28, 3)
  # Left / centre / right crops of a 28 x 42 resize differ; the 4 temporal clips differ.
  assert not np.allclose(v[0, 0], v[0, 2]) and not np.allclose(v[0, 1], v[1, 1])
  # One pass scores each of the 4 readable videos once; the bad files are counted, left out.
  rest = [b] + list(it)
  valid = np.concatenate([x.valid for x in rest])
  files = sum(len(f) for _, _, f in os.walk(clips))
  assert valid.sum() == 4 and rest[-1].skipped == files - 4 >= 2
  views = np.concatenate([x.arrays['video'] for x in rest])[valid]
  assert len({x.tobytes() for x in views}) == 4
  it.close()


def test_list_file_missing_videos(clips, tmp_path, caplog):
  lst = tmp_path / 'train.txt'
  lst.write_text(f'{clips}/a/0.mp4 0\n{clips}/b/1.mp4 1\nnope/x.mp4 1\nnope/y.mp4 0\n')
  with caplog.at_level(logging.WARNING):
    src = video.open_video_source(f'video_list:{lst}', _data_cfg(''))
  assert (len(src), src.missing, src.num_classes) == (2, 2, 2)
  assert '2 of 4 videos listed' in caplog.text
  gone = tmp_path / 'gone.txt'
  gone.write_text('a.mp4 0\nb.mp4 1\nc.mp4 2\n')
  with pytest.raises(FileNotFoundError, match='All 3 videos listed'):
    video.open_video_source(f'video_list:{gone}', _data_cfg(''))
  bad = tmp_path / 'bad.txt'
  bad.write_text('a.mp4 zero\n')
  with pytest.raises(ValueError, match='line 1'):
    video.open_video_source(f'video_list:{bad}', _data_cfg(''))
  # A file name with a comma and two spaces is kept verbatim; the label is the last field, after
  # a space, a tab or a comma (CSV).
  odd = tmp_path / 'odd'
  odd.mkdir()
  shutil.copy(f'{clips}/a/0.mp4', odd / 'x, y  z.mp4')
  lst = tmp_path / 'odd.txt'
  lst.write_text(f'{odd}/x, y  z.mp4 1\n{odd}/x, y  z.mp4,0\n{clips}/b/1.mp4\t1\n')
  src = video.open_video_source(f'video_list:{lst}', _data_cfg(''))
  assert (len(src), src.missing) == (3, 0) and src.labels == [1, 0, 1]
  assert src.paths[0] == src.paths[1] == str(odd / 'x, y  z.mp4')


def test_pan_demo_frames_do_not_tell_the_class():
  """The four classes show the same frames (the same loop from another corner): only the
  order differs, so a frame-averaged model is at chance."""
  photo = np.asarray(Image.fromarray(demo._load_photo('astronaut')).convert('RGB'))
  clips = [demo.pan_clip(photo, c, np.random.default_rng(1)) for c in range(4)]
  per_edge = demo.VIDEO_FRAMES // 4
  for c in range(1, 4):
    assert not np.array_equal(clips[0], clips[c])
    np.testing.assert_array_equal(np.roll(clips[0], -per_edge * c, axis=0), clips[c])
  # One patch a frame: frame 1 of a clip starting right is frame 0 moved one patch left.
  np.testing.assert_array_equal(clips[0][1][:, :-demo.VIDEO_STEP], clips[0][0][:, demo.VIDEO_STEP:])


# ----------------------------------------------------------------------------------------------
# Listing a video folder (issue 12, kind K: the image folder's walk, data/sources.py)

def _touch(root, *rels):
  """Empty files: VideoFolderSource only lists, it opens nothing."""
  for rel in rels:
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    open(os.path.join(root, rel), 'wb').close()


def _old_listing(root):
  """The listing before the change (os.walk without links, sorted by directory path)."""
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
  paths, labels = [], []
  for label, c in enumerate(classes):
    for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
      for f in sorted(files):
        if f.lower().endswith(video.VIDEO_EXTENSIONS) and not f.startswith('.'):
          paths.append(os.path.join(dirpath, f))
          labels.append(label)
  return classes, paths, labels


def _by_class(src):
  return {os.path.relpath(p, src.root): src.classes[l] for p, l in zip(src.paths, src.labels)}


def test_video_folder_follows_links_once(tmp_path, caplog):
  root, outside = str(tmp_path / 'data'), str(tmp_path / 'elsewhere')
  _touch(root, 'a/0.mp4', 'a/sub/4.mp4', 'b/1.mp4')
  _touch(outside, 'extra/2.mp4', 'extra/3.AVI', 'extra/notes.txt')
  os.symlink(os.path.join(outside, 'extra'), os.path.join(root, 'a', 'more'))   # followed
  os.symlink(os.path.join(outside, 'extra'), os.path.join(root, 'a', 'same'))   # duplicate
  os.symlink('..', os.path.join(root, 'a', 'sub', 'back'))                      # loop
  with caplog.at_level(logging.WARNING):
    src = video.VideoFolderSource(root)
  assert _by_class(src) == {'a/0.mp4': 'a', 'a/more/2.mp4': 'a', 'a/more/3.AVI': 'a',
                            'a/sub/4.mp4': 'a', 'b/1.mp4': 'b'}
  assert src.skipped_links == {'loop_or_duplicate': 2, 'other_class': 0, 'dangling': 0}
  assert 'symlink loops' in caplog.text and 'a/sub/back' in caplog.text
  assert len(_old_listing(root)[1]) == 3        # the old walk dropped the linked folder, uncounted


def test_video_folder_links_never_lend_a_class(tmp_path, caplog):
  root, outside = str(tmp_path / 'data'), str(tmp_path / 'elsewhere')
  _touch(root, 'a/0.mp4', 'b/1.mp4', 'b/2.mp4')
  _touch(outside, 'c/5.mp4')
  os.symlink(os.path.join(root, 'b'), os.path.join(root, 'a', 'bs'))            # dir into class b
  os.symlink(os.path.join(root, 'b', '1.mp4'), os.path.join(root, 'a', 'x.mp4'))  # file of b
  os.symlink(os.path.join(root, 'b'), os.path.join(root, 'alias'))   # first-level, inside: no class
  os.symlink(os.path.join(outside, 'c'), os.path.join(root, 'c'))    # linked-in data: a class
  os.symlink(os.path.join(outside, 'c'), os.path.join(root, 'a', 'cs'))   # into linked-in class c
  with caplog.at_level(logging.WARNING):
    src = video.VideoFolderSource(root)
  assert src.classes == ['a', 'b', 'c'] and src.num_classes == 3
  assert _by_class(src) == {'a/0.mp4': 'a', 'b/1.mp4': 'b', 'b/2.mp4': 'b', 'c/5.mp4': 'c'}
  assert src.skipped_links == {'loop_or_duplicate': 0, 'other_class': 4, 'dangling': 0}
  assert 'a link never lends a class' in caplog.text and 'videos' in caplog.text



def test_video_folder_dangling_links_are_counted(tmp_path, caplog):
  root, gone = str(tmp_path / 'data'), str(tmp_path / 'unmounted')
  _touch(root, 'a/0.mp4')
  os.symlink(os.path.join(gone, '1.mp4'), os.path.join(root, 'a', '1.mp4'))
  os.symlink(os.path.join(gone, 'b'), os.path.join(root, 'b'))        # a class folder
  with caplog.at_level(logging.WARNING):
    src = video.VideoFolderSource(root)
  assert _by_class(src) == {'a/0.mp4': 'a'}
  assert src.skipped_links == {'loop_or_duplicate': 0, 'other_class': 0, 'dangling': 2}
  assert '2 dangling links' in caplog.text
  os.remove(os.path.join(root, 'a', '0.mp4'))
  with pytest.raises(ValueError, match='No videos .* 2 links there point at nothing'):
    video.VideoFolderSource(root)

def test_video_folder_top_level_videos_are_counted(tmp_path, caplog):
  root = str(tmp_path / 'data')
  _touch(root, 'top.mp4', 'top2.webm', 'a/0.mp4')
  with caplog.at_level(logging.WARNING):
    src = video.VideoFolderSource(root)
  assert (src.paths, src.top_level) == ([os.path.join(root, 'a', '0.mp4')], 2)
  assert '2 videos at the top level' in caplog.text and 'top.mp4' in caplog.text
  flat = str(tmp_path / 'flat')
  _touch(flat, 'x.mp4')
  with pytest.raises(ValueError, match='1 videos .*x.mp4.* no class sub-folders'):
    video.VideoFolderSource(flat)
  empty = str(tmp_path / 'empty')
  _touch(empty, 'a/notes.txt', 'b/.hidden.mp4')
  with pytest.raises(ValueError, match=r'No videos \(.mp4, .avi.*2 class folders'):
    video.VideoFolderSource(empty)


def test_video_folder_plain_tree_lists_as_before(tmp_path):
  """Class indices (an empty class folder keeps its index) and order equal the old listing, on
  names where a depth-first walk and the old sort by directory path differ (x/ y, x-z, x.w)."""
  root = str(tmp_path / 'data')
  _touch(root, 'a/5.mp4', 'a/x/1.mp4', 'a/x/y/2.mp4', 'a/x-z/3.mp4', 'a/x.w/4.mp4', 'a/X/6.MP4',
         'a/.hidden.mp4', 'a/notes.txt', 'c/7.webm', 'c/d/8.mkv', 'c/0.mov')
  os.makedirs(os.path.join(root, 'b'))           # an empty class
  src = video.VideoFolderSource(root)
  classes, paths, labels = _old_listing(root)
  assert src.classes == classes == ['a', 'b', 'c'] and src.num_classes == 3
  assert (src.paths, src.labels) == (paths, labels) and len(paths) == 9 and labels[-1] == 2
  # The shared walk is depth-first, so without the sort the order would have changed.
  from eva_jax.data import sources
  assert sources._walk_images(root, accept=video._is_video)[0] != paths
  assert src.skipped_links == {'loop_or_duplicate': 0, 'other_class': 0, 'dangling': 0} and src.top_level == 0
  # The listing fingerprint a resume is checked against: the same for a copy elsewhere, not for
  # a changed listing.
  import shutil
  copy = shutil.copytree(root, str(tmp_path / 'copy'))
  want = sources.listing_fingerprint(src)
  assert sources.listing_fingerprint(video.VideoFolderSource(copy)) == want
  os.rename(os.path.join(copy, 'a', 'x-z', '3.mp4'), os.path.join(copy, 'a', 'x-z', '9.mp4'))
  got = sources.listing_fingerprint(video.VideoFolderSource(copy))
  assert got['videos'] == want['videos'] and got['listing'] != want['listing']
