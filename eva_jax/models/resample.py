"""Patch-size and position-embedding resampling of an encoder's weights (host side, numpy).

Patch size (e.g. EVA-02-B/14 -> EVA-02-CLIP-B/16, or the ViTDet /16 backbones from /14
pretraining), two methods, each matching its reference exactly:
- 'pinv': FlexiViT's pseudo-inverse resize (Beyer et al. 2023, big_vision flexi/vit.py), as
  timm.layers.resample_patch_embed: with B the (antialiased bicubic) resize of a p x p patch to
  p' x p', the new kernel w' minimizes ||<B x, w'> - <x, w>|| over patches, w' = pinv(B)^T w. A
  patch resized by B and embedded with w' gives the old token: a model keeps its function when the
  image is resized with the patch (224/14 -> 256/16).
- 'bicubic': the official EVA `interpolate_patch_14to16.py` (EVA-01/eva, EVA-CLIP/rei/training):
  F.interpolate(kernel, (16, 16), mode='bicubic', align_corners=False), no antialias, no rescale.
The position embedding is re-gridded with layers.resize_grid: 'bicubic' is the official resize
(interpolate_pos_embed / ViTDet get_abs_pos), 'bicubic_aa' timm's resample_abs_pos_embed.
"""
from __future__ import annotations

import logging

import numpy as np

from eva_jax.models import layers

PATCH_METHODS = ('pinv', 'bicubic')


def _check_method(method: str) -> None:
  if method not in PATCH_METHODS:
    raise ValueError(f"patch resampling method must be one of {PATCH_METHODS} ('pinv' = FlexiViT / "
                     f"timm resample_patch_embed, 'bicubic' = official interpolate_patch_14to16), "
                     f'got {method!r}.')


def patch_resize_matrix(old: tuple[int, int], new: tuple[int, int], method: str) -> np.ndarray:
  """[new_h*new_w, old_h*old_w] float64 matrix taking a flattened old kernel/patch to the new size.

  'pinv': pinv(R)^T with R the antialiased bicubic resize of a patch (timm's
  _compute_resize_matrix: F.interpolate(mode='bicubic', antialias=True, align_corners=False), a
  separable resize, so R = kron(R_y, R_x)). 'bicubic': kron(B_y, B_x) with B PyTorch's plain
  bicubic (A=-0.75), applied to the kernel itself. Raises ValueError for an unknown method."""
  _check_method(method)
  if method == 'pinv':
    m = layers._bicubic_aa_matrix
    resize = np.kron(m(old[0], new[0]).astype(np.float64), m(old[1], new[1]).astype(np.float64))
    return np.linalg.pinv(resize).T
  m = layers._bicubic_matrix
  return np.kron(m(old[0], new[0]).astype(np.float64), m(old[1], new[1]).astype(np.float64))


def resample_patch_kernel(kernel, new_size: int | tuple[int, int], method: str = 'pinv'):
  """Patch-embedding kernel [p, p, C, D] (our layout; torch's [D, C, p, p] transposed) resized
  to [new_h, new_w, C, D] float32 by `method` ('pinv' | 'bicubic', see the module docstring).
  Raises ValueError for an unknown method or a kernel that is not 4-D."""
  kernel = np.asarray(kernel)
  if kernel.ndim != 4:
    raise ValueError(f'patch kernel must be [p, p, C, D], got shape {kernel.shape}.')
  new = (new_size, new_size) if isinstance(new_size, (int, np.integer)) else tuple(new_size)
  old = kernel.shape[:2]
  if tuple(old) == new:
    return kernel.astype(np.float32)
  mat = patch_resize_matrix(old, new, method)
  flat = kernel.reshape(old[0] * old[1], -1).astype(np.float64)
  return (mat @ flat).reshape(*new, *kernel.shape[2:]).astype(np.float32)


def resample_pos_embed(pos, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       num_prefix: int = 1, mode: str = 'bicubic') -> np.ndarray:
  """[num_prefix + old_h*old_w, D] -> [num_prefix + new_h*new_w, D] float32: prefix rows kept,
  the patch grid resized by layers.resize_grid (mode 'bicubic' official, 'bicubic_aa' timm)."""
  import jax.numpy as jnp
  pos = np.asarray(pos, np.float32)
  if pos.shape[0] != num_prefix + old_grid[0] * old_grid[1]:
    raise ValueError(f'pos_embed has {pos.shape[0]} rows; a {old_grid[0]}x{old_grid[1]} grid with '
                     f'{num_prefix} prefix rows needs {num_prefix + old_grid[0] * old_grid[1]}.')
  grid = np.asarray(layers.resize_grid(jnp.asarray(pos[num_prefix:]), old_grid, new_grid, mode))
  return np.concatenate([pos[:num_prefix], grid], 0)


def resample_encoder(params_flat: dict, cfg, *, patch_size: int | None = None,
                     image_size: int | None = None, method: str = 'pinv',
                     pos_interp: str = 'bicubic') -> tuple[dict, object, str]:
  """An encoder's flat params ('patch_kernel', 'pos_embed', ...) and config moved to another patch
  size and/or image size: (new params, new config, one log line saying what was done).

  The patch kernel is resampled by `method`; the pos-embed grid goes from cfg.image_size //
  cfg.patch_size to image_size // patch_size by `pos_interp`. Raises ValueError when the new
  image size is not a multiple of the new patch size (naming both)."""
  _check_method(method)
  p_old, s_old = cfg.patch_size, cfg.image_size
  p_new, s_new = patch_size or p_old, image_size or s_old
  if s_new % p_new:
    lo = max(p_new, s_new // p_new * p_new)
    raise ValueError(f'image size {s_new} is not a multiple of patch size {p_new}; choose a '
                     f'multiple of {p_new}, e.g. {lo} or {lo + p_new}.')
  out = dict(params_flat)
  notes = []
  if p_new != p_old:
    out['patch_kernel'] = resample_patch_kernel(params_flat['patch_kernel'], p_new, method)
    notes.append(f'patch kernel {p_old}->{p_new} ({method})')
  g_old, g_new = (s_old // p_old,) * 2, (s_new // p_new,) * 2
  if g_old != g_new:
    npp = 1 if cfg.class_token else 0
    out['pos_embed'] = resample_pos_embed(params_flat['pos_embed'], g_old, g_new, npp, pos_interp)
    notes.append(f'pos-embed grid {g_old[0]}x{g_old[1]}->{g_new[0]}x{g_new[1]} ({pos_interp})')
  new_cfg = cfg.copy_and_resolve_references()
  new_cfg.patch_size, new_cfg.image_size = p_new, s_new
  line = 'Resampled the encoder: ' + ('; '.join(notes) or 'nothing to do')
  logging.info(line)
  return out, new_cfg, line
