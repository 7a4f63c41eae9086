"""How a frozen teacher of any family meets the student inside the train step.

- Input normalization: the data pipeline normalizes with config.data.mean/std (CLIP's by default:
  EVA's student and CLIP / EVA-CLIP teacher see the identical tensor). A teacher trained with
  another normalization (SigLIP: 0.5/0.5, DINOv2: ImageNet) gets the same pixels re-normalized
  with its own mean/std: x_t = (x * data_std + data_mean - t_mean) / t_std (exact, per channel).
  config.teacher.mean/std: () = the family's own (FAMILY_NORM).
- Patch grid (config.teacher.grid): the student regresses one target per student patch, so the
  teacher's target map must have the student's grid. Rules:
    'same'            the grids must already agree (e.g. both patch 14 at 224); else refused.
    'resize_input'    the teacher sees the same crop resized (bicubic, antialiased) to
                      student_grid x teacher_patch pixels, so its grid is the student's
                      (e.g. a /16 SigLIP for a /14 student at 224: 256 px).
    'resize_targets'  the teacher runs on the images as they are and its target map is resized
                      (bilinear, antialiased when shrinking) to the student grid. Needs the
                      image size to be a multiple of the teacher's patch; refused otherwise.
- Target (config.teacher.target, apply_target): '' = the family's ('projected' for CLIP and
  EVA-CLIP, 'tokens' for SigLIP and DINOv2); 'tokens' drops a projection (CLIP ln_post tokens,
  EVA-CLIP norm tokens, out_dim = width).
- teacher_fingerprint(params): sha256 over the teacher's parameter names, shapes and float32
  bytes, for checkpoint meta and resume checks.
"""
from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from eva_jax.data.config import CLIP_MEAN, CLIP_STD

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FAMILY_NORM = {
    'clip': (CLIP_MEAN, CLIP_STD),
    'eva_clip': (CLIP_MEAN, CLIP_STD),              # EVA-CLIP uses OpenAI CLIP's statistics
    'siglip': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),   # SiglipImageProcessor
    'dinov2': (IMAGENET_MEAN, IMAGENET_STD),        # BitImageProcessor of facebook/dinov2-*
}
GRID_RULES = ('same', 'resize_input', 'resize_targets')
TARGETS = ('projected', 'tokens')


def apply_target(tcfg, target: str, params=None):
  """(teacher config, params) for config.teacher.target: '' = the family's target; 'projected' =
  through the tower's projection (CLIP proj, EVA-CLIP head; the EVA targets); 'tokens' = the
  final-normed patch tokens, projection dropped (out_dim = width). ValueError naming the field
  when the tower has no projection to use."""
  if not target:
    return tcfg, params
  if target not in TARGETS:
    raise ValueError(f'config.teacher.target must be one of {", ".join(TARGETS)} or empty (the '
                     f"family's target); got {target!r}.")
  has_proj = bool(tcfg.out_dim) and tcfg.get('proj', True)
  if target == 'projected':
    if not has_proj:
      raise ValueError(f"config.teacher.target='projected': the {tcfg.get('family', 'clip')} tower "
                       f'{tcfg.name} has no projection; its targets are the normed tokens '
                       "(target='tokens' or empty).")
    return tcfg, params
  if has_proj:
    tcfg = ml_collections.ConfigDict(tcfg.to_dict())
    tcfg.proj, tcfg.proj_bias, tcfg.out_dim = False, False, int(tcfg.width)
    if params is not None:
      params = {k: v for k, v in params.items() if k not in ('proj', 'proj_bias')}
  return tcfg, params


@dataclasses.dataclass(frozen=True)
class TeacherInput:
  """What the step does between the batch and the teacher (hashable: part of the jitted closure)."""
  rule: str
  student_grid: tuple[int, int]
  teacher_size: tuple[int, int]       # pixels the teacher sees
  scale: tuple[float, ...] | None     # re-normalization x * scale + shift (None = identity)
  shift: tuple[float, ...] | None


def plan(tcfg, *, student_patch: int, image_size: int, rule: str = 'same',
         data_mean=CLIP_MEAN, data_std=CLIP_STD, mean=(), std=()) -> TeacherInput:
  """The teacher input plan; ValueError naming the config field when a rule cannot apply."""
  if rule not in GRID_RULES:
    raise ValueError(f'config.teacher.grid must be one of {", ".join(GRID_RULES)}; got {rule!r}.')
  tp = int(tcfg.patch_size)
  if image_size % student_patch:
    raise ValueError(f'config.image_size={image_size} is not a multiple of the student patch '
                     f'{student_patch}.')
  g = image_size // student_patch
  tgrid = image_size / tp
  if rule == 'same':
    if image_size % tp or image_size // tp != g:
      raise ValueError(
          f'The teacher {tcfg.name} (patch {tp}) gives a {tgrid:g}x{tgrid:g} target grid at '
          f'{image_size} px, the student (patch {student_patch}) a {g}x{g} grid. Set '
          "config.teacher.grid='resize_input' (the teacher sees the crop resized to "
          f"{g * tp} px) or 'resize_targets' (its target map is resized to {g}x{g}"
          + ('' if image_size % tp == 0 else f'; not possible here: {image_size} is not a '
             f'multiple of {tp}') + ').')
    size = (image_size, image_size)
  elif rule == 'resize_input':
    size = (g * tp, g * tp)
  else:
    if image_size % tp:
      raise ValueError(f"config.teacher.grid='resize_targets' needs config.image_size={image_size} "
                       f'to be a multiple of the teacher patch {tp}; use '
                       "config.teacher.grid='resize_input'.")
    size = (image_size, image_size)
  family = tcfg.get('family', 'clip') or 'clip'
  t_mean, t_std = (tuple(mean) or FAMILY_NORM[family][0]), (tuple(std) or FAMILY_NORM[family][1])
  for name, v in (('config.teacher.mean', t_mean), ('config.teacher.std', t_std)):
    if len(v) != tcfg.in_chans:
      raise ValueError(f'{name} must have {tcfg.in_chans} values, got {v}.')
  if any(s <= 0 for s in t_std):
    raise ValueError(f'config.teacher.std must be positive, got {t_std}.')
  dm, ds = np.asarray(data_mean, np.float64), np.asarray(data_std, np.float64)
  tm, ts = np.asarray(t_mean, np.float64), np.asarray(t_std, np.float64)
  scale, shift = ds / ts, (dm - tm) / ts
  if np.allclose(scale, 1.0, rtol=0, atol=1e-12) and np.allclose(shift, 0.0, rtol=0, atol=1e-12):
    scale = shift = None
  else:
    scale, shift = tuple(float(v) for v in scale), tuple(float(v) for v in shift)
  return TeacherInput(rule, (g, g), size, scale, shift)


def targets(teacher, images, p: TeacherInput, patch_index=None):
  """Teacher targets [B, student grid cells, D] (float32, no gradient) for the student's images.
  patch_index: optional int [B, K] student-grid cells: only those targets, [B, K, D]. Where the
  teacher's grid is the student's, its last block runs on those tokens only; otherwise (rule
  'resize_targets') the full map is resized, then gathered."""
  x = jax.lax.stop_gradient(images)
  if p.scale is not None:
    x = x * jnp.asarray(p.scale, x.dtype) + jnp.asarray(p.shift, x.dtype)
  if tuple(x.shape[1:3]) != p.teacher_size:
    x = jax.image.resize(x, (x.shape[0],) + p.teacher_size + (x.shape[-1],), 'bicubic',
                         antialias=True)
  gh, gw = p.student_grid
  th, tw = x.shape[1] // teacher.cfg.patch_size, x.shape[2] // teacher.cfg.patch_size
  if (th, tw) == (gh, gw):
    return jax.lax.stop_gradient(teacher.targets(x, patch_index).astype(jnp.float32))
  t = teacher.targets(x).reshape(x.shape[0], th, tw, -1)
  t = jax.image.resize(t, (t.shape[0], gh, gw, t.shape[-1]), 'bilinear', antialias=True)
  t = t.reshape(t.shape[0], gh * gw, t.shape[-1])
  if patch_index is not None:
    t = jnp.take_along_axis(t, patch_index[:, :, None], axis=1)
  return jax.lax.stop_gradient(t.astype(jnp.float32))


def teacher_fingerprint(params) -> str:
  """sha256 hex of a teacher's parameters (a pure dict / nnx.State of arrays): names, shapes and
  float32 bytes in sorted key order. Reads every parameter to the host once (~1 s per GB)."""
  from eva_jax.convert.common import flatten
  if hasattr(params, 'to_pure_dict'):
    params = params.to_pure_dict()
  h = hashlib.sha256()
  for k, v in sorted(flatten(params).items()):
    a = np.asarray(jax.device_get(v), np.float32)
    h.update(f'{k}:{a.shape};'.encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def describe(tcfg) -> dict:
  """Family, architecture and target of a teacher config (for checkpoint meta and logs)."""
  family = tcfg.get('family', 'clip') or 'clip'
  target = {'clip': 'ln_post(patch tokens) @ proj', 'eva_clip': 'head(norm(tokens))[:, 1:]',
            'siglip': 'post_layernorm(tokens)',
            'dinov2': 'layernorm(tokens)[:, 1 + registers:]'}[family]
  return {'family': family, 'arch': tcfg.name, 'target': target, 'target_dim': int(tcfg.out_dim),
          'patch_size': int(tcfg.patch_size), 'width': int(tcfg.width), 'depth': int(tcfg.depth)}
