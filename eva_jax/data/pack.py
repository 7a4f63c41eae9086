"""Packs an image folder into ArrayRecord shards for fast random access.

  eva-pack --src=DIR --out=DIR [--name=train] [--images_per_shard=10000]

Writes OUT/NAME-00000-of-0000N.array_record (records: msgpack {'image': original encoded bytes,
'label': class index or -1}) and OUT/NAME-meta.json (classes, count). Labels come from class
sub-folders exactly as the folder: source assigns them. Read back with source=arrayrecord:OUT.
Files are copied as they are: undecodable ones are skipped (and counted) by the loader later.
"""
from __future__ import annotations

import json
import math
import os

from array_record.python.array_record_module import ArrayRecordWriter
import tqdm

from eva_jax.data.sources import ARRAYRECORD_SUFFIX, META_SUFFIX, FolderSource, encode_record


def pack_folder(src: str, out: str, name: str = 'train', images_per_shard: int = 10_000,
                progress: bool = True) -> dict:
  """Packs `src` into shards under `out`; returns the metadata written to NAME-meta.json."""
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


if __name__ == '__main__':   # `python -m eva_jax.data.pack` = eva-pack
  from eva_jax.cli.pack import run
  run()
