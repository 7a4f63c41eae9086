"""Measures the real input pipeline; optionally tf.data doing the same work on the same files.

  eva-data-benchmark --config=data_bench [--config.data.workers=2]
      [--config.data.source=folder:/data/train] [--compare_tfdata]

Returns (the command prints as one JSON line): images_per_s (wall clock), images_per_cpu_s (images per CPU-second
of this process and its workers: the per-core rate), workers, threads, cores, and with
--compare_tfdata the same two figures for a tf.data pipeline (read, decode, RandomResizedCrop-style
crop via sample_distorted_bounding_box, bicubic resize, flip, normalize; no mask) on the same files.
"""
from __future__ import annotations

import os
import time

import psutil

from eva_jax.data import pipeline
from eva_jax.data.sources import FolderSource, open_source



def _cpu_seconds() -> float:
  """CPU time of this process and all live descendants (grain workers are children)."""
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.Error:
      pass
  return total


def _time(batches, warmup: int, num: int, batch_size: int) -> dict:
  for _ in range(warmup):
    next(batches)
  cpu0, t0 = _cpu_seconds(), time.perf_counter()
  for _ in range(num):
    next(batches)
  wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
  n = num * batch_size
  return {'images_per_s': round(n / wall, 1), 'images_per_cpu_s': round(n / cpu, 1)}


def _tfdata(paths, cfg) -> dict:
  import tensorflow as tf   # pylint: disable=g-import-not-at-top
  d, size = cfg.data, cfg.image_size
  mean = tf.constant(d.mean, tf.float32) * 255.0
  std = tf.constant(d.std, tf.float32) * 255.0

  def load(path):
    img = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    begin, crop, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(img), tf.zeros([1, 0, 4]), min_object_covered=0.0,
        aspect_ratio_range=tuple(d.ratio), area_range=tuple(d.scale), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    img = tf.slice(img, begin, crop)
    img = tf.image.resize(img, [size, size], method='bicubic', antialias=True)
    img = tf.image.random_flip_left_right(img)
    return (img - mean) / std

  threads = max(1, d.workers) * max(1, d.threads)
  opts = tf.data.Options()
  opts.threading.private_threadpool_size = min(threads, len(os.sched_getaffinity(0)))
  ds = (tf.data.Dataset.from_tensor_slices(paths).shuffle(len(paths), seed=cfg.seed).repeat()
        .map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(cfg.batch_size, drop_remainder=True)
        .prefetch(max(1, d.prefetch)).with_options(opts))
  it = iter(ds.as_numpy_iterator())
  return _time(it, cfg.warmup_batches, cfg.num_batches, cfg.batch_size)


def run(cfg, compare_tfdata: bool = False) -> dict:
  """Times cfg.num_batches batches after cfg.warmup_batches; returns the figures as a dict.
  compare_tfdata: also the equivalent tf.data pipeline (folder and demo sources only; ValueError
  otherwise)."""
  from eva_jax.training import checks
  checks.check_config(cfg, 'data_bench')   # every field range-checked before anything starts
  kw = dict(image_size=cfg.image_size, batch_size=cfg.batch_size, seed=cfg.seed,
            process_index=0, process_count=1)
  if cfg.mode == 'pretrain':
    it = pipeline.build_pretrain_loader(cfg.data, patch_size=cfg.patch_size, **kw)
  else:
    it = pipeline.build_classification_loader(cfg.data, train=True, **kw)
  result = {'mode': cfg.mode, 'source': cfg.data.source if not cfg.data.mixture else 'mixture',
            'image_size': cfg.image_size, 'batch_size': cfg.batch_size,
            'workers': cfg.data.workers,
            'threads': pipeline.read_threads(int(cfg.data.threads), int(cfg.data.workers)),
            'cores': len(os.sched_getaffinity(0))}
  try:
    result.update(_time(it, cfg.warmup_batches, cfg.num_batches, cfg.batch_size))
    result['skipped'] = it.get_state()['skipped']
  finally:
    it.close()     # stop workers/threads before tf.data is timed on the same cores
  if compare_tfdata:
    source = open_source(cfg.data.source, cfg.data)
    if not isinstance(source, FolderSource) or cfg.data.mixture:
      raise ValueError('--compare_tfdata reads image files: use demo or folder: sources.')
    tf_result = _tfdata(source.paths, cfg)
    result['tfdata_images_per_s'] = tf_result['images_per_s']
    result['tfdata_images_per_cpu_s'] = tf_result['images_per_cpu_s']
  return result


if __name__ == '__main__':   # `python -m eva_jax.data.benchmark` = eva-data-benchmark
  from eva_jax.cli.data_benchmark import run as main
  main()
