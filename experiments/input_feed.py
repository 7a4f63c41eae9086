r"""Does the input pipeline starve the step? The pretraining loop fed by the real pipeline (decode,
RandomResizedCrop, flip, BEiT block mask, normalize; grain workers) against the same compiled step on
a device-resident synthetic batch, and what feeding one H100 at 50% MFU takes in CPU cores.

  python experiments/input_feed.py                       # bench_cpu step, workers 0 and 2, ~3 min
  python experiments/input_feed.py --workers=0,2,4 --steps=20 --source=folder:/data/imagenet/train

1. Step: `eva_jax.benchmark.run` on `--config` (default configs/bench_cpu.py) with
   benchmark.input='pipeline': the median synthetic step, then the step fed through the training
   loop's device-prefetch thread (`training/prefetch.py`, what eva-pretrain runs) and synchronously
   (prefetch 0). Ratio = fed images/s / synthetic images/s (1.0 = the input is hidden).
2. Feed rate at the GPU's image size (224 px, EVA-01 geometry): `eva_jax.data.benchmark.run` on
   configs/data_bench.py, images per CPU-second of this process and its workers (the per-core rate)
   for our grain pipeline and for the tf.data equivalent it builds (`--compare_tfdata`: same files,
   decode, crop, bicubic resize, flip, normalize; no mask).
3. Need: one H100 at 50% MFU on the EVA-01 g/14 + CLIP-L/14 step = 989e12 x 0.5 / 1.7663e12
   = 280 images/s (`--mfu`, `--peak`), and the cores that takes at the measured per-core rate.

On a shared machine every figure is noisy (other jobs take cores): read the ratio, not the
absolute numbers, and rerun in a quiet period.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def step_record(config: str, workers: int, steps: int, warmup: int, source: str) -> dict:
  from eva_jax import benchmark, configs
  cfg = configs.get(config)
  cfg.data.workers = workers
  cfg.data.source = source
  cfg.benchmark.input = 'pipeline'
  cfg.benchmark.steps, cfg.benchmark.warmup = steps, warmup
  r = benchmark.run(cfg)
  return {'workers': workers, 'batch': cfg.batch_size, 'image_size': cfg.image_size,
          'synthetic_images_per_s': r['images_per_s'],
          'fed_images_per_s': r['pipeline_prefetch_images_per_s'],
          'fed_sync_images_per_s': r['pipeline_images_per_s'],
          'data_alone_images_per_s': cfg.batch_size / r['data_batch_s'],
          'ratio': r['pipeline_prefetch_images_per_s'] / r['images_per_s'],
          'ratio_sync': r['pipeline_images_per_s'] / r['images_per_s']}


def feed_record(image_size: int, workers: int, batches: int, source: str) -> dict:
  from eva_jax import configs
  from eva_jax.data import benchmark as data_benchmark
  cfg = configs.get('data_bench')
  cfg.data.source = source
  cfg.image_size, cfg.data.workers, cfg.num_batches = image_size, workers, batches
  cfg.batch_size = 32
  return data_benchmark.run(cfg, compare_tfdata=True)


def main():
  from eva_jax import host_memory
  host_memory.keep_step_buffers_resident()   # as eva-benchmark does: before jax starts
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='bench_cpu')
  ap.add_argument('--workers', default='0,2')
  ap.add_argument('--source', default='demo',
                  help='demo (small crops: decoding is cheap) or folder:/path/to/train (real JPEGs)')
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument('--feed_image_size', type=int, default=224)
  ap.add_argument('--feed_batches', type=int, default=10)
  ap.add_argument('--peak', type=float, default=989.0, help='H100 SXM dense bf16 TFLOP/s')
  ap.add_argument('--mfu', type=float, default=0.5)
  a = ap.parse_args()
  from eva_jax import benchmark
  from eva_jax.models import config as model_config
  per_image = benchmark.step_flops_per_image(model_config.encoder_config('g/14'),
                                             model_config.teacher_config('clip-L/14'))['total']
  need = a.peak * 1e12 * a.mfu / per_image
  cores = os.cpu_count()
  print(f'{cores} cores on this machine; load average {os.getloadavg()[0]:.1f} '
        '(other jobs share them: figures are noisy)')
  steps = [step_record(a.config, int(w), a.steps, a.warmup, a.source) for w in a.workers.split(',')]
  print(f'\n1. {a.config} step fed by the real pipeline vs a synthetic batch')
  print('| workers | synthetic img/s | fed (prefetch thread) img/s | ratio | fed, no prefetch img/s '
        '| ratio | pipeline alone img/s |')
  print('|---|---|---|---|---|---|---|')
  for s in steps:
    print(f"| {s['workers']} | {s['synthetic_images_per_s']:.1f} | {s['fed_images_per_s']:.1f} | "
          f"{s['ratio']:.3f} | {s['fed_sync_images_per_s']:.1f} | {s['ratio_sync']:.3f} | "
          f"{s['data_alone_images_per_s']:.1f} |")
  feeds = [feed_record(a.feed_image_size, int(w), a.feed_batches, a.source) for w in a.workers.split(',')]
  print(f'\n2. Feed rate at {a.feed_image_size} px (pretraining transform, batch 32, {a.source})')
  print('| workers | ours img/s | ours img per CPU-s | tf.data img/s | tf.data img per CPU-s |')
  print('|---|---|---|---|---|')
  for f in feeds:
    print(f"| {f['workers']} | {f['images_per_s']:.1f} | {f['images_per_cpu_s']:.1f} | "
          f"{f['tfdata_images_per_s']:.1f} | {f['tfdata_images_per_cpu_s']:.1f} |")
  best = max(f['images_per_cpu_s'] for f in feeds)
  best_tf = max(f['tfdata_images_per_cpu_s'] for f in feeds)
  print(f'\n3. One H100 at {a.mfu:.0%} MFU on EVA-01 g/14 + CLIP-L/14 ({per_image / 1e12:.4f} '
        f'TFLOP/image): {need:.0f} images/s = {need / best:.1f} cores of ours at {best:.1f} '
        f'img/core-s ({need / best_tf:.1f} of tf.data at {best_tf:.1f}); 8 GPUs per host: '
        f'{8 * need / best:.0f} cores.')
  print(json.dumps({'steps': steps, 'feeds': feeds, 'need_images_per_s': need,
                    'cores_per_gpu': need / best, 'cores_per_gpu_tfdata': need / best_tf}))


if __name__ == '__main__':
  main()
