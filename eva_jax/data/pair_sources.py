"""Image-text pair sources: index -> `Pair(image bytes | None, caption bytes | None, key)`.

  webdataset:PATTERN    tar shards as img2dataset writes them: {key}.jpg|png|webp + {key}.txt
                        [+ {key}.json, ignored]. PATTERN: a path, a glob, a brace pattern
                        (shard-{00000..00009}.tar), a folder of *.tar, several joined by '::'.
                        Members are indexed once per shard (tar headers only) and read with
                        os.pread, so access is random and thread-safe.
  arrayrecord:GLOB|DIR  pairs packed by `eva_jax.data.pack.pack_pairs` (eva-pack --pairs).
  folder:DIR            image files anywhere under DIR, each with a same-named .txt beside it.
  demo[:train|val]      the captioned demo photos (eva_jax.data.demo.ensure_demo_pairs).

Sources only read bytes; checking, decoding and counting bad pairs is `eva_jax.data.pairs`'s job.
Every source is picklable (grain ships sources to worker processes).
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from typing import NamedTuple, Sequence

import msgpack
import numpy as np

from eva_jax.data.sources import IMAGE_EXTENSIONS, ArrayRecordSource, FolderSource

_IMAGE_EXTS = tuple(e.lstrip('.') for e in IMAGE_EXTENSIONS)


class Pair(NamedTuple):
  image: bytes | None
  text: bytes | None
  key: str


class BadPairError(ValueError):
  """A pair that cannot be used; `kind` is one of SKIP_KINDS."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


def expand_braces(pattern: str) -> list[str]:
  """'a-{000..002}.tar' -> ['a-000.tar', 'a-001.tar', 'a-002.tar']; '{x,y}' alternatives too
  (nested and several groups), as webdataset's braceexpand. Zero padding follows the first bound."""
  m = re.search(r'\{([^{}]*)\}', pattern)
  if not m:
    return [pattern]
  body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
  r = re.fullmatch(r'(\d+)\.\.(\d+)', body)
  if r:
    lo, hi = int(r.group(1)), int(r.group(2))
    width = len(r.group(1))
    step = 1 if hi >= lo else -1
    options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
  else:
    options = body.split(',')
  return [p for o in options for p in expand_braces(head + o + tail)]


def shard_paths(spec: str | Sequence[str]) -> list[str]:
  """Tar shard paths named by a list, '::'-joined patterns, globs, brace patterns or folders.
  Raises FileNotFoundError naming the pattern when a part matches nothing."""
  parts = spec.split('::') if isinstance(spec, str) else list(spec)
  out = []
  for part in parts:
    part = os.path.expanduser(part)
    if os.path.isdir(part):
      found = sorted(glob.glob(os.path.join(part, '*.tar')))
    else:
      found = [f for p in expand_braces(part)
               for f in (sorted(glob.glob(p)) if glob.has_magic(p) else [p])]
      missing = [f for f in found if not os.path.isfile(f)]
      if missing:
        raise FileNotFoundError(f'webdataset shard {missing[0]} (from {part}) does not exist; '
                                f'{len(missing)} of {len(found)} shards missing.')
    if not found:
      raise FileNotFoundError(f'No webdataset .tar shards match {part}. Give a path, glob, folder '
                              'or brace pattern such as shards/{00000..00009}.tar.')
    out.extend(found)
  return out


def _split_key(name: str) -> tuple[str, str]:
  """webdataset's rule: the key is the path up to the first '.' of the file name."""
  d, base = os.path.split(name)
  stem, _, ext = base.partition('.')
  return os.path.join(d, stem), ext.lower()


class WebDatasetSource:
  """Pairs in webdataset tar shards, indexed once (headers only) and read by offset.

  The index (offsets and keys, ~100 bytes a pair) is built when the source is opened, reading every
  tar header once; for hundreds of millions of pairs or slow file systems, pack the shards to
  ArrayRecord once (`eva-pack --pairs`) instead."""

  unit = 'pairs'   # what sources.listing_fingerprint counts

  def __init__(self, spec: str | Sequence[str]):
    self.files = shard_paths(spec)
    self.name = f'webdataset:{spec if isinstance(spec, str) else "::".join(spec)}'
    shard, img_off, img_len, txt_off, txt_len, keys = [], [], [], [], [], []
    for s, path in enumerate(self.files):
      try:
        members = _tar_members(path)
      except (tarfile.TarError, OSError) as e:
        raise ValueError(f'webdataset shard {path} is not a readable tar file ({e}); copy it '
                         'again or leave it out of the pattern.') from e
      for key, exts in members.items():
        img = next((exts[e] for e in _IMAGE_EXTS if e in exts), (-1, -1))
        txt = exts.get('txt', (-1, -1))
        shard.append(s)
        keys.append(key)
        img_off.append(img[0]), img_len.append(img[1])
        txt_off.append(txt[0]), txt_len.append(txt[1])
    if not keys:
      raise ValueError(f'The webdataset shards {self.files[:3]} hold no samples.')
    # numpy, not lists of Python objects: compact, and cheap to pickle into grain's workers.
    self.keys = np.asarray(keys)
    self._shard = np.asarray(shard, np.int32)
    self._img = np.asarray([img_off, img_len], np.int64).T
    self._txt = np.asarray([txt_off, txt_len], np.int64).T

  def __len__(self) -> int:
    return len(self.keys)

  def shard_records(self) -> list[int]:
    """Pairs per shard (of `files`, in order)."""
    return np.bincount(self._shard, minlength=len(self.files)).tolist()

  def _read(self, s: int, off: int, n: int) -> bytes | None:
    if off < 0:
      return None
    # Opened per read (~10 us, small next to a JPEG decode): no descriptor limit with thousands of
    # shards, nothing shared between grain's reader threads.
    fd = os.open(self.files[s], os.O_RDONLY)
    try:
      data = os.pread(fd, int(n), int(off))
    finally:
      os.close(fd)
    if len(data) != n:
      raise OSError(f'shard {self.files[s]} is truncated at byte {off + len(data)}')
    return data

  def __getitem__(self, index: int) -> Pair:
    s = int(self._shard[index])
    return Pair(self._read(s, *self._img[index]), self._read(s, *self._txt[index]),
                f'{self.files[s]}:{self.keys[index]}')


def _tar_members(path: str) -> dict[str, dict[str, tuple[int, int]]]:
  """{key: {ext: (data offset, size)}} of the regular files of one tar, in archive order."""
  out: dict[str, dict[str, tuple[int, int]]] = {}
  with tarfile.open(path, 'r:') as tf:
    for m in tf:
      if m.isfile():
        key, ext = _split_key(m.name)
        out.setdefault(key, {}).setdefault(ext, (m.offset_data, m.size))
  return out


class PairFolderSource:
  """Images under `root` (recursively, links as `FolderSource` follows them), each paired with the
  same-named .txt; a .txt without an image is listed too and reported as 'missing_image'."""

  unit = 'pairs'

  def __init__(self, root: str):
    self.root = os.path.abspath(os.path.expanduser(root))
    self.name = f'folder:{self.root}'
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f'Pair folder {self.root} does not exist. Point folder: at images '
                              'with same-named .txt captions, or use the bundled demo pairs '
                              '(demo, demo:val).')
    images = FolderSource(self.root).paths
    # (image path or None, caption path): captions without an image are counted when read.
    self.entries = [(p, os.path.splitext(p)[0] + '.txt') for p in images]
    paired = {t for _, t in self.entries}
    self.entries += sorted((None, os.path.join(d, f))
                           for d, _, files in os.walk(self.root, followlinks=True)
                           for f in files if f.endswith('.txt')
                           and os.path.join(d, f) not in paired)

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, index: int) -> Pair:
    image, text = self.entries[index]
    return Pair(_read_file(image) if image else None, _read_file(text), image or text)


def _read_file(path: str) -> bytes | None:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except FileNotFoundError:
    return None


def encode_pair(image: bytes | None, text: bytes | None, key: str = '') -> bytes:
  """The packed pair record: msgpack {'image': bytes|None, 'text': bytes|None, 'key': str}. The
  caption stays the raw bytes so a bad encoding is still counted when read."""
  return msgpack.packb({'image': image, 'text': text, 'key': key}, use_bin_type=True)


class PairArrayRecordSource(ArrayRecordSource):
  """ArrayRecord shards of `encode_pair` records (eva-pack --pairs). The same shards read as
  unlabeled images through the image source arrayrecord:, e.g. for MIM pretraining."""

  unit = 'pairs'

  def __getitem__(self, index: int) -> Pair:
    try:
      record = self._ds[index]
    except Exception as e:  # noqa: BLE001 - a corrupt chunk: skipped and counted as unreadable
      raise OSError(f'unreadable ArrayRecord record {index} of {self.name} '
                    f'({type(e).__name__}: {e})') from e
    is_map = bool(record) and (0x80 <= record[0] <= 0x8f or record[0] in (0xde, 0xdf))
    rec = msgpack.unpackb(record, raw=False) if is_map else None
    if not isinstance(rec, dict) or 'text' not in rec:
      raise BadPairError('missing_text', f'record {index} of {self.name} holds no caption (packed '
                         'with eva-pack without --pairs?)')
    return Pair(rec.get('image'), rec.get('text'), rec.get('key') or f'{self.name}[{index}]')


def open_pair_source(spec: str, data_cfg=None):
  """The pair source named by `spec` (see the module docstring); ValueError for an unknown one."""
  kind, _, arg = spec.partition(':')
  if kind == 'demo' and arg in ('', 'train', 'val'):
    from eva_jax.data import demo   # pylint: disable=g-import-not-at-top
    cache = data_cfg.get('cache_dir', '') if data_cfg is not None else ''
    return PairFolderSource(os.path.join(demo.ensure_demo_pairs(cache), arg or 'train'))
  if kind == 'webdataset' and arg:
    return WebDatasetSource(arg)
  if kind == 'folder' and arg:
    return PairFolderSource(arg)
  if kind == 'arrayrecord' and arg:
    return PairArrayRecordSource(arg)
  raise ValueError(f'Unknown image-text source "{spec}". Use demo[:train|val], '
                   'webdataset:PATTERN, folder:DIR or arrayrecord:GLOB.')


def write_webdataset(pairs, out_dir: str, name: str = 'shard', pairs_per_shard: int = 1000,
                     image_ext: str = 'jpg') -> list[str]:
  """Writes (key, image bytes | None, caption bytes | str | None) triples as img2dataset does:
  OUT/NAME-00000.tar ... holding {key}.{image_ext}, {key}.txt, {key}.json ({'key', 'caption'}).
  A None part is left out (how a broken download looks). Returns the shard paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths, tf, count = [], None, 0
  for key, image, caption in pairs:
    if tf is None or count == pairs_per_shard:
      if tf is not None:
        tf.close()
        os.replace(paths[-1] + '.tmp', paths[-1])
      paths.append(os.path.join(out_dir, f'{name}-{len(paths):05d}.tar'))
      tf, count = tarfile.open(paths[-1] + '.tmp', 'w', format=tarfile.PAX_FORMAT), 0
    text = caption.encode('utf-8') if isinstance(caption, str) else caption
    meta = {'key': key, 'caption': caption if isinstance(caption, str) else None}
    for ext, data in ((image_ext, image), ('txt', text),
                      ('json', json.dumps(meta).encode('utf-8'))):
      if data is not None:
        info = tarfile.TarInfo(f'{key}.{ext}')
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    count += 1
  if tf is not None:
    tf.close()
    os.replace(paths[-1] + '.tmp', paths[-1])
  return paths
