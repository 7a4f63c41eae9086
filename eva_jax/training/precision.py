"""Mixed precision: compute dtypes by name and DeepSpeed-style dynamic loss scaling for fp16.

The official EVA run used DeepSpeed fp16 with initial scale 2^16, window 500, hysteresis 2 and
min scale 1. The semantics reproduced here (DeepSpeed DynamicLossScaler, non-consecutive mode):
- a step whose gradients are not all finite is skipped (parameters and optimizer state unchanged);
  the scale is halved only when the hysteresis budget is spent, else the budget drops by one;
- after `growth_interval` steps since the last overflow, the scale doubles and the budget resets.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

# The one dtype table. Canonical names (ConfigDict `dtype` fields) -> jnp dtypes, and the
# config's precision names (and other spellings users pass to load_teacher / load_encoder).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
PRECISIONS = {'fp32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16'}
_ALIASES = {**PRECISIONS, 'f32': 'float32', 'f16': 'float16'}


def compute_dtype(precision: str) -> str:
  """'float32' | 'bfloat16' | 'float16' for a config precision ('fp32' | 'bf16' | 'fp16').

  Raises ValueError naming the choices."""
  if precision not in PRECISIONS:
    raise ValueError(f'precision={precision!r} unknown; choose one of {sorted(PRECISIONS)}.')
  return PRECISIONS[precision]


def dtype_name(dtype) -> str:
  """Canonical dtype name from a name, an alias (fp32, bf16, ...) or a jnp/np dtype.

  Raises ValueError for anything else."""
  if isinstance(dtype, str):
    name = _ALIASES.get(dtype, dtype)
  else:
    try:
      name = np.dtype(dtype).name
    except TypeError:
      name = str(dtype)
  if name not in DTYPES:
    raise ValueError(f'dtype must be float32, bfloat16 or float16, got {dtype!r}.')
  return name


@struct.dataclass
class LossScale:
  scale: jax.Array            # float32 scalar
  since_overflow: jax.Array   # int32: steps since the last overflow (DeepSpeed cur_iter - last_overflow_iter)
  hysteresis: jax.Array       # int32: overflows still tolerated before the scale is lowered
  growth_interval: int = struct.field(pytree_node=False, default=500)
  max_hysteresis: int = struct.field(pytree_node=False, default=2)
  min_scale: float = struct.field(pytree_node=False, default=1.0)
  enabled: bool = struct.field(pytree_node=False, default=True)

  @classmethod
  def create(cls, enabled: bool, initial: float = 2.0 ** 16, growth_interval: int = 500,
             hysteresis: int = 2, min_scale: float = 1.0) -> 'LossScale':
    return cls(scale=jnp.asarray(initial if enabled else 1.0, jnp.float32),
               since_overflow=jnp.asarray(0, jnp.int32),
               hysteresis=jnp.asarray(hysteresis, jnp.int32),
               growth_interval=growth_interval, max_hysteresis=hysteresis,
               min_scale=min_scale, enabled=enabled)

  @classmethod
  def from_config(cls, ls_cfg, enabled: bool) -> 'LossScale':
    """From a config.loss_scale block (initial, growth_interval, hysteresis, min_scale)."""
    return cls.create(enabled, ls_cfg.initial, ls_cfg.growth_interval, ls_cfg.hysteresis,
                      ls_cfg.min_scale)

  def update(self, finite: jax.Array) -> 'LossScale':
    """The next state after a step whose gradients were (not) all finite."""
    if not self.enabled:
      return self
    lower = jnp.logical_and(~finite, self.hysteresis <= 1)
    scale_on_overflow = jnp.where(lower, jnp.maximum(self.scale / 2, self.min_scale), self.scale)
    hyst_on_overflow = jnp.where(lower, self.hysteresis, self.hysteresis - 1)
    since = jnp.where(finite, self.since_overflow + 1, 0)
    grow = jnp.logical_and(finite, since % self.growth_interval == 0)
    scale = jnp.where(finite, jnp.where(grow, self.scale * 2, self.scale), scale_on_overflow)
    hyst = jnp.where(finite, jnp.where(grow, self.max_hysteresis, self.hysteresis), hyst_on_overflow)
    return self.replace(scale=scale, since_overflow=since, hysteresis=hyst)


def all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def unscale(grads, scale):
  return jax.tree.map(lambda g: g / scale.astype(g.dtype), grads)


def select_tree(pred, on_true, on_false):
  """Elementwise choice between two trees of arrays: used to skip a non-finite update."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


class Update(NamedTuple):
  params: Any
  opt_state: Any
  loss_scale: LossScale
  grads: Any
  loss: jax.Array
  aux: Any
  finite: jax.Array


def scaled_update(loss_fn: Callable, params, opt_state, tx: optax.GradientTransformation,
                  loss_scale: LossScale) -> Update:
  """One optimizer update with loss scaling: loss_fn(params) -> (loss, aux).

  Gradients of loss * scale are unscaled, checked for overflow and handed to optax; with loss
  scaling on, a non-finite step leaves parameters and optimizer state untouched.
  """
  def scaled(p):
    loss, aux = loss_fn(p)
    return loss * loss_scale.scale, (loss, aux)

  grads, (loss, aux) = jax.grad(scaled, has_aux=True)(params)
  grads = unscale(grads, loss_scale.scale)
  finite = all_finite(grads)
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  if loss_scale.enabled:
    new_params, new_opt = select_tree(finite, (new_params, new_opt), (params, opt_state))
  return Update(new_params, new_opt, loss_scale.update(finite), grads, loss, aux, finite)
