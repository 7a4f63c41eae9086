"""Video clips for EVA video fine-tuning (../shared/EVA-SPEC.md "Video"): PyAV decoding, sources,
TSN segment sampling, clip-consistent augmentation, multi-view testing, a grain loader.

Sources (`config.data.source`):
  video_folder:PATH   video files (.mp4 .avi .webm .mkv .mov .m4v) in class sub-folders (links
                      followed as in image folders; see VideoFolderSource)
  video_list:FILE     a Kinetics-style list, one `path label` per line (path relative to the file's
                      folder unless absolute; `config.data.video.root` overrides the folder)
  video_demo[:val]    the synthetic camera-pan set, train (default) or val split
                      (eva_jax.data.demo.ensure_video_demo_set)
Missing files in a list are counted and reported (warning) and the run stops if all are missing.

Decoding: PyAV (FFmpeg in its wheels). A record keeps at most `video.max_decode_frames` frames
(every s-th, s = ceil(frames / max)), optionally scaled to a short side of
`video.decode_short_side` by swscale while decoding, so a long video never fills memory. A file
that cannot be opened or decoded, or decodes to fewer than `video.min_frames` frames, is skipped
like an undecodable image (data/decode.py): its slot takes the next good video and the batch
counts it in `skipped`; nothing crashes on a video with no decodable frames.

Sampling (TSN, Wang et al. 2016): the decoded frames are split into T equal segments; training
draws one random frame per segment, evaluation takes each segment's centre; the multi-view test
(`views`) takes K temporal clips at offsets (k + 0.5) / K of every segment x 3 spatial crops
(left/centre/right or top/centre/bottom after resizing the short side to the crop size).

Augmentation (train), the same draw for every frame of a clip: RandomResizedCrop
(data.finetune_scale, data.ratio; bicubic), horizontal flip (data.hflip), colour jitter with
probability video.color_jitter (torchvision ColorJitter(brightness, contrast, saturation, hue) =
video.jitter, factors and order drawn once per clip), grayscale with probability video.grayscale;
optional batch mixup/cutmix (data/mixup.py, boxes shared by every frame).

Loader batches: data.pipeline.Batch(arrays={'video': float32 [B, T, H, W, 3] normalized (eval:
[B, V, T, H, W, 3], V = views), 'label': int32 [B] or float32 [B, classes] with mixup}, valid,
skipped). Iterator state (get_state/set_state) resumes exactly, as the image loaders do.
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image, ImageEnhance

from eva_jax.data import pipeline, sources
from eva_jax.data.decode import BadImageError, DecodedSource
from eva_jax.data.mixup import Mixup
from eva_jax.data.transforms import BICUBIC, rrc_params

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.webm', '.mkv', '.mov', '.m4v')


def _is_video(name: str) -> bool:
  return sources.has_extension(name, VIDEO_EXTENSIONS)


def video_data_config() -> ml_collections.ConfigDict:
  """The `config.data.video` block (defaults: the spec's K-400 augmentation)."""
  return ml_collections.ConfigDict(dict(
      root='',                 # list files: folder the paths are relative to ('' = the list's)
      max_decode_frames=64,    # frames kept per decoded video (every s-th frame beyond that)
      decode_short_side=0,     # scale frames to this short side while decoding (0 = native)
      min_frames=1,            # a video decoding to fewer frames is skipped (counted)
      color_jitter=0.8,        # P(colour jitter) per clip (EVA-SPEC K-400)
      jitter=(0.4, 0.4, 0.4, 0.1),   # brightness, contrast, saturation, hue strengths
      grayscale=0.2,           # P(grayscale) per clip (EVA-SPEC K-400)
      test_clips=4,            # temporal clips per video at test (EVA-SPEC: 4 x 3)
      test_crops=3,            # spatial crops per clip at test (1 = centre crop only)
  ))


# ----------------------------------------------------------------------------------------------
# Decoding

class BadVideoError(BadImageError):
  """A video that cannot be opened, has no video stream, or decodes to too few frames."""


def decode_video(path: str, *, max_frames: int = 64, short_side: int = 0,
                 min_frames: int = 1) -> np.ndarray:
  """uint8 [n, h, w, 3] RGB frames of `path` (n <= max_frames, every s-th frame when longer).

  Raises BadVideoError for anything unreadable or with fewer than `min_frames` frames."""
  import av   # pylint: disable=g-import-not-at-top
  frames: list[np.ndarray] = []
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise BadVideoError('no video stream')
      stream = container.streams.video[0]
      stream.thread_type = 'AUTO'
      total = int(stream.frames or 0)       # 0 when the container does not say
      stride = max(1, math.ceil(total / max_frames)) if total else 1
      size = None
      for i, frame in enumerate(container.decode(stream)):
        if i % stride:
          continue
        if size is None:
          size = _scaled_size(frame.width, frame.height, short_side)
        frames.append(frame.to_ndarray(format='rgb24', width=size[0], height=size[1]))
  except BadVideoError:
    raise
  except (av.error.FFmpegError, OSError, ValueError, EOFError, MemoryError) as e:
    if not frames:
      raise BadVideoError(f'{type(e).__name__}: {e}') from e
    # A truncated tail: the frames decoded so far are the video (FFmpeg players do the same).
    log.info('video %s: decoding stopped after %d frames (%s)', path, len(frames), e)
  if len(frames) < max(1, min_frames):
    raise BadVideoError(f'{len(frames)} decodable frames, fewer than '
                        f'config.data.video.min_frames={max(1, min_frames)}')
  if len(frames) > max_frames:              # frame count unknown up front: subsample now
    keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
    frames = [frames[i] for i in keep]
  return np.stack(frames)


def _scaled_size(w: int, h: int, short_side: int) -> tuple[int, int]:
  if not short_side or min(w, h) == short_side:
    return w, h
  s = short_side / min(w, h)
  return max(1, round(w * s)), max(1, round(h * s))


# ----------------------------------------------------------------------------------------------
# Sources: index -> (path, label)

class VideoFolderSource:
  """Video files (VIDEO_EXTENSIONS, not hidden) in class sub-folders of `root`: the sorted names of
  the first-level directories are the classes, empty ones included (ImageFolder-style; an empty
  class keeps its index so later labels do not shift).

  Listed with the image folder's walk (data/sources.py `_walk_images`, issue 12 kind K): links
  are followed by real path, a loop or a second link to a folder is skipped, a link never lends a
  class (a link from class A into class B's folder lists nothing under A; B lists it), and a
  first-level link to a folder inside the root is no class. Skips are counted in
  `skipped_links` and logged once. Videos at the top level have no label: they are counted in
  `top_level` and logged, not listed (ValueError if there are no class folders at all).

  Order: by class, then directory path, then file name -- the order of the earlier
  `sorted(os.walk(class_dir))` listing, so a plain tree lists exactly as before (training/video.py
  also records a fingerprint of the listing that a resume must match, sources.listing_fingerprint).
  """

  unit = 'videos'   # what sources.listing_fingerprint counts

  def __init__(self, root: str):
    self.root = os.path.abspath(os.path.expanduser(root))
    self.name = f'video_folder:{self.root}'
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f'Video folder {self.root} does not exist; point the source at '
                              'video_folder:<a folder of class sub-folders of videos>.')
    paths, tops, self.skipped_links, examples, self.classes = sources._walk_images(
        self.root, accept=_is_video)
    top_level = [p for p, t in zip(paths, tops) if t is None]
    self.top_level = len(top_level)
    fix = (f'Put each video in a folder named after its class ({self.root}/CLASS/NAME.mp4), or '
           'list them with labels in a video_list:FILE.')
    if top_level and not self.classes:
      raise ValueError(f'{self.name}: {len(top_level)} videos (e.g. {top_level[0]}) but no class '
                       f'sub-folders; video classification needs a label per video. {fix}')
    if top_level:
      log.warning('%s: %d videos at the top level, outside any class folder, have no label and '
                  'are not listed (e.g. %s). %s', self.name, len(top_level), top_level[0], fix)
    sources.warn_skipped_links(self.name, self.skipped_links, examples, 'video')
    index = {c: i for i, c in enumerate(self.classes)}
    listed = sorted((index[t], os.path.dirname(p), os.path.basename(p))
                    for p, t in zip(paths, tops) if t is not None)
    self.paths = [os.path.join(d, f) for _, d, f in listed]
    self.labels = [label for label, _, _ in listed]
    if not self.paths:
      raise ValueError(f'No videos ({", ".join(VIDEO_EXTENSIONS)}) in class sub-folders of '
                       f'{self.root} ({len(self.classes)} class folders, {self.top_level} videos '
                       f'at the top level).{sources.dangling_note(self.skipped_links)} {fix}')
    self.num_classes = len(self.classes)
    self.missing = 0

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> tuple[str, int]:
    return self.paths[index], self.labels[index]


class VideoListSource:
  """A Kinetics-style list file: `path label` per line (space, tab or comma separated; blank
  lines and '#' comments ignored). Missing files are counted (`missing`) and left out with one
  warning; FileNotFoundError when every listed file is missing."""

  unit = 'videos'

  def __init__(self, list_file: str, root: str = ''):
    list_file = os.path.abspath(os.path.expanduser(list_file))
    self.name = f'video_list:{list_file}'
    if not os.path.isfile(list_file):
      raise FileNotFoundError(f'Video list {list_file} does not exist (video_list:FILE, one '
                              '`path label` per line).')
    base = os.path.expanduser(root) if root else os.path.dirname(list_file)
    self.root = os.path.abspath(base)
    self.paths, self.labels, absent = [], [], []
    with open(list_file) as f:
      for n, line in enumerate(f, 1):
        line = line.strip()
        if not line or line.startswith('#'):
          continue
        # The label is the last field (after a space, tab or comma, as Kinetics lists and CSVs
        # write it); the path is everything before it, verbatim: commas and repeated spaces in a
        # file name are kept.
        entry = re.fullmatch(r'(.*?)[\s,]+(-?\d+)', line)
        if entry is None:
          raise ValueError(f'{list_file} line {n}: expected `path label` (label an int), got '
                           f'{line!r}.')
        path, label = entry.group(1), int(entry.group(2))
        if label < 0 or not path:
          raise ValueError(f'{list_file} line {n}: bad entry {line!r} (negative label or no path).')
        full = path if os.path.isabs(path) else os.path.join(base, path)
        if os.path.isfile(full):
          self.paths.append(full)
          self.labels.append(label)
        else:
          absent.append(full)
    self.missing = len(absent)
    listed = len(self.paths) + self.missing
    if not listed:
      raise ValueError(f'{list_file} lists no videos.')
    if not self.paths:
      raise FileNotFoundError(f'All {listed} videos listed in {list_file} are missing (e.g. '
                              f'{absent[0]}); check the paths or set config.data.video.root to '
                              'the folder they are relative to.')
    if absent:
      log.warning('%d of %d videos listed in %s are missing and left out (e.g. %s).',
                  self.missing, listed, list_file, '; '.join(absent[:3]))
    self.num_classes = max(self.labels) + 1

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> tuple[str, int]:
    return self.paths[index], self.labels[index]


def open_video_source(spec: str, data_cfg) -> VideoFolderSource | VideoListSource:
  """The video source named by `spec` (module docstring); ValueError for an unknown one."""
  kind, _, arg = spec.partition(':')
  video_cfg = data_cfg.get('video') or video_data_config()
  if kind == 'video_folder' and arg:
    return VideoFolderSource(arg)
  if kind == 'video_list' and arg:
    return VideoListSource(arg, video_cfg.get('root', ''))
  if kind == 'video_demo' and arg in ('', 'train', 'val'):
    from eva_jax.data import demo   # pylint: disable=g-import-not-at-top
    root = demo.ensure_video_demo_set(data_cfg.get('cache_dir', ''))
    return VideoFolderSource(os.path.join(root, arg or 'train'))
  raise ValueError(f'Unknown video source {spec!r}. Use video_folder:PATH, video_list:FILE or '
                   'video_demo[:train|:val].')


class DecodedVideoSource(DecodedSource):
  """grain source of {'image': uint8 [n, h, w, 3] frames, 'label', 'skipped', 'valid'}: the image
  DecodedSource's skip-and-count logic with PyAV decoding."""

  def __init__(self, records, video_cfg, substitute: bool = True):
    super().__init__(records, substitute)
    self.max_frames = int(video_cfg.max_decode_frames)
    self.short_side = int(video_cfg.decode_short_side)
    self.min_frames = int(video_cfg.min_frames)

  def _read(self, index: int):
    path, label = self.records[index]
    return decode_video(path, max_frames=self.max_frames, short_side=self.short_side,
                        min_frames=self.min_frames), int(label)


# ----------------------------------------------------------------------------------------------
# Sampling and augmentation

def segment_indices(n: int, num_frames: int, offsets) -> np.ndarray:
  """TSN: [num_frames] frame indices, one per equal segment of n frames at `offsets` in [0, 1)
  (random for training, 0.5 = centred). Short videos repeat frames."""
  edges = np.arange(num_frames) * (n / num_frames)
  idx = np.floor(edges + np.asarray(offsets) * (n / num_frames)).astype(int)
  return np.clip(idx, 0, n - 1)


def _jitter(frames: list[Image.Image], strengths, rng) -> list[Image.Image]:
  """torchvision ColorJitter with one draw for the whole clip (factors and op order)."""
  b, c, s, h = strengths
  factors = [rng.uniform(max(0, 1 - b), 1 + b), rng.uniform(max(0, 1 - c), 1 + c),
             rng.uniform(max(0, 1 - s), 1 + s), rng.uniform(-h, h)]
  order = rng.permutation(4)

  def one(img):
    for op in order:
      if op == 0:
        img = ImageEnhance.Brightness(img).enhance(factors[0])
      elif op == 1:
        img = ImageEnhance.Contrast(img).enhance(factors[1])
      elif op == 2:
        img = ImageEnhance.Color(img).enhance(factors[2])
      else:   # torchvision adjust_hue on PIL: shift the uint8 H channel with wrap-around
        hsv = np.array(img.convert('HSV'))
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(factors[3] * 255)) % 256
        img = Image.fromarray(hsv, 'HSV').convert('RGB')
    return img
  return [one(f) for f in frames]


class VideoTransform:
  """grain map_with_index: decoded frames -> {'image': uint8 [T*S, S, 3] (train) or
  [V*T*S, S, 3] (eval; V = clips x crops)}: frames stacked along the height so the image
  pipeline's NormalizeBatch normalizes a clip in one pass; the loader reshapes to 'video'.
  Randomness from default_rng([seed, global index]), as the image transforms."""

  def __init__(self, data_cfg, *, num_frames: int, image_size: int, seed: int, train: bool):
    self.t, self.size, self.seed, self.train = int(num_frames), int(image_size), int(seed), train
    v = data_cfg.get('video') or video_data_config()
    self.v = v
    self.scale, self.ratio = tuple(data_cfg.finetune_scale), tuple(data_cfg.ratio)
    self.hflip = float(data_cfg.hflip)
    self.clips, self.crops = (1, 1) if train else (int(v.test_clips), int(v.test_crops))
    if self.crops not in (1, 3) or self.clips < 1:
      raise ValueError(f'config.data.video.test_crops must be 1 or 3 and test_clips >= 1, got '
                       f'{self.crops} and {self.clips}.')

  @property
  def views(self) -> int:
    return self.clips * self.crops

  def __call__(self, index: int, element) -> dict[str, Any]:
    out = {'skipped': np.int32(element['skipped']), 'valid': np.bool_(element['valid']),
           'label': np.int32(element['label'])}
    frames = element['image']
    s = self.size
    if frames is None:    # evaluation padding
      return {'image': np.zeros((self.views * self.t * s, s, 3), np.uint8), **out}
    if self.train:
      clip = self._train_clip(frames, np.random.default_rng([self.seed, int(index)]))
    else:
      clip = np.concatenate([self._test_views(frames, k) for k in range(self.clips)])
    return {'image': clip.reshape(-1, s, 3), **out}

  def _train_clip(self, frames, rng) -> np.ndarray:
    idx = segment_indices(len(frames), self.t, rng.random(self.t))
    h, w = frames.shape[1:3]
    left, top, cw, ch = rrc_params(w, h, self.scale, self.ratio, rng)
    flip = rng.random() < self.hflip
    jitter = rng.random() < float(self.v.color_jitter)
    if jitter:
      jrng = np.random.default_rng(rng.integers(2 ** 32))
    gray = rng.random() < float(self.v.grayscale)
    imgs = []
    for i in idx:
      img = Image.fromarray(frames[i]).crop((left, top, left + cw, top + ch))
      img = img.resize((self.size, self.size), BICUBIC)
      if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
      imgs.append(img)
    if jitter:
      imgs = _jitter(imgs, tuple(self.v.jitter), jrng)
    if gray:   # torchvision RandomGrayscale: luma replicated to 3 channels
      imgs = [i.convert('L').convert('RGB') for i in imgs]
    return np.stack([np.asarray(i) for i in imgs])

  def _test_views(self, frames, k: int) -> np.ndarray:
    """[crops, T, S, S, 3]: temporal clip k of `clips` (offset (k + 0.5) / clips per segment)."""
    idx = segment_indices(len(frames), self.t, np.full(self.t, (k + 0.5) / self.clips))
    h, w = frames.shape[1:3]
    scale = self.size / min(h, w)
    nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
    if self.crops == 1:
      starts = [((nw - self.size) // 2, (nh - self.size) // 2)]
    elif nw >= nh:   # three crops along the long side, as the official 3-crop test
      starts = [(x, (nh - self.size) // 2) for x in (0, (nw - self.size) // 2, nw - self.size)]
    else:
      starts = [((nw - self.size) // 2, y) for y in (0, (nh - self.size) // 2, nh - self.size)]
    resized = [Image.fromarray(frames[i]).resize((nw, nh), BICUBIC) for i in idx]
    return np.stack([np.stack([np.asarray(r.crop((x, y, x + self.size, y + self.size)))
                               for r in resized]) for x, y in starts])


# ----------------------------------------------------------------------------------------------
# Loader

class VideoLoader:
  """Wraps the image pipeline's LoaderIterator: reshapes stacked frames to 'video', applies batch
  mixup/cutmix over [B, H, W, T*C] (one box for every frame), keeps its exact-resume state."""

  def __init__(self, inner: pipeline.LoaderIterator, *, shape, mixup: Mixup | None, seed: int,
               process_index: int):
    self._inner, self._shape, self._mixup = inner, tuple(shape), mixup
    self._seed, self._pi = seed, process_index

  def __iter__(self):
    return self

  def __next__(self) -> pipeline.Batch:
    b = next(self._inner)
    arrays = dict(b.arrays)
    vid = np.asarray(arrays.pop('image')).reshape((-1,) + self._shape)
    if self._mixup is not None:
      # Seeded by the batch number (as the image loader) so a restored iterator mixes the same.
      rng = np.random.default_rng([self._seed, self._pi, self._inner._batches, 1])
      bsz, t, h, w, c = vid.shape
      flat = np.ascontiguousarray(vid.transpose(0, 2, 3, 1, 4)).reshape(bsz, h, w, t * c)
      flat, arrays['label'] = self._mixup(flat, arrays['label'], rng)
      vid = flat.reshape(bsz, h, w, t, c).transpose(0, 3, 1, 2, 4)
    arrays['video'] = np.ascontiguousarray(vid, np.float32)
    return b.replace(arrays=arrays)

  def get_state(self) -> dict:
    return self._inner.get_state()

  def set_state(self, state: dict) -> None:
    self._inner.set_state(state)

  def close(self) -> None:
    self._inner.close()


def build_video_loader(data_cfg, *, num_frames: int, image_size: int, batch_size: int, seed: int,
                       train: bool, num_classes: int | None = None,
                       process_index: int | None = None, process_count: int | None = None,
                       num_epochs: int | None = None, records=None) -> VideoLoader:
  """Video `Batch`es (module docstring). `batch_size` is per host. train=False: one ordered pass
  of multi-view clips (data.video.test_clips x test_crops), padded to full batches. `records`:
  the source of config.data.source already opened (None = open it here)."""
  pi, pc = pipeline._process(process_index, process_count)
  v = data_cfg.get('video') or video_data_config()
  records = records if records is not None else open_video_source(data_cfg.source, data_cfg)
  num_classes = num_classes or records.num_classes
  if records.num_classes > num_classes:
    raise ValueError(f'{records.name} has {records.num_classes} classes but config.num_classes='
                     f'{num_classes}; set it to 0 (from the source) or at least '
                     f'{records.num_classes}.')
  transform = VideoTransform(data_cfg, num_frames=num_frames, image_size=image_size, seed=seed,
                             train=train)
  decoded = grain.MapDataset.source(DecodedVideoSource(records, v, substitute=train))
  ds = pipeline.host_stream([(decoded, 1.0)], transform, data_cfg, seed=seed, train=train,
                            batch_size=batch_size, process_index=pi, process_count=pc,
                            num_epochs=num_epochs)
  mixup = None
  if train and (data_cfg.mixup > 0 or data_cfg.cutmix > 0):
    mixup = Mixup(data_cfg.mixup, data_cfg.cutmix, prob=data_cfg.mixup_prob,
                  switch_prob=data_cfg.mixup_switch_prob,
                  label_smoothing=data_cfg.label_smoothing, num_classes=num_classes)
  inner = pipeline._finish(ds, data_cfg, batch_size=batch_size, train=train, seed=seed,
                           process_index=pi, num_classes=num_classes, source=records.name)
  shape = ((num_frames, image_size, image_size, 3) if train
           else (transform.views, num_frames, image_size, image_size, 3))
  return VideoLoader(inner, shape=shape, mixup=mixup, seed=seed, process_index=pi)
