r"""Teacher share of the pretraining step, per teacher family (issue 13): measured on CPU at small
size, and counted in FLOPs for the real pairs.

  python experiments/teacher_share.py                       # ~5 min on 2 CPU cores
  python experiments/teacher_share.py --width=192 --depth=6 --steps=5 --out=/tmp/share.md

Measured: the student eva02-Ti/14 at 112 px, batch 8, fp32, with a teacher of each family scaled to
the same small size (width/depth/heads from the flags; the family's own structure: CLIP ln_pre /
QuickGELU / ln_post + proj, EVA-CLIP EVA-01 and EVA-02 (SwiGLU, sub-LN, RoPE) and post-norm towers
with their head, SigLIP without cls, DINOv2 with layer scale and 4 registers). For each: the
compiled train step exactly as eva-pretrain builds it (`pretrain.build`), and the jitted teacher
targets alone on the same batch; wall-clock medians and process CPU time per call (all threads, less
sensitive to other jobs on a shared machine). Share = teacher alone / whole step.

Counted: teacher forward FLOPs / step FLOPs at 224 for EVA-02-L/14 with the large tower of each
family (benchmark.step_flops_per_image, with patch embeddings and heads).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SMALL = ('clip-tiny', 'eva01-clip-tiny', 'eva02-clip-tiny', 'eva02-clip-tiny-post', 'siglip-tiny',
         'dinov2-tiny-reg')
LARGE = ('clip-L/14', 'eva01-clip-g/14', 'eva02-clip-L/14', 'eva02-clip-E/14', 'siglip-So400m/14',
         'dinov2-L/14-reg', 'dinov2-g/14')


def _time(fn, n):
  wall, cpu = [], []
  for _ in range(n):
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return statistics.median(wall), statistics.median(cpu)


def measure(name, args):
  import jax
  import numpy as np
  from flax import nnx

  from eva_jax import benchmark, defaults, parallel
  from eva_jax.models import config as model_config
  from eva_jax.models import teacher as teacher_lib
  from eva_jax.models import vit
  from eva_jax.training import pretrain

  cfg = defaults.pretrain_defaults(model='eva02-Ti/14', teacher=name)
  cfg.teacher.family = model_config.teacher_family(name)
  cfg.image_size, cfg.batch_size, cfg.model.drop_path = args.image_size, args.batch, 0.0
  cfg.data.mask.num_masking_patches = 0
  tcfg = model_config.teacher_config(name)
  swiglu_hidden = int(args.width * 4 * 2 / 3)
  tcfg.update(dict(width=args.width, depth=args.depth, heads=args.heads,
                   mlp_dim=swiglu_hidden if tcfg.swiglu else 4 * args.width,
                   image_size=args.image_size))
  tcfg.out_dim = args.width   # towers without a projection must have out_dim = width
  mesh = parallel.make_mesh(cfg.mesh)
  task, scfg, tcfg = pretrain.build(cfg, mesh, tcfg)
  teacher = pretrain.random_teacher(tcfg, task.consts_shardings, 1)
  host = benchmark.synthetic_host_batch(cfg, scfg.patch_size, cfg.batch_size)
  batch = parallel.host_to_global(host, mesh)
  state = task.init(0)
  compiled = task.train_step.lower(task.abstract_state, teacher, batch).compile()
  holder = {'state': state}

  def step():
    holder['state'], m = compiled(holder['state'], teacher, batch)
    jax.block_until_ready(m)

  graphdef, template = nnx.split(vit.abstract(tcfg), nnx.Param)
  plan = pretrain.teacher_input(cfg, scfg, tcfg)
  from eva_jax.training import task as task_lib
  t_fn = jax.jit(lambda p, x: teacher_lib.targets(task_lib.merge_pure(graphdef, template, p), x,
                                                  plan))
  images = batch['image']

  def teach():
    jax.block_until_ready(t_fn(teacher, images))

  for _ in range(2):
    step(), teach()
  s_wall, s_cpu = _time(step, args.steps)
  t_wall, t_cpu = _time(teach, args.steps)
  flops = benchmark.step_flops_per_image(scfg, tcfg)
  return dict(name=name, family=tcfg.family, step_s=s_wall, teacher_s=t_wall, step_cpu=s_cpu,
              teacher_cpu=t_cpu, share_wall=t_wall / s_wall, share_cpu=t_cpu / s_cpu,
              flop_share=flops['teacher_share'],
              params=vit.param_count(vit.abstract(tcfg)))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--width', type=int, default=192)
  ap.add_argument('--depth', type=int, default=6)
  ap.add_argument('--heads', type=int, default=3)
  ap.add_argument('--image_size', type=int, default=112)
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--out', default='')
  args = ap.parse_args()
  from eva_jax import benchmark
  from eva_jax.models import config as model_config
  rows = ['| teacher preset (scaled) | family | teacher params | step s | teacher alone s | share '
          '(wall) | share (CPU time) | share (FLOPs) |', '|---|---|---|---|---|---|---|---|']
  for name in SMALL:
    r = measure(name, args)
    rows.append(f'| {name} | {r["family"]} | {r["params"] / 1e6:.2f}M | {r["step_s"]:.3f} | '
                f'{r["teacher_s"]:.3f} | {r["share_wall"]:.0%} | {r["share_cpu"]:.0%} | '
                f'{r["flop_share"]:.0%} |')
    print(rows[-1], flush=True)
  s = model_config.encoder_config('eva02-L/14')
  big = ['| teacher (224 px) | family | teacher TFLOP/image | step TFLOP/image | teacher share |',
         '|---|---|---|---|---|']
  for name in LARGE:
    t = model_config.teacher_config(name)
    f = benchmark.step_flops_per_image(s, t, teacher_image_size=224)
    big.append(f'| {name} | {t.family} | {f["teacher_forward"] / 1e12:.3f} | '
               f'{f["total"] / 1e12:.3f} | {f["teacher_share"]:.0%} |')
  text = '\n'.join([f'Measured (CPU, student eva02-Ti/14 at {args.image_size} px, batch '
                    f'{args.batch}, teachers scaled to width {args.width}, depth {args.depth}):',
                    '', *rows, '', 'Counted (EVA-02-L/14 student at 224, FLOPs):', '', *big])
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
