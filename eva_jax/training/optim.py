"""Optimizer: decoupled AdamW with EVA's decay mask, warmup + per-step cosine schedule, global-norm
clipping and optional layer-wise lr decay, all from optax pieces.

Parameters are nested dicts of arrays (nnx.to_pure_dict of the model); blocks are stacked with a
leading layer axis, so layer-wise decay is a per-row scale on those arrays.
"""
from __future__ import annotations

import types
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


EMBED_LEAVES = ('patch_kernel', 'patch_bias', 'cls_token', 'pos_embed', 'mask_token')
# The CLIP text tower's embeddings: layer id 0 like the image tower's (EVA-CLIP rei/training/optim.py
# get_num_layer_for_transformer: token / positional embedding -> 0, resblocks.i -> i + 1).
TEXT_EMBED_LEAVES = ('token_embedding', 'positional_embedding')


def layer_decay_scales(params, depth: int, decay: float, prefix: tuple[str, ...] = (),
                       embed_names: tuple[str, ...] = EMBED_LEAVES):
  """Per-parameter lr scales decay^(L+1-id): id 0 for the embeddings (`embed_names`: patch/cls/pos/
  mask), i+1 for block i, L+1 for the rest (BEiT / EVA `LayerDecayValueAssigner`).

  Stacked block parameters get an array of shape [L, 1, ...] so each row gets its block's scale.
  `prefix` is the path of the encoder inside `params` (e.g. ('encoder',)).
  """
  n = len(prefix)

  def one(path, p):
    path = tuple(str(getattr(k, 'key', k)) for k in path)
    if path[:n] != prefix:
      return np.float32(1.0)  # heads and others outside the encoder: id L+1
    rest = path[n:]
    if rest[0] in embed_names:
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

  Returns (tx, schedule). A config with `towers` (a two-tower model) goes to
  make_tower_optimizer.
  """
  if cfg.get('towers'):
    return make_tower_optimizer(cfg, params, total_steps)
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


# ---------------------------------------------------------------------------- two-tower (CLIP) --
# Leaves of the CLIP model that take no weight decay besides NO_DECAY_LEAVES: EVA-CLIP
# (rei/training/optim.py) skips 1-D / 0-D tensors, biases and each tower's no_weight_decay() set
# (pos_embed, cls_token; the text tower's positional_embedding; logit_scale).
CLIP_NO_DECAY_LEAVES = frozenset({'positional_embedding', 'logit_scale', 'logit_bias'})
TOWERS = ('visual', 'text')


def tower_of(path: tuple[str, ...]) -> str:
  """'visual' (visual, visual_fc_norm, visual_head), 'text' or 'other' (logit_scale / bias) for a
  ClipModel parameter path. The projection heads belong to their tower with layer id L+1."""
  top = path[0]
  if top == 'text':
    return 'text'
  if top.startswith('visual'):
    return 'visual'
  return 'other'


def _stacked_depth(params, tower: str) -> int:
  """Depth of a tower from its stacked blocks (leading axis of blocks/layers leaves)."""
  leaves = jax.tree.leaves(params[tower]['blocks'])
  return int(leaves[0].shape[0])


def tower_settings(cfg, tower: str) -> dict:
  """{lr, min_lr, weight_decay, layer_decay} of one tower: `cfg.towers.<tower>` fields, else the
  base ones; min_lr keeps the base ratio min_lr / lr (EVA-CLIP decays every group by one cosine)."""
  t = cfg.get('towers', {}).get(tower, {}) if tower in TOWERS else {}
  lr = float(t.get('lr', cfg.lr))
  return {'lr': lr, 'min_lr': lr * (float(cfg.min_lr) / float(cfg.lr)),
          'weight_decay': float(t.get('weight_decay', cfg.weight_decay)),
          'layer_decay': float(t.get('layer_decay', 1.0) if tower in TOWERS else 1.0)}


def tower_lr_scales(params, cfg) -> dict:
  """Per-parameter effective peak lr of a ClipModel's params (a tree like `params`): tower lr x
  layer-decay scale; vision block i gets lr_v * ld_v^(Lv - i) (0-based i; Lv + 1 for the
  embeddings, 1 for the head), text block j lr_t * ld_t^(Lt - j). For logging and tests."""
  out = {}
  for top, sub in params.items():
    tower = tower_of((top,))
    s = tower_settings(cfg, tower)
    if tower in TOWERS and s['layer_decay'] != 1.0:
      depth = _stacked_depth(params, tower)   # the trunk's ('visual' / 'text'); heads: id L+1
      embed = TEXT_EMBED_LEAVES if tower == 'text' else EMBED_LEAVES
      scales = layer_decay_scales({top: sub}, depth, s['layer_decay'], (top,), embed)[top]
    else:
      scales = jax.tree.map(lambda _: np.float32(1.0), sub)
    out[top] = jax.tree.map(lambda x: np.float32(s['lr']) * np.asarray(x, np.float32), scales)
  return out


def make_tower_optimizer(cfg, params, total_steps: int):
  """optax optimizer of a two-tower (CLIP) model with its own lr, weight decay and layer decay
  per tower (EVA-CLIP recipe, EVA-SPEC "EVA-CLIP"; official EVA-CLIP/rei `--visual-lr --text-lr
  --visual-wd --text-wd --visual-ld --text-ld`; parameters outside both towers, i.e. logit_scale,
  take the base lr / wd).

  cfg: the optim section: name ('lamb' | 'adamw'), lr, min_lr, warmup_steps, b1, b2, eps,
  weight_decay, clip_norm and towers.{visual,text}.{lr, weight_decay, layer_decay}. params: the
  ClipModel pure dict ({'visual', 'visual_head', 'text', 'logit_scale', ...}).

  Chain: global-norm clip over all parameters, then per group (optax.multi_transform): Adam
  moments -> decoupled weight decay (mask) -> [LAMB trust ratio, as optax.lamb] -> layer-decay
  scale -> the group's warmup + cosine schedule. Returns (tx, schedule of the visual tower).
  Raises ValueError naming the field for an unknown optimizer name.
  """
  name = cfg.get('name', 'adamw')
  if name not in ('lamb', 'adamw'):
    raise ValueError(f"config.optim.name={name!r} must be 'lamb' or 'adamw'.")
  wd_mask = jax.tree_util.tree_map_with_path(
      lambda p, x: (_leaf_name(p) not in NO_DECAY_LEAVES | CLIP_NO_DECAY_LEAVES
                    and len(x.shape) > 1), params)
  labels = {top: jax.tree.map(lambda _, t=tower_of((top,)): t, sub)
            for top, sub in params.items()}
  lr_scales = tower_lr_scales(params, cfg)
  groups, schedules = {}, {}
  for group in ('visual', 'text', 'other'):
    s = tower_settings(cfg, group)
    sched = lr_schedule(types.SimpleNamespace(lr=s['lr'], min_lr=s['min_lr'],
                                            warmup_steps=cfg.warmup_steps), total_steps)
    # Only this group's leaves are live under multi_transform; the others arrive as MaskedNode.
    rel = jax.tree.map(lambda x, lab, g=group, base=s['lr']: (np.asarray(x) / base) if lab == g
                       else np.float32(1.0), lr_scales, labels)
    parts = [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
             optax.add_decayed_weights(s['weight_decay'], mask=wd_mask)]
    if name == 'lamb':
      parts.append(optax.scale_by_trust_ratio())
    parts += [scale_by_tree(rel), optax.scale_by_learning_rate(sched)]
    groups[group], schedules[group] = optax.chain(*parts), sched
  tx = optax.multi_transform(groups, labels)
  if cfg.clip_norm and cfg.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx, schedules['visual']
