r"""eva-benchmark: speed of a real training step (compile time, step time, images/s, TFLOP/s,
MFU, memory) on the configured mesh, with synthetic or real input.

  eva-benchmark --config=bench_cpu [--config.benchmark.steps=20 --config.benchmark.input=pipeline]
  eva-benchmark --config=clip_demo          # the EVA-CLIP contrastive step (pairs/s)
  eva-benchmark --config=video_demo         # the video fine-tuning step (clips/s and frames/s)

Accepts a pretraining, EVA-CLIP or video fine-tuning config (the step that command trains), or
config.benchmark.backbone=vitdet for the detection backbone; `config.benchmark` (steps, warmup,
input, compile_only) is added with defaults. Prints a summary line on stderr and one JSON object
last on stdout.
"""
import json
import sys

import jax
from absl import flags

from eva_jax import benchmark
from eva_jax.benchmark import steps
from eva_jax.cli import common


def main(argv):
  del argv
  main_process = jax.process_index() == 0
  if main_process and steps.step_kind(flags.FLAGS.config) == 'pretrain':
    check = benchmark.reference_flops_check()   # the FLOP count behind the pretraining MFU
    print(f"FLOP check: EVA-01 g/14 + CLIP-L/14 @224 = {check['g14_l14_tflop']:.4f} TFLOP/image "
          f"(blocks only {check['g14_l14_blocks_tflop']:.4f}; spec 1.76; rel err "
          f"{check['rel_err']:.2%}) {'OK' if check['rel_err'] < 0.01 else 'MISMATCH'}", flush=True)
  r = benchmark.run(flags.FLAGS.config)
  if not main_process:
    return
  if 'step_s' not in r:
    print(f"compile only: {r['compile_s']:.1f} s (lower {r['lower_s']:.1f} s), "
          f"{(r['peak_bytes_per_device'] or 0) / 2 ** 30:.2f} GiB/device", file=sys.stderr)
  else:
    line = (f"{r['device_kind']} x{r['num_devices']} {r['precision']}: step "
            f"{r['step_s'] * 1e3:.1f} ms (median of {r['steps']}), {_throughput(r)}, "
            f"{r['tflops_per_s_per_device']:.3f} TFLOP/s/device")
    if r['mfu'] is not None:
      line += f", MFU {r['mfu']:.1%}"
    if r.get('matmul_fraction') is not None:   # measured for the pretraining step only
      line += (f", {r['matmul_fraction']:.0%} of this machine's matmul rate "
               f"({r['matmul_tflops_per_s']:.3f} TFLOP/s on the step's shapes)")
    line += f", compile {r['compile_s']:.1f} s"
    if r['peak_bytes_per_device']:
      line += f", peak {r['peak_bytes_per_device'] / 2 ** 30:.2f} GiB/device"
    if 'pipeline_step_s' in r:
      line += (f"; pipeline {r['pipeline_step_s'] * 1e3:.1f} ms/step, prefetched "
               f"{r['pipeline_prefetch_step_s'] * 1e3:.1f} ms/step, data alone "
               f"{r['data_batch_s'] * 1e3:.1f} ms/batch")
    print(line, file=sys.stderr, flush=True)
  print(json.dumps(r), flush=True)


def _throughput(r: dict) -> str:
  """The step's own unit: clips (and frames) for video, image-text pairs for EVA-CLIP."""
  if 'clips_per_s' in r:
    return f"{r['clips_per_s']:.1f} clips/s ({r['images_per_s']:.1f} frames/s)"
  if 'pairs_per_s' in r:
    return f"{r['pairs_per_s']:.1f} pairs/s"
  return f"{r['images_per_s']:.1f} img/s"


def run():
  common.define_config('Pretraining, EVA-CLIP or video fine-tuning config.',
                       post=benchmark.add_benchmark_defaults, kind='pretrain')
  common.run(main, __doc__, ['config'])


if __name__ == '__main__':
  run()
