"""eva_jax.training.optim against the BEiT/EVA recipe, with numbers from real optax updates.

References (BEiT/EVA-01 `optim_factory.py`): no weight decay for 1-D tensors (biases, norm
weights, q/v biases), names ending in `.bias`, and `no_weight_decay()` = {pos_embed, cls_token};
mask_token (1, 1, D) and the patch-embed conv weight are decayed. Layer-wise lr decay uses
`get_layer_id_for_vit`: cls/mask token, pos_embed and patch_embed = 0, block i = i + 1, the rest
= depth + 1, scale = decay ** (depth + 1 - layer_id). The schedule is linear warmup from 0 then
cosine to min_lr.
"""
import math

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from eva_jax.models import config as model_config
from eva_jax.models import vit
from eva_jax.training import optim

DEPTH = 2   # the tiny encoder

# Every parameter of the tiny encoder (under 'encoder') and a classifier head; True = decayed.
# The torch counterpart's shape decides: 1-D in torch (all biases and norm weights, q_bias/v_bias)
# or in no_weight_decay() -> no decay.
EXPECTED_DECAY = {
    'encoder/blocks/layers/attn/qkv': True,
    'encoder/blocks/layers/attn/q_bias': False,
    'encoder/blocks/layers/attn/v_bias': False,
    'encoder/blocks/layers/attn/proj': True,
    'encoder/blocks/layers/attn/proj_bias': False,
    'encoder/blocks/layers/mlp/fc1/kernel': True,
    'encoder/blocks/layers/mlp/fc1/bias': False,
    'encoder/blocks/layers/mlp/fc2/kernel': True,
    'encoder/blocks/layers/mlp/fc2/bias': False,
    'encoder/blocks/layers/norm1/scale': False,
    'encoder/blocks/layers/norm1/bias': False,
    'encoder/blocks/layers/norm2/scale': False,
    'encoder/blocks/layers/norm2/bias': False,
    'encoder/cls_token': False,      # no_weight_decay()
    'encoder/pos_embed': False,      # no_weight_decay()
    'encoder/mask_token': True,      # (1, 1, D) in torch and not in no_weight_decay()
    'encoder/patch_kernel': True,
    'encoder/patch_bias': False,
    'encoder/norm/scale': False,
    'encoder/norm/bias': False,
    'head/kernel': True,
    'head/bias': False,
}


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def _params(seed=0):
  """The tiny encoder's real parameter names and shapes with random values, plus a head."""
  shapes = nnx.to_pure_dict(nnx.state(vit.abstract(model_config.encoder_config('tiny')), nnx.Param))
  rng = np.random.default_rng(seed)
  draw = lambda shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return {'encoder': jax.tree.map(lambda s: draw(s.shape), shapes),
          'head': {'kernel': draw((64, 5)), 'bias': draw((5,))}}


def _cfg(**kw):
  base = dict(lr=1e-2, min_lr=1e-4, warmup_steps=2, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05,
              clip_norm=0.0, layer_decay=1.0)
  return ml_collections.ConfigDict({**base, **kw})


def _beit_scale(path, depth, decay, n_rows):
  """decay ** (depth + 1 - get_layer_id_for_vit(name)), one value per stacked block row."""
  parts = path.split('/')
  if parts[0] != 'encoder':
    layer_ids = [depth + 1]
  elif parts[1] in ('cls_token', 'mask_token', 'pos_embed', 'patch_kernel', 'patch_bias'):
    layer_ids = [0]
  elif parts[1] == 'blocks':
    layer_ids = [i + 1 for i in range(n_rows)]
  else:
    layer_ids = [depth + 1]
  return np.array([decay ** (depth + 1 - i) for i in layer_ids])


def _schedule_ref(step, lr, min_lr, warmup, total):
  if step < warmup:
    return lr * step / warmup
  return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _adamw_ref(params, grads_seq, cfg, total, scales, mask):
  """Decoupled AdamW with bias correction in float64, per leaf (torch.optim.AdamW's update)."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for t, grads in enumerate(grads_seq, start=1):
    g = {k: x.astype(np.float64) for k, x in grads.items()}
    if cfg.clip_norm:
      norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
      if norm >= cfg.clip_norm:
        g = {k: x * cfg.clip_norm / norm for k, x in g.items()}
    lr = _schedule_ref(t - 1, cfg.lr, cfg.min_lr, cfg.warmup_steps, total)
    for k in p:
      m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g[k]
      v2[k] = cfg.b2 * v2[k] + (1 - cfg.b2) * g[k] ** 2
      direction = (m[k] / (1 - cfg.b1 ** t)) / (np.sqrt(v2[k] / (1 - cfg.b2 ** t)) + cfg.eps)
      direction = direction + cfg.weight_decay * mask[k] * p[k]
      p[k] = p[k] - lr * scales[k] * direction
  return p


def _run_optax(tx, params, grads_seq):
  state = tx.init(params)
  update = jax.jit(tx.update)   # one compile instead of hundreds of eager ops per step
  for grads in grads_seq:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_decay_mask_matches_beit_rule():
  mask = _flat(optim.decay_mask(_params()))
  assert set(mask) == set(EXPECTED_DECAY), 'a parameter was added or renamed: classify it above'
  assert mask == EXPECTED_DECAY


def test_layer_decay_scales_match_get_layer_id_for_vit():
  params = _params()
  scales = _flat(optim.layer_decay_scales(params, DEPTH, 0.5, prefix=('encoder',)))
  flat = _flat(params)
  for path, s in scales.items():
    n_rows = flat[path].shape[0] if path.startswith('encoder/blocks/') else 1
    np.testing.assert_allclose(np.ravel(s), _beit_scale(path, DEPTH, 0.5, n_rows), err_msg=path)
    assert np.ndim(s) in (0, np.ndim(flat[path])), path   # broadcasts against its parameter
  # The numbers themselves: 0.5**3 for the embeddings, 0.25 / 0.5 for blocks 0 / 1, 1 for the rest.
  assert float(scales['encoder/pos_embed']) == 0.125
  np.testing.assert_array_equal(np.ravel(scales['encoder/blocks/layers/mlp/fc1/kernel']), [0.25, 0.5])
  assert float(scales['encoder/norm/scale']) == 1.0 and float(scales['head/kernel']) == 1.0


@pytest.mark.parametrize('clip_norm,layer_decay', [(0.0, 1.0), (0.5, 0.75)])
def test_adamw_steps_match_reference(clip_norm, layer_decay):
  """Four real optax updates equal decoupled AdamW with BEiT's groups, clipping and lr scales."""
  cfg, total = _cfg(clip_norm=clip_norm, layer_decay=layer_decay), 10
  params = _params(0)
  grads_seq = [jax.tree.map(lambda x, i=i: np.random.default_rng(i).standard_normal(x.shape)
                            .astype(np.float32), params) for i in range(1, 5)]
  tx, _ = optim.make_optimizer(cfg, params, total, depth=DEPTH, encoder_prefix=('encoder',))
  got, _ = _run_optax(tx, params, grads_seq)

  flat = _flat(params)
  scales = {}
  for k, v in flat.items():
    stacked = k.startswith('encoder/blocks/')   # one row per block
    s = _beit_scale(k, DEPTH, layer_decay, v.shape[0] if stacked else 1)
    scales[k] = s.reshape((-1,) + (1,) * (v.ndim - 1)) if stacked else s[0]
  mask = {k: float(d) for k, d in EXPECTED_DECAY.items()}
  want = _adamw_ref(flat, [_flat(g) for g in grads_seq], cfg, total, scales, mask)
  got = _flat(got)
  for k in flat:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-7, err_msg=k)
  # Step 0 has lr 0 (warmup from 0): with 4 steps, every parameter must have moved.
  assert all(not np.array_equal(got[k], flat[k]) for k in flat)


def test_frozen_parameters_get_no_update_and_no_state():
  cfg = _cfg(clip_norm=1.0, layer_decay=0.75)
  params = _params(0)
  frozen = {'encoder/patch_kernel', 'encoder/patch_bias'}
  trainable = jax.tree_util.tree_map_with_path(
      lambda p, _: '/'.join(str(k.key) for k in p) not in frozen, params)
  grads_seq = [jax.tree.map(lambda x: np.ones_like(x), params)] * 3
  tx, _ = optim.make_optimizer(cfg, params, 10, depth=DEPTH, encoder_prefix=('encoder',),
                               trainable=trainable)
  got, state = _run_optax(tx, params, grads_seq)
  got, flat = _flat(got), _flat(params)
  for k in flat:
    if k in frozen:
      np.testing.assert_array_equal(got[k], flat[k], err_msg=k)
    else:
      assert not np.array_equal(got[k], flat[k]), k
  # Frozen parameters hold no Adam moments (MaskedNode), so they cost no optimizer memory.
  shapes = [np.shape(x) for x in jax.tree.leaves(state)]
  assert (14, 14, 3, 64) not in shapes and sum(np.prod(s) for s in shapes if len(s)) == \
      2 * sum(v.size for k, v in flat.items() if k not in frozen)


def test_schedule_is_warmup_then_cosine():
  lr, min_lr, warmup, total = 3e-3, 1e-5, 10, 110
  sched = optim.lr_schedule(ml_collections.ConfigDict(dict(lr=lr, min_lr=min_lr,
                                                           warmup_steps=warmup)), total)
  for step in (0, 1, 5, 9, 10, 11, 35, 60, 109, 110):
    np.testing.assert_allclose(float(sched(step)), _schedule_ref(step, lr, min_lr, warmup, total),
                               rtol=1e-5, err_msg=str(step))
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(warmup)), lr, rtol=1e-6)
  np.testing.assert_allclose(float(sched(60)), (lr + min_lr) / 2, rtol=1e-5)   # cosine midpoint
  np.testing.assert_allclose(float(sched(total)), min_lr, rtol=1e-5)
  with pytest.raises(ValueError, match='warmup_steps'):
    optim.lr_schedule(ml_collections.ConfigDict(dict(lr=lr, min_lr=min_lr, warmup_steps=5)), 5)
