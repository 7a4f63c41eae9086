"""Packs an image folder (or image-text pairs) into ArrayRecord shards for fast random access.

  eva-pack --src=DIR --out=DIR [--name=train] [--images_per_shard=10000]
  eva-pack --pairs --src=webdataset:PATTERN|folder:DIR --out=DIR    (see pack_pairs)

Writes OUT/NAME-00000-of-0000N.array_record (records: msgpack {'image': original encoded bytes,
'label': class index or -1}) and OUT/NAME-meta.json (classes, count). Labels come from class
sub-folders exactly as the folder: source assigns them. Read back with source=arrayrecord:OUT.
Files are copied as they are: undecodable ones are skipped (and counted) by the loader later.
"""
from __future__ import annotations

import glob
import json
import math
import os

from array_record.python.array_record_module import ArrayRecordWriter
import tqdm

from eva_jax.data.sources import ARRAYRECORD_SUFFIX, META_SUFFIX, FolderSource, encode_record


def check_out(out: str, name: str, per_shard: int) -> None:
  """ValueError for a shard size below 1, or an `out` that already holds a pack NAME (its shards
  or NAME-meta.json): packing over it would replace some shards and leave others, which readers
  would mix (sources.check_shard_sets); nothing saved is overwritten."""
  if per_shard < 1:
    raise ValueError(f'--images_per_shard={per_shard}: a shard holds at least one record.')
  old = glob.glob(os.path.join(glob.escape(out), f'{glob.escape(name)}-*-of-*{ARRAYRECORD_SUFFIX}'))
  if old or os.path.exists(os.path.join(out, name + META_SUFFIX)):
    raise ValueError(f'{out} already holds a pack named {name!r} ({len(old)} shards): choose '
                     'another --out or --name, or delete those files first.')


def pack_folder(src: str, out: str, name: str = 'train', images_per_shard: int = 10_000,
                progress: bool = True) -> dict:
  """Packs `src` into shards under `out`; returns the metadata written to NAME-meta.json.
  Raises ValueError where `out` already holds a pack NAME (check_out) and FileNotFoundError /
  ValueError for a missing or image-less `src` (sources.FolderSource)."""
  check_out(out, name, images_per_shard)
  folder = FolderSource(src)
  os.makedirs(out, exist_ok=True)
  n = len(folder)
  num_shards = max(1, math.ceil(n / images_per_shard))
  bar = tqdm.tqdm(total=n, unit='img', desc=f'packing {folder.root}', disable=not progress)
  for s in range(num_shards):
    path = os.path.join(out, f'{name}-{s:05d}-of-{num_shards:05d}{ARRAYRECORD_SUFFIX}')
    # group_size:1 makes every record its own chunk: what random access (grain) needs.
    writer = ArrayRecordWriter(path + '.tmp', 'group_size:1')
    for i in range(s * n // num_shards, (s + 1) * n // num_shards):
      data, label = folder[i]
      writer.write(encode_record(data, label))
      bar.update(1)
    writer.close()
    os.replace(path + '.tmp', path)   # a crash never leaves a shard that looks complete
  bar.close()
  meta = {'source': folder.root, 'num_records': n, 'num_shards': num_shards,
          'classes': folder.classes}
  with open(os.path.join(out, name + META_SUFFIX), 'w') as f:
    json.dump(meta, f, indent=1)
  return meta


def pack_pairs(src: str, out: str, name: str = 'train', pairs_per_shard: int = 10_000,
               progress: bool = True) -> dict:
  """Packs image-text pairs into ArrayRecord shards under `out`; read them back as the pair source
  arrayrecord:OUT. Records: `pair_sources.encode_pair` (msgpack {'image', 'text', 'key'}). `src`
  is a pair source spec (webdataset:PATTERN, folder:DIR; a bare directory means folder:DIR).
  Pairs are copied as they are, bad ones included: the loader skips and counts them by kind.
  Returns the metadata written to NAME-meta.json (kind 'pairs', record and shard counts)."""
  from eva_jax.data import pair_sources   # pylint: disable=g-import-not-at-top
  check_out(out, name, pairs_per_shard)
  spec = f'folder:{src}' if os.path.isdir(os.path.expanduser(src)) else src
  source = pair_sources.open_pair_source(spec)
  os.makedirs(out, exist_ok=True)
  n = len(source)
  num_shards = max(1, math.ceil(n / pairs_per_shard))
  bar = tqdm.tqdm(total=n, unit='pair', desc=f'packing {source.name}', disable=not progress)
  unreadable = 0
  for s in range(num_shards):
    path = os.path.join(out, f'{name}-{s:05d}-of-{num_shards:05d}{ARRAYRECORD_SUFFIX}')
    writer = ArrayRecordWriter(path + '.tmp', 'group_size:1')
    for i in range(s * n // num_shards, (s + 1) * n // num_shards):
      try:
        pair = source[i]
      except OSError:   # a truncated shard member: packed as a pair without data, counted
        unreadable += 1
        pair = pair_sources.Pair(None, None, f'{source.name}[{i}]')
      writer.write(pair_sources.encode_pair(*pair))
      bar.update(1)
    writer.close()
    os.replace(path + '.tmp', path)
  bar.close()
  meta = {'source': source.name, 'kind': 'pairs', 'num_records': n, 'num_shards': num_shards,
          'unreadable': unreadable, 'classes': []}
  with open(os.path.join(out, name + META_SUFFIX), 'w') as f:
    json.dump(meta, f, indent=1)
  return meta


if __name__ == '__main__':   # `python -m eva_jax.data.pack` = eva-pack
  from eva_jax.cli.pack import run
  run()
