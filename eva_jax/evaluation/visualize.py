r"""What a pretraining run learned, on one photo: mask, per-patch cosine to the teacher, feature PCA.

  eva-visualize --workdir=workdirs/demo --image=photo.jpg --out=viz.png \
      [--teacher=PATH_OR_NAME] [--mask_seed=0] [--num_masking_patches=N]

Loads the student encoder + lm_head of the latest checkpoint in WORKDIR and the frozen teacher the
run trained against, of any family (CLIP, EVA-CLIP, SigLIP, DINOv2): the checkpoint in
config.json's teacher.checkpoint (read as the trainer reads it: family, arch, target), or
(random-init demo runs) the teacher architecture recorded in the checkpoint metadata
re-initialized exactly as the trainer did (`training.pretrain.random_teacher(..., config.seed +
1)`). The teacher meets the student as in the train step (models/teacher.py `plan` / `targets`:
the family's input normalization, registers and cls dropped, the run's config.teacher.grid rule).
The photo is resized and center-cropped to the run's image size, or to --image_size (an int or
HxW, e.g. 224x336: the encoders interpolate their pos-embed and RoPE to that grid),
normalized as the run's data (config.data.mean/std), masked with the run's BEiT block-mask
settings, and one PNG is written with five panels:

  photo | masked patches greyed | cos(student prediction, teacher target) per patch (masked
  patches outlined; visible ones faded) | PCA(3) of the student's patch features (unmasked
  forward) as RGB | the same PCA for the teacher's targets.

Prints `mean masked cosine: X` = -(the training loss on this image and mask). The functions
(`load_models`, `random_models`, `load_image`, `draw_mask`, `analyze`, `render`, `pca_rgb`) are
the notebook's (experiments/eva_jax_colab.ipynb) building blocks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from eva_jax import checkpoint as ckpt_lib
from eva_jax import paths
from eva_jax.data.config import CLIP_MEAN, CLIP_STD, format_hw, image_hw
from eva_jax.data.decode import BadImageError, decode_image
from eva_jax.data.masking import BlockMaskGenerator
from eva_jax.data.transforms import resize_center_crop
from eva_jax.models import TEACHER_NAMES, teacher_config, vit
from eva_jax.models import mim as mim_lib
from eva_jax.models.layers import create_module
from eva_jax.models import teacher as teacher_lib
from eva_jax.evaluation.plot import check_png, save_figure
from eva_jax.training import checks, pretrain, task as task_lib

PANELS = ('photo', 'masked', 'cosine', 'pca_student', 'pca_teacher')


# -------------------------------------------------------------------------------------------------
# Models
@dataclasses.dataclass
class Models:
  """Student (encoder + lm_head) and frozen teacher of one pretraining run, ready to apply.

  mim: eva_jax.models.mim.MIM (nnx); teacher: VisionTransformer tower with out_dim (any family).
  image_size: (height, width) in pixels the photo is cropped to.
  plan: how the teacher meets the student (models/teacher.py TeacherInput, as in the train step).
  mask: the run's `config.data.mask` settings (num_masking_patches, min_num_patches, ...).
  mean, std: the run's input normalization (config.data.mean/std).
  """
  mim: Any
  teacher: Any
  image_size: tuple[int, int]
  patch_size: int
  mask: dict
  plan: Any = None
  step: int | None = None
  source: str = ''
  teacher_source: str = ''
  mean: tuple = CLIP_MEAN
  std: tuple = CLIP_STD

  @property
  def grid(self) -> tuple[int, int]:
    return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)


@contextlib.contextmanager
def _quiet_absl():
  log = logging.getLogger('absl')
  level = log.level
  log.setLevel(max(level, logging.ERROR))
  try:
    yield
  finally:
    log.setLevel(level)


def _find_config_json(path: str) -> str | None:
  """config.json of the run owning `path` (a workdir, its checkpoints/ or checkpoints/<step>)."""
  p = paths.as_path(path)
  for _ in range(3):
    cand = p / 'config.json'
    if cand.is_file():
      return os.fspath(cand)
    p = p.parent
  return None


def random_teacher(tcfg, seed: int):
  """The trainer's random-init teacher as a module: `training.pretrain.random_teacher`'s params."""
  tcfg = ml_collections.ConfigDict(tcfg.to_dict() if hasattr(tcfg, 'to_dict') else dict(tcfg))
  graphdef, template = nnx.split(vit.abstract(tcfg), nnx.Param)
  return task_lib.merge_pure(graphdef, template, pretrain.random_teacher(tcfg, None, seed))


def teacher_plan(tcfg, run_cfg, patch_size: int, image_size) -> teacher_lib.TeacherInput:
  """The train step's teacher input plan (models/teacher.py `plan`: grid rule, re-normalization)
  at `image_size` (int or (h, w)). The rules act on each side separately, so a non-square size is
  planned per side with the library's own checks and messages. run_cfg: the run's config
  (config.json as a dict; its teacher.grid/mean/std and data.mean/std)."""
  t, d = run_cfg.get('teacher') or {}, run_cfg.get('data') or {}
  kw = dict(student_patch=int(patch_size), rule=t.get('grid') or 'same',
            data_mean=tuple(d.get('mean') or CLIP_MEAN), data_std=tuple(d.get('std') or CLIP_STD),
            mean=tuple(t.get('mean') or ()), std=tuple(t.get('std') or ()))
  h, w = image_hw(image_size, 'image_size')
  ph = teacher_lib.plan(tcfg, image_size=h, **kw)
  pw = ph if w == h else teacher_lib.plan(tcfg, image_size=w, **kw)
  return dataclasses.replace(ph, student_grid=(ph.student_grid[0], pw.student_grid[0]),
                             teacher_size=(ph.teacher_size[0], pw.teacher_size[0]))


def _mim_from_params(scfg, teacher_dim: int, params: dict):
  abstract = nnx.eval_shape(lambda: mim_lib.MIM(scfg, teacher_dim, rngs=nnx.Rngs(params=0)))
  graphdef, template = nnx.split(abstract, nnx.Param)
  pure = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  return task_lib.merge_pure(graphdef, template, pure)


def _mask_settings(mask_cfg, grid) -> dict:
  n = grid[0] * grid[1]
  defaults = {'num_masking_patches': int(round(0.4 * n)), 'min_num_patches': 16 if n >= 256 else 4,
              'max_aspect': 1 / 0.3, 'min_aspect': 0.3}
  out = dict(defaults)
  out.update({k: v for k, v in dict(mask_cfg or {}).items() if k in defaults})
  return out


def load_models(workdir: str, teacher: str | None = None, dtype: str = 'float32',
                image_size=None) -> Models:
  """Student (encoder + lm_head) of the latest checkpoint under `workdir` and its teacher.

  teacher: None = what the run used (config.json teacher.checkpoint read with its family / arch /
  target, else the random-init teacher of meta['teacher'] with seed config.seed + 1, as the
  trainer); a path = that checkpoint, of the run's teacher family; a teacher name ('clip-tiny',
  'siglip-tiny', ...) = a random-init teacher of that architecture, seed config.seed + 1.
  dtype: compute dtype of both models (the parameters are float32 either way).
  image_size: None = the run's; an int or (height, width) / 'HxW' (each side a multiple of the
  patch: ValueError naming the nearest sizes otherwise).
  """
  workdir = os.fspath(workdir)
  if not paths.as_path(workdir).is_dir():
    raise FileNotFoundError(f'--workdir {workdir!r} does not exist or is not a directory; pass a '
                            'pretraining workdir (eva-pretrain ... --workdir=DIR).')
  with _quiet_absl():   # orbax warns about its own optional metadata file
    weights = ckpt_lib.read_encoder(workdir)
  meta, step = weights.meta, weights.step
  if 'lm_head' not in weights.extra or 'teacher' not in meta:
    raise ValueError(f'{weights.source} is not a pretraining checkpoint with encoder + lm_head '
                     f'(parameter groups {sorted(weights.extra)} besides the encoder; a '
                     'fine-tuning run has no regression head).')
  params = {'encoder': weights.params, **weights.extra}
  config_path = _find_config_json(workdir)
  run_cfg = {}
  if config_path:
    run_cfg = json.loads(paths.as_path(config_path).read_text())
  seed = int(run_cfg.get('seed', 0)) + 1

  scfg = ml_collections.ConfigDict(meta['student'])
  scfg.dtype = dtype
  tcfg = ml_collections.ConfigDict(meta['teacher'])
  tcfg.dtype = dtype

  if teacher is None:
    teacher = (run_cfg.get('teacher') or {}).get('checkpoint') or None
    if teacher is None and not config_path:
      logging.warning('No config.json found above %s: assuming the random teacher of seed 0 + 1.',
                      workdir)
  raw = scfg.image_size if image_size is None else image_size
  size = image_hw(raw, '--image_size')
  grid = checks.image_grid(raw, scfg.patch_size, '--image_size')
  target = (run_cfg.get('teacher') or {}).get('target') or ''
  if teacher is None or (teacher in TEACHER_NAMES and not os.path.exists(teacher)):
    if teacher is not None:
      tcfg = teacher_config(teacher)
      if tcfg.family in ('clip', 'eva_clip'):   # as training.pretrain.teacher_config
        tcfg.image_size = scfg.image_size
      tcfg.dtype = dtype
      tcfg = teacher_lib.apply_target(tcfg, target)[0]
    teacher_model = random_teacher(tcfg, seed)
    teacher_source = f'random-init {tcfg.name} (seed {seed})'
  else:
    # The trainer's reader (training.pretrain.load_teacher): family, arch / heads / act, target.
    t_cfg = ml_collections.ConfigDict({'precision': 'fp32', 'teacher': {
        'family': tcfg.get('family', 'clip') or 'clip', 'checkpoint': os.fspath(teacher),
        'arch': '', 'heads': 0, 'act': '', 'target': target, 'precision': ''}})
    t_cfg.teacher.update({k: v for k, v in (run_cfg.get('teacher') or {}).items()
                          if k in ('family', 'arch', 'heads', 'act') and v})
    loaded_cfg, loaded = pretrain.load_teacher(t_cfg)
    loaded_cfg.dtype = dtype
    graphdef, template = nnx.split(vit.abstract(loaded_cfg), nnx.Param)
    teacher_model = task_lib.merge_pure(graphdef, template, loaded)
    teacher_source = os.fspath(teacher)
  if teacher_model.cfg.out_dim != params['lm_head']['kernel'].shape[1]:
    raise ValueError(f'teacher {teacher_source} (out_dim {teacher_model.cfg.out_dim}) does not '
                     'match the student (lm_head out '
                     f'{params["lm_head"]["kernel"].shape[1]}).')
  try:
    plan = teacher_plan(teacher_model.cfg, run_cfg, scfg.patch_size, size)
  except ValueError as e:
    raise ValueError(f'teacher {teacher_source}: {e}') from None
  mim = _mim_from_params(scfg, params['lm_head']['kernel'].shape[1], params)
  data = run_cfg.get('data') or {}
  mask = _mask_settings(data.get('mask'), grid)
  return Models(mim=mim, teacher=teacher_model, image_size=size, patch_size=int(scfg.patch_size),
                mask=mask, plan=plan, step=step, source=workdir, teacher_source=teacher_source,
                mean=tuple(data.get('mean') or CLIP_MEAN), std=tuple(data.get('std') or CLIP_STD))


def random_models(cfg=None, image_size=None) -> Models:
  """The models of a fresh pretraining run at step 0 (student init(seed), teacher seed + 1).

  cfg: a pretraining config (default: configs/pretrain_demo.py's get_config()); any teacher
  family. image_size: None = config.image_size; an int or (height, width) / 'HxW'.
  """
  if cfg is None:
    cfg = demo_config()
  scfg = pretrain.student_config(cfg)
  tcfg = pretrain.teacher_config(cfg)
  raw = cfg.image_size if image_size is None else image_size
  size = image_hw(raw, '--image_size')
  grid = checks.image_grid(raw, scfg.patch_size, '--image_size')
  plan = teacher_plan(tcfg, cfg.to_dict(), scfg.patch_size, size)
  mim = create_module(lambda: mim_lib.MIM(scfg, tcfg.out_dim,
                                          rngs=nnx.Rngs(params=jax.random.key(cfg.seed))))
  return Models(mim=mim, teacher=random_teacher(tcfg, cfg.seed + 1), image_size=size,
                patch_size=int(scfg.patch_size), mask=_mask_settings(cfg.data.mask, grid),
                plan=plan, step=0, source='random init',
                teacher_source=f'random-init {tcfg.name} (seed {cfg.seed + 1})',
                mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))


def demo_config():
  """The pretrain_demo recipe's config (shipped in the package as eva_jax.configs)."""
  from eva_jax import configs
  return configs.get('pretrain_demo')


# -------------------------------------------------------------------------------------------------
# Inputs
def read_image(path: str):
  """The file as an RGB PIL image; FileNotFoundError / ValueError (not an image) otherwise."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--image {path!r} does not exist or is not a file.')
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return decode_image(data)
  except BadImageError as e:
    raise ValueError(f'--image {path!r} is not a readable image ({e}).') from None


def preprocess(img, image_size, crop_pct: float = 1.0, mean=CLIP_MEAN, std=CLIP_STD):
  """PIL image or uint8 HWC array -> (uint8 RGB [H, W, 3], normalized float32 [H, W, 3]) for
  image_size S (S x S) or (H, W): resize + center crop, as the evaluation transform
  (data/transforms.py resize_center_crop); (x / 255 - mean) / std, CLIP's by default."""
  from PIL import Image
  if isinstance(img, np.ndarray):
    img = Image.fromarray(np.asarray(img, np.uint8)).convert('RGB')
  rgb = np.asarray(resize_center_crop(img.convert('RGB'), image_size, crop_pct), np.uint8)
  return rgb, normalize(rgb, mean, std)


def load_image(path: str, image_size, crop_pct: float = 1.0, mean=CLIP_MEAN, std=CLIP_STD):
  """read_image + preprocess: (uint8 RGB [H, W, 3], normalized float32 [H, W, 3])."""
  return preprocess(read_image(path), image_size, crop_pct, mean, std)


def normalize(rgb: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
  return ((rgb.astype(np.float32) / 255.0 - np.asarray(mean, np.float32))
          / np.asarray(std, np.float32)).astype(np.float32)


def draw_mask(grid: tuple[int, int], mask_settings: dict | None = None, seed: int = 0) -> np.ndarray:
  """One BEiT block mask, bool [h, w], from np.random.default_rng(seed) (the run's settings)."""
  s = _mask_settings(mask_settings, grid)
  return BlockMaskGenerator.from_config(grid, s)(np.random.default_rng(seed))


# -------------------------------------------------------------------------------------------------
# Analysis
@dataclasses.dataclass
class Analysis:
  cos: np.ndarray              # [h, w] cos(student prediction, teacher target) per patch
  mask: np.ndarray             # [h, w] bool
  mean_masked_cos: float       # = -cosine_loss on this image and mask
  mean_visible_cos: float
  student_features: np.ndarray  # [N, D] encoder patch tokens, unmasked forward
  teacher_targets: np.ndarray   # [N, Dt]
  predictions: np.ndarray       # [N, Dt] lm_head on the masked forward


def _forward(mim, teacher, images, mask, plan):
  pred = mim(images, mask)                                       # masked forward, [B, N, Dt]
  feats = mim.encoder.patch_tokens(images)                       # unmasked forward, [B, N, D]
  return pred, feats.astype(jnp.float32), teacher_lib.targets(teacher, images, plan)


_forward_jit = None


def _apply(models: Models, images, mask):
  global _forward_jit
  if _forward_jit is None:   # one jitted function: compiled once per architecture and shape
      _forward_jit = nnx.jit(_forward, static_argnames='plan')
  plan = models.plan
  if plan is None:   # Models built by hand: the CLIP identity plan at the student's grid
    plan = teacher_lib.TeacherInput('same', models.grid, tuple(models.image_size), None, None)
  return _forward_jit(models.mim, models.teacher, images, mask, plan=plan)


def analyze(models: Models, image: np.ndarray, mask: np.ndarray) -> Analysis:
  """image: normalized [H, W, 3] at models.image_size; mask: bool [h, w] (True = masked)."""
  image = np.asarray(image, np.float32)
  h, w = models.image_size
  if image.shape != (h, w, 3):
    raise ValueError(f'image must be [{h}, {w}, 3], got {image.shape}; use '
                     'load_image(path, models.image_size).')
  mask = np.asarray(mask, bool).reshape(models.grid)
  pred, feats, targets = _apply(models, jnp.asarray(image[None]),
                                jnp.asarray(mask.reshape(1, -1)))
  pred, feats, targets = (np.asarray(a[0], np.float64) for a in (pred, feats, targets))
  cos = np.sum(pred * targets, -1) / np.maximum(
      np.linalg.norm(pred, axis=-1) * np.linalg.norm(targets, axis=-1), 1e-8)
  m = mask.reshape(-1)
  return Analysis(cos=cos.reshape(models.grid).astype(np.float32), mask=mask,
                  mean_masked_cos=float(cos[m].mean()) if m.any() else float('nan'),
                  mean_visible_cos=float(cos[~m].mean()) if (~m).any() else float('nan'),
                  student_features=feats.astype(np.float32),
                  teacher_targets=targets.astype(np.float32),
                  predictions=pred.astype(np.float32))


def pca_rgb(features: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """First 3 principal components of [N, D] features -> RGB [h, w, 3] in [0, 1] (per-channel
  min-max; signs fixed so each component's largest loading is positive)."""
  x = np.asarray(features, np.float64)
  x = x - x.mean(0, keepdims=True)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  comps = vt[:3]
  comps = comps * np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])[:, None]
  proj = x @ comps.T
  if proj.shape[1] < 3:   # fewer than 3 dims: pad with zeros
    proj = np.concatenate([proj, np.zeros((len(x), 3 - proj.shape[1]))], 1)
  lo, hi = proj.min(0), proj.max(0)
  rgb = (proj - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0)
  return rgb.reshape(grid[0], grid[1], 3).astype(np.float32)


def masked_photo(rgb: np.ndarray, mask: np.ndarray, patch_size: int,
                 grey: tuple[int, int, int] = (128, 128, 128)) -> np.ndarray:
  """The photo with masked patches painted grey."""
  big = np.kron(np.asarray(mask, np.uint8), np.ones((patch_size, patch_size), np.uint8)).astype(bool)
  out = np.array(rgb, copy=True)
  out[big] = grey
  return out


# -------------------------------------------------------------------------------------------------
# Rendering
def plot_mask(ax, rgb, mask, patch_size, title='masked patches'):
  ax.imshow(masked_photo(rgb, mask, patch_size))
  ax.set_title(f'{title} ({int(mask.sum())}/{mask.size})')
  ax.axis('off')


def plot_cosine(ax, analysis: Analysis, fig=None, title=None):
  """Per-patch cosine heat map; visible patches faded, masked ones outlined."""
  from matplotlib.patches import Rectangle
  cos, mask = analysis.cos, analysis.mask
  alpha = np.where(mask, 1.0, 0.35)
  im = ax.imshow(cos, cmap='viridis', vmin=-1.0, vmax=1.0, alpha=alpha, interpolation='nearest')
  for y, x in zip(*np.nonzero(mask)):
    ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor='white', linewidth=0.6))
  ax.set_title(title or f'cos(student, teacher)\nmasked mean {analysis.mean_masked_cos:.3f}, '
               f'visible {analysis.mean_visible_cos:.3f}')
  ax.axis('off')
  if fig is not None:
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  return im


def plot_pca(ax, features, grid, title):
  ax.imshow(pca_rgb(features, grid), interpolation='nearest')
  ax.set_title(title)
  ax.axis('off')


def render(models: Models, rgb: np.ndarray, analysis: Analysis, title: str = ''):
  """The five-panel matplotlib figure (see PANELS)."""
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 4.6), layout='constrained')
  axes[0].imshow(rgb)
  axes[0].set_title(f'photo ({format_hw(models.image_size)}px)')
  axes[0].axis('off')
  plot_mask(axes[1], rgb, analysis.mask, models.patch_size)
  plot_cosine(axes[2], analysis, fig=fig)
  plot_pca(axes[3], analysis.student_features, models.grid, 'PCA: student features (unmasked)')
  plot_pca(axes[4], analysis.teacher_targets, models.grid, 'PCA: teacher targets')
  if title:
    fig.suptitle(title)
  return fig


def visualize(workdir: str, image: str, out: str, teacher: str | None = None, mask_seed: int = 0,
              num_masking_patches: int = 0, dpi: int = 100, image_size=None) -> Analysis:
  """CLI body: loads, analyzes, writes `out` (PNG); returns the Analysis. image_size: None (or
  '' / 0) = the run's; an int or (height, width) / 'HxW'."""
  if not paths.as_path(workdir).is_dir():
    raise FileNotFoundError(f'--workdir {workdir!r} does not exist or is not a directory.')
  if image_size in ('', 0):
    image_size = None
  check_png(out)   # a wrong name or size fails before any model is loaded
  if image_size is not None:
    image_hw(image_size, '--image_size')
  photo = read_image(image)     # bad input fails before any model is loaded
  models = load_models(workdir, teacher=teacher, image_size=image_size)
  rgb, x = preprocess(photo, models.image_size, mean=models.mean, std=models.std)
  settings = dict(models.mask)
  if num_masking_patches:
    settings['num_masking_patches'] = int(num_masking_patches)
  try:
    mask = draw_mask(models.grid, settings, seed=mask_seed)
  except ValueError:   # its message names config fields; this command's are flags
    h, w = models.grid
    chosen = f'--num_masking_patches={num_masking_patches}' if num_masking_patches else (
        "the run's mask setting")
    raise ValueError(f'{chosen} draws no block mask on the {h}x{w} patch grid of this image size '
                     f'({h * w} patches): give --num_masking_patches between 1 and {h * w}'
                     f'{"" if num_masking_patches else " or a larger --image_size"}.') from None
  analysis = analyze(models, x, mask)
  fig = render(models, rgb, analysis, title=(
      f'{paths.as_path(workdir).name} step {models.step} - '
      f'teacher {models.teacher_source} - {os.path.basename(image)}'))
  save_figure(fig, out, list(PANELS), dpi)
  return analysis
