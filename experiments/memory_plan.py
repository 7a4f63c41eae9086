r"""Bytes per device of a pretraining step under FSDP (default EVA-01 g/14 + CLIP-L/14 at 224;
--config=eva02_l14_pretrain.py: EVA-02 L/14 + EVA-CLIP g/14), from XLA's
compiled memory analysis: jax.jit(step).lower(abstract args).compile().memory_analysis(). Nothing
is allocated or executed, so it runs on fake CPU devices (one subprocess per device count N with
XLA_FLAGS=--xla_force_host_platform_device_count=N).

  python experiments/memory_plan.py --remats=none,dots,dots_no_batch,full --out=/tmp/mp.md   # ~10 min
  python experiments/memory_plan.py --devices=8 --precisions=bf16 --remats=full --batches=32
  python experiments/memory_plan.py --config=eva02_l14_pretrain.py --devices=8,128 --precisions=bf16
  python experiments/memory_plan.py --config=video_k400_g14.py --devices=8 --precisions=bf16 \
      --remats=full --batches=2 --slope_batch=1 --budget_gib=80     # video: g/14 x 16 x 224

Detection backbone (--vitdet): bytes of one device's forward + backward of the ViTDet backbone +
simple feature pyramid (eva_jax.benchmark.backbone_step: models/vitdet.py on config.model, params
replicated, batch per device) at --det_image_size. L/14 at 1022 (what a stride-14 conv sees of
detectron2's 1024 input): 73x73 = 5,329 tokens, window 16 zero-padded to 80x80. Windowed with
--global_blocks (';'-separated sets) or all-global ('all'):

  python experiments/memory_plan.py --vitdet --config=eva02_l14_pretrain.py --precisions=bf16 \
      --remats=full,dots_no_batch --batches=1,2 --global_blocks=";all" --det_image_size=1022

It compiles the step exactly as `eva_jax.training.pretrain.build` makes it, block activations pinned to
the batch sharding by `parallel.constrain_batch` (before commit 3f512fb they were not, and the FSDP
step computed the global batch on every device: docs/memory_plan.md, section 1). Results and their
discussion: docs/memory_plan.md.

Per (N, precision, remat, per-device batch) it reports, per device: arguments (params + optimizer
state + teacher + batch), temporaries, the total (arguments + non-aliased outputs + temporaries) and
the compile time. The per-device batch slope of the total, fitted on N=8 from two batches, gives the
largest per-device batch that fits a memory budget (default 40 GiB A100 minus 2 GiB headroom for
the CUDA context, cuBLAS/cuDNN workspaces and fragmentation).

Caveat: this is XLA:CPU's buffer assignment of the SPMD-partitioned program. XLA:GPU fuses
differently (e.g. cuDNN flash attention never materializes the T x T attention probabilities, while
the XLA attention path here does), schedules collectives asynchronously (FSDP all-gather buffers of
the next layer overlap the current one) and XLA:CPU may upcast bf16/fp16 dots to f32. Treat the
figures as an estimate to within ~20-30%, and the parameter/optimizer parts (exact) as a floor.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30


def _load_config(precision, config='eva01_g14_pretrain.py'):
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(ROOT, 'configs', config))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(precision)


def worker(n, precisions, remats, batches, teacher_shard, config='eva01_g14_pretrain.py'):
  if config.startswith('video_'):
    return video_worker(n, precisions, remats, batches, config)
  import jax
  sys.path.insert(0, ROOT)
  from eva_jax import benchmark, parallel
  from eva_jax.training import pretrain
  assert jax.device_count() == n, (jax.device_count(), n)
  for precision in precisions:
    for remat in remats:
      for per_dev in batches:
        cfg = _load_config(precision, config)
        cfg.batch_size = per_dev * n
        cfg.model.remat = remat
        cfg.teacher.shard = teacher_shard
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
        mesh = parallel.make_mesh(cfg.mesh)
        t0 = time.perf_counter()
        task, scfg, tcfg = pretrain.build(cfg, mesh)
        teacher = jax.eval_shape(lambda: pretrain.random_teacher(tcfg, task.consts_shardings, 0))
        g = cfg.image_size // scfg.patch_size
        batch = {'image': jax.ShapeDtypeStruct((cfg.batch_size, cfg.image_size, cfg.image_size, 3),
                                               jax.numpy.float32),
                 'mask': jax.ShapeDtypeStruct((cfg.batch_size, g * g), jax.numpy.bool_)}
        compiled = task.train_step.lower(task.abstract_state, teacher, batch).compile()
        mem = benchmark.memory_stats(compiled)
        rec = {'devices': n, 'precision': precision, 'remat': remat, 'per_device_batch': per_dev,
               'teacher_shard': teacher_shard, 'student': scfg.name, 'teacher': tcfg.name,
               'compile_s': time.perf_counter() - t0, **mem}
        print('RESULT ' + json.dumps(rec), flush=True)


def vitdet_records(precisions, remats, batches, config, det_image_size, window_size, glbs):
  """Compile-only memory of benchmark.backbone_step per (precision, remat, batch, global set)."""
  sys.path.insert(0, ROOT)
  from eva_jax import benchmark
  out = []
  for precision in precisions:
    for remat in remats:
      for per_dev in batches:
        for glb in glbs:
          cfg = benchmark.add_benchmark_defaults(_load_config(precision, config))
          cfg.model.remat = remat
          cfg.benchmark.det_image_size, cfg.benchmark.window_size = det_image_size, window_size
          cfg.benchmark.window_pad = True
          t0 = time.perf_counter()
          fn, params, images, scfg, det = benchmark.backbone_step(cfg, per_dev)
          if glb == 'all':
            cfg.benchmark.global_blocks = ','.join(map(str, range(scfg.depth)))
            fn, params, images, scfg, det = benchmark.backbone_step(cfg, per_dev)
          elif glb:
            cfg.benchmark.global_blocks = glb
            fn, params, images, scfg, det = benchmark.backbone_step(cfg, per_dev)
          mem = benchmark.memory_stats(fn.lower(params, images).compile())
          g = det_image_size // scfg.patch_size
          rec = {'student': scfg.name, 'precision': precision, 'remat': remat,
                 'per_device_batch': per_dev, 'image': det_image_size, 'tokens': g * g,
                 'attention': ('global x%d' % scfg.depth if glb == 'all' else
                               f'window {window_size} + global {list(det.global_blocks)}'),
                 'compile_s': time.perf_counter() - t0, **mem}
          print('RESULT ' + json.dumps(rec), flush=True)
          out.append(rec)
  return out


def vitdet_table(records, budget_gib, headroom_gib):
  usable = (budget_gib - headroom_gib) * GiB
  lines = ['| model | image (tokens) | attention | precision | remat | batch/device | arguments GiB | '
           'temporaries GiB | total GiB | fits 40 GB? | compile s |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in records:
    lines.append(f"| {r['student']} | {r['image']} ({r['tokens']:,}) | {r['attention']} | "
                 f"{r['precision']} | {r['remat']} | {r['per_device_batch']} | "
                 f"{fmt(r['argument_size_in_bytes'])} | {fmt(r['temp_size_in_bytes'])} | "
                 f"{fmt(r['peak_bytes'])} | {'yes' if r['peak_bytes'] <= usable else 'no'} | "
                 f"{r['compile_s']:.0f} |")
  return '\n'.join(lines)


def video_worker(n, precisions, remats, batches, config):
  """The video fine-tuning step (training/video.py build) of a configs/video_*.py recipe, e.g.
  --config=video_k400_g14.py: g/14 x 16 frames x 224 = 4,097 tokens; 400 classes; batch/device
  counts clips."""
  import jax
  sys.path.insert(0, ROOT)
  from eva_jax import benchmark, parallel
  from eva_jax.training import video
  assert jax.device_count() == n, (jax.device_count(), n)
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(ROOT, 'configs', config))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for precision in precisions:
    for remat in remats:
      for per_dev in batches:
        cfg = mod.get_config()
        cfg.precision = precision
        cfg.batch_size = per_dev * n
        cfg.model.remat = remat
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
        mesh = parallel.make_mesh(cfg.mesh)
        t0 = time.perf_counter()
        task, ecfg = video.build(cfg, mesh, num_classes=400)
        t, s = cfg.video.num_frames, cfg.image_size
        batch = {'video': jax.ShapeDtypeStruct((cfg.batch_size, t, s, s, 3), jax.numpy.float32),
                 'label': jax.ShapeDtypeStruct((cfg.batch_size,), jax.numpy.int32)}
        compiled = task.train_step.lower(task.abstract_state, {}, batch).compile()
        mem = benchmark.memory_stats(compiled)
        tokens = 1 + t // cfg.video.tubelet * (s // ecfg.patch_size) ** 2
        rec = {'devices': n, 'precision': precision, 'remat': remat, 'per_device_batch': per_dev,
               'teacher_shard': 'none', 'student': f'{ecfg.name} x {t} frames ({tokens} tokens)',
               'teacher': '', 'compile_s': time.perf_counter() - t0, **mem}
        print('RESULT ' + json.dumps(rec), flush=True)


def fmt(b):
  return f'{b / GiB:.2f}'


def table(records, budget_gib, headroom_gib):
  lines = ['| N devices | precision | remat | batch/device | arguments GiB | temporaries GiB | '
           'total GiB | fits 40 GB? | compile s |', '|---|---|---|---|---|---|---|---|---|']
  usable = (budget_gib - headroom_gib) * GiB
  for r in sorted(records, key=lambda r: (r['devices'], r['precision'], r['remat'],
                                         r['per_device_batch'])):
    total = r['peak_bytes']
    lines.append(f"| {r['devices']} | {r['precision']} | {r['remat']} | {r['per_device_batch']} | "
                 f"{fmt(r['argument_size_in_bytes'])} | {fmt(r['temp_size_in_bytes'])} | "
                 f"{fmt(total)} | {'yes' if total <= usable else 'no'} | {r['compile_s']:.0f} |")
  return '\n'.join(lines)


def max_batch(records, budget_gib, headroom_gib):
  """Largest per-device batch per (N, precision, remat): total(B) = fixed(N) + slope * B, the slope
  from the two batches measured at the smallest N (activations per device do not depend on N)."""
  usable = (budget_gib - headroom_gib) * GiB
  slopes = {}
  by = {}
  for r in records:
    by.setdefault((r['devices'], r['precision'], r['remat']), []).append(r)
  n0 = min(r['devices'] for r in records)
  for (n, p, m), rs in by.items():
    rs = sorted(rs, key=lambda r: r['per_device_batch'])
    if n == n0 and len(rs) >= 2 and rs[-1]['per_device_batch'] != rs[0]['per_device_batch']:
      slopes[(p, m)] = ((rs[-1]['peak_bytes'] - rs[0]['peak_bytes']) /
                        (rs[-1]['per_device_batch'] - rs[0]['per_device_batch']))
  lines = ['| N devices | precision | remat | bytes per extra image GiB | fixed GiB | '
           f'max batch/device in {budget_gib - headroom_gib:g} GiB |', '|---|---|---|---|---|---|']
  for (n, p, m), rs in sorted(by.items()):
    if (p, m) not in slopes:
      continue
    s = slopes[(p, m)]
    r = max(rs, key=lambda r: r['per_device_batch'])
    fixed = r['peak_bytes'] - s * r['per_device_batch']
    best = int((usable - fixed) // s) if s > 0 else None
    lines.append(f'| {n} | {p} | {m} | {s / GiB:.3f} | {fixed / GiB:.2f} | '
                 f'{best if best is None or best > 0 else "does not fit"} |')
  return '\n'.join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--devices', default='8,16,64,128')
  ap.add_argument('--precisions', default='bf16,fp16')
  ap.add_argument('--remats', default='none,dots,full')
  ap.add_argument('--batches', default='32', help='per-device batches at every N')
  ap.add_argument('--slope_batch', type=int, default=8,
                  help='extra per-device batch compiled at the smallest N for the batch slope (0 = off)')
  ap.add_argument('--teacher_shard', default='replicate', choices=['replicate', 'fsdp'])
  ap.add_argument('--config', default='eva01_g14_pretrain.py',
                  help='recipe file under configs/ (e.g. eva02_l14_pretrain.py: EVA-02-L + EVA-CLIP-g)')
  ap.add_argument('--budget_gib', type=float, default=40.0)
  ap.add_argument('--headroom_gib', type=float, default=2.0)
  ap.add_argument('--timeout', type=int, default=1200, help='seconds per device count')
  ap.add_argument('--out', default='', help='write the markdown tables here (else stdout)')
  ap.add_argument('--jsonl', default='', help='also write the raw records here')
  ap.add_argument('--worker', type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument('--vitdet', action='store_true', help='the ViTDet backbone rows (see docstring)')
  ap.add_argument('--det_image_size', type=int, default=1024)
  ap.add_argument('--window_size', type=int, default=16)
  ap.add_argument('--global_blocks', default='',
                  help="';'-separated sets: '' = every 6th from block 5, 'all', or '5,11,17,23'")
  args = ap.parse_args()
  precisions = args.precisions.split(',')
  remats = args.remats.split(',')
  batches = [int(b) for b in args.batches.split(',')]
  if args.vitdet:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    t0 = time.perf_counter()
    glbs = args.global_blocks.split(';')
    records = vitdet_records(precisions, remats, batches, args.config, args.det_image_size,
                             args.window_size, glbs)
    text = (f'## ViTDet backbone fwd+bwd bytes per device ({args.config}; XLA:CPU compiled memory '
            'analysis, one device)\n\n' + vitdet_table(records, args.budget_gib, args.headroom_gib)
            + f'\n\n{len(records)} compiles in {time.perf_counter() - t0:.0f} s.')
    if args.out:
      with open(args.out, 'w') as f:
        f.write(text + '\n')
    print(text)
    return
  if args.worker:
    worker(args.worker, precisions, remats, batches, args.teacher_shard, args.config)
    return
  devices = [int(n) for n in args.devices.split(',')]
  records, notes = [], []
  t_all = time.perf_counter()
  for i, n in enumerate(devices):
    b = sorted(set(batches + ([args.slope_batch] if i == 0 and args.slope_batch else [])))
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n}',
               JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.abspath(__file__), f'--worker={n}', f'--precisions={args.precisions}',
           f'--remats={args.remats}', f'--batches={",".join(map(str, b))}',
           f'--teacher_shard={args.teacher_shard}', f'--config={args.config}']
    t0 = time.perf_counter()
    try:
      out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
      text, err = out.stdout, (out.stderr if out.returncode else '')
    except subprocess.TimeoutExpired as e:
      text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
      err = f'timed out after {args.timeout} s'
    got = [json.loads(l[7:]) for l in text.splitlines() if l.startswith('RESULT ')]
    records += got
    msg = f'N={n}: {len(got)} compiles in {time.perf_counter() - t0:.0f} s'
    if err:
      msg += f' (incomplete: {err.strip().splitlines()[-1][:300]})'
    notes.append(msg)
    print(msg, file=sys.stderr, flush=True)
  md = [f'## Bytes per device ({args.config}; XLA:CPU compiled memory analysis; teacher '
        f'{args.teacher_shard})', '',
        table(records, args.budget_gib, args.headroom_gib), '',
        '## Largest per-device batch', '', max_batch(records, args.budget_gib, args.headroom_gib), '',
        'Runs: ' + '; '.join(notes) + f'; total {time.perf_counter() - t_all:.0f} s.']
  text = '\n'.join(md)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  print(text)
  if args.jsonl:
    with open(args.jsonl, 'w') as f:
      for r in records:
        f.write(json.dumps(r) + '\n')


if __name__ == '__main__':
  main()
