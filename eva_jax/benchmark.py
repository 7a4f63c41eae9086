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
"""
from __future__ import annotations

import collections
import math
import re
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
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


# ------------------------------------------------------------------------------------------------
# What a lowered or compiled step contains (tests/training/test_lowering.py golden summaries,
# experiments/aot_scaling.py collective bytes). Text parsing, because jax exposes no structured
# view of an HLO module; the formats read are jax 0.10's StableHLO/Shardy text (`Lowered.as_text()`)
# and XLA's HLO text (`Compiled.as_text()`).
HOST_TRANSFER_OPS = ('infeed', 'outfeed', 'send', 'recv')
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}
_OP = re.compile(r'\b(stablehlo|sdy|mhlo|func)\.([a-z_]+)')
_CUSTOM_CALL = re.compile(r'custom_call @([\w$.\-]+)')
_DOT_TYPES = re.compile(r'stablehlo\.dot_general .*: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> '
                        r'(tensor<[^>]*>)')  # one op per line in jax's text
_ELEM = re.compile(r'x?([a-z]+\d*)>$')


def _elem(tensor_type: str) -> str:
  m = _ELEM.search(tensor_type)
  return m.group(1) if m else tensor_type


def stablehlo_summary(text: str) -> dict[str, int]:
  """Counts per op kind of a lowered module (`jitted.trace(...).lower(...).as_text()`).

  Kinds: `while`, `dot_general A,B->C` (element types of operands and result, and the dot
  algorithm's operand and accumulation types when one is set), `custom_call
  TARGET`, `sharding_constraint`, host transfers (`infeed`, `outfeed`, `send`, `recv`), random bits
  (`rng_bit_generator`), and `args sharded over fsdp` / `args replicated` from the entry's Shardy
  annotations. Constants, elementwise ops and reshapes are left out: they change with every harmless
  edit, and what matters for speed on GPU/TPU is in the kinds kept."""
  counts: dict[str, int] = collections.Counter()
  for m in _OP.finditer(text):
    dialect, op = m.groups()
    if op in ('while', 'rng_bit_generator', *HOST_TRANSFER_OPS) or \
        (dialect == 'sdy' and op == 'sharding_constraint'):
      counts[op] += 1
  for m in _CUSTOM_CALL.finditer(text):
    counts[f'custom_call {m.group(1)}'] += 1
  for line in text.splitlines():
    m = _DOT_TYPES.search(line)
    if m:
      a, b, c = (_elem(t) for t in m.groups())
      # An explicit algorithm (e.g. bf16 x bf16 accumulating in f32) decides the operand precision
      # the hardware uses, whatever the operand types.
      alg = re.search(r'lhs_precision_type = (\w+), rhs_precision_type = (\w+), '
                      r'accumulation_type = (\w+)', line)
      key = f'dot_general {a},{b}->{c}'
      counts[key + (' algorithm {},{}->{}'.format(*alg.groups()) if alg else '')] += 1
  main = re.search(r'func\.func public @main\((.*?)\) -> ', text, re.S)
  if main:
    for arg in re.split(r'%arg\d+: ', main.group(1))[1:]:
      sh = re.search(r'sdy\.sharding<@\w+, \[(.*?)\]>', arg)
      counts['args sharded over fsdp' if sh and '"fsdp"' in sh.group(1) else
             'args sharded otherwise' if sh and '"' in sh.group(1) else 'args replicated'] += 1
  return dict(sorted(counts.items()))


def _type_bytes(types: str) -> int:
  """Bytes of an HLO result type, e.g. `f32[64,256]{1,0}` or a tuple of them."""
  total = 0
  for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', types):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _first_group(line: str) -> list[int]:
  """Device ids of the replica group holding device 0 of a collective's HLO line, from the three
  forms XLA prints: mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'} (axes of a
  reshaped device mesh, possibly permuted), iota [groups,size]<=[n], or explicit {{0,1},{2,3}}."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]([^{]*)\{([^}]*)\}", line)
  if m:
    axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    shape = [int(v) for _, v in axes]
    ids = np.arange(math.prod(shape))
    perm = re.search(r'device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\)', m.group(2))
    if perm:
      ids = ids.reshape([int(v) for v in perm.group(1).split(',')])
      if perm.group(2):
        ids = ids.transpose([int(v) for v in perm.group(2).split(',')])
    ids = ids.reshape(shape)
    in_group = set(re.findall(r"'(\w+)'", m.group(3)))
    index = tuple(slice(None) if name in in_group else 0 for name, _ in axes)
    return sorted(int(i) for i in np.ravel(ids[index]))
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', line)
  if m:
    groups, size = int(m.group(1)), int(m.group(2))
    ids = np.arange(groups * size).reshape([int(v) for v in m.group(3).split(',')])
    if m.group(4):
      ids = ids.transpose([int(v) for v in m.group(4).split(',')])
    return sorted(int(i) for i in ids.reshape(groups, size)[0])
  m = re.search(r'replica_groups=\{\{([\d,]*)\}', line)
  return sorted(int(v) for v in m.group(1).split(',')) if m and m.group(1) else [0]


def hlo_collectives(text: str) -> list[dict[str, Any]]:
  """The collectives of a compiled module (`compiled.as_text()`, after SPMD partitioning).

  One record per instruction: kind (all-gather, reduce-scatter, all-reduce, ...; the async
  -start halves counted once), result bytes, group size and the device ids of the group holding
  device 0 (which mesh axis it spans), the computation holding it, and `trips`:
  how many times it runs per step (the product of the known trip counts of the while loops around
  it: a scanned block's collectives run once per block), and jax's op_name (`transpose(jvp(...))`
  marks the backward pass). `full_bytes` is the unsharded size of the
  data: all-gather result, all-reduce operand, reduce-scatter operand (= result x group)."""
  comps: dict[str, list[str]] = {}
  name = None
  for line in text.splitlines():
    head = re.match(r'(?:ENTRY )?%([\w.\-]+) ', line)
    if head and not line.startswith(' '):
      name = head.group(1)
      comps[name] = []
    elif name is not None and line.startswith('  '):
      comps[name].append(line)
  entry = next((n for n in comps if re.search(rf'^ENTRY %{re.escape(n)} ', text, re.M)), None)
  # Calls between computations: while bodies multiply by their trip count, anything else by 1.
  callees: dict[str, list[tuple[str, int]]] = {n: [] for n in comps}
  for n, lines in comps.items():
    for line in lines:
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
      body = re.search(r'\bbody=%([\w.\-]+)', line)
      if body:
        callees[n].append((body.group(1), int(trips.group(1)) if trips else 1))
      for c in re.findall(r'(?:calls|to_apply|condition|branch_computations)=\{?%([\w.\-]+)', line):
        callees[n].append((c, 1))
  trips_of: dict[str, int] = {}
  stack = [(entry, 1)] if entry else []
  while stack:
    n, t = stack.pop()
    if n not in comps or trips_of.get(n, 0) >= t:
      continue
    trips_of[n] = t
    stack.extend((c, t * k) for c, k in callees[n])
  out = []
  for n, lines in comps.items():
    for line in lines:
      m = re.match(r'\s*%[\w.\-]+ = (.*?) (' + '|'.join(COLLECTIVES) + r')(-start)?\(', line)
      if not m:
        continue
      kind, size = m.group(2), _type_bytes(m.group(1))
      ids = _first_group(line)
      group = len(ids)
      if m.group(3) and kind in ('all-gather', 'all-reduce', 'reduce-scatter'):
        size = _type_bytes(m.group(1).rsplit('),', 1)[-1]) or size   # async: (operands), result
      full = size * group if kind == 'reduce-scatter' else size
      op_name = re.search(r'op_name="([^"]*)"', line)
      out.append({'kind': kind, 'bytes': size, 'full_bytes': full, 'group': group, 'group_ids': ids,
                  'computation': n, 'trips': trips_of.get(n, 1),
                  'op_name': op_name.group(1) if op_name else ''})
  return out


def collective_bytes_per_step(text: str) -> dict[str, float]:
  """Per kind: bytes each device sends per step with ring algorithms, from `hlo_collectives`:
  all-gather and reduce-scatter (g-1)/g of the full size, all-reduce 2(g-1)/g (a reduce-scatter
  then an all-gather), all-to-all (g-1)/g, collective-permute the whole buffer."""
  factor = {'all-gather': lambda g: (g - 1) / g, 'reduce-scatter': lambda g: (g - 1) / g,
            'all-reduce': lambda g: 2 * (g - 1) / g, 'all-to-all': lambda g: (g - 1) / g,
            'collective-permute': lambda g: 1.0}
  out: dict[str, float] = collections.defaultdict(float)
  for c in hlo_collectives(text):
    if c['group'] > 1 or c['kind'] == 'collective-permute':
      out[c['kind']] += c['full_bytes'] * c['trips'] * factor[c['kind']](max(c['group'], 1))
  return dict(out)


def matmul_rate(cfg, rows: int, dtype=None, repeats: int = 5) -> float:
  """The machine's matmul rate in TFLOP/s on the step's own shapes: one block's weight matmuls
  (q, k, v, attention output, MLP in and out) of encoder `cfg` on `rows` = batch x tokens rows, in
  the compute dtype, jitted, median of `repeats` timed runs after one warm-up. The step's achieved
  TFLOP/s divided by this is the fraction of matmul-bound time it reaches (issue 17: the step
  cannot beat its own matmuls; the rest is attention, norms, elementwise work and the optimizer)."""
  from eva_jax.training.precision import DTYPES
  dt = DTYPES[cfg.dtype] if dtype is None else dtype
  d, f = cfg.width, cfg.mlp_dim
  mlp_in = 2 if cfg.get('swiglu', False) else 1
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (rows, d), dt)
  w = jax.random.normal(keys[1], (4, d, d), dt)
  w1 = jax.random.normal(keys[2], (mlp_in, d, f), dt)
  w2 = jax.random.normal(keys[3], (f, d), dt)

  @jax.jit
  def block(x, w, w1, w2):
    outs = [x @ w[i] for i in range(4)]
    h = [x @ w1[i] for i in range(mlp_in)]
    return outs, [hi @ w2 for hi in h]

  flops = 2.0 * rows * d * (4 * d + 2 * mlp_in * f)
  jax.block_until_ready(block(x, w, w1, w2))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(block(x, w, w1, w2))
    times.append(time.perf_counter() - t0)
  return flops / statistics.median(times) / 1e12


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


def vitdet_forward_flops(scfg, det) -> float:
  """Backbone forward FLOPs per image (module docstring formula per block with the attention term
  4*T*T_attn*d: T_attn = T for global blocks, window^2 over the padded grid for windowed ones;
  patch embedding included, the pyramid not)."""
  g = det.image_size // scfg.patch_size
  t, d, f = g * g, scfg.width, scfg.mlp_dim
  ws = det.window_size
  tp = (-(-g // ws) * ws) ** 2
  mlp = (6 if scfg.swiglu else 4) * d * f
  n_glb = len(set(int(i) % scfg.depth for i in det.global_blocks))
  per_glb = 8 * t * d * d + t * mlp + 4 * t * t * d
  per_win = 8 * tp * d * d + tp * mlp + 4 * tp * ws * ws * d
  embed = 2 * t * scfg.patch_size ** 2 * scfg.in_chans * d
  return float(embed + n_glb * per_glb + (scfg.depth - n_glb) * per_win)


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


def run(cfg) -> dict[str, Any]:
  """Builds, compiles and times the pretraining step (or, with config.benchmark.backbone='vitdet',
  the detection backbone: run_backbone); returns the result record."""
  from eva_jax import parallel
  from eva_jax.training import pretrain

  cfg = add_benchmark_defaults(cfg)
  if cfg.benchmark.backbone:
    if cfg.benchmark.backbone != 'vitdet':
      raise ValueError(f"config.benchmark.backbone must be '' or 'vitdet', got "
                       f'{cfg.benchmark.backbone!r}.')
    return run_backbone(cfg)
  if 'video' in cfg:
    return run_video(cfg)    # a configs/video_*.py recipe: the video fine-tuning step
  if 'text' in cfg and 'loss' in cfg:
    return run_clip(cfg)     # an eva-clip recipe: the contrastive step
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



# ------------------------------------------------------------------------------------------------
# EVA-CLIP contrastive step (issue 15)
def _blocks_flops(t: int, d: int, f: int, depth: int, swiglu: bool) -> float:
  mlp = 6 * t * d * f if swiglu else 4 * t * d * f
  return float(depth * (8 * t * d * d + mlp + 4 * t * t * d))


def clip_step_flops_per_pair(clip_cfg, *, image_size: int | None = None,
                             patch_dropout: float | None = None, text_length: int | None = None,
                             global_batch: int = 0) -> dict[str, float]:
  """FLOPs per image-text pair of one EVA-CLIP training step (both towers trained: 3x forward).

  clip_cfg: eva_jax.models.clip config. image_size: default clip_cfg.vision.image_size.
  patch_dropout: fraction of patch tokens dropped before the blocks (FLIP; default the config's):
    the blocks see prefix + max(1, int(N (1 - rate))) tokens, the patch embedding all N.
  text_length: tokens per caption (default the context length, 77: the text tower runs on the
    padded sequence). Causal attention is counted in full (4 T^2 d): the XLA attention computes
    the whole T x T product and masks it.
  global_batch: > 0 adds the logits of the loss (each pair scored against all B in both
    directions, 2 x 2 B E per pair forward, x3); 0 leaves them out (tiny at B << width x depth).
  Returns {'vision_train', 'text_train', 'loss_train', 'total'} in FLOPs (formula: module docstring,
  EVA-SPEC "Compute per image"); remat recomputation not counted.
  """
  v, t, e = clip_cfg.vision, clip_cfg.text, clip_cfg.embed_dim
  size = image_size or v.image_size
  n = (size // v.patch_size) ** 2
  rate = clip_cfg.patch_dropout if patch_dropout is None else patch_dropout
  kept = max(1, int(n * (1.0 - rate))) if rate > 0 else n
  prefix = (1 if v.get('class_token', True) else 0) + int(v.get('registers', 0))
  vis = _blocks_flops(prefix + kept, v.width, v.mlp_dim, v.depth, v.get('swiglu', False))
  vis += 2 * n * v.patch_size ** 2 * v.get('in_chans', 3) * v.width + 2 * v.width * e
  tl = text_length or t.context_length
  txt = _blocks_flops(tl, t.width, t.mlp_dim, t.depth, False) + 2 * t.width * e
  loss = 2.0 * 2 * global_batch * e
  out = {'vision_train': 3.0 * vis, 'text_train': 3.0 * txt, 'loss_train': 3.0 * loss}
  out['total'] = sum(out.values())
  return out




# ------------------------------------------------------------------------------------------------
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


if __name__ == '__main__':   # `python -m eva_jax.benchmark` = eva-benchmark
  from eva_jax.cli.benchmark import run as main
  main()
