"""Config checks that run before anything is built or compiled: each names the field and the fix.

Every trainer calls `check_run(cfg)` (training/trainer.py); programs add their own in
Program.validate; the linear probe and the data benchmark call `check_config` too.

The whole config is walked: every numeric field (numbers and tuples of numbers) must have a rule in
the table of its kind of config (`RULES`), NaN and infinity are refused everywhere, and the
cross-field rules (`CROSS`) run after the single fields. A numeric field without a rule is logged
as unchecked rather than passed in silence (tests/test_robust_config.py makes sure the recipes
have none).
"""
from __future__ import annotations

import logging

import dataclasses

from eva_jax import parallel, ranges
from eva_jax.data.config import image_hw
from eva_jax.models import config as model_config
from eva_jax.ranges import Range, count, fraction, nonneg, positive
from eva_jax.training import precision

@dataclasses.dataclass(frozen=True)
class ImageSize(Range):
  """The rule of `config.image_size`: an int S (S x S), a (height, width) pair or an 'HxW' string
  (data/config.py image_hw). `square`: the program runs at square sizes only (pretraining: the
  teacher grid plan, models/teacher.py, is square); `zero`: 0 means "the encoder's own". As a
  Range it reads as an integer >= 1 (>= 0 with `zero`) for the table's generic tests."""
  lo: float = 1
  integer: bool = True
  square: bool = False
  zero: bool = False

  def check(self, name: str, v) -> None:
    if self.zero and not isinstance(v, bool) and v == 0:
      return
    h, w = image_hw(v, name)
    if self.square and h != w:
      raise ValueError(f'{name}={v!r} ({h} high, {w} wide) is not square: {self.why} Use one int '
                       '(e.g. 224); fine-tuning, the linear and segmentation probes and '
                       'eva-visualize take HxW.')


_SQUARE = ImageSize(square=True, why='this program runs at square sizes only.')


def image_grid(value, patch_size: int, field: str = 'config.image_size') -> tuple[int, int]:
  """The (rows, cols) patch grid of an image size (int, (h, w) or 'HxW'). Raises ValueError naming
  `field`, the size and the nearest valid sizes when a side is not a multiple of the patch."""
  h, w = image_hw(value, field)
  p = int(patch_size)
  bad = [(side, n) for side, n in (('height', h), ('width', w)) if n % p]
  if bad:
    near = lambda n: sorted({max(p, n // p * p), (n // p + 1) * p})
    what = '; '.join(f'{side} {n} (nearest: {" or ".join(map(str, near(n)))})' for side, n in bad)
    raise ValueError(f'{field}={value!r}: every side must be a multiple of the patch size {p}; '
                     f'{what}.')
  return h // p, w // p

# ------------------------------------------------------------------------------------------------
# Single fields. Keys are dotted paths inside the config. Ranges say what the run can honour;
# `why` explains the ones that are not obvious.
_DATA = {
    'data.workers': count(0, why='0 = decode in the main process'),
    'data.threads': count(1),
    'data.prefetch': count(0),
    'data.device_prefetch': count(0, why='0 = off'),
    'data.mean': Range(length=3),
    'data.std': Range(0.0, lo_open=True, length=3, why='images are divided by it'),
    'data.hflip': fraction(),
    'data.scale': Range(0.0, 1.0, lo_open=True, length=2, ordered=True,
                        why='(min, max) area fraction of RandomResizedCrop'),
    'data.ratio': Range(0.0, lo_open=True, length=2, ordered=True,
                        why='(min, max) aspect ratio of RandomResizedCrop'),
    'data.finetune_scale': Range(0.0, 1.0, lo_open=True, length=2, ordered=True,
                                 why='(min, max) area fraction of the fine-tuning crop'),
    'data.mask.ratio': fraction(hi_open=True, why='the recipe is 105/256'),
    'data.mask.num_masking_patches': count(0, why='0 = ratio * cells'),
    'data.mask.min_num_patches': count(1),
    'data.mask.max_aspect': positive(),
    'data.mask.min_aspect': positive(),
    'data.mixup': nonneg('a Beta alpha; 0 = off'),
    'data.cutmix': nonneg('a Beta alpha; 0 = off'),
    'data.mixup_prob': fraction(),
    'data.mixup_switch_prob': fraction(),
    'data.label_smoothing': fraction(hi_open=True, why='1 would erase the label'),
    'data.crop_pct': fraction(lo_open=True),
}

_RUN = {
    'seed': count(0),
    'total_steps': count(1),
    'batch_size': count(1),
    'image_size': _SQUARE,
    'log_every': count(1),
    'checkpoint_every': count(1),
    'keep_checkpoints': count(1, why='0 would delete every checkpoint, the last one included'),
    'eval_every': count(0, why='0 = only at the end'),
    'eval_batches': count(0),
    'optim.lr': Range(0.0, 1.0, lo_open=True,
                      why='AdamW moves each weight by about lr per step: above 1 it rewrites them'),
    'optim.min_lr': nonneg(),
    'optim.warmup_steps': count(0),
    'optim.b1': fraction(hi_open=True),
    'optim.b2': fraction(hi_open=True),
    'optim.eps': Range(0.0, 1.0, lo_open=True),
    'optim.weight_decay': nonneg(),
    'optim.clip_norm': nonneg('0 = no clipping'),
    'optim.layer_decay': fraction(lo_open=True, why='1 = off'),
    # The scale multiplies an fp32 loss: below 1 it shrinks gradients instead of protecting them
    # from fp16 underflow; above 2^64 the scaled loss overflows fp32 (3.4e38) for any loss > 1e19.
    'loss_scale.initial': Range(1.0, 2.0 ** 64),
    'loss_scale.min_scale': Range(1.0, 2.0 ** 64),
    'loss_scale.growth_interval': count(1),
    'loss_scale.hysteresis': count(1),
    'mesh.data': count(1, also=(-1,), why='-1 = the devices left over'),
    'mesh.fsdp': count(1, also=(-1,), why='-1 = the devices left over'),
    'mesh.tensor': count(1, also=(-1,), why='-1 = the devices left over'),
    'distributed.num_processes': count(1),
    'distributed.process_id': count(0),
    # Divergence stop (training/loop.py Divergence, which also checks max_norm_growth > 1).
    'divergence.max_nonfinite_steps': count(1),
    'divergence.spike_window': count(1),
    'divergence.spike_patience': count(1),
    'divergence.spike_factor': nonneg('0 = no spike test'),
    'divergence.max_norm_growth': nonneg('0 = off, else > 1'),
    'benchmark.steps': count(1),
    'benchmark.warmup': count(0),
    'benchmark.det_image_size': count(1, why='ViTDet backbone input side (benchmark.backbone=vitdet)'),
    'benchmark.window_size': count(1, why='ViTDet window side in patches'),
    **_DATA,
}

RULES = {
    # Any other trainer's config (trainer.Program subclasses to come): the fields every run has.
    'train': _RUN,
    'pretrain': {
        **_RUN,
        'eval_batches': count(0, why='validation batches per evaluation; 0 = no validation'),
        'teacher.heads': count(0, why='0 = from the file'),
        'image_size': ImageSize(square=True, why='pretraining runs at square sizes only (the '
                                'teacher grid plan, models/teacher.py, is square).'),
    },
    'finetune': {
        **_RUN,
        'eval_batches': count(0, why='0 = the whole eval split'),
        'num_classes': count(0, why='0 = from the labeled source'),
        'image_size': ImageSize(),
        'head_init_scale': nonneg(),
        'ema_decay': fraction(hi_open=True, why='0 = no EMA; 1 would never update it'),
    },
    'linear_probe': {
        'seed': count(0),
        'image_size': ImageSize(lo=0, zero=True),    # 0 = the encoder's own
        'batch_size': count(1),
        'holdout': fraction(lo_open=True, hi_open=True,
                            why='the held-out share of each class'),
        'epochs': count(1),
        'lr': Range(0.0, 1.0, lo_open=True),
        'weight_decay': nonneg(),
        'probe_batch_size': count(1),
        'knn_k': count(1),
        'knn_temperature': positive(),
        **_DATA,
    },
    'seg_probe': {     # evaluation/seg_probe.py
        'seed': count(0),
        'image_size': ImageSize(lo=0, zero=True),    # 0 = the encoder's own
        'batch_size': count(1),
        'mean': Range(length=3),
        'std': Range(0.0, lo_open=True, length=3, why='images are divided by it'),
        'epochs': count(1),
        'lr': Range(0.0, 1.0, lo_open=True),
        'weight_decay': nonneg(),
        'probe_batch_size': count(1),
        'task.train_images': count(1),
        'task.test_images': count(1),
        'task.area': Range(0.0, 1.0, lo_open=True, length=2, ordered=True,
                           why='(min, max) share of the image the pasted shape covers'),
    },
    'clip': {          # training/clip.py: contrastive image-text (EVA-CLIP)
        **_RUN,
        'image_size': ImageSize(),
        'eval_batches': count(0),
        'model.patch_dropout': fraction(hi_open=True, why='1 would drop every patch'),
        'eval.batch_size': count(1),
        'eval.limit': count(0, why='0 = every pair'),
        **{f'optim.towers.{t}.{k}': rule for t in ('visual', 'text') for k, rule in (
            ('lr', Range(0.0, 1.0, lo_open=True)), ('weight_decay', nonneg()),
            ('layer_decay', fraction(lo_open=True, why='1 = off')))},
    },
    'data_bench': {
        'seed': count(0),
        'image_size': count(1),
        'patch_size': count(1),
        'batch_size': count(1),
        'warmup_batches': count(0),
        'num_batches': count(1),
        **_DATA,
    },
}

RULES['video'] = {   # training/video.py: a fine-tuning config plus the clip geometry and decoding
    **RULES['finetune'],
    'video.num_frames': count(1),
    'video.tubelet': count(1, why='frames per token; must divide video.num_frames'),
    'video.time_noise': nonneg('std of the per-time-step pos-embed offset; 0 = plain repeat'),
    'data.video.max_decode_frames': count(1),
    'data.video.decode_short_side': count(0, why='0 = native size'),
    'data.video.min_frames': count(1),
    'data.video.color_jitter': fraction(),
    'data.video.jitter': Range(0.0, length=4, why='brightness, contrast, saturation, hue'),
    'data.video.grayscale': fraction(),
    'data.video.test_clips': count(1),
    'data.video.test_crops': count(1),
}

# Fields whose value is a word from a fixed list ('' where it means "default").
CHOICES = {
    'pool': ('mean', 'token'),
    'teacher.shard': ('replicate', 'fsdp'),
    'teacher.act': ('', 'gelu', 'quick_gelu'),
    'init_from_weights': ('auto', 'model', 'model_ema'),
    'mode': ('pretrain', 'classify'),
    'benchmark.input': ('synthetic', 'pipeline'),
    'task.shape': ('ellipse', 'box'),
    'patch_resample': ('pinv', 'bicubic'),
    'init.patch_resample': ('bicubic', 'pinv'),
    'video.model': ('space_time', 'frame_average'),
}


# What each kind of config is for: (what it is, the command that takes it, a recipe of it).
KIND_COMMANDS = {
    'pretrain': ('a pretraining', 'eva-pretrain', 'pretrain_demo'),
    'video': ('a video fine-tuning', 'eva-video-finetune', 'video_demo'),
    'finetune': ('a fine-tuning', 'eva-finetune', 'finetune_demo'),
    'linear_probe': ('a linear-probe', 'eva-linear-probe', 'linear_probe_demo'),
    'seg_probe': ('a segmentation-probe', 'eva-seg-probe', 'seg_probe_demo'),
    'clip': ('a contrastive (EVA-CLIP)', 'eva-clip', 'clip_demo'),
    'data_bench': ('an input-benchmark', 'eva-data-benchmark', 'data_bench'),
}


def require_kind(cfg, kind: str) -> None:
  """ValueError unless config_kind(cfg) == kind, naming what the config is, the command that
  takes it and a recipe of the wanted kind. Without it, a pretraining config given to fine-tuning
  fails deep inside with a bare AttributeError on the first field it lacks."""
  what, _, recipe = KIND_COMMANDS[kind]
  try:
    found = config_kind(cfg)
  except ValueError:
    found = None
  if found == kind:
    return
  other = KIND_COMMANDS.get(found)
  guess = f' It is {other[0]} config: give it to {other[1]}.' if other else ''
  raise ValueError(f'This is not {what} config.{guess} Give {what} recipe or run, e.g. '
                   f'--config={recipe}.')


def config_kind(cfg) -> str:
  """Which table applies: told apart by the fields only one kind of config has."""
  if 'teacher' in cfg:
    return 'pretrain'
  if 'video' in cfg and 'num_classes' in cfg:
    return 'video'
  if 'num_classes' in cfg:
    return 'finetune'
  if 'knn_k' in cfg:
    return 'linear_probe'
  if 'task' in cfg and 'probe_batch_size' in cfg:
    return 'seg_probe'
  if 'loss' in cfg and 'init' in cfg and 'text' in cfg:
    return 'clip'
  if 'num_batches' in cfg:
    return 'data_bench'
  if 'total_steps' in cfg:
    return 'train'
  raise ValueError('This config is not a pretraining, fine-tuning, linear-probe, segmentation-probe '
                   'or data-benchmark config (none of config.teacher, num_classes, knn_k, task, '
                   'num_batches).')


def numeric_leaves(cfg, prefix: str = ''):
  """(dotted path, value) of every number or tuple of numbers in `cfg`, config.model excluded
  (its fields are checked resolved, with models/config.py MODEL_RULES)."""
  for k, v in cfg.items():
    path = f'{prefix}{k}'
    if path == 'model':
      continue
    if hasattr(v, 'items'):
      yield from numeric_leaves(v, path + '.')
    elif ranges.is_number(v) or (isinstance(v, (tuple, list)) and v
                                 and all(ranges.is_number(x) for x in v)):
      yield path, v


def _get(cfg, path: str):
  for part in path.split('.'):
    cfg = cfg[part]
  return cfg


def _has(cfg, path: str) -> bool:
  for part in path.split('.'):
    if not hasattr(cfg, 'items') or part not in cfg:
      return False
    cfg = cfg[part]
  return True


def _check_mixture(cfg) -> None:
  for i, entry in enumerate(cfg.data.get('mixture') or ()):
    if len(entry) != 2:
      raise ValueError(f'config.data.mixture[{i}]={tuple(entry)!r} must be a (source, weight) '
                       'pair.')
    positive('sources are drawn in proportion to the weights').check(
        f'config.data.mixture[{i}] weight', entry[1])


# ------------------------------------------------------------------------------------------------
# Cross-field rules: (kinds, check(cfg)); each raises naming both fields.
def _lr_order(cfg):
  if cfg.optim.min_lr > cfg.optim.lr:
    raise ValueError(f'config.optim.min_lr={cfg.optim.min_lr} is above config.optim.lr='
                     f'{cfg.optim.lr}: the cosine would rise. Set min_lr <= lr.')


def _warmup(cfg):
  if cfg.optim.warmup_steps >= cfg.total_steps:
    raise ValueError(f'config.optim.warmup_steps={cfg.optim.warmup_steps} must be < '
                     f'config.total_steps={cfg.total_steps}: the run would end before the lr '
                     'peaks.')


def _loss_scale(cfg):
  ls = cfg.loss_scale
  if ls.initial < ls.min_scale:
    raise ValueError(f'config.loss_scale.initial={ls.initial} is below config.loss_scale.min_scale'
                     f'={ls.min_scale}: the scale could never reach its start. Raise initial or '
                     'lower min_scale.')


def _mask_aspect(cfg):
  m = cfg.data.mask
  if m.min_aspect > m.max_aspect:
    raise ValueError(f'config.data.mask.min_aspect={m.min_aspect} is above '
                     f'config.data.mask.max_aspect={m.max_aspect}.')


def _process_id(cfg):
  d = cfg.distributed
  if d.process_id >= d.num_processes:
    raise ValueError(f'config.distributed.process_id={d.process_id} must be < '
                     f'config.distributed.num_processes={d.num_processes}.')


def _mesh_rest(cfg):
  layout = cfg.mesh.get('layout', 'flat')
  if layout not in parallel.MESH_LAYOUTS:
    raise ValueError(f"config.mesh.layout={layout!r} unknown; use 'flat' (sizes over all devices) "
                     "or 'hybrid' (sizes within each host, data repeated across hosts).")
  rest = [k for k in ('data', 'fsdp', 'tensor') if cfg.mesh[k] == -1]
  if len(rest) > 1:
    raise ValueError(f'config.mesh.{rest[0]} and config.mesh.{rest[1]} are both -1; at most one '
                     'mesh axis takes the devices left over.')


def _warmup_ema(cfg):
  # Evaluating the EMA needs updates to have reached it; a decay whose horizon (1 / (1 - decay))
  # exceeds the whole run evaluates mostly the random init (the EMA starts from it).
  if cfg.ema_decay > 0 and 1.0 / (1.0 - cfg.ema_decay) > cfg.total_steps:
    horizon = 1.0 / (1.0 - cfg.ema_decay)
    raise ValueError(f'config.ema_decay={cfg.ema_decay} averages over ~{horizon:.0f} steps, more '
                     f'than config.total_steps={cfg.total_steps}: the EMA evaluated would still '
                     'be mostly the initial weights. Lower ema_decay (or set 0).')


def _eval_pretrain(cfg):
  # Periodic evaluation asked for with nothing to evaluate on would log nothing, every time.
  if cfg.eval_every > 0 and cfg.eval_batches == 0:
    raise ValueError(f'config.eval_every={cfg.eval_every} asks for a validation loss every '
                     f'{cfg.eval_every} steps but config.eval_batches=0 measures none: set '
                     'eval_batches >= 1, or eval_every=0.')


_TRAIN = ('train', 'pretrain', 'finetune', 'video', 'clip')
# (kinds, fields the rule reads, rule): a config of another trainer may lack a section.
CROSS = [
    (_TRAIN, ('optim', 'total_steps'), _lr_order), (_TRAIN, ('optim', 'total_steps'), _warmup),
    (_TRAIN, ('loss_scale',), _loss_scale), (_TRAIN, ('distributed',), _process_id),
    (_TRAIN, ('mesh',), _mesh_rest), (None, ('data.mask',), _mask_aspect),
    (('finetune', 'video'), ('ema_decay',), _warmup_ema),
    (('pretrain',), ('eval_every', 'eval_batches'), _eval_pretrain),
]


def check_config(cfg, kind: str | None = None) -> str:
  """Range-checks every numeric field of `cfg` and the cross-field rules; returns the kind.
  kind: the kind the caller takes (require_kind: another kind's config is refused, naming the
  command it is for); None = whatever config_kind finds.

  Raises ValueError 'config.FIELD=VALUE is out of range: must be ...' naming the first bad field."""
  if kind:
    require_kind(cfg, kind)
  kind = kind or config_kind(cfg)
  rules = RULES[kind]
  unchecked = []
  for path, value in numeric_leaves(cfg):
    rule = rules.get(path)
    if rule is None:
      unchecked.append(path)
      continue
    rule.check(f'config.{path}', value)
  for path, rule in rules.items():
    # config.model is skipped by the walk (encoder fields: MODEL_RULES); a kind's own model-level
    # fields (the CLIP model's patch_dropout) are named in its table.
    if path.startswith('model.') and _has(cfg, path):
      rule.check(f'config.{path}', _get(cfg, path))
  if isinstance(cfg.get('image_size'), str) and 'image_size' in rules:
    # 'HxW' from the command line: not a number, so the walk above does not see it.
    rules['image_size'].check('config.image_size', cfg.image_size)
  if unchecked:
    # A field the table does not know (a custom config's own field): say so instead of passing it.
    logging.warning('No range rule for config field(s) %s: not checked.', ', '.join(unchecked))
  for path, allowed in CHOICES.items():
    if _has(cfg, path) and _get(cfg, path) not in allowed:
      raise ValueError(f'config.{path}={_get(cfg, path)!r} must be one of '
                       f'{", ".join(repr(a) for a in allowed)}.')
  if 'data' in cfg:
    _check_mixture(cfg)
  for kinds, needs, check in CROSS:
    if (kinds is None or kind in kinds) and all(_has(cfg, f) for f in needs):
      check(cfg)
  if 'model' in cfg:
    # Overrides that are set are checked before resolving (the resolved encoder is checked again
    # in models/config.py validate, with the run-owned fields filled in).
    for k, v in cfg.model.items():
      if v is not None and k in model_config.MODEL_RULES:
        model_config.MODEL_RULES[k].check(f'config.model.{k}', v)
  return kind


def check_run(cfg, kind: str | None = None) -> None:
  """Fields every trainer reads; kind: the trainer's config kind (see check_config). Raises
  ValueError naming the field."""
  check_config(cfg, kind)   # require_kind first: another kind's config may lack precision
  precision.compute_dtype(cfg.precision)

