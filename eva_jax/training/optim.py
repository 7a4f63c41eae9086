"""Optimizer: decoupled AdamW with EVA's decay mask, warmup + per-step cosine schedule, global-norm
clipping and optional layer-wise lr decay, all from optax pieces.

Parameters are nested dicts of arrays (nnx.to_pure_dict of the model); blocks are stacked with a
leading layer axis, so layer-wise decay is a per-row scale on those arrays.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Leaf names that are "1-D params, biases, pos_embed, cls_token" in the official code: no weight
# decay. mask_token and patch_kernel ARE decayed, as officially.
NO_DECAY_LEAVES = frozenset({'bias', 'scale', 'q_bias', 'k_bias', 'v_bias', 'proj_bias',
                             'patch_bias', 'pos_embed', 'cls_token'})


def _leaf_name(path) -> str:
  return str(getattr(path[-1], 'key', path[-1]))


def decay_mask(params):
  """True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) not in NO_DECAY_LEAVES, params)


def layer_decay_scales(params, depth: int, decay: float, prefix: tuple[str, ...] = ()):
  """Per-parameter lr scales decay^(L+1-id): id 0 for patch/cls/pos/mask, i+1 for block i, L+1 rest.

  Stacked block parameters get an array of shape [L, 1, ...] so each row gets its block's scale.
  `prefix` is the path of the encoder inside `params` (e.g. ('encoder',)).
  """
  n = len(prefix)

  def one(path, p):
    path = tuple(str(getattr(k, 'key', k)) for k in path)
    if path[:n] != prefix:
      return np.float32(1.0)  # heads and others outside the encoder: id L+1
    rest = path[n:]
    if rest[0] in ('patch_kernel', 'patch_bias', 'cls_token', 'pos_embed', 'mask_token'):
      return np.float32(decay ** (depth + 1))
    if rest[0] == 'blocks':
      ids = np.arange(1, depth + 1)
      s = (decay ** (depth + 1 - ids)).astype(np.float32)
      return s.reshape((depth,) + (1,) * (np.ndim(p) - 1))
    return np.float32(1.0)

  return jax.tree_util.tree_map_with_path(one, params)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update by its (broadcastable) scale."""
  def update(updates, state, params=None):
    del params
    masked = lambda u: isinstance(u, optax.MaskedNode)   # frozen under multi_transform
    return jax.tree.map(lambda u, s: u if masked(u) else u * jnp.asarray(s, u.dtype),
                        updates, scales, is_leaf=masked), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def lr_schedule(cfg, total_steps: int) -> Callable[[int], jax.Array]:
  """Linear warmup from 0 to cfg.lr over warmup_steps, then per-step cosine to cfg.min_lr."""
  warmup = int(cfg.warmup_steps)
  if warmup >= total_steps:
    raise ValueError(f'optim.warmup_steps={warmup} must be < total_steps={total_steps}.')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=total_steps, end_value=cfg.min_lr)


def make_optimizer(cfg, params, total_steps: int, *, depth: int = 0,
                   encoder_prefix: tuple[str, ...] = (), trainable=None):
  """optax chain for `params`. cfg: lr, min_lr, warmup_steps, b1, b2, eps, weight_decay, clip_norm,
  layer_decay (1.0 = off). `trainable` (optional tree of bools) freezes parameters with zero updates.

  Returns (tx, schedule).
  """
  schedule = lr_schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm and cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts += [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(params))]
  if cfg.get('layer_decay', 1.0) != 1.0:
    parts.append(scale_by_tree(layer_decay_scales(params, depth, cfg.layer_decay, encoder_prefix)))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  if trainable is not None:
    labels = jax.tree.map(lambda t: 'train' if t else 'freeze', trainable)
    tx = optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels)
  return tx, schedule
