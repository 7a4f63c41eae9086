r"""EVA pretraining: masked CLIP-feature regression, readable top to bottom.

  python -m eva_jax.pretrain --config=configs/pretrain_demo.py --workdir=workdirs/demo \
      [--config.batch_size=8 --config.mesh.fsdp=-1 ...]

Running the same command on the same workdir resumes from the latest checkpoint (train state,
input-iterator position; randomness is a function of (seed, step)), so the continuation equals an
uninterrupted run. SIGTERM finishes the current step, saves and exits 0.
"""
from __future__ import annotations

import json
import os

import jax
from absl import logging

from eva_jax import checkpoint as ckpt_lib
from eva_jax import parallel
from eva_jax.data import pipeline as data_lib
from eva_jax.training import loop
from eva_jax.training import metrics as metrics_lib
from eva_jax.training import precision
from eva_jax.training import step as step_lib


def validate_config(cfg) -> None:
  """Bad configs fail here, with the field named, before anything is compiled."""
  precision.compute_dtype(cfg.precision)
  for f in ('total_steps', 'batch_size', 'log_every', 'checkpoint_every'):
    if int(cfg[f]) <= 0:
      raise ValueError(f'config.{f} must be positive, got {cfg[f]}.')
  if cfg.teacher.shard not in ('replicate', 'fsdp'):
    raise ValueError(f"config.teacher.shard must be 'replicate' or 'fsdp', got {cfg.teacher.shard!r}.")
  step_lib.student_config(cfg)  # unknown model name / field / shape errors


def load_teacher(cfg, dtype: str):
  """(teacher ConfigDict, host params) from config.teacher.checkpoint, or (None, None) for random init."""
  if not cfg.teacher.checkpoint:
    logging.info('No teacher.checkpoint: random-init teacher %s (demos and tests only).',
                 cfg.teacher.name)
    return None, None
  from flax import nnx
  import ml_collections
  from eva_jax.api import load_teacher as load
  teacher = load(cfg.teacher.checkpoint, dtype=dtype)
  tcfg = ml_collections.ConfigDict(teacher.model.cfg.to_dict())
  return tcfg, nnx.to_pure_dict(nnx.state(teacher.model, nnx.Param))


def train(cfg, workdir: str) -> dict:
  """Runs (or resumes) pretraining; returns the last logged metrics."""
  validate_config(cfg)
  parallel.maybe_initialize_distributed(cfg)
  mesh = parallel.make_mesh(cfg.mesh)
  parallel.check_batch(cfg.batch_size, mesh)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)

  teacher_cfg, teacher_host = load_teacher(
      cfg, precision.compute_dtype(cfg.teacher.precision or cfg.precision))
  task = step_lib.build(cfg, mesh, teacher_cfg=teacher_cfg)
  if is_main:
    resolved = cfg.to_dict()
    resolved['resolved'] = {'student': task.student_cfg.to_dict(), 'teacher': task.teacher_cfg.to_dict(),
                            'mesh': dict(mesh.shape), 'num_devices': jax.device_count(),
                            'num_processes': jax.process_count()}
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(resolved, f, indent=2, default=str)

  loader = data_lib.build_pretrain_loader(
      cfg.data, image_size=cfg.image_size, patch_size=task.student_cfg.patch_size,
      batch_size=cfg.batch_size // jax.process_count(), seed=cfg.seed, train=True)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.keep_checkpoints)
  meta = {'kind': 'eva_pretrain', 'student': task.student_cfg.to_dict(),
          'teacher': task.teacher_cfg.to_dict()}

  start = ckpt.latest_step()
  if start is not None:
    state, data_state, _ = ckpt.restore(start, task.abstract_state, task.state_shardings)
    loader.set_state(data_state)
    if is_main:
      print(f'Resumed from step {start} in {ckpt.directory}.', flush=True)
  else:
    start = 0
    state = task.init(cfg.seed)
  if teacher_host is None:
    teacher_params = task.init_teacher(cfg.seed + 1)
  else:
    teacher_params = jax.tree.map(jax.device_put, teacher_host, task.teacher_shardings)
    del teacher_host

  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  progress = metrics_lib.Progress(total=cfg.total_steps, initial=start,
                                  enabled=is_main and cfg.progress)
  try:
    state, last, _ = loop.run(
        cfg, state=state, start=start, loader=loader, ckpt=ckpt, meta=meta, writer=writer,
        progress=progress,
        train_step=lambda s, b: task.train_step(s, teacher_params, b),
        to_device=lambda b: parallel.host_to_global(b, mesh),
        evaluate=lambda s, step: evaluate(cfg, task, s, teacher_params, step))
  finally:
    ckpt.close()
    writer.close()
    progress.close()
    loader.close()
  return last


def evaluate(cfg, task, state, teacher_params, step) -> dict:
  """Validation loss with the spec's deterministic mask (every even patch) on center crops."""
  loader = data_lib.build_pretrain_loader(
      cfg.data, image_size=cfg.image_size, patch_size=task.student_cfg.patch_size,
      batch_size=cfg.batch_size // jax.process_count(), seed=cfg.seed, train=False)
  total, tokens = 0.0, 0.0
  for i, host_batch in enumerate(loader):
    if i >= cfg.eval_batches:
      break
    host_batch.pop('skipped', None)
    # Padding examples of the last batch carry no masked tokens, so they add nothing to the loss.
    host_batch['mask'] = host_batch['mask'] & host_batch.pop('valid')[:, None]
    m = jax.device_get(task.eval_step(state, teacher_params,
                                      parallel.host_to_global(host_batch, task.mesh)))
    total += float(m['loss']) * float(m['masked_tokens'])
    tokens += float(m['masked_tokens'])
  loader.close()
  if not tokens:
    return {}
  if jax.process_index() == 0:
    print(f'step {step} val_loss {total / tokens:.4f} ({int(tokens)} masked tokens)', flush=True)
  return {'val_loss': total / tokens}


if __name__ == '__main__':
  loop.run_program(train, 'Pretraining')
