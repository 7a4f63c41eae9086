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
steps dispatched back to back (what the training loop sees). With `benchmark.input=pipeline`, the
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
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

# Dense bf16 peak TFLOP/s per chip (EVA-SPEC), matched against jax's device_kind (lower case);
# the first matching entry wins, so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ('h100 pcie', 756.0),
    ('h100', 989.0),
    ('h200', 989.0),
    ('gh200', 989.0),
    ('a100', 312.0),
    ('tpu v4', 275.0),
    ('tpu v5 lite', 197.0),
    ('tpu v5e', 197.0),
    ('tpu v5p', 459.0),
    ('tpu v5', 459.0),
    ('tpu v6 lite', 918.0),
    ('tpu v6e', 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  if 'cpu' in kind:
    return None
  for name, peak in PEAK_TFLOPS:
    if name in kind:
      return peak
  return None


def benchmark_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      steps=10,            # timed steps (median reported)
      warmup=2,            # untimed steps after compilation
      input='synthetic',   # 'synthetic' | 'pipeline' (also time the step fed by the input pipeline)
      compile_only=False,  # True: AOT lower + compile and memory analysis only, nothing executed
  ))


def add_benchmark_defaults(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds config.benchmark (or its missing fields) to a pretraining config."""
  with cfg.unlocked():
    if 'benchmark' not in cfg:
      cfg.benchmark = benchmark_defaults()
    else:
      for k, v in benchmark_defaults().items():
        if k not in cfg.benchmark:
          cfg.benchmark[k] = v
  return cfg


# ------------------------------------------------------------------------------------------------
# FLOPs
def tokens(cfg, image_size: int | None = None) -> int:
  """Tokens of one image: patches + cls + registers (DINOv2)."""
  n = ((image_size or cfg.image_size) // cfg.patch_size) ** 2
  return n + (1 if cfg.get('class_token', True) else 0) + int(cfg.get('registers', 0))


def forward_flops(cfg, head_dim_out: int = 0, with_embed: bool = True,
                  image_size: int | None = None) -> float:
  """Forward FLOPs per image of one tower (see module docstring) at `image_size` (default: the
  config's)."""
  t, d, f, depth = tokens(cfg, image_size), cfg.width, cfg.mlp_dim, cfg.depth
  mlp = 6 * t * d * f if cfg.get('swiglu', False) else 4 * t * d * f
  total = depth * (8 * t * d * d + mlp + 4 * t * t * d)
  if with_embed:
    n = ((image_size or cfg.image_size) // cfg.patch_size) ** 2
    total += 2 * n * cfg.patch_size ** 2 * cfg.get('in_chans', 3) * d
    if head_dim_out:
      total += 2 * n * d * head_dim_out
  return float(total)


def teacher_forward_flops(teacher_cfg, image_size: int | None = None,
                          with_embed: bool = True) -> float:
  """Forward FLOPs per image of a frozen teacher of any family: its blocks (cls and registers
  included) and, with `with_embed`, the patch embedding and its projection where it has one
  (CLIP proj, EVA-CLIP head; SigLIP / DINOv2 targets are the normed tokens, nothing to add)."""
  has_proj = bool(teacher_cfg.out_dim) and teacher_cfg.get('proj', True)
  return forward_flops(teacher_cfg, teacher_cfg.out_dim if has_proj else 0, with_embed,
                       image_size)


def step_flops_per_image(student_cfg, teacher_cfg, with_embed: bool = True,
                         teacher_image_size: int | None = None) -> dict[str, float]:
  """FLOPs per image of one pretraining step: 3x student forward (with its lm_head to the
  teacher's dim) + 1x teacher forward (at `teacher_image_size`: what config.teacher.grid feeds
  it; default the student's image size)."""
  out = teacher_cfg.out_dim
  student = 3.0 * forward_flops(student_cfg, out, with_embed)
  teacher = teacher_forward_flops(teacher_cfg, teacher_image_size or student_cfg.image_size,
                                  with_embed)
  return {'student_train': student, 'teacher_forward': teacher, 'total': student + teacher,
          'teacher_share': teacher / (student + teacher)}


def reference_flops_check() -> dict[str, float]:
  """EVA-01 g/14 + CLIP-L/14 at 224: the spec's 1.76 TFLOP per image; EVA-02-L + EVA-CLIP-g:
  the spec's 1.02 (0.486 student training + 0.534 teacher forward)."""
  from eva_jax.models import config as model_config
  s, t = model_config.encoder_config('g/14'), model_config.teacher_config('clip-L/14')
  blocks = step_flops_per_image(s, t, with_embed=False)['total'] / 1e12
  full = step_flops_per_image(s, t, with_embed=True)['total'] / 1e12
  s2, t2 = model_config.encoder_config('eva02-L/14'), model_config.teacher_config('eva01-clip-g/14')
  e2 = step_flops_per_image(s2, t2, with_embed=False)
  return {'g14_l14_blocks_tflop': blocks, 'g14_l14_tflop': full, 'spec_tflop': 1.76,
          'rel_err': abs(full - 1.76) / 1.76,
          'eva02_l14_blocks_tflop': e2['total'] / 1e12,
          'eva02_l14_student_tflop': e2['student_train'] / 1e12,
          'eva02_l14_teacher_tflop': e2['teacher_forward'] / 1e12, 'eva02_spec_tflop': 1.02}


# ------------------------------------------------------------------------------------------------
def memory_stats(compiled) -> dict[str, Any]:
  """Bytes per device from XLA's buffer assignment of the compiled step (no execution needed)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is None:
    return {}
  if isinstance(m, (list, tuple)):
    m = m[0]
  out = {k: int(getattr(m, k)) for k in ('argument_size_in_bytes', 'output_size_in_bytes',
                                          'alias_size_in_bytes', 'temp_size_in_bytes',
                                          'generated_code_size_in_bytes')
         if hasattr(m, k)}
  live = (out.get('argument_size_in_bytes', 0) + out.get('output_size_in_bytes', 0)
          - out.get('alias_size_in_bytes', 0) + out.get('temp_size_in_bytes', 0))
  # XLA:CPU's peak_memory_in_bytes leaves out the temp buffer; arguments + non-aliased outputs +
  # temps is an upper bound that holds on every backend, so the larger of the two is reported.
  out['peak_memory_in_bytes'] = int(getattr(m, 'peak_memory_in_bytes', 0) or 0)
  out['live_bytes'] = live
  out['peak_bytes'] = max(out['peak_memory_in_bytes'], live)
  return out


def device_peak_bytes(device) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def synthetic_host_batch(cfg, patch_size: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random normalized NHWC images and BEiT block masks (the configured mask generator)."""
  from eva_jax.data.masking import BlockMaskGenerator
  rng = np.random.default_rng(seed)
  g = cfg.image_size // patch_size
  gen = BlockMaskGenerator.from_config((g, g), cfg.data.mask)
  images = rng.standard_normal((batch, cfg.image_size, cfg.image_size, 3), dtype=np.float32)
  masks = np.stack([gen(rng).reshape(-1) for _ in range(batch)])
  return {'image': images, 'mask': masks}


def _time_steps(fn, state, n):
  """Wall-clock seconds of n blocked steps, and the process CPU seconds (all threads) of each."""
  times, cpu = [], []
  for _ in range(n):
    c0, t0 = time.process_time(), time.perf_counter()
    state, metrics = fn(state)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return state, metrics, times, cpu


def run(cfg) -> dict[str, Any]:
  """Builds, compiles and times the pretraining step; returns the result record."""
  from eva_jax import parallel
  from eva_jax.training import pretrain

  cfg = add_benchmark_defaults(cfg)
  if 'video' in cfg:
    return run_video(cfg)    # a configs/video_*.py recipe: the video fine-tuning step
  from eva_jax.training import checks
  checks.check_config(cfg)   # every field range-checked before anything is built, as in training
  b = cfg.benchmark
  if b.input not in ('synthetic', 'pipeline'):
    raise ValueError(f"config.benchmark.input must be 'synthetic' or 'pipeline', got {b.input!r}.")
  parallel.maybe_initialize_distributed(cfg)
  mesh = parallel.make_mesh(cfg.mesh)
  parallel.check_batch(cfg.batch_size, mesh)
  task, scfg, tcfg = pretrain.build(cfg, mesh)
  init_teacher = lambda seed: pretrain.random_teacher(tcfg, task.consts_shardings, seed)
  devices = mesh.devices.reshape(-1)
  device_kind = devices[0].device_kind
  local_batch = cfg.batch_size // jax.process_count()

  # Ahead-of-time compile of the exact jitted step (shardings + donation), nothing executed.
  teacher_abstract = jax.eval_shape(init_teacher, 0)
  host = synthetic_host_batch(cfg, scfg.patch_size, local_batch, seed=cfg.seed)
  batch_abstract = {k: jax.ShapeDtypeStruct((cfg.batch_size,) + v.shape[1:], v.dtype)
                    for k, v in host.items()}
  t0 = time.perf_counter()
  lowered = task.train_step.lower(task.abstract_state, teacher_abstract, batch_abstract)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = memory_stats(compiled)
  t_input = pretrain.teacher_input(cfg, scfg, tcfg)
  flops = step_flops_per_image(scfg, tcfg, teacher_image_size=t_input.teacher_size[0])
  num_devices = int(mesh.size)
  result = {
      'config': {'student': scfg.name, 'width': scfg.width, 'depth': scfg.depth,
                 'teacher': tcfg.name, 'teacher_family': tcfg.get('family', 'clip'), 'image_size': cfg.image_size, 'batch_size': cfg.batch_size,
                 'attention': scfg.attention, 'remat': scfg.remat, 'scan_unroll': scfg.scan_unroll,
                 'mesh': dict(mesh.shape), 'teacher_shard': cfg.teacher.shard},
      'tflops_per_image': flops['total'] / 1e12,
      'teacher_tflops_per_image': flops['teacher_forward'] / 1e12,
      'teacher_flop_share': flops['teacher_share'],
      'tflops_per_step': flops['total'] * cfg.batch_size / 1e12,
      'lower_s': t1 - t0,
      'compile_s': t2 - t0,
      'xla_compile_s': t2 - t1,
      'memory_analysis': mem,
      'device_kind': device_kind,
      'platform': devices[0].platform,
      'num_devices': num_devices,
      'num_processes': jax.process_count(),
      'precision': cfg.precision,
  }
  if b.compile_only:
    result['peak_bytes_per_device'] = mem.get('peak_bytes')
    result['peak_bytes_source'] = 'memory_analysis'
    return result

  state = task.init(cfg.seed)
  teacher = init_teacher(cfg.seed + 1)
  batch = parallel.host_to_global(host, mesh)
  jax.block_until_ready((state, teacher, batch))

  step = lambda s: compiled(s, teacher, batch)
  state, metrics, _, _ = _time_steps(step, state, max(int(b.warmup), 0))
  state, metrics, times, cpu_times = _time_steps(step, state, int(b.steps))
  step_s = statistics.median(times)
  t3 = time.perf_counter()  # back-to-back dispatch, one sync at the end
  for _ in range(int(b.steps)):
    state, metrics = step(state)
  jax.block_until_ready((state, metrics))
  step_s_async = (time.perf_counter() - t3) / int(b.steps)

  tflops_step = result['tflops_per_step']
  per_dev = tflops_step / step_s / num_devices
  peak = peak_tflops(device_kind)
  runtime_peak = [device_peak_bytes(d) for d in jax.local_devices()]
  runtime_peak = max((p for p in runtime_peak if p is not None), default=None)
  result.update({
      'step_s': step_s,
      'step_s_min': min(times),
      'step_s_async': step_s_async,
      # Process CPU time per step (all threads): with one thread, the work done, whatever the load.
      'step_cpu_s': statistics.median(cpu_times),
      'images_per_s': cfg.batch_size / step_s,
      'tflops_per_s_per_device': per_dev,
      'mfu': (per_dev / peak) if peak else None,
      'peak_tflops_per_device': peak,
      'peak_bytes_per_device': runtime_peak if runtime_peak is not None else mem.get('peak_bytes'),
      'peak_bytes_source': 'device.memory_stats' if runtime_peak is not None else 'memory_analysis',
      'loss': float(metrics['loss']),
      'steps': int(b.steps),
      'warmup': int(b.warmup),
      'input': b.input,
  })
  if b.input == 'pipeline':
    result.update(_pipeline(cfg, scfg, compiled, state, teacher, mesh, int(b.steps),
                            max(int(b.warmup), 1)))
  return result


def _pipeline(cfg, scfg, compiled, state, teacher, mesh, steps, warmup) -> dict[str, Any]:
  """The step fed by the real input pipeline: synchronously (the training loop with
  data.device_prefetch=0) and through the prefetch thread (its default)."""
  from eva_jax import parallel
  from eva_jax.data import pipeline as data_lib
  from eva_jax.training import prefetch

  def loader():
    return data_lib.build_pretrain_loader(
        cfg.data, image_size=cfg.image_size, patch_size=scfg.patch_size,
        batch_size=cfg.batch_size // jax.process_count(), seed=cfg.seed, train=True)

  def host_next(it):
    return next(it).arrays

  out = {}
  it = loader()
  for _ in range(warmup):
    host_next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    host_next(it)
  out['data_batch_s'] = (time.perf_counter() - t0) / steps     # host pipeline alone
  # As the training loop without prefetch: read, transfer, dispatch (metrics never block the host).
  for i in range(warmup + steps):
    if i == warmup:
      jax.block_until_ready(state)
      t0 = time.perf_counter()
    state, metrics = compiled(state, teacher, parallel.host_to_global(host_next(it), mesh))
  jax.block_until_ready((state, metrics))
  out['pipeline_step_s'] = (time.perf_counter() - t0) / steps
  it.close()

  pf = prefetch.DevicePrefetcher(loader(), lambda b: parallel.host_to_global(b, mesh),
                                 size=int(cfg.data.get('device_prefetch', 0)) or 2)
  for i in range(warmup + steps):
    if i == warmup:
      jax.block_until_ready(state)
      t0 = time.perf_counter()
    state, metrics = compiled(state, teacher, next(pf).arrays)
  jax.block_until_ready((state, metrics))
  out['pipeline_prefetch_step_s'] = (time.perf_counter() - t0) / steps
  pf.close()
  out['pipeline_images_per_s'] = cfg.batch_size / out['pipeline_step_s']
  out['pipeline_prefetch_images_per_s'] = cfg.batch_size / out['pipeline_prefetch_step_s']
  return out


if __name__ == '__main__':   # `python -m eva_jax.benchmark` = eva-benchmark
  from eva_jax.cli.benchmark import run as main
  main()


# ------------------------------------------------------------------------------------------------
# Video fine-tuning step (issue 16)
def video_step_flops_per_clip(encoder_cfg, num_frames: int, tubelet: int,
                              num_classes: int) -> float:
  """FLOPs of one video fine-tuning step per clip: 3 x forward over T = 1 + (frames/t)*N tokens
  (joint space-time attention: the 4·T²·d term over all of them), the patch embedding (t·p²·3·d
  per token, the same as per-frame 2D) and the head (2·d·classes). g/14 x 16 x 224: T = 4,097."""
  n = (encoder_cfg.image_size // encoder_cfg.patch_size) ** 2
  t, d, f = 1 + num_frames // tubelet * n, encoder_cfg.width, encoder_cfg.mlp_dim
  mlp = 6 * t * d * f if encoder_cfg.get('swiglu', False) else 4 * t * d * f
  fwd = encoder_cfg.depth * (8 * t * d * d + mlp + 4 * t * t * d)
  fwd += 2 * num_frames * n * encoder_cfg.patch_size ** 2 * 3 * d + 2 * d * num_classes
  return 3.0 * fwd


def run_video(cfg, num_classes: int = 400) -> dict[str, Any]:
  """The video fine-tuning step (training/video.py build) on synthetic clips: compile time,
  step time, clips/s (and frames/s as images_per_s), TFLOP/s, MFU, memory. Same fields and
  conventions as run(); remat recomputation is not counted in the FLOPs."""
  from eva_jax import parallel
  from eva_jax.training import video
  b = cfg.benchmark
  mesh = parallel.make_mesh(cfg.mesh)
  parallel.check_batch(cfg.batch_size, mesh)
  task, ecfg = video.build(cfg, mesh, num_classes)
  frames, size = int(cfg.video.num_frames), int(cfg.image_size)
  local = cfg.batch_size // jax.process_count()
  rng = np.random.default_rng(cfg.seed)
  host = {'video': rng.standard_normal((local, frames, size, size, 3), dtype=np.float32),
          'label': rng.integers(0, num_classes, local).astype(np.int32)}
  abstract = {k: jax.ShapeDtypeStruct((cfg.batch_size,) + v.shape[1:], v.dtype)
              for k, v in host.items()}
  t0 = time.perf_counter()
  compiled = task.train_step.lower(task.abstract_state, {}, abstract).compile()
  compile_s = time.perf_counter() - t0
  mem = memory_stats(compiled)
  flops = video_step_flops_per_clip(ecfg, frames, int(cfg.video.tubelet), num_classes)
  devices = mesh.devices.reshape(-1)
  result = {
      'config': {'model': ecfg.name, 'frames': frames, 'tubelet': int(cfg.video.tubelet),
                 'image_size': size, 'tokens': 1 + frames // int(cfg.video.tubelet) *
                 (size // ecfg.patch_size) ** 2, 'batch_size': cfg.batch_size,
                 'attention': ecfg.attention, 'remat': ecfg.remat, 'mesh': dict(mesh.shape)},
      'tflops_per_clip': flops / 1e12, 'tflops_per_step': flops * cfg.batch_size / 1e12,
      'compile_s': compile_s, 'lower_s': 0.0, 'memory_analysis': mem,
      'device_kind': devices[0].device_kind, 'platform': devices[0].platform,
      'num_devices': int(mesh.size), 'precision': cfg.precision}
  if b.compile_only:
    result.update(peak_bytes_per_device=mem.get('peak_bytes'), peak_bytes_source='memory_analysis')
    return result
  state = task.init(cfg.seed)
  batch = parallel.host_to_global(host, mesh)
  step = lambda s: compiled(s, {}, batch)
  state, metrics, _, _ = _time_steps(step, state, max(int(b.warmup), 0))
  state, metrics, times, cpu_times = _time_steps(step, state, int(b.steps))
  step_s = statistics.median(times)
  per_dev = result['tflops_per_step'] / step_s / int(mesh.size)
  peak = peak_tflops(devices[0].device_kind)
  runtime_peak = max((p for p in (device_peak_bytes(d) for d in jax.local_devices())
                      if p is not None), default=None)
  result.update({
      'step_s': step_s, 'step_s_min': min(times), 'step_cpu_s': statistics.median(cpu_times),
      'clips_per_s': cfg.batch_size / step_s,
      'images_per_s': cfg.batch_size * frames / step_s,    # frames per second
      'tflops_per_s_per_device': per_dev, 'mfu': (per_dev / peak) if peak else None,
      'peak_tflops_per_device': peak,
      'peak_bytes_per_device': runtime_peak if runtime_peak is not None else mem.get('peak_bytes'),
      'peak_bytes_source': 'device.memory_stats' if runtime_peak is not None else 'memory_analysis',
      'loss': float(metrics['loss']), 'steps': int(b.steps), 'warmup': int(b.warmup)})
  return result
