r"""Ours / PyTorch eager on the CPU step, measured in pairs: the two steps alternate, one at a time.

  python experiments/paired_ratio.py                      # bench_cpu, 30 pairs, ~2 min on 2 cores
  python experiments/paired_ratio.py --pairs=60 --config=bench_cpu --preset=bench_cpu

Why: on a shared VM the machine's speed drifts by 20-30% within minutes (2026-12-01: PyTorch's
bench_cpu step 0.72-0.97 s across runs a few minutes apart), so two separate benchmark processes
run a few minutes apart compare two machines. Here both steps are built once, each in its own
process (this project's with the jax runtime, PyTorch's with its own threads), and then step i of
ours and step i of PyTorch run back to back while the other process waits on a pipe (after a
short pause that lets the idle side's spinning threads go to sleep). Each pair sees the same
machine; the ratio of the pair medians and the median of the per-pair ratios are printed.

The step is what `eva-benchmark --config=<config>` compiles (synthetic batch, `training/pretrain.py
build`) and what `torch_reference.py --preset=<preset> --modes=eager` runs (`--serve`).

Then (--matmul_pairs, default 30) the two libraries' GEMMs alternate the same way on one student
block's weight matmuls at the step's rows (`eva_jax.benchmark.matmul_block`, torch_reference.py
`matmul_block`): their ratio is the part of the step ratio that the GEMM kernels set (XLA:CPU's
YNNPACK or Eigen against PyTorch's MKL / oneDNN), and step ratio / matmul ratio the part beyond
them (attention, norms, elementwise work, the optimizer, scheduling).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve_ours(config: str) -> None:
  """Worker: build and compile the pretraining step of `config`, then time one step per stdin
  line (as torch_reference.py --serve does)."""
  from eva_jax import host_memory
  host_memory.keep_step_buffers_resident()   # as eva-benchmark: before jax starts
  import jax
  from eva_jax import benchmark, configs, parallel
  from eva_jax.benchmark import steps
  from eva_jax.training import pretrain
  cfg = steps.add_benchmark_defaults(configs.get(config))
  mesh = parallel.make_mesh(cfg.mesh)
  task, scfg, tcfg = pretrain.build(cfg, mesh)
  teacher = pretrain.random_teacher(tcfg, task.consts_shardings, cfg.seed + 1)
  host = steps.synthetic_host_batch(cfg, scfg.patch_size, cfg.batch_size, seed=cfg.seed)
  batch = parallel.host_to_global(host, mesh)
  state = task.init(cfg.seed)
  for _ in range(max(int(cfg.benchmark.warmup), 1)):
    state, metrics = task.train_step(state, teacher, batch)
  jax.block_until_ready(state)
  block, block_args, _ = benchmark.matmul_block(scfg, cfg.batch_size * benchmark.tokens(scfg))
  jax.block_until_ready(block(*block_args))
  print('ready', flush=True)
  for line in sys.stdin:
    t0 = time.perf_counter()
    if line.strip() == 'matmul':
      jax.block_until_ready(block(*block_args))
    else:
      state, metrics = task.train_step(state, teacher, batch)
      jax.block_until_ready((state, metrics))
    print(time.perf_counter() - t0, flush=True)


class Worker:
  def __init__(self, cmd):
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 cwd=ROOT)
    for line in self.proc.stdout:
      if line.strip() == 'ready':
        return
    raise RuntimeError(f'{cmd} exited before it was ready (rc {self.proc.wait()}).')

  def step(self, what: str = 'step') -> float:
    self.proc.stdin.write(what + '\n')
    self.proc.stdin.flush()
    return float(self.proc.stdout.readline())

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='bench_cpu')
  ap.add_argument('--preset', default='bench_cpu', help='torch_reference.py preset (same step)')
  ap.add_argument('--pairs', type=int, default=30)
  ap.add_argument('--matmul_pairs', type=int, default=30,
                  help='alternating pairs of the matmul block after the steps (0 = none)')
  ap.add_argument('--pause', type=float, default=0.2, help='seconds between the two steps')
  ap.add_argument('--worker', default='', help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.worker:
    serve_ours(a.worker)
    return
  ours = Worker([sys.executable, os.path.abspath(__file__), f'--worker={a.config}'])
  ref = Worker([sys.executable, os.path.join(ROOT, 'experiments', 'torch_reference.py'),
                f'--preset={a.preset}', '--modes=eager', '--serve'])
  def alternate(what, n):
    out = []
    for i in range(n):
      # Alternate which side goes first, so neither always follows the other's cache state.
      first, second = (ours, ref) if i % 2 == 0 else (ref, ours)
      t_first = first.step(what)
      time.sleep(a.pause)
      t_second = second.step(what)
      time.sleep(a.pause)
      out.append((t_first, t_second) if first is ours else (t_second, t_first))
    return out

  try:
    pairs = alternate('step', a.pairs)
    gemm = alternate('matmul', a.matmul_pairs)
  finally:
    ours.close()
    ref.close()
  o = statistics.median(p[0] for p in pairs)
  t = statistics.median(p[1] for p in pairs)
  per_pair = statistics.median(p[0] / p[1] for p in pairs)
  q = statistics.quantiles([p[0] / p[1] for p in pairs], n=4)
  print(f'{a.config} vs torch_reference --preset={a.preset} eager, {a.pairs} alternating pairs, '
        f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
  print(f'ours median {o:.3f} s (range {min(p[0] for p in pairs):.3f}-'
        f'{max(p[0] for p in pairs):.3f}), PyTorch eager median {t:.3f} s (range '
        f'{min(p[1] for p in pairs):.3f}-{max(p[1] for p in pairs):.3f})')
  print(f'ratio of medians {o / t:.3f}; median per-pair ratio {per_pair:.3f} '
        f'(quartiles {q[0]:.3f}-{q[2]:.3f})')
  out = {'ours_s': o, 'torch_s': t, 'ratio_of_medians': o / t, 'median_pair_ratio': per_pair,
         'pair_ratio_quartiles': [q[0], q[2]], 'pairs': pairs}
  if gemm:
    # The libraries' GEMMs on the step's shapes (XLA:CPU's YNNPACK / Eigen against PyTorch's
    # MKL / oneDNN), in the same window: the part of the step ratio that is the GEMM kernel's.
    g = statistics.median(p[0] / p[1] for p in gemm)
    print(f'matmul block (one student block\'s weight matmuls, the step\'s rows), '
          f'{len(gemm)} pairs: ours {statistics.median(p[0] for p in gemm) * 1e3:.2f} ms, PyTorch '
          f'{statistics.median(p[1] for p in gemm) * 1e3:.2f} ms, median per-pair ratio {g:.3f}; '
          f'step ratio / matmul ratio {per_pair / g:.3f} (the gap beyond the GEMM kernels)')
    out.update(matmul_pair_ratio=g, matmul_pairs=gemm)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
