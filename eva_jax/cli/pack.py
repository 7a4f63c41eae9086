r"""eva-pack: packs an image folder into ArrayRecord shards for fast random access.

  eva-pack --src=DIR --out=DIR [--name=train] [--images_per_shard=10000]
  eva-pack --pairs --src=webdataset:SHARDS|folder:DIR --out=DIR   (image-text pairs)

Labels come from class sub-folders exactly as the folder: source assigns them; read the shards back
with data.source=arrayrecord:OUT (for pairs, through eva_jax.data.pairs). Prints a JSON line.
"""
import json
import os

from absl import flags

from eva_jax.cli import common
from eva_jax.data import pack


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.pairs and not os.path.isdir(os.path.expanduser(f.src)):
    raise FileNotFoundError(f'--src={f.src} is not a folder: give the image folder to pack (one '
                            'sub-folder per class).')
  if f.pairs:
    meta = pack.pack_pairs(f.src, f.out, f.name, f.images_per_shard)
  else:
    meta = pack.pack_folder(f.src, f.out, f.name, f.images_per_shard)
  print(json.dumps({k: meta[k] for k in ('num_records', 'num_shards')}
                   | {'num_classes': len(meta['classes']), 'out': os.path.abspath(f.out)}))


def run():
  flags.DEFINE_string('src', None, 'Image folder (class sub-folders = labels).')
  flags.DEFINE_string('out', None, 'Output folder for the shards.')
  flags.DEFINE_string('name', 'train', 'Shard file prefix, e.g. train or val.')
  flags.DEFINE_integer('images_per_shard', 10_000, 'Records per shard.')
  flags.DEFINE_bool('pairs', False, 'Pack image-text pairs: --src is webdataset:PATTERN or '
                    'folder:DIR (images with same-named .txt captions).')
  flags.mark_flag_as_required('src')
  flags.mark_flag_as_required('out')
  common.run(main, __doc__, ['src', 'out', 'name', 'images_per_shard', 'pairs'])


if __name__ == '__main__':
  run()
