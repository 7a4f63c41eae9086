"""EVA pretraining: masked image modeling that regresses a frozen teacher's features.

The student (EVA encoder + lm_head) sees images with ~40% of the patches block-masked and replaced
by the mask token; the loss is the negative cosine between its predictions and the teacher's
features on the masked patches (paper section 2.1; official `engine_for_pretraining.py`). The
teacher runs inside the same jitted, mesh-sharded step, under stop_gradient, in the compute dtype.

  program = PretrainProgram(cfg); trainer.run(program, workdir)     # eva-pretrain does this
"""
from __future__ import annotations

import logging
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from eva_jax import checkpoint as ckpt_lib
from eva_jax import parallel
from eva_jax.data import masking, pipeline as data_lib
from eva_jax.models import config as model_config
from eva_jax.models import mim as mim_lib
from eva_jax.models import teacher as teacher_lib
from eva_jax.models import vit
from eva_jax.models.layers import jit_init
from eva_jax.training import precision, task as task_lib, trainer


def student_config(cfg) -> ml_collections.ConfigDict:
  """The resolved student encoder: config.model's architecture name plus its overrides."""
  return model_config.resolve_encoder(cfg.model, image_size=cfg.image_size,
                                      dtype=precision.compute_dtype(cfg.precision))


def teacher_dtype(cfg) -> str:
  return precision.compute_dtype(cfg.teacher.get('precision') or cfg.precision)


def teacher_config(cfg) -> ml_collections.ConfigDict:
  """The random-init teacher architecture named by config.teacher.name (of config.teacher.family).

  Raises ValueError naming the field for an unknown family or name, or a name of another family."""
  family = cfg.teacher.get('family') or 'clip'
  names = model_config.teacher_names(family)          # unknown family -> ValueError
  if cfg.teacher.name not in names:
    model_config.teacher_family(cfg.teacher.name)     # unknown name -> ValueError naming the field
    raise ValueError(f'config.teacher.name={cfg.teacher.name!r} is a '
                     f'{model_config.teacher_family(cfg.teacher.name)!r} tower but '
                     f'config.teacher.family={family!r}; {family} towers: {", ".join(names)}.')
  t = model_config.teacher_config(cfg.teacher.name)
  t.image_size = cfg.image_size if t.family in ('clip', 'eva_clip') else t.image_size
  t.dtype = teacher_dtype(cfg)
  return teacher_lib.apply_target(t, cfg.teacher.get('target') or '')[0]


def load_teacher(cfg):
  """(teacher ConfigDict, host params) from config.teacher.checkpoint, or (None, None) when it is
  empty (a random-init teacher of config.teacher.name: demos and tests only).

  config.teacher.family says what the file holds (never guessed); arch / heads / act are the facts
  a file may not record (eva_jax.load_teacher)."""
  t = cfg.teacher
  family = t.get('family') or 'clip'
  if not t.checkpoint:
    teacher_config(cfg)   # the random-init architecture exists and belongs to the family
    logging.warning('No config.teacher.checkpoint: RANDOM-INIT %s teacher %s (demos and tests '
                    'only).', family, t.name)
    return None, None
  from eva_jax.api import load_teacher as load
  teacher = load(t.checkpoint, dtype=teacher_dtype(cfg), family=family, arch=t.get('arch') or '',
                 heads=t.get('heads') or None, act=t.get('act') or None)
  tcfg = ml_collections.ConfigDict(teacher.model.cfg.to_dict())
  return teacher_lib.apply_target(tcfg, t.get('target') or '',
                                  nnx.to_pure_dict(nnx.state(teacher.model, nnx.Param)))


def teacher_input(cfg, scfg, tcfg) -> teacher_lib.TeacherInput:
  """How the step feeds the teacher (grid rule, re-normalization); ValueError naming the field."""
  t = cfg.teacher
  return teacher_lib.plan(tcfg, student_patch=scfg.patch_size, image_size=cfg.image_size,
                          rule=t.get('grid') or 'same', data_mean=tuple(cfg.data.mean),
                          data_std=tuple(cfg.data.std), mean=tuple(t.get('mean') or ()),
                          std=tuple(t.get('std') or ()))


def masked_token_bound(cfg, t_input: teacher_lib.TeacherInput) -> int | None:
  """How many tokens the last blocks and the heads of a training step run on: the block-mask
  generator's count for config.data.mask (no training mask has more; data/masking.py
  max_masked), or None (every token) when that is the whole grid. The loss reads only masked
  tokens, so this is exact and saves ~0.45 of a block per tower at the recipe's 40%. Evaluation's
  fixed mask (every other patch) may exceed it, so eval_fn runs every token. ValueError naming
  the field for a config.data.mask that fits no grid (as the loader's)."""
  cells = t_input.student_grid[0] * t_input.student_grid[1]
  k = masking.max_masked(t_input.student_grid, cfg.data.mask)
  return k if k < cells else None


def build(cfg, mesh, teacher_cfg: ml_collections.ConfigDict | None = None):
  """(Task, student ConfigDict, teacher ConfigDict). teacher_cfg: the architecture of a loaded
  teacher checkpoint (None = config.teacher.name). The step's consts are the teacher parameters."""
  scfg = student_config(cfg)
  tcfg = teacher_config(cfg) if teacher_cfg is None else teacher_cfg
  # The attention implementation is a property of the run, not of the tower: the teacher's forward
  # (more than half of an EVA-02 step) takes the fused kernel whenever the student does.
  tcfg = ml_collections.ConfigDict(tcfg.to_dict())
  tcfg.attention = scfg.attention
  t_graphdef, t_template = nnx.split(vit.abstract(tcfg), nnx.Param)
  teacher_sh = nnx.to_pure_dict(parallel.state_shardings(
      t_template, mesh, parallel.rules_from_config(cfg), replicate=cfg.teacher.shard == 'replicate'))

  def make_model(seed):
    return mim_lib.MIM(scfg, tcfg.out_dim, rngs=nnx.Rngs(params=jax.random.key(seed)))

  t_input = teacher_input(cfg, scfg, tcfg)
  k = masked_token_bound(cfg, t_input)

  def targets(teacher_params, images, patch_index=None):
    return teacher_lib.targets(task_lib.merge_pure(t_graphdef, t_template, teacher_params),
                               images, t_input, patch_index)

  def loss_fn(model, teacher_params, batch, key):
    images, mask = batch['image'], batch['mask']
    idx, weights = mim_lib.masked_slots(mask, k)
    loss, n = mim_lib.cosine_loss(model(images, mask, dropout_key=key, patch_index=idx),
                                  targets(teacher_params, images, idx), weights)
    metrics = {'masked_tokens': n, 'mask_ratio': jnp.mean(mask.astype(jnp.float32))}
    if idx is not None:   # masked patches past the K slots (none from our loader): counted, logged
      metrics['masked_beyond_bound'] = jnp.sum(mask.astype(jnp.float32)) - n
    return loss, metrics

  def eval_fn(model, teacher_params, batch):
    images, mask = batch['image'], batch['mask']
    loss, n = mim_lib.cosine_loss(model(images, mask), targets(teacher_params, images), mask)
    return {'loss': loss, 'masked_tokens': n}

  task = task_lib.build(cfg, mesh, make_model=make_model, loss_fn=loss_fn, eval_fn=eval_fn,
                        batch_ndims={'image': 4, 'mask': 2},
                        eval_batch_ndims={'image': 4, 'mask': 2}, depth=scfg.depth,
                        consts_shardings=teacher_sh)
  return task, scfg, tcfg


def random_teacher(tcfg, shardings, seed: int):
  """Random-init teacher parameters, created already sharded (None = one device) (demos and tests
  only). The visualizer rebuilds the same teacher from the same seed."""
  def init(key):
    return nnx.to_pure_dict(nnx.state(vit.VisionTransformer(tcfg, rngs=nnx.Rngs(params=key)),
                                      nnx.Param))
  jitted = jit_init(init) if shardings is None else jit_init(init, out_shardings=shardings)
  return jitted(jax.random.key(seed))


def loader(cfg, patch_size: int, train: bool, sources=None):
  """The pretraining loader of config.data; `sources`: data_lib.open_sources(cfg.data) already
  opened (None = open them)."""
  return data_lib.build_pretrain_loader(
      cfg.data, image_size=cfg.image_size, patch_size=patch_size,
      batch_size=trainer.per_host_batch(cfg), seed=cfg.seed, train=train, sources=sources)


def evaluate(cfg, task, params, teacher_params, patch_size: int, step: int,
             sources=None) -> dict:
  """Validation loss with the spec's deterministic mask (every even patch) on center crops.
  `sources`: as `loader`'s."""
  total, tokens = 0.0, 0.0
  eval_loader = loader(cfg, patch_size, train=False, sources=sources)
  try:
    for i, batch in enumerate(eval_loader):
      if i >= cfg.eval_batches:
        break
      # Padding examples of the last batch carry no masked tokens, so they add nothing to the loss.
      arrays = {'image': batch.arrays['image'],
                'mask': batch.arrays['mask'] & batch.valid[:, None]}
      m = jax.device_get(task.eval_step(params, teacher_params,
                                        parallel.host_to_global(arrays, task.mesh)))
      total += float(m['loss']) * float(m['masked_tokens'])
      tokens += float(m['masked_tokens'])
  finally:
    eval_loader.close()
  if not tokens:
    return {}
  if jax.process_index() == 0:
    print(f'step {step} val_loss {total / tokens:.4f} ({int(tokens)} masked tokens)', flush=True)
  return {'val_loss': total / tokens}


def random_teacher_in_use(cfg) -> bool:
  """True when the run's teacher is random-init: no checkpoint, or a teacher name that is no file
  (api.load_teacher then builds that architecture at random)."""
  path = cfg.teacher.checkpoint
  return not path or (path in model_config.TEACHER_NAMES and not os.path.exists(path))


def check_random_teacher(cfg) -> None:
  """A random-init teacher gives targets without meaning: only demos and tests may ask for one, and
  they say so (config.teacher.allow_random_init=True). Raises ValueError naming both fields."""
  if random_teacher_in_use(cfg) and not cfg.teacher.get('allow_random_init', False):
    what = (f'config.teacher.checkpoint={cfg.teacher.checkpoint!r} is a teacher name, not a file'
            if cfg.teacher.checkpoint else 'config.teacher.checkpoint is empty')
    raise ValueError(f'{what}: the student would regress the features of a RANDOM-INIT teacher, '
                     'which teaches nothing. Set --config.teacher.checkpoint=PATH (e.g. OpenAI '
                     "ViT-L-14.pt or a transformers CLIP directory), or opt in for a demo or test "
                     'with --config.teacher.allow_random_init=True.')


def announce_random_teacher(cfg, tcfg) -> None:
  """A banner on stderr that nobody scrolling past the start of the log can miss."""
  bar = '!' * 78
  lines = [bar, '!!  RANDOM-INIT TEACHER: the targets are features of an untrained '
           f'{tcfg.get("name", "")}.',
           '!!  The student learns nothing transferable. Demos and tests only '
           '(config.teacher.allow_random_init=True).',
           '!!  Real pretraining: --config.teacher.checkpoint=PATH.', bar]
  print('\n'.join(lines), file=sys.stderr, flush=True)


def check_geometry(cfg, scfg, tcfg, teacher_source: str) -> None:
  """The student's predictions and the teacher's targets must meet on one patch grid at
  config.image_size (directly, or through config.teacher.grid's rule), from the same input channels,
  or the first step fails deep inside XLA after compiling (`mul got incompatible shapes (16, 64,
  48), (16, 49, 48)`). Raises ValueError naming both models' patch sizes and grids and what to
  change; nothing has been compiled yet."""
  # The grid rule (config.teacher.grid, models/teacher.py) refuses a mismatch under 'same' and
  # says which rule would bridge it; under another rule the teacher input is planned to fit.
  try:
    teacher_input(cfg, scfg, tcfg)
  except ValueError as e:
    raise ValueError(f'{e} (teacher: {teacher_source}; student: {scfg.name}, patch '
                     f'{scfg.patch_size})') from None
  if int(tcfg.in_chans) != int(scfg.in_chans):
    raise ValueError(f'The teacher ({teacher_source}) reads {tcfg.in_chans}-channel images and '
                     f'the student {scfg.in_chans}: set --config.model.in_chans={tcfg.in_chans}.')
  if not int(tcfg.get('out_dim', 0)) > 0:
    raise ValueError(f'The teacher ({teacher_source}) has no projection (out_dim='
                     f'{tcfg.get("out_dim", 0)}), so it gives no targets for the lm_head: use a '
                     'CLIP vision tower with its projection (CLIPVisionModelWithProjection).')


class PretrainProgram(trainer.Program):
  kind = 'eva_pretrain'
  config_kind = 'pretrain'

  def validate(self):
    cfg = self.cfg
    if cfg.teacher.shard not in ('replicate', 'fsdp'):
      raise ValueError("config.teacher.shard must be 'replicate' or 'fsdp', got "
                       f'{cfg.teacher.shard!r}.')
    scfg = student_config(cfg)   # unknown model name / field / shape errors
    check_random_teacher(cfg)
    if not cfg.teacher.checkpoint:
      # The random-init teacher's architecture is known now; a checkpoint's once it is read
      # (build, still before compiling).
      check_geometry(cfg, scfg, teacher_config(cfg), f'config.teacher.name={cfg.teacher.name!r}')

  def build(self, mesh):
    teacher_cfg, self.teacher_host = load_teacher(self.cfg)
    if teacher_cfg is not None:
      check_geometry(self.cfg, student_config(self.cfg), teacher_cfg,
                     f'config.teacher.checkpoint={self.cfg.teacher.checkpoint!r}')
    task, self.student_cfg, self.teacher_cfg = build(self.cfg, mesh, teacher_cfg)
    # The teacher's identity, recorded in every checkpoint and compared on resume: other weights
    # of the same shape would silently change the targets. A random-init teacher is a function of
    # its architecture (in meta['teacher']) and its seed.
    self.teacher_fingerprint = (
        f'random-init seed {self.cfg.seed + 1}' if self.teacher_host is None
        else ckpt_lib.params_fingerprint(self.teacher_host))
    if random_teacher_in_use(self.cfg) and jax.process_index() == 0:
      announce_random_teacher(self.cfg, self.teacher_cfg)
    return task

  def open_train_sources(self):
    return data_lib.open_sources(self.cfg.data)

  def train_loader(self, task):
    return loader(self.cfg, self.student_cfg.patch_size, train=True,
                  sources=self.train_sources())

  def consts(self, task):
    if self.teacher_host is None:
      return random_teacher(self.teacher_cfg, task.consts_shardings, self.cfg.seed + 1)
    params = jax.tree.map(jax.device_put, self.teacher_host, task.consts_shardings)
    self.teacher_host = None   # the host copy is no longer needed
    return params

  def evaluate(self, task, state, consts, step):
    return evaluate(self.cfg, task, task.eval_params(state), consts, self.student_cfg.patch_size,
                    step, sources=self.train_sources())

  def meta(self, task):
    return {'kind': self.kind, 'student': self.student_cfg.to_dict(),
            'teacher': self.teacher_cfg.to_dict(),
            'teacher_fingerprint': self.teacher_fingerprint,
            'teacher_random_init': random_teacher_in_use(self.cfg)}

  def resolved(self, task):
    # Recorded so a reader of config.json (or a plot, or a later probe) sees what taught the run.
    return {'student': self.student_cfg.to_dict(), 'teacher': self.teacher_cfg.to_dict(),
            'teacher_random_init': random_teacher_in_use(self.cfg)}


def train(cfg, workdir: str) -> dict:
  """Runs (or resumes) pretraining in `workdir`; returns the last logged metrics."""
  return trainer.run(PretrainProgram(cfg), workdir)
