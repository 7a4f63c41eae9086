"""Record sources named by one string: index -> (encoded image bytes, label or -1).

  tfds:NAME[:VERSION][:SPLIT]   TFDS ArrayRecord data via `tfds.data_source` (split default train)
  arrayrecord:GLOB|DIR          shards written by `eva_jax.data.pack` (or bare encoded images)
  folder:PATH                   jpg/jpeg/png/webp found recursively; class sub-folders give labels
  demo                          the scikit-image photo set built on first use (eva_jax.data.demo)

Every source is picklable (grain ships it to worker processes) and reports `num_classes`
(None when unlabeled). Misconfiguration raises FileNotFoundError / ValueError naming the fix.
"""
from __future__ import annotations

import glob
import json
import os
import re

import msgpack

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')
ARRAYRECORD_SUFFIX = '.array_record'
META_SUFFIX = '-meta.json'      # written next to the shards by eva_jax.data.pack
_SHARD_NAME = re.compile(r'-\d+-of-\d+\.array_record$')   # NAME-00000-of-00004.array_record


class FolderSource:
  """Image files under `root`. Labels follow torchvision's ImageFolder: when every image sits
  inside a top-level sub-folder, the sorted sub-folder names are the classes."""

  def __init__(self, root: str):
    self.root = os.path.abspath(os.path.expanduser(root))
    self.name = f'folder:{self.root}'
    if not os.path.isdir(self.root):
      raise FileNotFoundError(
          f'Image folder {self.root} does not exist. Set config.data.source to folder:<an '
          'existing directory of images>, or use source=demo for the bundled photos.')
    paths = []
    for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
      dirnames.sort()        # os.walk order is filesystem-dependent; sort for determinism
      paths.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))
    if not paths:
      raise ValueError(
          f'No images ({", ".join(IMAGE_EXTENSIONS)}) found under {self.root}. Put images (or '
          'class sub-folders of images) there, or point config.data.source elsewhere.')
    tops = [os.path.relpath(p, self.root).split(os.sep)[0] for p in paths]
    if all(os.sep in os.path.relpath(p, self.root) for p in paths):
      self.classes = sorted(set(tops))
      index = {c: i for i, c in enumerate(self.classes)}
      self.labels = [index[t] for t in tops]
      self.num_classes = len(self.classes)
    else:
      self.classes, self.labels, self.num_classes = [], [-1] * len(paths), None
    self.paths = paths

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> tuple[bytes, int]:
    with open(self.paths[index], 'rb') as f:
      return f.read(), self.labels[index]


def encode_record(image: bytes, label: int = -1) -> bytes:
  """The ArrayRecord record format: a msgpack map {'image': bytes, 'label': int}."""
  return msgpack.packb({'image': image, 'label': int(label)}, use_bin_type=True)


def decode_record(record: bytes) -> tuple[bytes, int]:
  # A msgpack map starts with 0x80-0x8f/0xde/0xdf; no image format starts with those bytes, so
  # shards holding bare encoded images (no labels) are read as well.
  if record and (0x80 <= record[0] <= 0x8f or record[0] in (0xde, 0xdf)):
    rec = msgpack.unpackb(record, raw=False)
    return rec['image'], int(rec.get('label', -1))
  return record, -1


class ArrayRecordSource:
  """ArrayRecord shards (grain's reader); classes come from the pack `*-meta.json` if present."""

  def __init__(self, pattern: str):
    import grain   # pylint: disable=g-import-not-at-top
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
      pattern = os.path.join(pattern, '*' + ARRAYRECORD_SUFFIX)
    self.name = f'arrayrecord:{pattern}'
    self.files = sorted(glob.glob(pattern))
    if not self.files:
      raise FileNotFoundError(
          f'No ArrayRecord files match {pattern}. Pack an image folder with `python -m '
          'eva_jax.data.pack --src DIR --out OUT` and use arrayrecord:OUT/*.array_record.')
    self.classes = []
    for meta in sorted({_SHARD_NAME.sub('', f) + META_SUFFIX for f in self.files}):
      if os.path.exists(meta):
        with open(meta) as f:
          self.classes = self.classes or json.load(f).get('classes', [])
    self.num_classes = len(self.classes) or None
    self._ds = grain.sources.ArrayRecordDataSource(self.files)

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> tuple[bytes, int]:
    return decode_record(self._ds[index])


_TFDS_SPEC = re.compile(r'^(?P<name>[^:\[]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$')


class TfdsSource:
  """A TFDS dataset prepared as ArrayRecord; images stay encoded (SkipDecoding) for our decoder."""

  def __init__(self, spec: str, data_dir: str = '', image_key: str = '', label_key: str = 'label'):
    import tensorflow_datasets as tfds   # pylint: disable=g-import-not-at-top
    m = _TFDS_SPEC.match(spec)
    if not m:
      raise ValueError(f'Cannot parse TFDS source "tfds:{spec}"; expected tfds:NAME[:SPLIT].')
    name, split = m.group('name'), m.group('split') or 'train'
    self.name = f'tfds:{name}:{split}'
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    fix = (f'Prepare it once with `tfds build {name.split(":")[0]} --file_format=array_record'
           f'{" --data_dir=" + data_dir if data_dir else ""}` (manual-download datasets such as '
           'imagenet2012 also need --manual_dir), or set config.data.data_dir to where it is.')
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      features = builder.info.features
      self.image_key = image_key or next(
          (k for k, f in features.items() if isinstance(f, tfds.features.Image)), '')
      if not self.image_key:
        raise ValueError(f'TFDS dataset {name} has no Image feature; set config.data.image_key.')
      self._ds = tfds.data_source(
          name, split=split, data_dir=data_dir, download=False,
          decoders={self.image_key: tfds.decode.SkipDecoding()})
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(f'TFDS has no dataset named "{name}" (from source tfds:{spec}).') from e
    except (NotImplementedError, AssertionError, FileNotFoundError) as e:
      raise ValueError(f'TFDS dataset {name} split {split} is not prepared as ArrayRecord under '
                       f'data_dir={data_dir or "~/tensorflow_datasets"}. {fix}') from e
    self.label_key = label_key if label_key in features else ''
    self.num_classes = (getattr(features[self.label_key], 'num_classes', None)
                        if self.label_key else None)
    if len(self._ds) == 0:
      raise ValueError(f'TFDS dataset {name} split {split} is empty. {fix}')

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> tuple[bytes, int]:
    ex = self._ds[index]
    return ex[self.image_key], int(ex[self.label_key]) if self.label_key else -1


def open_source(spec: str, data_cfg) -> FolderSource | ArrayRecordSource | TfdsSource:
  """The record source named by `spec` (see the module docstring)."""
  kind, _, arg = spec.partition(':')
  if kind == 'demo' and not arg:
    from eva_jax.data import demo   # pylint: disable=g-import-not-at-top
    return FolderSource(demo.ensure_demo_set(data_cfg.get('cache_dir', '')))
  if kind == 'folder' and arg:
    return FolderSource(arg)
  if kind == 'arrayrecord' and arg:
    return ArrayRecordSource(arg)
  if kind == 'tfds' and arg:
    return TfdsSource(arg, data_cfg.get('data_dir', ''), data_cfg.get('image_key', ''),
                      data_cfg.get('label_key', 'label'))
  raise ValueError(f'Unknown data source "{spec}". Use demo, folder:PATH, arrayrecord:GLOB or '
                   'tfds:NAME[:SPLIT].')
