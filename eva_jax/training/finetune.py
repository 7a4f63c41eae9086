"""Fine-tuning an EVA encoder for image classification (../shared/EVA-SPEC.md "ImageNet fine-tuning").

Mean-pooled patch tokens -> fc_norm -> head; soft-label cross-entropy (mixup/cutmix and label
smoothing arrive as soft labels from the loader, or hard labels are smoothed here), frozen patch
embedding, layer-wise lr decay, and an EMA of the weights that evaluation uses when kept.
`config.init_from`: anything checkpoint.read_encoder reads (an eva_jax workdir or checkpoint, a
timm or official EVA file); '' = random init.
`config.image_size`: an int S, or (height, width) / 'HxW' (--config.image_size=224x336). At a
square size the model is built at S (the pretrained pos-embed is resized bicubically once, 224 ->
336). At a non-square size the model keeps a square native pos-embed -- the init_from checkpoint's
own (the larger side for a random init) -- and the encoder interpolates it (and RoPE) to the
h x w patch grid in every forward, as timm's `dynamic_img_size=True` does; exported weights then
run in timm at the same size.

Everything else (mesh, restore-or-init, loop, checkpoints, SIGTERM, logging) is the trainer
skeleton's: this module is the whole of what a new trainer has to write.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from eva_jax import checkpoint as ckpt_lib
from eva_jax import parallel, paths
from eva_jax.data import pipeline as data_lib
from eva_jax.data.config import format_hw, image_hw
from eva_jax.models import classifier as clf_lib
from eva_jax.models import config as model_config
from eva_jax.training import checks, precision, task as task_lib, trainer

PATCH_EMBED = ('patch_kernel', 'patch_bias')
ARCH_FIELDS = ('width', 'depth', 'heads', 'mlp_dim', 'patch_size', 'swiglu', 'sub_ln',
               'sub_ln_attn', 'rope', 'class_token')


def read_init_encoder(cfg, encoder_cfg):
  """checkpoint.read_encoder of config.init_from. A PyTorch file may not record every
  architecture fact: the run's encoder config states them (and a file that records other values
  is refused, naming the field)."""
  from eva_jax.convert.eva_torch import FACT_FIELDS
  return ckpt_lib.read_encoder(cfg.init_from, weights=cfg.get('init_from_weights', 'auto'),
                               facts={k: encoder_cfg[k] for k in FACT_FIELDS})


def check_init_architecture(init_config: dict, encoder_cfg, what: str) -> None:
  """Raises ValueError naming the first ARCH_FIELDS value (patch size aside: the callers resample
  or refuse it themselves) where the init_from checkpoint's config differs from the run's."""
  for field in ARCH_FIELDS:
    if field == 'patch_size':
      continue
    if field in init_config and init_config[field] != encoder_cfg[field]:
      raise ValueError(f'config.init_from has model.{field}={init_config[field]} but the '
                       f'{what} config has {encoder_cfg[field]}; set --config.model.name (and '
                       'overrides) to match the checkpoint.')


def soft_targets(labels, num_classes: int, smoothing: float):
  """Hard int labels -> smoothed one-hot (timm: off = s/C, on = 1 - s + s/C); soft labels pass."""
  if labels.ndim == 2:
    return labels.astype(jnp.float32)
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def trainable(params, freeze_patch_embed: bool):
  """Tree of bools: False for the patch embedding when EVA's fine-tuning freezes it."""
  def one(path, _):
    names = [str(getattr(k, 'key', k)) for k in path]
    return not (freeze_patch_embed and names[0] == 'encoder' and names[1] in PATCH_EMBED)
  return jax.tree_util.tree_map_with_path(one, params)


def encoder_config(cfg, native: int | None = None) -> ml_collections.ConfigDict:
  """The resolved encoder: config.model at its native (pos-embed) image size, which is
  config.image_size when square, else `native` (the init_from checkpoint's size; None = the larger
  side, for a random init)."""
  h, w = image_hw(cfg.image_size)
  size = h if h == w else int(native or max(h, w))
  return model_config.resolve_encoder(cfg.model, image_size=size,
                                      dtype=precision.compute_dtype(cfg.precision))


def build(cfg, mesh, num_classes: int, native: int | None = None,
          eval_classes: np.ndarray | None = None):
  """(Task, encoder ConfigDict): a Classifier trained with soft-label cross-entropy; `native`:
  see encoder_config. eval_classes: bool [num_classes], the classes evaluation predicts among
  (trainer.Program.eval_class_mask; None = all), a constant of the eval step."""
  ecfg = encoder_config(cfg, native)
  smoothing = float(cfg.data.label_smoothing)

  def make_model(seed):
    return clf_lib.Classifier(ecfg, num_classes, pool=cfg.pool, head_init_scale=cfg.head_init_scale,
                              rngs=nnx.Rngs(params=jax.random.key(seed)))

  def loss_fn(model, consts, batch, key):
    targets = soft_targets(batch['label'], num_classes, smoothing)
    logits = model(batch['image'], dropout_key=key)
    acc = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
    return optax.softmax_cross_entropy(logits, targets).mean(), {'train_top1': acc}

  def eval_fn(model, consts, batch):
    logits = restrict_logits(model(batch['image']), eval_classes)
    labels, valid = batch['label'], batch['valid'].astype(jnp.float32)
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
    hit1 = (top5[:, 0] == labels).astype(jnp.float32)
    hit5 = jnp.any(top5 == labels[:, None], -1).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    ce = jnp.where(valid > 0, ce, 0.0)   # a padding row's label may be an excluded class
    return {'loss': jnp.sum(ce * valid), 'top1': jnp.sum(hit1 * valid),
            'top5': jnp.sum(hit5 * valid), 'count': jnp.sum(valid)}

  soft = cfg.data.mixup > 0 or cfg.data.cutmix > 0   # the loader then yields [B, classes] labels
  graphdef, template = task_lib.split_abstract(make_model)
  task = task_lib.build(
      cfg, mesh, make_model=make_model, loss_fn=loss_fn, eval_fn=eval_fn,
      batch_ndims={'image': 4, 'label': 2 if soft else 1},
      eval_batch_ndims={'image': 4, 'label': 1, 'valid': 1}, depth=ecfg.depth,
      trainable=trainable(nnx.to_pure_dict(template), cfg.freeze_patch_embed))
  return task, ecfg


def resample_patch_size(encoder_params: dict, patch_size: int, method: str) -> dict:
  """Pretrained encoder params (nested, numpy) with the patch kernel resampled to `patch_size`
  (models.resample: 'pinv' = FlexiViT / timm resample_patch_embed, 'bicubic' = the official
  interpolate_patch_14to16.py), logged; pretrained_into then re-grids the pos-embed (official
  bicubic). EVA-02-CLIP-B/16 starts this way from EVA-02-B/14."""
  from eva_jax.models import resample
  old = np.asarray(encoder_params['patch_kernel'])
  out = dict(encoder_params)
  out['patch_kernel'] = resample.resample_patch_kernel(old, patch_size, method)
  print(f'Resampled the pretrained patch kernel {old.shape[0]}x{old.shape[1]} -> '
        f'{patch_size}x{patch_size} ({method}; config.patch_resample).', flush=True)
  return out


def pretrained_into(abstract_params: dict, encoder_params: dict, *, grid_from: tuple[int, int],
                    grid_to: tuple[int, int], num_prefix: int = 1) -> tuple[dict, list[str]]:
  """Classifier encoder params from a pretrained encoder (numpy, host side).

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


def classifier_heads(params: dict, weights, fc_norm_from_norm: bool,
                     dropped: list[str]) -> tuple[str, list[str]]:
  """Sets params['fc_norm'] / params['head'] (numpy, in place) from what a fine-tuned checkpoint
  holds next to its encoder (weights.extra: an eva_jax run's groups, a timm / official file's
  fc_norm.* / head.*) wherever the shapes fit. The official run_class_finetuning.py and timm keep
  them and drop only a head with another class count (IN-21K -> IN-1K). Without a checkpoint
  fc_norm, fc_norm_from_norm makes the MIM `norm` the fc_norm (timm's checkpoint_filter_fn).
  Returns (the groups taken from the checkpoint, 'norm (as fc_norm)' included, and the 'not used'
  list extended)."""
  from eva_jax.convert import common
  used, dropped = [], list(dropped)
  for group, tree in sorted(weights.extra.items()):
    got = common.flatten(tree)
    want = common.flatten(params[group]) if group in ('fc_norm', 'head') else {}
    shapes = {k: np.shape(v) for k, v in got.items()}
    if want and shapes == {k: np.shape(v) for k, v in want.items()}:
      params[group] = common.unflatten({k: np.asarray(v, np.float32) for k, v in got.items()})
      used.append(group)
    elif group == 'head' and 'kernel' in got:
      dropped.append(f'head ({np.shape(got["kernel"])[-1]} classes; this run has '
                     f'{np.shape(want["kernel"])[-1]})')
    else:
      dropped.append(group if not want else f'{group} (another shape)')
  if 'fc_norm' not in used and fc_norm_from_norm and 'norm' in weights.params:
    params['fc_norm'] = {k: np.asarray(v, np.float32) for k, v in weights.params['norm'].items()}
    # pretrained_into lists 'norm/scale', 'norm/bias'; video's inflation lists 'norm': used now.
    dropped = [d for d in dropped if d != 'norm' and not d.startswith('norm/')]
    used.append('norm (as fc_norm)')
  return used, dropped


def heads_note(used: list[str]) -> str:
  """'fc_norm, head from the checkpoint; ' (the start-up line's part for classifier_heads)."""
  return f'{", ".join(used)} from the checkpoint; ' if used else ''


def restrict_logits(logits, class_mask: np.ndarray | None):
  """logits [B, C] with the classes where class_mask (bool [C], numpy: a constant of the step) is
  False set to the dtype's lowest finite value: no prediction, no softmax mass
  (trainer.Program.eval_class_mask). class_mask None or all True: logits unchanged."""
  if class_mask is None or class_mask.all():
    return logits
  return jnp.where(class_mask, logits, jnp.finfo(logits.dtype).min)


def skipped_note(rec: dict) -> str:
  """' (N unreadable left out)' when evaluation skipped undecodable records, else ''."""
  return f" ({rec['eval_skipped']} unreadable left out)" if rec.get('eval_skipped') else ''


def classes_note(class_mask: np.ndarray) -> str:
  """' among K of N classes' for an evaluation restricted to a subset (printed with its scores,
  which do not compare with full-head ones), else ''."""
  k = int(class_mask.sum())
  return '' if k == class_mask.size else f' among {k} of {class_mask.size} classes'


def eval_top_k(task, state, consts, loader, eval_batches: int, input_key: str) -> dict:
  """Loss, top-1 and top-5 over `loader` (at most eval_batches batches; 0 = all; closed after)
  with the weights evaluation uses: {'eval_loss', 'eval_top1', 'eval_top5', 'eval_count',
  'eval_skipped'} (unreadable records, left out of the scores; summed over hosts). ValueError
  when nothing could be scored.
  input_key: the batch array the model reads ('image', or 'video' for training/video.py). The
  classes predicted among are the task's (build's eval_classes)."""
  sums = {'loss': 0.0, 'top1': 0.0, 'top5': 0.0, 'count': 0.0}
  skipped = 0
  try:
    for i, b in enumerate(loader):
      if eval_batches > 0 and i >= eval_batches:
        break
      arrays = {input_key: b.arrays[input_key], 'label': b.arrays['label'], 'valid': b.valid}
      out = jax.device_get(task.eval_step(task.eval_params(state), consts,
                                          parallel.host_to_global(arrays, task.mesh)))
      for k in sums:
        sums[k] += float(out[k])
      skipped = b.skipped   # this host's unreadable records so far (padding rows, not scored)
  finally:
    loader.close()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils   # pylint: disable=g-import-not-at-top
    skipped = int(np.sum(multihost_utils.process_allgather(np.int64(skipped))))
  if sums['count'] == 0:
    raise ValueError(f'Evaluation scored no {input_key}: all {skipped} records read were '
                     'unreadable (undecodable files?). Check config.eval_source (or '
                     'config.data.source when it is unset).')
  n = sums['count']
  return {'eval_loss': sums['loss'] / n, 'eval_top1': sums['top1'] / n,
          'eval_top5': sums['top5'] / n, 'eval_count': int(sums['count']),
          'eval_skipped': int(skipped)}


class FinetuneProgram(trainer.Program):
  kind = 'eva_finetune'
  config_kind = 'finetune'
  init_fields = ('init_from', 'init_from_weights', 'patch_resample', 'fc_norm_from_norm',
                 'head_init_scale')

  def validate(self):
    cfg = self.cfg
    self.num_classes = self.classifier_num_classes()   # config.eval_source too
    # Each side a multiple of the patch, before anything is read or compiled.
    checks.image_grid(cfg.image_size, cfg.model.get('patch_size') or model_config.encoder_config(
        cfg.model.get('name') or 'tiny').patch_size)
    ecfg = encoder_config(cfg)
    if cfg.pool == 'token' and not ecfg.class_token:
      raise ValueError("config.pool='token' pools the class token, but config.model.class_token "
                       "is False: use config.pool='mean' (all patch tokens) or a class token.")

  def native_image_size(self) -> int | None:
    """The square pos-embed size of a non-square run: on a resume the run's own (its checkpoint's
    metadata: init_from is not read then, and may be another or none), else the init_from
    checkpoint's (its metadata for an eva_jax checkpoint; a PyTorch file is read once, kept for
    init_state); None otherwise."""
    cfg = self.cfg
    h, w = image_hw(cfg.image_size)
    if h == w:
      return None
    if self.resume_step_dir is not None:
      return int(ckpt_lib.read_meta(self.resume_step_dir)['student']['image_size'])
    if not cfg.init_from:
      return None
    if paths.as_path(cfg.init_from).is_dir():
      return int(ckpt_lib.read_meta(ckpt_lib.resolve(cfg.init_from)[0])['student']['image_size'])
    return int(self.init_weights().config.get('image_size', 224))

  def init_weights(self):
    """checkpoint.read_encoder of config.init_from, read once."""
    if getattr(self, '_init_weights', None) is None:
      ecfg = getattr(self, 'encoder_cfg', None) or encoder_config(self.cfg)
      self._init_weights = read_init_encoder(self.cfg, ecfg)
    return self._init_weights

  def build(self, mesh):
    task, self.encoder_cfg = build(self.cfg, mesh, self.num_classes, self.native_image_size(),
                                   self.eval_class_mask(self.num_classes))
    return task

  def open_train_sources(self):
    return data_lib.open_sources(self.cfg.data)

  def open_eval_source(self, spec):
    return data_lib.open_source(spec, self.cfg.data)

  def loader(self, train: bool):
    """The classification loader of config.data: training reads the training sources, evaluation
    the evaluation sources (both opened once)."""
    return data_lib.build_classification_loader(
        self.cfg.data, image_size=self.cfg.image_size, batch_size=trainer.per_host_batch(self.cfg),
        seed=self.cfg.seed, train=train, num_classes=self.num_classes,
        sources=self.train_sources() if train else self.eval_sources())

  def train_loader(self, task):
    return self.loader(train=True)

  def init_state(self, task):
    cfg = self.cfg
    state = task.init(cfg.seed)
    if not cfg.init_from:
      return state
    weights = self.init_weights()
    self._init_weights = None   # the host copy is not kept for the whole run
    check_init_architecture(weights.config, self.encoder_cfg, 'fine-tuning')   # patch: resampled below
    p = self.encoder_cfg.patch_size
    p_from = int(weights.config.get('patch_size', p))
    grid_from = (weights.config.get('image_size', 224) // p_from,) * 2
    if p_from != p:
      weights = dataclasses.replace(weights, params=resample_patch_size(
          weights.params, p, cfg.get('patch_resample', 'pinv')))
    grid_to = (self.encoder_cfg.image_size // p,) * 2
    params = jax.tree.map(np.asarray, jax.device_get(state.params))
    params['encoder'], dropped = pretrained_into(
        task.abstract_state.params, weights.params, grid_from=grid_from, grid_to=grid_to,
        num_prefix=1 if self.encoder_cfg.class_token else 0)
    self.init_heads, dropped = classifier_heads(params, weights, cfg.fc_norm_from_norm, dropped)
    self.init_source = weights.source
    run_grid = checks.image_grid(cfg.image_size, p)
    resampled = '' if run_grid == grid_to else f', interpolated to {run_grid} in each forward'
    print(f'Initialized the encoder from {weights.source} (pos-embed grid {grid_from} -> '
          f'{grid_to}{resampled}; {heads_note(self.init_heads)}not used: '
          f'{", ".join(dropped) or "nothing"}).', flush=True)
    return task.with_params(state, jax.tree.map(jax.device_put, params, task.param_shardings))

  def evaluate(self, task, state, consts, step):
    cfg = self.cfg
    mask = self.eval_class_mask(self.num_classes)
    rec = eval_top_k(task, state, consts, self.loader(train=False), cfg.eval_batches, 'image')
    if jax.process_index() == 0:
      print(f"step {step} eval top1 {rec['eval_top1']:.4f} top5 {rec['eval_top5']:.4f} "
            f"on {rec['eval_count']}{self.eval_split_note()} images{skipped_note(rec)}"
            f"{classes_note(mask)}"
            f"{' (EMA)' if state.ema is not None else ''}", flush=True)
    return rec

  def meta(self, task):
    return {'kind': self.kind, 'num_classes': self.num_classes, 'pool': self.cfg.pool,
            'student': clf_lib.finetune_encoder_config(self.encoder_cfg).to_dict()}

  def resolved(self, task):
    return {'encoder': self.encoder_cfg.to_dict(), 'num_classes': self.num_classes,
            'image_size': format_hw(image_hw(self.cfg.image_size))}


def train(cfg, workdir: str) -> dict:
  """Runs (or resumes) fine-tuning in `workdir`; returns the last logged metrics."""
  return trainer.run(FinetuneProgram(cfg), workdir)
