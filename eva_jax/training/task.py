"""The jitted, sharded functions every trainer needs, built once from a model and a loss.

A trainer supplies only what is its own (`make_model`, `loss_fn`, `eval_fn`, the batch layout and
any frozen constants such as a teacher); `build` returns a `Task` with:
- `init(seed)`: parameters and optimizer state created already sharded (eval_shape, then a jitted
  init with out_shardings), so no host ever materializes a full replica;
- `train_step(state, consts, batch)`: loss_fn under fp16 loss scaling with skip-on-overflow, the
  optax update, an EMA of the weights when `config.ema_decay > 0`; the state is donated;
- `eval_step(params, consts, batch)`: eval_fn on the given parameters (raw or EMA);
- `with_params(state, params)`: a state whose parameters (and EMA) are `params` (init_from).

State is plain pytrees (nested dicts of arrays), which keeps optax and orbax simple; the NNX modules
are rebuilt inside the jitted functions with `merge_pure` (the Flax NNX split/merge pattern).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eva_jax import parallel
from eva_jax.models.layers import jit_init
from eva_jax.training import optim, precision


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any          # nested dict of float32 arrays (master weights)
  opt_state: Any
  loss_scale: precision.LossScale
  ema: Any = None      # EMA of params when config.ema_decay > 0, else None (not stored)


def under_mesh(mesh: Mesh, fn):
  """Traces `fn` with `mesh` as the abstract mesh, so activation constraints can name its axes."""
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return wrapped


def merge_pure(graphdef, template: nnx.State, pure):
  """Module from a graphdef, an (abstract) State template and a pure dict of arrays."""
  state = jax.tree.map(lambda x: x, template, is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def split_abstract(make_model: Callable[[int], nnx.Module], *args):
  """(graphdef, abstract Param State) of `make_model(0, *args)`; nothing is allocated."""
  return nnx.split(nnx.eval_shape(lambda: make_model(0, *args)), nnx.Param)


@dataclasses.dataclass
class Task:
  cfg: ml_collections.ConfigDict
  mesh: Mesh
  graphdef: Any
  template: Any                 # abstract nnx.State of the parameters
  tx: optax.GradientTransformation
  schedule: Callable
  abstract_state: TrainState
  state_shardings: TrainState
  param_shardings: Any
  consts_shardings: Any
  init: Callable                # seed -> TrainState
  with_params: Callable         # (state, params) -> state
  train_step: Callable          # (state, consts, batch) -> (state, metrics)
  eval_step: Callable           # (params, consts, batch) -> metrics

  def model(self, params):
    """The NNX module with `params` (host or device arrays), e.g. for evaluation outside jit."""
    return merge_pure(self.graphdef, self.template, params)

  def eval_params(self, state: TrainState):
    """The weights evaluation uses: the EMA when it is kept, else the raw parameters."""
    return state.ema if state.ema is not None else state.params


def build(cfg, mesh: Mesh, *, make_model: Callable[[int], nnx.Module], loss_fn: Callable,
          eval_fn: Callable, batch_ndims: dict[str, int], eval_batch_ndims: dict[str, int],
          depth: int, consts_shardings: Any = None, trainable: Any = None) -> Task:
  """Builds the Task of one trainer.

  make_model(seed) -> nnx.Module. loss_fn(model, consts, batch, key) -> (scalar loss, dict of
  scalar metrics); called inside the gradient, so any frozen computation in it (a teacher) must
  stop gradients itself. eval_fn(model, consts, batch) -> dict of scalars (sums, so the caller can
  add batches). batch_ndims: rank of each array of a training batch (sharded over the batch axes);
  eval_batch_ndims likewise for evaluation. depth: encoder depth for layer decay. consts_shardings:
  shardings of the frozen constants (None = no constants). trainable: tree of bools, False =
  frozen (zero updates). Errors in the optimizer config raise ValueError naming the field.
  """
  consts_shardings = {} if consts_shardings is None else consts_shardings
  ema_decay = float(cfg.get('ema_decay', 0.0))
  loss_scale_on = cfg.precision == 'fp16'
  graphdef, template = split_abstract(make_model)
  abstract_params = nnx.to_pure_dict(template)
  tx, schedule = optim.make_optimizer(cfg.optim, abstract_params, int(cfg.total_steps),
                                      depth=depth, encoder_prefix=('encoder',),
                                      trainable=trainable)

  def init(seed):
    params = nnx.to_pure_dict(nnx.state(make_model(seed), nnx.Param))
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params),
                      loss_scale=precision.LossScale.from_config(cfg.loss_scale, loss_scale_on),
                      ema=params if ema_decay > 0 else None)

  abstract_state = jax.eval_shape(init, 0)
  rules = parallel.rules_from_config(cfg)
  param_sh = nnx.to_pure_dict(parallel.state_shardings(template, mesh, rules))
  rep = NamedSharding(mesh, P())
  state_sh = TrainState(
      step=rep, params=param_sh,
      opt_state=parallel.opt_state_shardings(tx, abstract_state.opt_state, param_sh, mesh),
      loss_scale=jax.tree.map(lambda _: rep, abstract_state.loss_scale),
      ema=param_sh if ema_decay > 0 else None)
  batch_sh = {k: parallel.batch_sharding(mesh, n) for k, n in batch_ndims.items()}
  eval_batch_sh = {k: parallel.batch_sharding(mesh, n) for k, n in eval_batch_ndims.items()}
  base_key = jax.random.key(cfg.seed)

  def train_step(state: TrainState, consts, batch):
    key = jax.random.fold_in(base_key, state.step)
    u = precision.scaled_update(
        lambda p: loss_fn(merge_pure(graphdef, template, p), consts, batch, key),
        state.params, state.opt_state, tx, state.loss_scale)
    ema = state.ema
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, u.params)
    new = TrainState(step=state.step + 1, params=u.params, opt_state=u.opt_state,
                     loss_scale=u.loss_scale, ema=ema)
    metrics = {'loss': u.loss, **u.aux, 'grad_norm': optax.tree.norm(u.grads),
               'lr': schedule(state.step), 'loss_scale': state.loss_scale.scale,
               'finite': u.finite.astype(jnp.float32)}
    return new, metrics

  def eval_step(params, consts, batch):
    return eval_fn(merge_pure(graphdef, template, params), consts, batch)

  def with_params(state, params):
    return state.replace(params=params, ema=params if state.ema is not None else None)

  return Task(
      cfg=cfg, mesh=mesh, graphdef=graphdef, template=template, tx=tx, schedule=schedule,
      abstract_state=abstract_state, state_shardings=state_sh, param_shardings=param_sh,
      consts_shardings=consts_shardings,
      init=jit_init(init, out_shardings=state_sh),
      with_params=jax.jit(with_params, in_shardings=(state_sh, param_sh), out_shardings=state_sh,
                          donate_argnums=0),
      train_step=jax.jit(under_mesh(mesh, train_step),
                         in_shardings=(state_sh, consts_shardings, batch_sh),
                         out_shardings=(state_sh, rep), donate_argnums=0),
      eval_step=jax.jit(under_mesh(mesh, eval_step),
                        in_shardings=(param_sh, consts_shardings, eval_batch_sh),
                        out_shardings=rep),
  )
