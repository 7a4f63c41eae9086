"""The `demo` source: a few hundred real JPEG photos with labels, built offline on first use.

scikit-image ships a handful of real photographs inside its wheel. Each becomes one class; each
class gets random crops/flips of its photo re-encoded as ImageNet-sized JPEGs. The set is written
once to the cache folder and then read like any image folder, so the default run needs no download
and fine-tuning has labels.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from PIL import Image

VERSION = 'v1'     # bump when the recipe below changes: a new folder is built, old ones unused
IMAGES_PER_CLASS = 48
# skimage.data loaders whose files are bundled in the wheel (no pooch download), all colour photos.
PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field',
          'immunohistochemistry', 'stereo_motorcycle', 'retina')


def default_cache_dir() -> str:
  root = os.environ.get('EVA_JAX_CACHE') or os.path.join('~', '.cache', 'eva_jax')
  return os.path.join(os.path.expanduser(root), 'demo')


def _load_photo(name: str) -> np.ndarray:
  import skimage.data   # pylint: disable=g-import-not-at-top
  img = getattr(skimage.data, name)()
  return img[0] if isinstance(img, tuple) else img    # stereo_motorcycle -> (left, right, disp)


def _variant(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
  """A random crop (25-100% of the area, aspect 3/4..4/3), maybe flipped, short side 256-400."""
  w, h = photo.size
  area = w * h * rng.uniform(0.25, 1.0)
  aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
  cw, ch = min(w, int(round(np.sqrt(area * aspect)))), min(h, int(round(np.sqrt(area / aspect))))
  left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
  crop = photo.crop((left, top, left + cw, top + ch))
  if rng.random() < 0.5:
    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  short = int(rng.integers(256, 401))
  scale = short / min(cw, ch)
  size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
  return crop.resize(size, Image.Resampling.BICUBIC)


def build_demo_set(out_dir: str, images_per_class: int = IMAGES_PER_CLASS, seed: int = 0) -> int:
  """Writes <out_dir>/<photo>/<i>.jpg; returns the number of classes written."""
  written = 0
  for c, name in enumerate(PHOTOS):
    try:
      photo = Image.fromarray(_load_photo(name)).convert('RGB')
    except Exception:  # pylint: disable=broad-except
      continue    # a photo missing from this skimage build (would need a download): skip it
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    for i in range(images_per_class):
      rng = np.random.default_rng([seed, c, i])
      _variant(photo, rng).save(os.path.join(out_dir, name, f'{i:03d}.jpg'), quality=90)
    written += 1
  return written


def build_once(final: str, build) -> str:
  """`final`, calling build(tmp_dir) to create it on first use: built in a temporary folder beside
  it and renamed (atomic: readers never see a half-written set; safe when several processes race
  to build it, and a failed build leaves nothing behind)."""
  if os.path.isdir(final):
    return final
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.building-', dir=parent)
  try:
    build(tmp)
    try:
      os.rename(tmp, final)
    except OSError:
      if not os.path.isdir(final):   # lost the race only if someone else finished
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def ensure_demo_set(cache_dir: str = '') -> str:
  """The demo folder, building it on first use. Safe when several processes race to build it."""
  def build(tmp):
    if build_demo_set(tmp) < 2:
      raise RuntimeError('scikit-image ships fewer than 2 of the demo photos '
                         f'{PHOTOS}; install scikit-image>=0.19 or use another source.')
  return build_once(os.path.join(os.path.expanduser(cache_dir) if cache_dir
                                 else default_cache_dir(), VERSION), build)


# ------------------------------------------------------------------------ captioned demo pairs --
# Our own short captions for the demo photos (issue 15): a class name for zero-shot prompts and a
# few descriptive phrases per photo, put into varied caption templates.
PAIRS_VERSION = 'pairs-v1'    # bump when the captions or the split change
TRAIN_PER_CLASS = 36          # crops 0..35 train, the rest are held out (as tests/conftest.py)
CAPTIONS_PER_VAL_IMAGE = 3
CLASSNAMES = {
    'astronaut': 'an astronaut',
    'chelsea': 'a cat',
    'coffee': 'a cup of coffee',
    'rocket': 'a rocket',
    'hubble_deep_field': 'galaxies in deep space',
    'immunohistochemistry': 'stained tissue under a microscope',
    'stereo_motorcycle': 'a motorcycle',
    'retina': 'the retina of an eye',
}
PHRASES = {
    'astronaut': ('an astronaut in a white spacesuit', 'a smiling astronaut in front of a flag',
                  'portrait of a woman astronaut', 'a nasa astronaut posing for a photo'),
    'chelsea': ('a tabby cat', 'a striped cat looking to the side', "a close-up of a cat's face",
                'a ginger house cat with whiskers'),
    'coffee': ('a cup of coffee on a saucer', 'a white coffee cup seen from above',
               'a hot drink in a cup with a spoon', 'coffee with milk foam'),
    'rocket': ('a rocket on the launch pad', 'a space rocket ready for launch',
               'a tall white rocket beside its tower', 'a rocket against the sky'),
    'hubble_deep_field': ('a deep field image full of distant galaxies',
                          'many small galaxies on a black background',
                          'a space telescope view of faraway galaxies',
                          'colorful galaxies and stars'),
    'immunohistochemistry': ('a microscope image of stained tissue', 'cells stained brown and blue',
                             'a histology slide seen under the microscope',
                             'a tissue sample with stained nuclei'),
    'stereo_motorcycle': ('a parked motorcycle', 'a motorbike seen up close',
                          'the engine and wheel of a motorcycle', 'a motorcycle indoors'),
    'retina': ('a photo of the retina of an eye', 'a fundus image with blood vessels',
               'the back of the eye seen through an ophthalmoscope',
               'an orange retina with red vessels'),
}
CAPTION_TEMPLATES = ('{}', 'a photo of {}.', 'a cropped photo of {}.', '{}, close-up.',
                     'an image showing {}.', 'a picture of {}')
# Zero-shot prompts for CLASSNAMES (which carry their own article).
ZERO_SHOT_TEMPLATES = ('a photo of {}.', 'a cropped photo of {}.', 'a close-up photo of {}.',
                       'a picture of {}.', '{}.')


def demo_captions(photo: str, index: int, count: int = 1, seed: int = 0) -> list[str]:
  """`count` distinct captions of crop `index` of `photo`: a phrase (or the class name) in a
  template, drawn from np.random.default_rng([seed, crc of photo, index])."""
  import zlib   # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng([seed, zlib.crc32(photo.encode()), index])
  subjects = PHRASES[photo] + (CLASSNAMES[photo],)
  combos = [(s, t) for s in subjects for t in CAPTION_TEMPLATES]
  return [CAPTION_TEMPLATES[t].format(subjects[s]) for s, t in
          (divmod(int(i), len(CAPTION_TEMPLATES))
           for i in rng.choice(len(combos), size=count, replace=False))]


def build_demo_pairs(out_dir: str, demo_dir: str, shard_size: int = 64) -> int:
  """The captioned demo set from the demo photo set at `demo_dir`:
    out/train/<photo>/<i>.jpg + .txt   one caption each, crops 0..TRAIN_PER_CLASS-1
    out/val/<photo>/<i>.jpg + .txt     held-out crops, CAPTIONS_PER_VAL_IMAGE captions (one a line)
    out/shards/train-00000.tar ...     the train pairs as img2dataset webdataset shards
  Returns the number of training pairs."""
  from eva_jax.data import pair_sources   # pylint: disable=g-import-not-at-top
  train = []
  for photo in sorted(os.listdir(demo_dir)):
    if photo not in CLASSNAMES:
      continue
    files = sorted(os.listdir(os.path.join(demo_dir, photo)))
    for i, name in enumerate(files):
      split = 'train' if i < TRAIN_PER_CLASS else 'val'
      captions = demo_captions(photo, i, 1 if split == 'train' else CAPTIONS_PER_VAL_IMAGE)
      folder = os.path.join(out_dir, split, photo)
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(demo_dir, photo, name), 'rb') as f:
        image = f.read()
      stem = os.path.splitext(name)[0]
      with open(os.path.join(folder, stem + '.jpg'), 'wb') as f:
        f.write(image)
      with open(os.path.join(folder, stem + '.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(captions))
      if split == 'train':
        train.append((f'{photo}_{stem}', image, captions[0]))
  order = np.random.default_rng(0).permutation(len(train))   # shards hold mixed classes
  pair_sources.write_webdataset([train[i] for i in order], os.path.join(out_dir, 'shards'),
                                'train', shard_size)
  return len(train)


def ensure_demo_pairs(cache_dir: str = '') -> str:
  """The captioned demo set (see build_demo_pairs), built on first use next to the demo photos.
  Sources: pair folder:<it>/train, folder:<it>/val, webdataset:<it>/shards (or `demo`)."""
  demo_dir = ensure_demo_set(cache_dir)
  return build_once(os.path.join(os.path.dirname(demo_dir), PAIRS_VERSION),
                    lambda tmp: build_demo_pairs(tmp, demo_dir))


# ----------------------------------------------------------------------------------------------
# Video demo: a set where only time carries the label (issue 16)

VIDEO_VERSION = 'v4'     # bump when the clip recipe below changes
VIDEO_CLASSES = ('starts_right', 'starts_down', 'starts_left', 'starts_up')
VIDEO_FRAMES = 4         # 1 per edge of the square path
VIDEO_SIZE = 28          # frame side written to the files (pixels): 2x2 patches of 14
VIDEO_STEP = 14          # camera move per frame (pixels): one patch, so tokens match exactly


def pan_clip(photo: np.ndarray, label: int, rng: np.random.Generator, *,
             frames: int = VIDEO_FRAMES, size: int = VIDEO_SIZE,
             step: int = VIDEO_STEP) -> np.ndarray:
  """uint8 [frames, size, size, 3]: a camera window panning clockwise once around a square
  path over `photo` (`step` pixels a frame, frames / 4 steps an edge), starting at the corner
  whose first pan goes VIDEO_CLASSES[label] (right from the top-left, down from the top-right,
  left from the bottom-right, up from the bottom-left).

  Why a loop: the set of frames of the four classes is the same (the same loop, started at
  another corner), so any model that ignores frame order -- a frame-averaged image model --
  is at chance (25%) by construction; only the order of the frames says where the pan starts.
  A straight pan would not do: its frames' unordered set shows the axis of motion (50%).
  Crops are whole-pixel windows of one resized photo (no per-frame resampling), so with a step
  of one patch a token of frame t+1 equals a token of frame t exactly."""
  per_edge = frames // 4
  side = per_edge * step                          # loop side in pixels
  img = Image.fromarray(photo)
  short = 2 * size + side                         # the window is under half the photo's side
  scale = short / min(img.size)
  img = np.asarray(img.resize((max(short, round(img.width * scale)),
                               max(short, round(img.height * scale))),
                              Image.Resampling.BICUBIC))
  h, w = img.shape[:2]
  x0 = int(rng.integers(0, w - size - side + 1))
  y0 = int(rng.integers(0, h - size - side + 1))
  corners = [(0, 0), (side, 0), (side, side), (0, side)]   # clockwise from the top-left
  out = []
  for e in range(4):
    (ax, ay), (bx, by) = corners[(label + e) % 4], corners[(label + e + 1) % 4]
    for k in range(per_edge):
      x = x0 + ax + (bx - ax) * k // per_edge
      y = y0 + ay + (by - ay) * k // per_edge
      out.append(img[y:y + size, x:x + size])
  return np.stack(out)


def write_video(path: str, frames: np.ndarray, fps: int = 8) -> None:
  """uint8 [T, H, W, 3] -> a video file through PyAV (MPEG-4 part 2, FFmpeg's built-in encoder,
  at a bit rate high enough for tiny frames to stay near-lossless, so the motion survives)."""
  import av   # pylint: disable=g-import-not-at-top
  with av.open(path, 'w') as container:
    stream = container.add_stream('mpeg4', rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = 'yuv420p'
    stream.bit_rate = 20_000_000
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(f, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def build_video_demo_set(out_dir: str, clips_per_class: dict | None = None, seed: int = 0, *,
                         frames: int = VIDEO_FRAMES, size: int = VIDEO_SIZE) -> int:
  """Writes <out_dir>/{train,val}/<class>/<i>.mp4 (pan_clip over the bundled photos, photo and
  loop position random per clip); returns the number of photos used. frames/size: another
  variant than the shipped set (e.g. frames=4, size=28 for the README's smaller run)."""
  clips_per_class = clips_per_class or {'train': 400, 'val': 64}
  photos = []
  for name in PHOTOS:
    try:
      photos.append(np.asarray(Image.fromarray(_load_photo(name)).convert('RGB')))
    except Exception:  # pylint: disable=broad-except
      continue    # as build_demo_set: a photo this skimage build lacks
  if len(photos) < 2:
    raise RuntimeError(f'scikit-image ships fewer than 2 of the demo photos {PHOTOS}.')
  for s, (split, n) in enumerate(sorted(clips_per_class.items())):
    for c, cls in enumerate(VIDEO_CLASSES):
      os.makedirs(os.path.join(out_dir, split, cls), exist_ok=True)
      for i in range(n):
        rng = np.random.default_rng([seed, s, c, i])
        photo = photos[int(rng.integers(len(photos)))]
        write_video(os.path.join(out_dir, split, cls, f'{i:03d}.mp4'),
                    pan_clip(photo, c, rng, frames=frames, size=size))
  return len(photos)


def ensure_video_demo_set(cache_dir: str = '') -> str:
  """The video demo folder (train/ and val/ of class sub-folders), built on first use; atomic
  like ensure_demo_set."""
  base = os.path.expanduser(cache_dir) if cache_dir else default_cache_dir()
  return build_once(os.path.join(base, f'video-{VIDEO_VERSION}'),
                    lambda tmp: build_video_demo_set(tmp, seed=7))   # the README's figures
