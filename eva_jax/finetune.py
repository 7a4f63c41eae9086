r"""Fine-tune an EVA encoder for image classification.

  python -m eva_jax.finetune --config=configs/finetune_demo.py --workdir=workdirs/finetune_demo \
      --config.init_from=workdirs/demo

`config.init_from`: a pretraining (or fine-tuning) workdir / checkpoint folder, or a PyTorch file
(timm or official EVA layout, converted by eva_jax.convert.eva_torch); '' = random init.
Logs eval_top1/eval_top5 to metrics.jsonl (EMA weights when config.ema_decay > 0). Resumes like
pretraining.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from eva_jax import checkpoint as ckpt_lib
from eva_jax import parallel
from eva_jax.data import pipeline as data_lib
from eva_jax.models.classifier import finetune_encoder_config
from eva_jax.training import classify, loop
from eva_jax.training import metrics as metrics_lib
from eva_jax.training import precision


def load_pretrained_encoder(path: str) -> tuple[dict, dict]:
  """(encoder params as a nested dict of numpy arrays, encoder config dict) from `path`."""
  if os.path.isdir(path):
    params, meta, _ = ckpt_lib.restore_params(path)
    if 'encoder' not in params or 'student' not in meta:
      raise ValueError(f'{path!r} holds no eva_jax encoder (parameter groups {sorted(params)}).')
    return params['encoder'], meta['student']
  if os.path.isfile(path):
    from eva_jax.convert import common, eva_torch
    enc_cfg, model, extras = eva_torch.from_torch_state_dict(common.TensorSource(path))
    logging.info('Imported %s; extra keys not used by the encoder: %s', path, sorted(extras))
    return common.unflatten(common.model_params_numpy(model)), enc_cfg.to_dict()
  raise FileNotFoundError(f'config.init_from={path!r} does not exist. Pass a pretraining workdir, '
                          'a checkpoint folder, or a timm/official EVA .pth/.safetensors file.')


def init_state(cfg, task, workdir_is_fresh: bool):
  state = task.init(cfg.seed)
  if not cfg.init_from or not workdir_is_fresh:
    return state
  enc, enc_cfg = load_pretrained_encoder(cfg.init_from)
  for field in ('width', 'depth', 'heads', 'mlp_dim', 'patch_size', 'swiglu', 'sub_ln',
                'sub_ln_attn', 'rope'):
    if field in enc_cfg and enc_cfg[field] != task.encoder_cfg[field]:
      raise ValueError(f'config.init_from has model.{field}={enc_cfg[field]} but the fine-tuning '
                       f'config has {task.encoder_cfg[field]}; set --config.model.name to match.')
  p = task.encoder_cfg.patch_size
  grid_from = (enc_cfg.get('image_size', 224) // p,) * 2
  grid_to = (task.encoder_cfg.image_size // p,) * 2
  params = jax.tree.map(np.asarray, jax.device_get(state.params))
  params['encoder'], dropped = classify.pretrained_into(
      task.abstract_state.params, enc, grid_from=grid_from, grid_to=grid_to)
  if cfg.fc_norm_from_norm and 'norm' in enc:
    # timm's checkpoint_filter_fn: the MIM `norm` becomes the classifier's `fc_norm`.
    params['fc_norm'] = {k: np.asarray(v, np.float32) for k, v in enc['norm'].items()}
    dropped = [d for d in dropped if not d.startswith('norm/')] + ['norm -> fc_norm']
  print(f'Initialized the encoder from {cfg.init_from} (pos-embed grid {grid_from} -> {grid_to}; '
        f'not used: {", ".join(dropped) or "nothing"}).', flush=True)
  params = jax.tree.map(jax.device_put, params, task.param_shardings)
  return task.with_params(state, params)


def train(cfg, workdir: str) -> dict:
  precision.compute_dtype(cfg.precision)
  parallel.maybe_initialize_distributed(cfg)
  mesh = parallel.make_mesh(cfg.mesh)
  parallel.check_batch(cfg.batch_size, mesh)
  is_main = jax.process_index() == 0
  num_classes = cfg.num_classes or data_lib.source_num_classes(cfg.data)
  if not num_classes:
    raise ValueError(f'config.data.source={cfg.data.source!r} has no labels and config.num_classes '
                     'is 0; fine-tuning needs a labeled source.')
  os.makedirs(workdir, exist_ok=True)
  task = classify.build(cfg, mesh, num_classes)
  if is_main:
    resolved = cfg.to_dict()
    resolved['num_classes'] = num_classes
    resolved['resolved'] = {'encoder': task.encoder_cfg.to_dict(), 'mesh': dict(mesh.shape)}
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(resolved, f, indent=2, default=str)

  per_host = cfg.batch_size // jax.process_count()
  loader = data_lib.build_classification_loader(
      cfg.data, image_size=cfg.image_size, batch_size=per_host, seed=cfg.seed, train=True,
      num_classes=num_classes)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.keep_checkpoints)
  meta = {'kind': 'eva_finetune',
          'student': finetune_encoder_config(task.encoder_cfg).to_dict(),   # no mask token / norm
          'num_classes': num_classes, 'pool': cfg.pool}
  start = ckpt.latest_step()
  if start is not None:
    state, data_state, _ = ckpt.restore(start, task.abstract_state, task.state_shardings)
    loader.set_state(data_state)
  else:
    start = 0
    state = init_state(cfg, task, workdir_is_fresh=True)

  def evaluate(state, step):
    eval_cfg = cfg.data.copy_and_resolve_references()
    if cfg.eval_source:
      eval_cfg.source = cfg.eval_source
    eval_loader = data_lib.build_classification_loader(
        eval_cfg, image_size=cfg.image_size, batch_size=per_host, seed=cfg.seed, train=False,
        num_classes=num_classes)
    params = state.ema if cfg.ema_decay > 0 else state.params
    sums = {'loss': 0.0, 'top1': 0.0, 'top5': 0.0, 'count': 0.0}
    for i, b in enumerate(eval_loader):
      if cfg.eval_batches > 0 and i >= cfg.eval_batches:
        break
      b.pop('skipped', None)
      out = jax.device_get(task.eval_step(params, parallel.host_to_global(b, mesh)))
      for k in sums:
        sums[k] += float(out[k])
    eval_loader.close()
    n = max(sums['count'], 1.0)
    rec = {'eval_loss': sums['loss'] / n, 'eval_top1': sums['top1'] / n,
           'eval_top5': sums['top5'] / n, 'eval_count': int(sums['count'])}
    if is_main:
      print(f"step {step} eval top1 {rec['eval_top1']:.4f} top5 {rec['eval_top5']:.4f} "
            f"on {rec['eval_count']} images{' (EMA)' if cfg.ema_decay > 0 else ''}", flush=True)
    return rec

  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  progress = metrics_lib.Progress(total=cfg.total_steps, initial=start,
                                  enabled=is_main and cfg.progress)
  try:
    _, last, _ = loop.run(cfg, state=state, start=start, train_step=task.train_step, loader=loader,
                          to_device=lambda b: parallel.host_to_global(b, mesh), ckpt=ckpt,
                          meta=meta, writer=writer, progress=progress, evaluate=evaluate)
  finally:
    ckpt.close()
    writer.close()
    progress.close()
    loader.close()
  return last


if __name__ == '__main__':
  loop.run_program(train, 'Fine-tuning')
