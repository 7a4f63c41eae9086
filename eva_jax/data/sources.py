"""Record sources named by one string: index -> (encoded image bytes, label or -1).

  tfds:NAME[:VERSION][:SPLIT]   TFDS ArrayRecord data via `tfds.data_source` (split default train)
  arrayrecord:GLOB|DIR          shards written by `eva_jax.data.pack` (or bare encoded images)
  folder:PATH                   jpg/jpeg/png/webp found recursively; class sub-folders give labels
  demo                          the scikit-image photo set built on first use (eva_jax.data.demo)

Every source is picklable (grain ships it to worker processes) and reports `num_classes`
(None when unlabeled). Misconfiguration raises FileNotFoundError / ValueError naming the fix.

`listing_fingerprint(source)` says which listing a loader position (grain: an index) refers to, for
every source of every training program (image, pair and video sources); checkpoints record it as
meta 'train_data' (`train_data_fingerprint`) and a resume must match it (training/resume.py).
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import re
from typing import Any, Callable, Iterable, Sequence

import msgpack

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')
ARRAYRECORD_SUFFIX = '.array_record'
META_SUFFIX = '-meta.json'      # written next to the shards by eva_jax.data.pack
_SHARD_NAME = re.compile(r'-(\d+)-of-(\d+)\.array_record$')   # NAME-00000-of-00004.array_record


def shard_sets(files: list[str]) -> dict[str, list[tuple[int, int]]]:
  """{OUT/NAME: [(shard index, shard count) ...]} of the files named as eva-pack names its shards
  (NAME-00000-of-00004.array_record); other files are not listed."""
  sets = {}
  for f in files:
    m = _SHARD_NAME.search(f)
    if m is not None:
      sets.setdefault(f[:m.start()], []).append((int(m.group(1)), int(m.group(2))))
  return sets


def check_shard_sets(files: list[str], pattern: str, from_folder: bool) -> None:
  """ValueError when the matched shards are not whole packs: a pack NAME missing shards or
  holding shards of another count (a re-pack with another shard count leaves the old ones beside
  the new), or, for a folder given as the source, shards of several packs (train-* and val-*:
  training would read the validation images too). An explicit glob may span packs on purpose."""
  sets = shard_sets(files)
  for prefix, shards in sets.items():
    counts = sorted({c for _, c in shards})
    if len(counts) > 1 or sorted(i for i, _ in shards) != list(range(counts[0])):
      raise ValueError(f'{pattern}: the shards {os.path.basename(prefix)}-*-of-* are not one whole '
                       f'pack ({len(shards)} files named of-{", of-".join(map(str, counts))}): a '
                       'shard is missing, or a re-pack with another shard count left old ones. '
                       'Re-pack into an empty folder (eva-pack --out).')
  if from_folder and len(sets) > 1:
    names = sorted(os.path.basename(k) for k in sets)
    example = os.path.join(pattern.rsplit(os.sep, 1)[0], names[0])
    raise ValueError(f'{pattern} holds {len(sets)} packs ({", ".join(names)}), which would be read '
                     f'as one source: name one, e.g. arrayrecord:{example}-*{ARRAYRECORD_SUFFIX}.')


@contextlib.contextmanager
def source_field(field: str, spec: str):
  """Opening the source `spec` that config `field` names: a FileNotFoundError / ValueError it
  raises is raised again with the field in front ("config.eval_source='folder:/x': ..."), so the
  message names what the user set, whichever field that was."""
  try:
    yield
  except (FileNotFoundError, ValueError) as e:
    if type(e) not in (FileNotFoundError, ValueError):   # subclasses carry their own arguments
      raise
    raise type(e)(f'{field}={spec!r}: {e}') from None


class FolderSource:
  """Image files under `root`. Labels follow torchvision's ImageFolder: when every image sits
  inside a top-level sub-folder, the sorted sub-folder names are the classes.

  Links are followed, but by real path (issue 12, kind K):
  - every directory and image is listed once: a directory whose real path was already walked (a
    loop such as sub/back -> .., or a second link to the same folder) is skipped, as is an image
    reached a second time;
  - a class is a first-level directory of `root`. A first-level link to a directory outside the
    root is a class too (datasets are often linked in); one to a directory inside the root is
    not (it would duplicate or rename another class);
  - below the first level, a link never moves images between classes: a directory or image whose
    real path lies in another class's real folder (one linked in from outside the root too), or
    elsewhere in the root (e.g. top-level images), is skipped; it is listed under the class it
    really belongs to.
  - a dangling link (its target is gone: an unmounted disk, a moved dataset) whose name could be
    an image or a folder is skipped, as is a loop of links.
  Every skip is counted in `skipped_links` ({'loop_or_duplicate': n, 'other_class': n,
  'dangling': n}) and logged once as a warning with examples. The classes are the first-level
  directories holding images (an empty class folder takes no index); images are listed
  depth-first in sorted name order. data/video.py VideoFolderSource lists videos with the same
  walk (`_walk_images`).
  """

  unit = 'images'   # what listing_fingerprint counts

  def __init__(self, root: str):
    self.root = os.path.abspath(os.path.expanduser(root))
    self.name = f'folder:{self.root}'
    if not os.path.isdir(self.root):
      # No config field named here: the caller that knows which one named the folder says it
      # (source_field); training's source, an evaluation split and eva-pack's --src all land here.
      raise FileNotFoundError(
          f'Image folder {self.root} does not exist: point the source at an existing directory '
          'of images (folder:DIR), or use demo for the bundled photos.')
    paths, tops, self.skipped_links, examples, _ = _walk_images(self.root)
    warn_skipped_links(self.name, self.skipped_links, examples, 'image')
    if not paths:
      raise ValueError(
          f'No images ({", ".join(IMAGE_EXTENSIONS)}) found under {self.root}.'
          f'{dangling_note(self.skipped_links)} Put images (or class sub-folders of images) '
          'there, or point the source elsewhere.')
    if all(t is not None for t in tops):
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


def has_extension(name: str, extensions: tuple[str, ...]) -> bool:
  """A file the folder walk lists: its name ends with one of `extensions` (any case) and it is
  not hidden (macOS '._x.jpg' resource forks, editor swap files)."""
  return name.lower().endswith(extensions) and not name.startswith('.')


def _is_image(name: str) -> bool:
  return has_extension(name, IMAGE_EXTENSIONS)


def warn_skipped_links(name: str, skipped: dict[str, int], examples: list[str], noun: str) -> None:
  """One warning for the links `_walk_images` skipped (nothing when it skipped none)."""
  if sum(skipped.values()):
    logging.getLogger(__name__).warning(
        '%s: skipped %d linked directories/%ss reached a second time (symlink loops, duplicate '
        'links), %d links into another class or the root (a link never lends a class) and %d '
        'dangling links (target missing: mount or restore it to list them); e.g. %s. Each %s is '
        'listed once, under its real class.', name, skipped['loop_or_duplicate'], noun,
        skipped['other_class'], skipped['dangling'], '; '.join(examples[:3]), noun)


def dangling_note(skipped: dict[str, int]) -> str:
  """The sentence an empty listing's error adds when dangling links were skipped ('' if none)."""
  n = skipped.get('dangling', 0)
  return (f' {n} links there point at nothing (examples logged above): mount or restore their '
          'targets.' if n else '')


def _inside(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk_images(root: str, accept: Callable[[str], bool] = _is_image):
  """(paths, first-level class name or None per path, skip counts, examples, sorted class names)
  of the files whose name `accept`s (images by default; data/video.py passes its video test).

  The rules are FolderSource's. The class names are every first-level directory that is a class
  (empty ones too); top-level files come first with class None, then each class depth-first in
  sorted name order."""
  real_root = os.path.realpath(root)
  skipped = {'loop_or_duplicate': 0, 'other_class': 0, 'dangling': 0}
  examples: list[str] = []

  def skip(kind, path, why):
    skipped[kind] += 1
    if len(examples) < 5:
      examples.append(f'{os.path.relpath(path, root)} ({why})')

  def kind(e) -> str | None:
    # 'dir', 'file' or None. DirEntry caches the stat; a loop of links makes it raise (ELOOP).
    try:
      return 'dir' if e.is_dir(follow_symlinks=True) else (
          'file' if e.is_file(follow_symlinks=True) else None)
    except OSError:
      return None

  def unreachable_link(e) -> None:
    # Called for entries that are neither a file nor a folder.
    # A link there is a loop of links, or dangling (an unmounted disk, a moved dataset); one whose
    # name could be an image or a folder is counted, or it would vanish from the listing unseen.
    if not e.is_symlink() or not (accept(e.name) or not os.path.splitext(e.name)[1]):
      return
    try:
      os.stat(e.path)
    except OSError as err:
      if err.errno == errno.ELOOP:
        skip('loop_or_duplicate', e.path, 'a loop of links')
      else:
        skip('dangling', e.path, f'link to missing {os.readlink(e.path)}')

  entries = sorted(os.scandir(root), key=lambda e: e.name)
  # Classes: first-level directories; a first-level link into the root lends no class.
  classes: dict[str, str] = {}   # name -> real path
  kinds = {e.name: kind(e) for e in entries}
  for e in entries:
    if kinds[e.name] == 'dir':
      real = os.path.realpath(e.path)
      if e.is_symlink() and _inside(real, real_root):
        skip('other_class', e.path, f'first-level link to {os.path.relpath(real, real_root)} '
             'inside the root')
        continue
      classes[e.name] = real
  visited_dirs = {real_root}
  seen_files: set[str] = set()
  paths: list[str] = []
  tops: list[str | None] = []

  def add_file(path, top):
    real = os.path.realpath(path)
    if real in seen_files:
      skip('loop_or_duplicate', path, 'file listed already')
      return
    if top is not None and os.path.islink(path) and elsewhere(real, top):
      skip('other_class', path, 'link to a file of another class or the root')
      return
    seen_files.add(real)
    paths.append(path)
    tops.append(top)

  def elsewhere(real, top):
    # In the root or in another class's real folder (a class linked in from outside the root is
    # one too), but not in this class's: listing it here would lend it this class.
    if _inside(real, classes[top]):
      return False
    return _inside(real, real_root) or any(_inside(real, h) for h in classes.values())

  for e in entries:            # files at the top level: unlabeled
    if kinds[e.name] == 'file':
      if accept(e.name):
        add_file(e.path, None)
    elif kinds[e.name] is None:
      unreachable_link(e)
  for name in sorted(classes):
    stack = [os.path.join(root, name)]
    while stack:
      d = stack.pop()
      real = os.path.realpath(d)
      if real in visited_dirs:
        skip('loop_or_duplicate', d, f'real folder {real} walked already')
        continue
      if elsewhere(real, name):
        skip('other_class', d, f'link into {os.path.relpath(real, real_root)}')
        continue
      visited_dirs.add(real)
      try:
        sub = sorted(os.scandir(d), key=lambda e: e.name)
      except OSError as err:
        raise ValueError(f'Cannot list {d} ({err}); fix its permissions or remove it from '
                         f'{root}.') from err
      dirs = []
      for e in sub:
        k = kind(e)
        if k == 'dir':
          dirs.append(e.path)
        elif k == 'file':
          if accept(e.name):
            add_file(e.path, name)
        else:
          unreachable_link(e)
      stack.extend(reversed(dirs))   # depth-first in sorted order, as os.walk listed them
  return paths, tops, skipped, examples, sorted(classes)


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

  unit = 'records'

  def __init__(self, pattern: str):
    import grain   # pylint: disable=g-import-not-at-top
    pattern = os.path.expanduser(pattern)
    from_folder = os.path.isdir(pattern)
    if from_folder:
      pattern = os.path.join(pattern, '*' + ARRAYRECORD_SUFFIX)
    self.name = f'arrayrecord:{pattern}'
    self.files = sorted(glob.glob(pattern))
    if not self.files:
      raise FileNotFoundError(
          f'No ArrayRecord files match {pattern}. Pack an image folder with `python -m '
          'eva_jax.data.pack --src DIR --out OUT` and use arrayrecord:OUT/*.array_record.')
    check_shard_sets(self.files, pattern, from_folder)
    self.classes = []
    for meta in sorted({_SHARD_NAME.sub('', f) + META_SUFFIX for f in self.files}):
      if os.path.exists(meta):
        with open(meta) as f:
          self.classes = self.classes or json.load(f).get('classes', [])
    self.num_classes = len(self.classes) or None
    try:
      self._ds = grain.sources.ArrayRecordDataSource(self.files)
    except Exception as e:  # noqa: BLE001 - the reader's errors name no file; find and name it
      raise ValueError(_unreadable_shards_message(self.files, pattern, e)) from e
    self._offsets = None   # cumulative record counts per shard, computed on the first read error

  def __len__(self) -> int:
    return len(self._ds)

  def shard_records(self) -> list[int]:
    """Records per shard (of `files`, in order): the counts the reader took when it opened them,
    else each shard's footer read once more."""
    # array_record's data source keeps one read instruction (file, record range) per shard.
    done = getattr(self._ds, '_read_instructions', None)
    if done is not None and [os.path.basename(r.filename) for r in done] == [
        os.path.basename(f) for f in self.files]:
      return [int(r.num_records) for r in done]
    return [_num_records(f) for f in self.files]

  def _shard_of(self, index: int) -> tuple[str, int]:
    import numpy as np   # pylint: disable=g-import-not-at-top
    if self._offsets is None:
      self._offsets = np.cumsum(self.shard_records())
    i = int(np.searchsorted(self._offsets, index, side='right'))
    return self.files[i], index - (int(self._offsets[i - 1]) if i else 0)

  def __getitem__(self, index: int) -> tuple[bytes, int]:
    try:
      record = self._ds[index]
    except Exception as e:  # noqa: BLE001 - a corrupt chunk: name the shard, let the loader skip it
      try:
        shard, local = self._shard_of(index)
        where = f'shard {shard} record {local}'
      except Exception:  # noqa: BLE001 - naming the shard is best effort, the error is not
        where = f'record {index} of {self.name}'
      # OSError: DecodedSource skips the record, counts it (data/skipped) and logs this text.
      raise OSError(f'unreadable ArrayRecord {where} ({type(e).__name__}: {e}); the shard is '
                    'corrupt: re-pack it with eva_jax.data.pack or copy it again.') from e
    return decode_record(record)


def _num_records(f: str) -> int:
  # pylint: disable-next=g-import-not-at-top
  from array_record.python.array_record_module import ArrayRecordReader
  r = ArrayRecordReader(f)
  try:
    return int(r.num_records())
  finally:
    r.close()


def _unreadable_shards_message(files: list[str], pattern: str, err: Exception) -> str:
  """Opens each shard alone to name the ones the reader refuses (its own error names none)."""
  bad = []
  for f in files:
    try:
      _num_records(f)
    except Exception as e:  # noqa: BLE001
      msg = str(e)[:200] or 'no message'
      bad.append(f'{f} ({os.path.getsize(f)} bytes: {type(e).__name__}: {msg})')
  if not bad:
    return (f'The ArrayRecord shards matching {pattern} cannot be opened together '
            f'({type(err).__name__}: {err}), though each opens alone. Check the files and the '
            'glob.')
  return (f'{len(bad)} of {len(files)} ArrayRecord shards matching {pattern} are truncated or '
          f'corrupt: {"; ".join(bad[:5])}{" ..." if len(bad) > 5 else ""}. Copy them again or '
          're-pack the image folder (python -m eva_jax.data.pack --src DIR --out OUT); to train '
          'without them, narrow config.data.source to the intact shards.')


_TFDS_SPEC = re.compile(r'^(?P<name>[^:\[]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$')


class TfdsSource:
  """A TFDS dataset prepared as ArrayRecord; images stay encoded (SkipDecoding) for our decoder."""

  unit = 'records'

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


class RelabeledSource:
  """`source` read with its labels renumbered: label i becomes `index_map[i]` (-1 stays -1). Made
  by `align_classes`; `classes` are the names the new labels index."""

  def __init__(self, source, classes: Sequence[str], index_map: Sequence[int]):
    self.source, self.classes, self.index_map = source, list(classes), list(index_map)
    self.name, self.num_classes = source.name, len(self.classes)
    self.unit = getattr(source, 'unit', 'records')

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    item, label = self.source[index]
    return item, self.index_map[label] if label >= 0 else label


def align_classes(source, train, field: str):
  """`source` (an evaluation split) with labels that mean the classes of `train` (the training
  source): each source numbers its own sorted class names (folders, packed folders), so a
  validation folder that lacks a class, or lists one more, would otherwise shift every later label
  onto the wrong class without a sound (torchvision's ImageFolder has the same trap).

  Returns `source` itself when its class names equal the training ones or either side has no
  names (TFDS, video lists: their integer labels are taken as they are). When its names are a
  subset, returns a RelabeledSource that maps each label by name (logged); evaluation then predicts
  among the split's classes only (`split_labels`). ValueError naming `field` when it has classes
  the training source lacks."""
  names = list(getattr(source, 'classes', None) or [])
  classes = list(getattr(train, 'classes', None) or [])
  if not names or not classes or names == classes:
    return source
  known = set(classes)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(
        f'{field}: {source.name} has {len(unknown)} of {len(names)} class names that the training '
        f'source {train.name} ({len(classes)} classes) does not have, e.g. '
        f'{", ".join(map(repr, unknown[:3]))}, so its labels cannot be matched to the head. Name '
        'its class folders as the training ones (then pack it again if it is packed).')
  index = {n: i for i, n in enumerate(classes)}
  moved = [f'{n} {i}->{index[n]}' for i, n in enumerate(names) if i != index[n]]
  logging.getLogger(__name__).warning(
      "%s: %s has %d of the %d training classes; its labels are renumbered by class name to the "
      "training source's (%d moved%s), and predictions are restricted to its %d classes (the "
      "ImageNet-A / -R protocol).", field, source.name, len(names), len(classes), len(moved),
      f': {", ".join(moved[:4])}' + (', ...' if len(moved) > 4 else '') if moved else '',
      len(names))
  return RelabeledSource(source, classes, [index[n] for n in names])


def split_labels(source) -> list[int] | None:
  """The training labels an evaluation split made a subset by `align_classes` holds (sorted), or
  None when it is not one (it has every class, or no class names).

  Evaluation predicts among these classes only: the other logits are excluded before top-1 / top-5,
  the loss and k-NN votes. This is how ImageNet-A and -R (200 of the 1,000 classes) are scored by
  the official EVA fine-tuning evaluation (its imagenet_a_r_indices) and timm's validate.py
  (valid_labels); over the full head their top-1 would also count confusions with classes that
  cannot occur."""
  return sorted(set(source.index_map)) if isinstance(source, RelabeledSource) else None


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


# ------------------------------------------------------------------------ listing fingerprint --

def listing_fingerprint(source) -> dict[str, Any]:
  """What a loader position in `source` refers to: a small JSON-ready dict, equal for two sources
  exactly when the same index reads the same example (as far as can be told without reading).

  The count key is the source's `unit` ('images', 'videos', 'pairs', else 'records'); 'listing' is
  16 hex digits of a sha256. Keys by kind of source (stable: checkpoints record them):
  - listed by path (`paths` [+ `labels`] under `root`: image folders and the demo set, video
    folders and lists): {UNIT: n, 'listing': hash of every (path relative to root, label) in
    order}. The same tree copied elsewhere has the same fingerprint; an added, removed, renamed,
    relabelled or reordered file (or one a link now adds) changes it;
  - image-caption folders (`entries` of (image path or None, caption path) under `root`):
    {'pairs': n, 'listing': hash of the relative (image, caption) paths in order};
  - shards (`files` with `shard_records()`: ArrayRecord, webdataset tars): {UNIT: n, 'shards': k,
    'listing': hash of (shard base name, records in it) in order}, so shards may move;
  - anything else (TFDS): {UNIT: n, 'name': source.name} (TFDS: tfds:NAME[:VERSION]:SPLIT).
  Paths are hashed as UTF-8 (undecodable bytes kept by surrogateescape). Cost: one pass over the
  listing the source already holds (ImageNet's 1.28M paths: about a second); no file is read.
  """
  unit = getattr(source, 'unit', 'records')
  root = getattr(source, 'root', None)
  if root is not None and hasattr(source, 'paths'):
    labels = getattr(source, 'labels', None)
    labels = [-1] * len(source.paths) if labels is None else labels
    return {unit: len(source.paths), 'listing': _digest(
        f'{_relative(p, root)}\t{label}\n' for p, label in zip(source.paths, labels))}
  if root is not None and hasattr(source, 'entries'):
    return {unit: len(source.entries), 'listing': _digest(
        '\t'.join(_relative(p, root) if p else '' for p in entry) + '\n'
        for entry in source.entries)}
  if hasattr(source, 'files') and hasattr(source, 'shard_records'):
    counts = source.shard_records()
    return {unit: int(sum(counts)), 'shards': len(source.files), 'listing': _digest(
        f'{os.path.basename(f)}\t{int(n)}\n' for f, n in zip(source.files, counts))}
  return {unit: len(source), 'name': source.name}


def train_data_fingerprint(sources: Sequence[tuple[Any, float]]) -> dict[str, Any]:
  """Checkpoint meta 'train_data' of a run reading `sources` ((source, weight) pairs, as
  pipeline.open_sources returns them): one source's `listing_fingerprint`, or for a mixture
  {'mixture': [listing_fingerprint + {'weight': w}, ...]} (the weights set the mixed order too)."""
  if len(sources) == 1:
    return listing_fingerprint(sources[0][0])
  return {'mixture': [{**listing_fingerprint(s), 'weight': float(w)} for s, w in sources]}


_EMPTY, _DOT, _DOTDOT = os.sep * 2, f'{os.sep}.{os.sep}', f'{os.sep}..{os.sep}'


def _relative(path: str, root: str) -> str:
  # os.path.relpath normalizes both sides (~10 us a path: 13 s for ImageNet); listed paths are
  # already root + '/' + a normalized tail, so that tail is the relative path.
  prefix = root.rstrip(os.sep) + os.sep
  if path.startswith(prefix):
    tail = path[len(prefix):]
    wrapped = os.sep + tail + os.sep   # normalized: no empty, '.' or '..' component
    if tail and not (_EMPTY in wrapped or _DOT in wrapped or _DOTDOT in wrapped):
      return tail
  return os.path.relpath(path, root)


def _digest(lines: Iterable[str]) -> str:
  h = hashlib.sha256()
  chunk: list[str] = []
  for line in lines:
    chunk.append(line)
    if len(chunk) == 4096:   # one update per chunk: the per-call overhead dominates short lines
      h.update(''.join(chunk).encode('utf-8', 'surrogateescape'))
      chunk = []
  h.update(''.join(chunk).encode('utf-8', 'surrogateescape'))
  return h.hexdigest()[:16]
