r"""Speed of the contrastive (EVA-CLIP) training step: image-text pairs/s, TFLOP/s, MFU, memory.

  PYTHONPATH=. python experiments/clip_benchmark.py --config=clip_demo --config.batch_size=64
  PYTHONPATH=. python experiments/clip_benchmark.py --config=eva01_clip_g14 \
      --config.batch_size=1024 --config.precision=bf16 --config.benchmark.steps=5

Builds exactly what eva-clip runs (eva_jax.benchmark.run_clip); FLOPs from
eva_jax.benchmark.clip_step_flops_per_pair (both towers, 3 x forward, FLIP-kept tokens). Prints
one JSON line.
"""
import json

from absl import flags

from eva_jax.cli import common


def main(argv):
  del argv
  from eva_jax import benchmark
  print(json.dumps(benchmark.run_clip(flags.FLAGS.config), default=str), flush=True)


if __name__ == '__main__':
  from eva_jax import benchmark as _bench
  common.define_config('eva-clip config.', post=_bench.add_benchmark_defaults)
  common.run(main, __doc__, ['config'])
