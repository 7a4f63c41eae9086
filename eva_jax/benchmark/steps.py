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
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from eva_jax.benchmark.flops import (
    tokens, step_flops_per_image, vitdet_forward_flops, clip_step_flops_per_pair,
    video_step_flops_per_clip)
from eva_jax.benchmark.machine import peak_tflops, memory_stats, device_peak_bytes, matmul_rate


def benchmark_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      steps=10,            # timed steps (median reported)
      warmup=2,            # untimed steps after compilation
      input='synthetic',   # 'synthetic' | 'pipeline' (also time the step fed by the input pipeline)
      compile_only=False,  # True: AOT lower + compile and memory analysis only, nothing executed
      # 'vitdet': time the ViTDet detection backbone (models/vitdet.py) of config.model instead of
      # the pretraining step: forward + backward of backbone + pyramid at det_image_size (L/14 at
      # 1024: 73x73 = 5,329 tokens; window 16 needs window_pad there), one device, batch_size.
      backbone='',
      det_image_size=1024,
      window_size=16,
      window_pad=True,
      global_blocks='',    # comma-separated; '' = every 6th block from block 5 (EVA-02-L: 5,11,17,23)
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


def vitdet_config_from(cfg):
  """(student encoder config, vitdet config) of a pretraining config's config.benchmark fields."""
  from eva_jax.models import vitdet
  from eva_jax.training import pretrain
  b = cfg.benchmark
  scfg = pretrain.student_config(cfg)
  size, p = int(b.det_image_size), scfg.patch_size
  if size % p:
    lo = size // p * p
    raise ValueError(f'config.benchmark.det_image_size={size} is not a multiple of the patch size '
                     f'{p}; use {lo} or {lo + p} (detectron2 pads to 1024 and a stride-{p} conv '
                     f'drops the remainder: {lo // p}x{lo // p} tokens).')
  glb = [int(i) for i in str(b.global_blocks).split(',') if i.strip()] or \
      (list(range(5, scfg.depth, 6)) or [scfg.depth - 1])
  det = vitdet.vitdet_config(image_size=int(b.det_image_size), window_size=int(b.window_size),
                             window_pad=bool(b.window_pad), global_blocks=tuple(glb))
  return scfg, det


def backbone_step(cfg, batch_size: int):
  """(jitted fwd+bwd of the ViTDet backbone + pyramid, abstract params, abstract images, scfg,
  det): the loss is the mean square of every pyramid level, enough to time and size a detection
  training step's backbone part (one device, params replicated)."""
  from flax import nnx
  from eva_jax.models import vitdet
  scfg, det = vitdet_config_from(cfg)
  graphdef, params = nnx.split(nnx.eval_shape(
      lambda: vitdet.ViTDetBackbone(scfg, det, rngs=nnx.Rngs(params=0))))

  def loss(params, images):
    feats = nnx.merge(graphdef, params)(images)
    return sum(jnp.mean(jnp.square(v.astype(jnp.float32))) for v in feats.values())

  images = jax.ShapeDtypeStruct((batch_size, det.image_size, det.image_size, 3), jnp.float32)
  return jax.jit(jax.value_and_grad(loss)), params, images, scfg, det


def run_backbone(cfg) -> dict[str, Any]:
  """config.benchmark.backbone='vitdet': compile (and unless compile_only, time) backbone_step."""
  from flax import nnx
  from eva_jax.models import vitdet
  b = cfg.benchmark
  fn, params_abstract, images_abstract, scfg, det = backbone_step(cfg, cfg.batch_size)
  t0 = time.perf_counter()
  compiled = fn.lower(params_abstract, images_abstract).compile()
  compile_s = time.perf_counter() - t0
  mem = memory_stats(compiled)
  device = jax.devices()[0]
  g = det.image_size // scfg.patch_size
  tflops_step = 3 * vitdet_forward_flops(scfg, det) * cfg.batch_size / 1e12
  result = {'config': {'student': scfg.name, 'backbone': 'vitdet', 'image_size': det.image_size,
                       'tokens': g * g, 'window_size': det.window_size,
                       'global_blocks': list(det.global_blocks), 'batch_size': cfg.batch_size,
                       'remat': scfg.remat, 'attention': scfg.attention},
            'tflops_per_step': tflops_step, 'compile_s': compile_s, 'memory_analysis': mem,
            'device_kind': device.device_kind, 'num_devices': 1, 'precision': cfg.precision}
  if b.compile_only:
    result['peak_bytes_per_device'] = mem.get('peak_bytes')
    return result
  _, params = nnx.split(vitdet.create(scfg, det, seed=cfg.seed))
  images = jnp.asarray(np.random.default_rng(cfg.seed).standard_normal(
      images_abstract.shape, dtype=np.float32))
  step = lambda s: (s, compiled(params, images))
  _, _, _, _ = _time_steps(step, None, max(int(b.warmup), 1))
  _, _, times, _ = _time_steps(step, None, int(b.steps))
  step_s = statistics.median(times)
  peak = peak_tflops(device.device_kind)
  per_dev = tflops_step / step_s
  result.update({'step_s': step_s, 'images_per_s': cfg.batch_size / step_s,
                 'tflops_per_s_per_device': per_dev, 'mfu': per_dev / peak if peak else None,
                 'peak_bytes_per_device': device_peak_bytes(device) or mem.get('peak_bytes'),
                 'steps': int(b.steps)})
  return result


def step_kind(cfg) -> str:
  """Which step `cfg` benchmarks: 'vitdet' (config.benchmark.backbone), 'video' (a
  configs/video_*.py recipe: the video fine-tuning step), 'clip' (an eva-clip recipe: the
  contrastive step) or 'pretrain'. ValueError for an unknown backbone."""
  backbone = cfg.get('benchmark', {}).get('backbone', '')
  if backbone:
    if backbone != 'vitdet':
      raise ValueError(f"config.benchmark.backbone must be '' or 'vitdet', got {backbone!r}.")
    return 'vitdet'
  if 'video' in cfg:
    return 'video'
  if 'text' in cfg and 'loss' in cfg:
    return 'clip'
  return 'pretrain'


def run(cfg) -> dict[str, Any]:
  """Builds, compiles and times the step of `cfg` (step_kind: pretraining, EVA-CLIP, video
  fine-tuning or the detection backbone); returns the result record."""
  from eva_jax import parallel
  from eva_jax.training import pretrain

  cfg = add_benchmark_defaults(cfg)
  kind = step_kind(cfg)
  if kind != 'pretrain':
    return {'vitdet': run_backbone, 'video': run_video, 'clip': run_clip}[kind](cfg)
  from eva_jax.training import checks
  checks.check_config(cfg, 'pretrain')   # every field range-checked before anything is built
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
  # Executed FLOPs: the last blocks and heads on the masked-token bound (pretrain.build does so).
  flops = step_flops_per_image(scfg, tcfg, teacher_image_size=t_input.teacher_size[0],
                               masked_tokens=pretrain.masked_token_bound(cfg, t_input))
  model_flops = step_flops_per_image(scfg, tcfg, teacher_image_size=t_input.teacher_size[0])
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
      # Every token through every block (the spec's count): what the step would cost without
      # the masked-token path; MFU and the matmul fraction use the executed FLOPs above.
      'model_tflops_per_step': model_flops['total'] * cfg.batch_size / 1e12,
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
  # The fraction of the machine's own matmul rate (measured on the step's shapes, per device).
  rate = matmul_rate(scfg, cfg.batch_size // num_devices * tokens(scfg))
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
      'matmul_tflops_per_s': rate,
      'matmul_fraction': per_dev / rate,
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


# Contrastive (EVA-CLIP) step: the timed step
def _compile_step(task, host, global_batch: int):
  """AOT compile of a program's train step (no constants: clip, video) for the global batch of
  `host`'s per-host arrays: (compiled, seconds, memory_stats)."""
  abstract = {k: jax.ShapeDtypeStruct((global_batch,) + v.shape[1:], v.dtype)
              for k, v in host.items()}
  t0 = time.perf_counter()
  compiled = task.train_step.lower(task.abstract_state, {}, abstract).compile()
  return compiled, time.perf_counter() - t0, memory_stats(compiled)


def _time_compiled(compiled, task, host, mesh, seed, b, tflops_per_step):
  """Times a compiled train step (no constants) on `host` placed on `mesh`: benchmark.warmup
  untimed steps, then benchmark.steps timed ones. Returns (median step s, step times, CPU times,
  last metrics, TFLOP/s per device, device peak TFLOP/s or None, runtime peak bytes or None)."""
  from eva_jax import parallel
  state = task.init(seed)
  batch = parallel.host_to_global(host, mesh)
  step = lambda s: compiled(s, {}, batch)   # noqa: E731
  state, metrics, _, _ = _time_steps(step, state, max(int(b.warmup), 0))
  state, metrics, times, cpu = _time_steps(step, state, int(b.steps))
  step_s = statistics.median(times)
  per_dev = tflops_per_step / step_s / int(mesh.size)
  peak = peak_tflops(mesh.devices.reshape(-1)[0].device_kind)
  runtime_peak = max((p for p in (device_peak_bytes(d) for d in jax.local_devices())
                      if p is not None), default=None)
  return step_s, times, cpu, metrics, per_dev, peak, runtime_peak


def run_clip(cfg) -> dict[str, Any]:
  """Builds, compiles and times the contrastive training step of an eva-clip config (exactly what
  eva-clip runs: eva_jax.training.clip.build) on a synthetic device-resident batch (random
  normalized images, random CLIP token rows ending in EOT); returns pairs/s, TFLOP/s, MFU and
  memory like `run`. Reads config.benchmark (steps, warmup, compile_only)."""
  from eva_jax import parallel
  from eva_jax.training import clip as clip_train

  cfg = add_benchmark_defaults(cfg)
  b = cfg.benchmark
  program = clip_train.ClipProgram(cfg)
  program.validate()
  mesh = parallel.make_mesh(cfg.mesh)
  parallel.check_batch(cfg.batch_size, mesh)
  task, mcfg = clip_train.build(cfg, mesh)
  rng = np.random.default_rng(cfg.seed)
  local = cfg.batch_size // jax.process_count()
  ctx = mcfg.text.context_length
  tokens = np.zeros((local, ctx), np.int32)
  tokens[:, 0] = 49406
  lengths = rng.integers(4, ctx - 1, size=local)
  for i, n in enumerate(lengths):
    tokens[i, 1:n] = rng.integers(1, 49405, size=n - 1)
    tokens[i, n] = 49407
  host = {'image': rng.standard_normal((local, cfg.image_size, cfg.image_size, 3),
                                       dtype=np.float32), 'text': tokens}
  compiled, compile_s, mem = _compile_step(task, host, cfg.batch_size)
  flops = clip_step_flops_per_pair(mcfg, global_batch=cfg.batch_size)
  devices = mesh.devices.reshape(-1)
  result = {
      'config': {'model': mcfg.name, 'image_size': cfg.image_size, 'batch_size': cfg.batch_size,
                 'patch_dropout': mcfg.patch_dropout, 'loss': cfg.loss, 'remat': mcfg.vision.remat,
                 'mesh': dict(mesh.shape), 'precision': cfg.precision},
      'tflops_per_pair': flops['total'] / 1e12,
      'tflops_per_step': flops['total'] * cfg.batch_size / 1e12,
      'compile_s': compile_s, 'memory_analysis': mem, 'device_kind': devices[0].device_kind,
      'num_devices': int(mesh.size)}
  if b.compile_only:
    return result
  step_s, times, cpu, metrics, per_dev, peak, runtime_peak = _time_compiled(
      compiled, task, host, mesh, cfg.seed, b, result['tflops_per_step'])
  result.update({
      'step_s': step_s, 'step_cpu_s': statistics.median(cpu),
      'pairs_per_s': cfg.batch_size / step_s, 'images_per_s': cfg.batch_size / step_s,
      'precision': cfg.precision, 'tflops_per_s_per_device': per_dev,
      'mfu': (per_dev / peak) if peak else None, 'peak_tflops_per_device': peak,
      'peak_bytes_per_device': runtime_peak if runtime_peak is not None else mem.get('peak_bytes'),
      'loss': float(metrics['loss']), 'steps': int(b.steps)})
  return result


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
  compiled, compile_s, mem = _compile_step(task, host, cfg.batch_size)
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
  step_s, times, cpu_times, metrics, per_dev, peak, runtime_peak = _time_compiled(
      compiled, task, host, mesh, cfg.seed, b, result['tflops_per_step'])
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
