r"""Where the CPU pretraining step spends its time: the step cut into its parts, each compiled and
timed alone, next to its FLOPs and the machine's matmul rate on the same shapes.

  python experiments/profile_step.py                         # configs/bench_cpu.py, ~2 min
  python experiments/profile_step.py --rounds=5 --trace_dir=/tmp/eva_trace   # + a jax profiler trace
  python experiments/profile_step.py --xla_dump=/tmp/eva_dump                # + XLA's HLO after passes
  python experiments/profile_step.py --ops                                   # + time per XLA op kind

Parts (each one jit, the shapes and dtypes of the step, median of --rounds x --steps runs):
  step          the real train step (`training/pretrain.py build`, exactly what eva-benchmark times)
  teacher       the frozen teacher's targets (`models/teacher.py targets`), forward only
  student       loss and gradient of the student (MIM forward + lm_head + cosine loss, backward),
                targets given
  optimizer     the optax update (clip, AdamW, decay mask, schedule) on gradients of the params' shapes
The parts add up to the step up to what XLA fuses across them; `matmul-bound s` is each part's
analytic FLOPs over the matmul rate measured on the step's block shapes (`benchmark.matmul_rate`),
so `fraction` = how close the part runs to its own matmuls. With --trace_dir the step runs under
`jax.profiler.trace` (open the .xplane.pb / perfetto trace in TensorBoard or ui.perfetto.dev for
the per-op breakdown); --xla_dump sets XLA_FLAGS=--xla_dump_to (the optimized HLO shows which ops
XLA:CPU fused and which matmuls went to oneDNN / XNNPACK).

--ops runs the step under the profiler (perfetto trace), maps every XLA:CPU op (thunk) to its
instruction in the compiled program and sums its time per step by phase (forward = student and
teacher forward, backward, recompute = remat's rematerialized forward inside the backward,
optimizer/other) and kind (matmul: YNNPACK / Eigen dots; reduction; zero-fill: the broadcasts that
initialize stacked scan buffers; elementwise: XLA's loop fusions, copies, transposes). Ops that
run concurrently on the two cores overlap, so the column sums exceed the step's wall time.

Timings on a shared 2-core machine are noisy: compare parts within one run, not across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _time(fn, args, steps: int, rounds: int) -> tuple[float, float]:
  """(median wall seconds, median process CPU seconds) per call. CPU time (all threads) is the
  steadier measure of work when other jobs share the cores."""
  import jax
  jax.block_until_ready(fn(*args))
  times, cpu = [], []
  for _ in range(rounds):
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / steps)
    cpu.append((time.process_time() - c0) / steps)
  return statistics.median(times), statistics.median(cpu)


def _phase(op_name: str) -> str:
  if 'transpose(jvp' in op_name:
    return 'recompute' if 'rematted_computation' in op_name else 'backward'
  return 'forward' if 'jvp(' in op_name or '/while/' in op_name else 'optimizer/other'


def _kind(name: str, op_name: str) -> str:
  if 'dot_general' in op_name and (name.startswith('ynn_fusion') or name.startswith('dot')):
    return 'matmul'
  if name.startswith('ynn_fusion'):
    return 'reduction'
  if name.startswith('wrapped_broadcast'):
    return 'zero-fill'
  return 'elementwise'


def op_breakdown(step, args, steps: int) -> tuple[dict, list]:
  """ms per step of every XLA:CPU op of `step(*args)` from a perfetto trace, by (phase, kind), and
  the 15 slowest ops. Reads the compiled HLO for each op's shape and source (op_name)."""
  import collections
  import glob
  import gzip
  import re
  import tempfile
  import jax
  text = step.lower(*args).compile().as_text()
  info = {}
  for line in text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ', line)
    if m:
      op = re.search(r'op_name="([^"]+)"', line)
      info[m.group(1)] = (m.group(2), op.group(1) if op else '')
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        out = step(*args)
      jax.block_until_ready(out)
    events = json.load(gzip.open(glob.glob(f'{d}/**/*.trace.json.gz', recursive=True)[0]))
  events = events['traceEvents'] if isinstance(events, dict) else events
  per_op = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('name') in info:
      per_op[e['name']] += e['dur'] / 1e3 / steps
  table = collections.Counter()
  for name, ms in per_op.items():
    shape, op_name = info[name]
    table[(_phase(op_name), _kind(name, op_name))] += ms
  top = [(ms, name, info[name][0], info[name][1][-90:]) for name, ms in per_op.most_common(15)]
  return table, top


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='bench_cpu')
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--trace_dir', default='')
  ap.add_argument('--xla_dump', default='')
  ap.add_argument('--ops', action='store_true', help='time per XLA op kind and phase')
  a = ap.parse_args()
  from eva_jax import host_memory
  host_memory.keep_step_buffers_resident()   # as eva-benchmark does: before jax starts
  if a.xla_dump:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' --xla_dump_to={a.xla_dump}'
                               ' --xla_dump_hlo_as_text').strip()
  import jax
  import optax
  from flax import nnx
  from eva_jax import benchmark, configs, parallel
  from eva_jax.models import mim as mim_lib
  from eva_jax.models import teacher as teacher_lib
  from eva_jax.models import vit
  from eva_jax.training import pretrain, task as task_lib

  cfg = configs.get(a.config)
  mesh = parallel.make_mesh(cfg.mesh)
  task, scfg, tcfg = pretrain.build(cfg, mesh)
  state = task.init(cfg.seed)
  teacher = pretrain.random_teacher(tcfg, task.consts_shardings, cfg.seed + 1)
  host = benchmark.synthetic_host_batch(cfg, scfg.patch_size, cfg.batch_size, seed=cfg.seed)
  batch = parallel.host_to_global(host, mesh)
  t_input = pretrain.teacher_input(cfg, scfg, tcfg)
  t_graphdef, t_template = nnx.split(vit.abstract(tcfg), nnx.Param)

  # As the step: the last blocks and heads on the masked-token bound (pretrain.build).
  k = pretrain.masked_token_bound(cfg, t_input)

  @jax.jit
  def teacher_part(tp, images, mask):
    return teacher_lib.targets(task_lib.merge_pure(t_graphdef, t_template, tp), images, t_input,
                               mim_lib.masked_slots(mask, k)[0])

  targets = teacher_part(teacher, batch['image'], batch['mask'])
  key = jax.random.key(0)

  @jax.jit
  def student_part(params, images, mask, targets):
    def loss(p):
      model = task.model(p)
      idx, w = mim_lib.masked_slots(mask, k)
      return mim_lib.cosine_loss(model(images, mask, dropout_key=key, patch_index=idx), targets,
                                 w)[0]
    return jax.value_and_grad(loss)(params)

  _, grads = student_part(state.params, batch['image'], batch['mask'], targets)

  @jax.jit
  def optimizer_part(grads, opt_state, params):
    updates, opt_state = task.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  step = jax.jit(lambda s, t, b: task.train_step(s, t, b))   # the step without donation
  flops = benchmark.step_flops_per_image(scfg, tcfg, masked_tokens=k)   # executed FLOPs
  b = cfg.batch_size
  rate = benchmark.matmul_rate(scfg, b * benchmark.tokens(scfg))
  parts = [
      ('step', step, (state, teacher, batch), flops['total'] * b),
      ('teacher', teacher_part, (teacher, batch['image'], batch['mask']),
       flops['teacher_forward'] * b),
      ('student', student_part, (state.params, batch['image'], batch['mask'], targets),
       flops['student_train'] * b),
      ('optimizer', optimizer_part, (grads, state.opt_state, state.params), 0.0),
  ]
  rows = []
  for name, fn, args, fl in parts:
    s, c = _time(fn, args, a.steps, a.rounds)
    rows.append({'part': name, 'seconds': s, 'cpu_seconds': c, 'gflop': fl / 1e9,
                 'matmul_bound_s': fl / (rate * 1e12), 'fraction': (fl / (rate * 1e12)) / s})
  if a.trace_dir:
    with jax.profiler.trace(a.trace_dir):
      for _ in range(a.steps):
        out = step(state, teacher, batch)
      jax.block_until_ready(out)
  print(f'{a.config}: batch {b}, {scfg.name} depth {scfg.depth} + {tcfg.name}, {cfg.precision}, '
        f'remat {scfg.remat}; matmul rate on the step\'s block shapes {rate * 1e3:.1f} GFLOP/s; '
        f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
  print('| part | s | share of step | CPU s | CPU share | GFLOP | matmul-bound s | fraction |')
  print('|---|---|---|---|---|---|---|---|')
  total, total_cpu = rows[0]['seconds'], rows[0]['cpu_seconds']
  for r in rows:
    print(f"| {r['part']} | {r['seconds']:.3f} | {r['seconds'] / total:.0%} | "
          f"{r['cpu_seconds']:.3f} | {r['cpu_seconds'] / total_cpu:.0%} | {r['gflop']:.1f} | "
          f"{r['matmul_bound_s']:.3f} | {r['fraction']:.0%} |")
  rest = total - sum(r['seconds'] for r in rows[1:])
  rest_cpu = total_cpu - sum(r['cpu_seconds'] for r in rows[1:])
  print(f'| step - parts (fused away or overhead) | {rest:.3f} | {rest / total:.0%} | '
        f'{rest_cpu:.3f} | {rest_cpu / total_cpu:.0%} | | | |')
  if a.ops:
    table, top = op_breakdown(step, (state, teacher, batch), max(a.steps, 3))
    kinds = ('matmul', 'reduction', 'elementwise', 'zero-fill')
    print('\nXLA ops, ms per step (overlapping ops on the two cores both count):')
    print('| phase | ' + ' | '.join(kinds) + ' | all |')
    print('|---|' + '---|' * (len(kinds) + 1))
    for ph in ('forward', 'backward', 'recompute', 'optimizer/other'):
      vals = [table.get((ph, k), 0.0) for k in kinds]
      print(f'| {ph} | ' + ' | '.join(f'{v:.1f}' for v in vals) + f' | {sum(vals):.1f} |')
    tot = [sum(v for (p, k), v in table.items() if k == kk) for kk in kinds]
    print('| all | ' + ' | '.join(f'{v:.1f}' for v in tot) + f' | {sum(tot):.1f} |')
    print('\nslowest ops (ms per step, result shape, source):')
    for ms, name, shape, op_name in top:
      print(f'  {ms:7.1f}  {name:28s} {shape:28s} {op_name}')
  print(json.dumps({'rows': rows, 'matmul_tflops_per_s': rate}))


if __name__ == '__main__':
  main()
