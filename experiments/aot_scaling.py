r"""Scaling on paper, checked by compilation: the EVA-01 g/14 + CLIP-L/14 pretraining step compiled
ahead of time on fake meshes of 8, 64 and 256 CPU devices, then a roofline for 128 A100 and 64 H100.

  python experiments/aot_scaling.py                                   # 8, 64, 256 devices, ~5-15 min
  python experiments/aot_scaling.py --devices=8 --depth=4             # quick look, reduced depth
  python experiments/aot_scaling.py --mfu=0.5 --efficiency=0.8 --out=/tmp/scaling.md

Per device count N (one subprocess each, XLA_FLAGS=--xla_force_host_platform_device_count=N), the
step as `eva_jax.training.pretrain.build` makes it for `configs/eva01_g14_pretrain.py:bf16` (remat
`--remat`, per-device batch `--batch`) is lowered with ShapeDtypeStruct inputs and compiled for CPU
(nothing allocated or executed). It reports compile time, bytes per device (XLA's memory analysis,
as docs/memory_plan.md) and the collectives of the SPMD-partitioned program
(`eva_jax.benchmark.hlo_collectives`: each all-gather / reduce-scatter / all-reduce with its size,
times the trip count of the scanned-block loop around it). Mesh: fsdp=N up to 128; g/14's width
1408 = 2^7 x 11 is not divisible by 256, so N=256 runs data=2 x fsdp=128 (the weights are gathered
within each fsdp group of 128 and the gradients all-reduced across the 2 groups).

Roofline model (stated, deliberately simple; every constant is a flag):
  compute   = analytic FLOPs of the step per device (benchmark.step_flops_per_image: 3x student
              forward + teacher forward, 1.7663 TFLOP/image) / (peak bf16 x target MFU)
  comm      = bytes each device sends per step with ring algorithms (from the compiled program:
              (g-1)/g of the gathered weights and reduced gradients, 2(g-1)/g for all-reduce),
              at the inter-node bandwidth per GPU x efficiency (a ring that spans nodes is limited
              by the NIC: DGX A100 8 x HDR 200 Gb/s per node = 25 GB/s per GPU, DGX H100 8 x NDR
              400 Gb/s = 50 GB/s per GPU)
  predicted = max(compute, comm) + exposed, exposed = the first block's weight gather and the last
              block's gradient reduction (2/depth of the per-block traffic), which nothing hides,
              plus the traffic outside the scanned loops (embeddings, head, scalars)
  bounds    = max(compute, comm) (perfect overlap) .. compute + comm (none)
Days for the paper's 150 epochs of 29.6M images at batch 4096 follow from the predicted step.

XLA:CPU's program is a stand-in for XLA:GPU's: the same SPMD partitioner places the collectives,
but XLA:CPU keeps gradient reductions as all-reduce + slice (GPU/TPU rewrite them into
reduce-scatter, half the bytes: the model counts what GPU runs, a reduce-scatter, and prints both)
and does not combine or pipeline them. Memory is XLA:CPU's buffer assignment (docs/memory_plan.md
discusses how it differs from GPU).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30
# GPU: (name, dense bf16 peak TFLOP/s, inter-node GB/s per GPU, GPUs per node)
CLUSTERS = {'a100': ('A100-SXM4 (DGX A100, 8x HDR 200 Gb/s)', 312.0, 25.0, 8),
            'h100': ('H100-SXM (DGX H100, 8x NDR 400 Gb/s)', 989.0, 50.0, 8)}


def parse_layouts(text: str) -> list[tuple[int, int]]:
  """'64:8x8,256:2x128' -> [(data, fsdp), ...]; ValueError when N != data x fsdp."""
  out = []
  for item in text.split(','):
    n, mesh = item.split(':')
    d, f = (int(v) for v in mesh.split('x'))
    if d * f != int(n):
      raise ValueError(f'--layouts entry {item!r}: {d} x {f} != {n} devices.')
    out.append((d, f))
  return out


def worker(data: int, fsdp: int, depth: int, batch: int, remat: str, precision: str) -> None:
  n = data * fsdp
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, ROOT)
  from eva_jax import benchmark, configs, parallel
  from eva_jax.training import pretrain
  assert jax.device_count() == n, (jax.device_count(), n)
  cfg = configs.get(f'eva01_g14_pretrain:{precision}')
  cfg.teacher.allow_random_init = True
  if depth:
    cfg.model.depth = depth
  cfg.model.remat = remat
  cfg.batch_size = batch * n
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, fsdp, 1
  mesh = parallel.make_mesh(cfg.mesh)
  t0 = time.perf_counter()
  task, scfg, tcfg = pretrain.build(cfg, mesh)
  teacher = jax.eval_shape(lambda: pretrain.random_teacher(tcfg, None, 0))
  g = cfg.image_size // scfg.patch_size
  args = (task.abstract_state, teacher,
          {'image': jax.ShapeDtypeStruct((cfg.batch_size, 224, 224, 3), jnp.float32),
           'mask': jax.ShapeDtypeStruct((cfg.batch_size, g * g), jnp.bool_)})
  lowered = task.train_step.trace(*args).lower()
  t1 = time.perf_counter()
  # Backend codegen at -O0: buffer assignment and the partitioned program are what is read here,
  # and LLVM's optimizations are most of XLA:CPU's compile time.
  compiled = lowered.compile({'xla_backend_optimization_level': 0,
                              'xla_llvm_disable_expensive_passes': True})
  t2 = time.perf_counter()
  cs = benchmark.hlo_collectives(compiled.as_text())
  # Role of each collective from its group: over the fsdp axis (weight gathers, gradient
  # reductions inside a data-parallel group), over the data axis (gradient all-reduce of each
  # shard across groups), or over every device (the few unsharded leaves, scalars).
  per_kind = collections.defaultdict(lambda: {'count': 0, 'full_bytes': 0.0, 'in_loop_bytes': 0.0})
  for c in cs:
    if c['group'] <= 1:
      continue
    ids = c['group_ids']
    role = ('fsdp' if ids == list(range(fsdp)) else 'data' if ids == list(range(0, n, fsdp)) else
            'all' if c['group'] == n else f"group{c['group']}")
    k = per_kind[f"{role} {c['kind']}"]
    k['count'] += c['trips']
    k['full_bytes'] += c['full_bytes'] * c['trips']
    if c['trips'] > 1:
      k['in_loop_bytes'] += c['full_bytes'] * c['trips']
  groups = sorted({(c['kind'], c['group']) for c in cs if c['group'] > 1})
  flops = benchmark.step_flops_per_image(scfg, tcfg)
  print('RESULT ' + json.dumps({
      'devices': n, 'mesh': dict(mesh.shape), 'depth': scfg.depth, 'width': scfg.width,
      'per_device_batch': batch, 'remat': remat, 'precision': precision,
      'lower_s': t1 - t0, 'compile_s': t2 - t1, **benchmark.memory_stats(compiled),
      'collectives': dict(per_kind), 'groups': groups,
      'sent_bytes_per_device': benchmark.collective_bytes_per_step(compiled.as_text()),
      'tflop_per_image': flops['total'] / 1e12}), flush=True)


def predict(rec: dict, cluster: str, n_gpus: int, global_batch: int, mfu: float,
            efficiency: float, gather_scale: float = 1.0) -> dict:
  """The roofline of the module docstring for `n_gpus` of `cluster` on the layout of `rec` (same
  fsdp size; data = n_gpus / fsdp), from that compiled record."""
  name, peak, inter, per_node = CLUSTERS[cluster]
  f = rec['mesh']['fsdp']
  d = n_gpus // f
  per_dev_batch = global_batch / n_gpus
  compute = rec['tflop_per_image'] * per_dev_batch / (peak * mfu)
  coll = rec['collectives']
  get = lambda key, field='full_bytes': coll.get(key, {}).get(field, 0.0)
  nvlink = 300e9 * efficiency        # NVLink3 per direction per GPU (A100; H100 has 450: bounded)
  ib = inter * 1e9 * efficiency
  bw_fsdp = nvlink if f <= per_node else ib
  # fsdp group: weights gathered, gradients reduced to shards. GPU runs the in-loop gradient
  # reduction as a reduce-scatter; XLA:CPU's all-reduce there is counted as one.
  # gather_scale: what if the weights were gathered in another dtype (0.5 = bf16 instead of f32).
  fsdp_loop = gather_scale * get('fsdp all-gather', 'in_loop_bytes') + \
      get('fsdp all-reduce', 'in_loop_bytes') + get('fsdp reduce-scatter', 'in_loop_bytes')
  fsdp_rest = gather_scale * get('fsdp all-gather') + get('fsdp reduce-scatter') + \
      get('fsdp all-reduce') - fsdp_loop
  t_fsdp = (fsdp_loop + fsdp_rest) * (f - 1) / f / bw_fsdp if f > 1 else 0.0
  # data axis: each device all-reduces its gradient shard across the d groups (inter-node); the
  # shard size scales with the compiled data size (the full bytes per device are params / fsdp).
  d_c = rec['mesh']['data']
  if d_c > 1:
    data_bytes = get('data all-reduce') + get('all all-reduce')
  else:   # compiled without a data axis: the shard each device would all-reduce across groups
    data_bytes = (get('fsdp all-reduce') + get('fsdp reduce-scatter')) / f
  t_data = 2 * data_bytes * (d - 1) / d / (ib if n_gpus > per_node else nvlink) if d > 1 else 0.0
  comm = t_fsdp + t_data
  exposed = (2 / rec['depth'] * fsdp_loop * (f - 1) / f / bw_fsdp if f > 1 else 0.0) + \
      (fsdp_rest * (f - 1) / f / bw_fsdp if f > 1 else 0.0)
  step = max(compute, comm) + exposed
  steps = 150 * 29_600_000 / global_batch
  return {'cluster': name, 'gpus': n_gpus, 'layout': f'{d} x {f}',
          'per_device_batch': per_dev_batch, 'compute_s': compute, 'comm_s': comm,
          'exposed_s': exposed, 'step_s': step, 'bound_lo_s': max(compute, comm),
          'bound_hi_s': compute + comm, 'images_per_s_per_gpu': per_dev_batch / step,
          'days_150_epochs': steps * step / 86400, 'mfu_effective': mfu * compute / step}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--layouts', default='8:1x8,64:1x64,64:8x8,256:2x128,256:32x8',
                  help='N:DATAxFSDP per compile (g/14 width 1408 = 2^7 x 11: fsdp <= 128)')
  ap.add_argument('--depth', type=int, default=0, help='student depth (0 = g/14\'s 40)')
  ap.add_argument('--batch', type=int, default=32, help='per-device batch (paper: 4096 / 128 = 32)')
  ap.add_argument('--remat', default='dots_no_batch')
  ap.add_argument('--precision', default='bf16')
  ap.add_argument('--mfu', type=float, default=0.5, help='target MFU of the compute term')
  ap.add_argument('--efficiency', type=float, default=0.8, help='fraction of link bandwidth reached')
  ap.add_argument('--gather_scale', type=float, default=1.0,
                  help='scale the weight all-gather bytes (0.5: gathered in bf16 instead of f32)')
  ap.add_argument('--timeout', type=int, default=1500, help='seconds per device count')
  ap.add_argument('--out', default='')
  ap.add_argument('--records', default='',
                  help='a previous run\'s output (its last line): print the tables again, no compiling')
  ap.add_argument('--worker', type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument('--fsdp_of_worker', type=int, default=0, help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.worker:
    worker(a.worker // a.fsdp_of_worker, a.fsdp_of_worker, a.depth, a.batch, a.remat, a.precision)
    return
  records = []
  if a.records:
    with open(a.records) as f:
      records = json.loads(f.read().strip().splitlines()[-1])
    for r in records:   # runs before the role order was fixed: with data = 1, all = fsdp
      if r['mesh']['data'] == 1:
        r['collectives'] = {k.replace('all ', 'fsdp ', 1): v for k, v in r['collectives'].items()}
  for data, fsdp in ([] if a.records else parse_layouts(a.layouts)):
    n = data * fsdp
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n}',
               JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.abspath(__file__), f'--worker={n}', f'--fsdp_of_worker={fsdp}',
           f'--depth={a.depth}',
           f'--batch={a.batch}', f'--remat={a.remat}', f'--precision={a.precision}']
    t0 = time.perf_counter()
    try:
      out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
      got = [json.loads(l[7:]) for l in out.stdout.splitlines() if l.startswith('RESULT ')]
      if not got:
        print(f'N={n}: failed: {out.stderr.strip().splitlines()[-1:]}', file=sys.stderr)
    except subprocess.TimeoutExpired:
      got = []
      print(f'N={n}: timed out after {a.timeout} s', file=sys.stderr)
    records += got
    print(f'N={n}: {time.perf_counter() - t0:.0f} s', file=sys.stderr, flush=True)
  if not records:
    sys.exit('no device count compiled')
  md = ['| devices | mesh data x fsdp | depth | batch/device | compile s | arguments GiB | '
        'temporaries GiB | total GiB | fsdp all-gather GB | fsdp grad reduction GB | '
        'data/all all-reduce GB |', '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in records:
    c = r['collectives']
    get = lambda key, field='full_bytes': c.get(key, {}).get(field, 0.0) / 1e9
    md.append(
        f"| {r['devices']} | {r['mesh']['data']} x {r['mesh']['fsdp']} | {r['depth']} | "
        f"{r['per_device_batch']} | {r['compile_s']:.0f} | {r['argument_size_in_bytes'] / GiB:.2f} | "
        f"{r['temp_size_in_bytes'] / GiB:.2f} | {r['peak_bytes'] / GiB:.2f} | "
        f"{get('fsdp all-gather'):.2f} | {get('fsdp all-reduce') + get('fsdp reduce-scatter'):.2f} | "
        f"{get('data all-reduce') + get('all all-reduce'):.3f} |")
  md += ['', 'GB = the full (unsharded) bytes of the collectives of one step, scanned-loop trips '
         'included; each device sends (g-1)/g of it (2(g-1)/g for an all-reduce).', '',
         f'Roofline (MFU {a.mfu:.0%} on the compute term, links at {a.efficiency:.0%}; global '
         f'batch 4096; weight gathers x{a.gather_scale:g}; each row from the compiled program with '
         'the same fsdp size):', '',
         '| cluster | GPUs | data x fsdp | batch/GPU | compute s | comm s | exposed s | '
         'predicted step s | bounds s | img/s/GPU | effective MFU | days, 150 epochs |',
         '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for cluster, n in (('a100', 128), ('h100', 64)):
    for rec in sorted({r['mesh']['fsdp']: r for r in records if n % r['mesh']['fsdp'] == 0
                       and r['mesh']['fsdp'] > 1}.values(), key=lambda r: r['mesh']['fsdp']):
      p = predict(rec, cluster, n, 4096, a.mfu, a.efficiency, a.gather_scale)
      md.append(f"| {p['cluster']} | {n} | {p['layout']} | {p['per_device_batch']:.0f} | "
                f"{p['compute_s']:.3f} | {p['comm_s']:.3f} | {p['exposed_s']:.3f} | "
                f"{p['step_s']:.3f} | {p['bound_lo_s']:.3f}-{p['bound_hi_s']:.3f} | "
                f"{p['images_per_s_per_gpu']:.1f} | {p['mfu_effective']:.0%} | "
                f"{p['days_150_epochs']:.2f}{'' if rec['depth'] == 40 else ' (reduced depth)'} |")
  ref = records[0]
  steps = 150 * 29_600_000 / 4096
  need = ref['tflop_per_image'] * 150 * 29_600_000 / (128 * 312.0 * 4 * 86400)
  md += ['', f'150 epochs x 29.6M images = {steps:,.0f} steps of 4096. Under 4 days on 128 A100 '
         f'needs an effective MFU of at least {need:.1%} (compute alone at '
         f'{ref["tflop_per_image"]:.4f} TFLOP/image).']
  text = '\n'.join(md)
  print(text)
  if a.out:
    with open(a.out, 'w') as f:
      f.write(text + '\n')
  print(json.dumps(records))


if __name__ == '__main__':
  main()
