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


def ensure_demo_set(cache_dir: str = '') -> str:
  """The demo folder, building it on first use. Safe when several processes race to build it."""
  final = os.path.join(os.path.expanduser(cache_dir) if cache_dir else default_cache_dir(), VERSION)
  if os.path.isdir(final):
    return final
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.building-', dir=parent)
  try:
    if build_demo_set(tmp) < 2:
      raise RuntimeError('scikit-image ships fewer than 2 of the demo photos '
                         f'{PHOTOS}; install scikit-image>=0.19 or use another source.')
    try:
      os.rename(tmp, final)    # atomic: readers never see a half-written set
    except OSError:
      if not os.path.isdir(final):   # lost the race only if someone else finished
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


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
  final = os.path.join(base, f'video-{VIDEO_VERSION}')
  if os.path.isdir(final):
    return final
  os.makedirs(base, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.building-video-', dir=base)
  try:
    build_video_demo_set(tmp, seed=7)   # the set of the README's figures
    try:
      os.rename(tmp, final)
    except OSError:
      if not os.path.isdir(final):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final
