"""The EVA pretraining step: student + frozen teacher in one jitted, sharded function.

`build(cfg, mesh)` returns a `Task` holding the compiled-on-demand functions:
- `init(seed)`: parameters and optimizer state created already sharded (eval_shape, then a jitted
  init with out_shardings), so no host ever materializes a full replica;
- `train_step(state, teacher_params, batch)`: teacher targets under stop_gradient in the compute
  dtype, student forward/backward, fp16 loss scaling with skip-on-overflow, optax update;
  the state is donated;
- `eval_step(state, teacher_params, batch)`: the loss with the batch's (deterministic) mask.

State is plain pytrees (nested dicts of arrays), which keeps optax and orbax simple; the NNX
modules are rebuilt inside the jitted functions with nnx.merge.
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
from eva_jax.models import config as model_config
from eva_jax.models import mim as mim_lib
from eva_jax.models import vit
from eva_jax.training import optim, precision


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any          # nested dict of float32 arrays (master weights)
  opt_state: Any
  loss_scale: precision.LossScale


def under_mesh(mesh: Mesh, fn):
  """Traces `fn` with `mesh` as the abstract mesh, so activation constraints can name its axes."""
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return wrapped


def _pure(state: nnx.State):
  return nnx.to_pure_dict(state)


def merge_pure(graphdef, template: nnx.State, pure):
  """Module from a graphdef, an (abstract) State template and a pure dict of arrays."""
  state = jax.tree.map(lambda x: x, template, is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def student_config(cfg) -> ml_collections.ConfigDict:
  m = cfg.model
  enc = model_config.encoder_config(m.name) if m.get('name', 'custom') != 'custom' \
      else model_config.encoder_config('tiny')
  for k, v in m.items():  # config overrides win over the named architecture
    if k in enc:
      enc[k] = v
    elif k != 'name':
      raise ValueError(f'config.model.{k} is not an encoder field. Known: {sorted(enc.keys())}.')
  enc.image_size = cfg.image_size
  enc.dtype = precision.compute_dtype(cfg.precision)
  model_config.validate(enc)
  return enc


def teacher_config(cfg) -> ml_collections.ConfigDict:
  t = model_config.teacher_config(cfg.teacher.name)
  t.image_size = cfg.image_size
  t.dtype = precision.compute_dtype(cfg.teacher.get('precision') or cfg.precision)
  return t


@dataclasses.dataclass
class Task:
  cfg: ml_collections.ConfigDict
  mesh: Mesh
  student_cfg: ml_collections.ConfigDict
  teacher_cfg: ml_collections.ConfigDict
  tx: optax.GradientTransformation
  schedule: Callable
  state_shardings: Any
  teacher_shardings: Any
  abstract_state: Any
  init: Callable
  init_teacher: Callable
  train_step: Callable
  eval_step: Callable


def _teacher_template(tcfg):
  graphdef, state = nnx.split(vit.abstract(tcfg), nnx.Param)
  return graphdef, state


def build(cfg, mesh: Mesh, teacher_cfg: ml_collections.ConfigDict | None = None) -> Task:
  """teacher_cfg: the architecture of a loaded teacher checkpoint (None = config.teacher.name)."""
  scfg = student_config(cfg)
  tcfg = teacher_config(cfg) if teacher_cfg is None else teacher_cfg
  total = int(cfg.total_steps)
  loss_scale_on = cfg.precision == 'fp16'

  def make_model(seed):
    return mim_lib.MIM(scfg, tcfg.out_dim, rngs=nnx.Rngs(params=jax.random.key(seed)))

  abstract_model = nnx.eval_shape(lambda: make_model(0))
  m_graphdef, m_template = nnx.split(abstract_model, nnx.Param)
  abstract_params = _pure(m_template)
  tx, schedule = optim.make_optimizer(cfg.optim, abstract_params, total, depth=scfg.depth,
                                      encoder_prefix=('encoder',))

  def init(seed):
    params = _pure(nnx.state(make_model(seed), nnx.Param))
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params),
                      loss_scale=precision.LossScale.from_config(cfg.loss_scale, loss_scale_on))

  abstract_state = jax.eval_shape(init, 0)
  param_sh = _pure(parallel.state_shardings(m_template, mesh))
  replicated = NamedSharding(mesh, P())
  opt_sh = parallel.opt_state_shardings(tx, abstract_state.opt_state, param_sh, mesh)
  state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                        loss_scale=jax.tree.map(lambda _: replicated, abstract_state.loss_scale))
  state_sh = jax.tree.map(lambda s, _: s, state_sh, abstract_state)  # same tree structure

  t_graphdef, t_template = _teacher_template(tcfg)
  teacher_sh = _pure(parallel.state_shardings(t_template, mesh,
                                              replicate=cfg.teacher.shard == 'replicate'))

  def init_teacher_fn(seed):
    return _pure(nnx.state(vit.VisionTransformer(tcfg, rngs=nnx.Rngs(params=jax.random.key(seed))), nnx.Param))

  image_sh = parallel.batch_sharding(mesh, 4)
  mask_sh = parallel.batch_sharding(mesh, 2)
  batch_sh = {'image': image_sh, 'mask': mask_sh}
  base_key = jax.random.key(cfg.seed)

  def targets_of(teacher_params, images):
    teacher = merge_pure(t_graphdef, t_template, teacher_params)
    return mim_lib.teacher_targets(teacher, images)

  def train_step(state: TrainState, teacher_params, batch):
    images, mask = batch['image'], batch['mask']
    targets = targets_of(teacher_params, images)
    key = jax.random.fold_in(base_key, state.step)

    def loss_fn(params):
      model = merge_pure(m_graphdef, m_template, params)
      return mim_lib.cosine_loss(model(images, mask, dropout_key=key), targets, mask)

    u = precision.scaled_update(loss_fn, state.params, state.opt_state, tx, state.loss_scale)
    new = TrainState(step=state.step + 1, params=u.params, opt_state=u.opt_state,
                     loss_scale=u.loss_scale)
    metrics = {'loss': u.loss, 'grad_norm': optax.tree.norm(u.grads), 'lr': schedule(state.step),
               'mask_ratio': jnp.mean(mask.astype(jnp.float32)), 'masked_tokens': u.aux,
               'loss_scale': state.loss_scale.scale, 'finite': u.finite.astype(jnp.float32)}
    return new, metrics

  def eval_step(state: TrainState, teacher_params, batch):
    images, mask = batch['image'], batch['mask']
    targets = targets_of(teacher_params, images)
    model = merge_pure(m_graphdef, m_template, state.params)
    loss, n = mim_lib.cosine_loss(model(images, mask), targets, mask)
    return {'loss': loss, 'masked_tokens': n}

  metric_sh = replicated
  return Task(
      cfg=cfg, mesh=mesh, student_cfg=scfg, teacher_cfg=tcfg, tx=tx, schedule=schedule,
      state_shardings=state_sh, teacher_shardings=teacher_sh, abstract_state=abstract_state,
      init=jax.jit(init, out_shardings=state_sh),
      init_teacher=jax.jit(init_teacher_fn, out_shardings=teacher_sh),
      train_step=jax.jit(under_mesh(mesh, train_step), in_shardings=(state_sh, teacher_sh, batch_sh),
                         out_shardings=(state_sh, metric_sh), donate_argnums=0),
      eval_step=jax.jit(under_mesh(mesh, eval_step), in_shardings=(state_sh, teacher_sh, batch_sh),
                        out_shardings=metric_sh),
  )
