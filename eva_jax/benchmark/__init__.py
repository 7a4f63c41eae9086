r"""Speed of the real EVA steps: compile time, step time, images/s, TFLOP/s, MFU, memory.

  eva-benchmark --config=bench_cpu            (or python -m eva_jax.benchmark)

Modules (every public name is re-exported here, e.g. `eva_jax.benchmark.run`):
  steps    the timed runs behind eva-benchmark: pretraining (synthetic or real input), the ViTDet
           backbone, contrastive and video steps; what is timed and how (its docstring)
  flops    analytic FLOP counts per image / pair / clip (the MFU numerator; EVA-SPEC formulas)
  machine  dense bf16 peaks per device kind, the matmul rate on a step's own shapes, memory
  hlo      op and collective summaries of lowered (StableHLO) and compiled (HLO) programs
"""
from eva_jax.benchmark.flops import (
    tokens, forward_flops, teacher_forward_flops, step_flops_per_image, reference_flops_check,
    vitdet_forward_flops, clip_step_flops_per_pair, video_step_flops_per_clip)
from eva_jax.benchmark.hlo import (
    HOST_TRANSFER_OPS, COLLECTIVES, stablehlo_summary, hlo_collectives,
    collective_bytes_per_step)
from eva_jax.benchmark.machine import (
    PEAK_TFLOPS, peak_tflops, memory_stats, device_peak_bytes, matmul_block, matmul_rate)
from eva_jax.benchmark.steps import (
    benchmark_defaults, add_benchmark_defaults, synthetic_host_batch, vitdet_config_from,
    backbone_step, run_backbone, run, run_clip, run_video)

__all__ = [
    'tokens',
    'forward_flops',
    'teacher_forward_flops',
    'step_flops_per_image',
    'reference_flops_check',
    'vitdet_forward_flops',
    'clip_step_flops_per_pair',
    'video_step_flops_per_clip',
    'HOST_TRANSFER_OPS',
    'COLLECTIVES',
    'stablehlo_summary',
    'hlo_collectives',
    'collective_bytes_per_step',
    'PEAK_TFLOPS',
    'peak_tflops',
    'memory_stats',
    'device_peak_bytes',
    'matmul_block', 'matmul_rate',
    'benchmark_defaults',
    'add_benchmark_defaults',
    'synthetic_host_batch',
    'vitdet_config_from',
    'backbone_step',
    'run_backbone',
    'run',
    'run_clip',
    'run_video',
]
