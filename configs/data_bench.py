"""Input-pipeline throughput benchmark.

  python -m eva_jax.data.benchmark --config=configs/data_bench.py [--compare_tfdata]

Override anything, e.g. --config.data.workers=4 --config.data.source=folder:/data/imagenet/train.
"""
import ml_collections

from eva_jax.data.config import default_data_config


def get_config():
  c = ml_collections.ConfigDict()
  c.data = default_data_config()
  c.mode = 'pretrain'          # 'pretrain' (flip + RRC + mask) or 'classify' (RRC + RandAugment)
  c.image_size = 224
  c.patch_size = 14
  c.batch_size = 64            # per host
  c.warmup_batches = 3         # not timed: worker start-up, file cache warm-up
  c.num_batches = 30
  c.seed = 0
  return c
