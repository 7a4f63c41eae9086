"""Fine-tuning step for image classification (../shared/EVA-SPEC.md "ImageNet fine-tuning").

Same conventions as step.py (pure-pytree state, sharded init, donated jitted step), plus: soft-label
cross-entropy (mixup/cutmix and label smoothing arrive as soft labels from the loader, or hard
labels are smoothed here), frozen patch embedding, layer-wise lr decay, and an EMA of the weights
that evaluation can use.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eva_jax import parallel
from eva_jax.models import classifier as clf_lib
from eva_jax.training import optim, precision
from eva_jax.training.step import merge_pure, student_config, under_mesh

PATCH_EMBED = ('patch_kernel', 'patch_bias')


@struct.dataclass
class FinetuneState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any               # EMA of params (a copy of params when EMA is off, never updated)
  loss_scale: precision.LossScale


@dataclasses.dataclass
class ClassifyTask:
  cfg: ml_collections.ConfigDict
  mesh: Mesh
  encoder_cfg: ml_collections.ConfigDict
  num_classes: int
  abstract_state: Any
  state_shardings: Any
  param_shardings: Any
  schedule: Callable
  init: Callable            # seed -> FinetuneState
  with_params: Callable     # (state, params) -> state whose params and EMA are `params`
  train_step: Callable      # (state, batch) -> (state, metrics)
  eval_step: Callable       # (params, batch) -> sums: loss, top1, top5, count


def soft_targets(labels, num_classes: int, smoothing: float):
  """Hard int labels -> smoothed one-hot (timm: off = s/C, on = 1 - s + s/C); soft labels pass."""
  if labels.ndim == 2:
    return labels.astype(jnp.float32)
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _trainable(params, freeze_patch_embed: bool):
  def one(path, _):
    names = [str(getattr(k, 'key', k)) for k in path]
    return not (freeze_patch_embed and names[0] == 'encoder' and names[1] in PATCH_EMBED)
  return jax.tree_util.tree_map_with_path(one, params)


def build(cfg, mesh: Mesh, num_classes: int) -> ClassifyTask:
  ecfg = student_config(cfg)
  total = int(cfg.total_steps)
  ema_decay = float(cfg.get('ema_decay', 0.0))
  loss_scale_on = cfg.precision == 'fp16'

  def make_model(seed):
    return clf_lib.Classifier(ecfg, num_classes, pool=cfg.pool,
                              head_init_scale=cfg.head_init_scale,
                              rngs=nnx.Rngs(params=jax.random.key(seed)))

  graphdef, template = nnx.split(nnx.eval_shape(lambda: make_model(0)), nnx.Param)
  abstract_params = nnx.to_pure_dict(template)
  tx, schedule = optim.make_optimizer(
      cfg.optim, abstract_params, total, depth=ecfg.depth, encoder_prefix=('encoder',),
      trainable=_trainable(abstract_params, cfg.freeze_patch_embed))

  def init(seed):
    params = nnx.to_pure_dict(nnx.state(make_model(seed), nnx.Param))
    return FinetuneState(step=jnp.asarray(0, jnp.int32), params=params,
                         opt_state=tx.init(params), ema=params,
                         loss_scale=precision.LossScale.from_config(cfg.loss_scale, loss_scale_on))

  abstract_state = jax.eval_shape(init, 0)
  param_sh = nnx.to_pure_dict(parallel.state_shardings(template, mesh))
  rep = NamedSharding(mesh, P())
  opt_sh = parallel.opt_state_shardings(tx, abstract_state.opt_state, param_sh, mesh)
  state_sh = FinetuneState(step=rep, params=param_sh, opt_state=opt_sh, ema=param_sh,
                           loss_scale=jax.tree.map(lambda _: rep, abstract_state.loss_scale))
  soft = cfg.data.mixup > 0 or cfg.data.cutmix > 0   # the loader then yields [B, classes] labels
  batch_sh = {'image': parallel.batch_sharding(mesh, 4),
              'label': parallel.batch_sharding(mesh, 2 if soft else 1)}
  base_key = jax.random.key(cfg.seed)
  smoothing = float(cfg.data.label_smoothing)

  def train_step(state: FinetuneState, batch):
    images = batch['image']
    targets = soft_targets(batch['label'], num_classes, smoothing)
    key = jax.random.fold_in(base_key, state.step)

    def loss_fn(params):
      logits = merge_pure(graphdef, template, params)(images, dropout_key=key)
      return optax.softmax_cross_entropy(logits, targets).mean(), logits

    u = precision.scaled_update(loss_fn, state.params, state.opt_state, tx, state.loss_scale)
    logits = u.aux
    ema = state.ema
    if ema_decay > 0:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema, u.params)
    acc = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
    new = FinetuneState(step=state.step + 1, params=u.params, opt_state=u.opt_state, ema=ema,
                        loss_scale=u.loss_scale)
    return new, {'loss': u.loss, 'train_top1': acc, 'grad_norm': optax.tree.norm(u.grads),
                 'lr': schedule(state.step), 'loss_scale': state.loss_scale.scale,
                 'finite': u.finite.astype(jnp.float32)}

  def eval_step(params, batch):
    logits = merge_pure(graphdef, template, params)(batch['image'])
    labels = batch['label']
    valid = batch['valid'].astype(jnp.float32)
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
    hit1 = (top5[:, 0] == labels).astype(jnp.float32)
    hit5 = jnp.any(top5 == labels[:, None], -1).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {'loss': jnp.sum(ce * valid), 'top1': jnp.sum(hit1 * valid),
            'top5': jnp.sum(hit5 * valid), 'count': jnp.sum(valid)}

  def with_params(state, params):
    return state.replace(params=params, ema=params)

  eval_batch_sh = {'image': parallel.batch_sharding(mesh, 4), 'label': parallel.batch_sharding(mesh, 1),
                   'valid': parallel.batch_sharding(mesh, 1)}
  return ClassifyTask(
      cfg=cfg, mesh=mesh, encoder_cfg=ecfg, num_classes=num_classes,
      abstract_state=abstract_state, state_shardings=state_sh, param_shardings=param_sh,
      schedule=schedule,
      init=jax.jit(init, out_shardings=state_sh),
      with_params=jax.jit(with_params, in_shardings=(state_sh, param_sh), out_shardings=state_sh,
                          donate_argnums=0),
      train_step=jax.jit(under_mesh(mesh, train_step), in_shardings=(state_sh, batch_sh),
                         out_shardings=(state_sh, rep), donate_argnums=0),
      eval_step=jax.jit(under_mesh(mesh, eval_step), in_shardings=(param_sh, eval_batch_sh), out_shardings=rep),
  )


def pretrained_into(abstract_params: dict, encoder_params: dict, *, grid_from: tuple[int, int],
                    grid_to: tuple[int, int], num_prefix: int = 1) -> tuple[dict, list[str]]:
  """Classifier params with the encoder taken from a pretrained encoder (numpy, host side).

  Drops what fine-tuning does not use (mask_token, the pretraining `norm`), resizes the pos-embed
  bicubically when the grid changes (224 -> 336), and fails listing missing keys. Returns the
  encoder subtree and the names of the dropped keys.
  """
  from eva_jax.convert import common
  from eva_jax.models.layers import resize_grid
  want = common.flatten(abstract_params['encoder'])
  got = common.flatten(encoder_params)
  dropped = sorted(k for k in got if k not in want)
  unexpected = [k for k in dropped if not (k == 'mask_token' or k.startswith('norm/'))]
  missing = sorted(k for k in want if k not in got)
  if missing or unexpected:
    common.check_keys({k: np.shape(v) for k, v in want.items()},
                      {k: np.shape(got[k]) for k in got if k not in ('mask_token',)
                       and not k.startswith('norm/')}, 'pretrained encoder')
  out = {}
  for k, target in want.items():
    v = np.asarray(got[k], np.float32)
    if k == 'pos_embed' and tuple(grid_from) != tuple(grid_to):
      patches = np.asarray(resize_grid(jnp.asarray(v[num_prefix:]), grid_from, grid_to))
      v = np.concatenate([v[:num_prefix], patches], 0)
    if v.shape != tuple(target.shape):
      raise ValueError(f'pretrained {k} has shape {v.shape}, the fine-tuning model wants '
                       f'{tuple(target.shape)}; is it the same architecture?')
    out[k] = v
  return common.unflatten(out), dropped
