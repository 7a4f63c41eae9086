r"""Speed of the real EVA pretraining step: compile time, step time, images/s, TFLOP/s, MFU, memory.

  eva-benchmark --config=bench_cpu
  eva-benchmark --config=eva01_l14_pretrain:bf16 --config.batch_size=64 \
      --config.model.attention=cudnn --config.model.remat=dots --config.benchmark.steps=20
  eva-benchmark --config=bench_cpu --config.benchmark.input=pipeline

It builds exactly what eva-pretrain runs (`eva_jax.training.pretrain.build`: student + frozen
teacher + optimizer, the configured mesh, sharding and precision), compiles the train step ahead of
time (`compile_s` = lower + XLA compile, nothing executed), then runs it `benchmark.warmup` times
untimed and `benchmark.steps` times timed on a device-resident synthetic batch (random normalized
images, BEiT block masks from the configured mask generator). Every timed step ends with
`block_until_ready`; `step_s` is the median. `step_s_async` is the mean over the same number of
steps dispatched back to back (what the training loop sees). `matmul_fraction` is the achieved
TFLOP/s per device over the machine's matmul rate measured on the step's own shapes
(`matmul_rate`: one block's weight matmuls at batch x tokens rows, compute dtype), so it says how
close the step is to matmul-bound on any machine, CPU included. With `benchmark.input=pipeline`, the
step is also timed fed by the real input pipeline (`build_pretrain_loader` + `host_to_global`, as
in training), once synchronously and once through `eva_jax.training.prefetch`.
`benchmark.compile_only=True` stops after the compile (compile time and XLA's memory analysis, no
execution: e.g. g/14 on a CPU). The last output line is one JSON object. `step_cpu_s` is the process
CPU time per step (all threads), a load-independent measure of work on a shared CPU machine.

Memory: `peak_bytes_per_device` is the device's `peak_bytes_in_use` where the backend reports it
(GPU/TPU), else XLA's compiled memory analysis: arguments + non-aliased outputs + temporaries
(XLA:CPU's own `peak_memory_in_bytes` leaves the temporaries out).

FLOP count (EVA-SPEC "Compute per image"; a multiply-add is 2 FLOPs; T tokens incl. cls, d width,
f MLP hidden, L layers):
  forward per layer      8·T·d² + 4·T·d·f + 4·T²·d      (SwiGLU: 6·T·d·f instead of 4·T·d·f)
  patch embedding        2·N·(p²·3)·d                     (N = T - 1 patches)
  heads                  student lm_head 2·N·d·out; teacher projection 2·N·d·out (CLIP proj,
                         EVA-CLIP head; none for SigLIP / DINOv2)
  step per image         3 x student forward (forward + backward) + 1 x teacher forward (any
                         family: its own T with cls/registers, at the size config.teacher.grid
                         feeds it); MFU counts the teacher.
Remat recomputation, LayerNorms, softmax, GELU and the optimizer are not counted (MFU convention).
EVA-01 g/14 + CLIP-L/14 at 224: blocks only 1.7626 TFLOP/image (the spec's 1.76), with patch
embedding and heads (x3 for the student) 1.7663. EVA-02 L/14 + EVA-CLIP g/14: blocks only
0.4851 + 0.5336 = 1.0187 (the spec's 0.486 + 0.534 = 1.02). `tflops_per_step` = per-image x global batch;
MFU divides the achieved TFLOP/s per device by the dense bf16 peak of the device kind (table
below; null on CPU/unknown), also for fp32 runs.

Modules: `steps` (the runs above), `flops` (FLOP counts), `machine` (peaks, matmul rate, memory),
`hlo` (lowered / compiled program summaries). Everything is re-exported here.
"""
from eva_jax.benchmark.flops import (
    tokens, forward_flops, teacher_forward_flops, step_flops_per_image, reference_flops_check,
    vitdet_forward_flops, clip_step_flops_per_pair, video_step_flops_per_clip)
from eva_jax.benchmark.hlo import (
    HOST_TRANSFER_OPS, COLLECTIVES, stablehlo_summary, hlo_collectives,
    collective_bytes_per_step)
from eva_jax.benchmark.machine import (
    PEAK_TFLOPS, peak_tflops, memory_stats, device_peak_bytes, matmul_rate)
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
    'matmul_rate',
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
