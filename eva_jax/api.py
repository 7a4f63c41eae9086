"""Public entry points: load_teacher (frozen CLIP teacher -> EVA targets); load_encoder follows.

Nothing here imports torch at module level: the converters import it only while reading a PyTorch
checkpoint.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_jax.models import TEACHER_NAMES, create, teacher_config
from eva_jax.training.precision import DTYPES, dtype_name as _dtype_name

__all__ = ['load_teacher', 'Teacher', 'load_encoder', 'Encoder']



# -------------------------------------------------------------------------------------------------
# Teacher
class Teacher:
  """Frozen CLIP vision tower: `teacher(images)` -> EVA regression targets.

  images: CLIP-normalized float images, NHWC [B, H, W, 3], H and W multiples of the patch size
          (other sizes than config.image_size interpolate the pos-embed bicubically).
  returns float32 [B, (H/patch)*(W/patch), config.out_dim] = ln_post(patch tokens) @ proj.

  Attributes: `model` (the nnx VisionTransformer), `config` (its ConfigDict; config.dtype is the
  compute dtype), `source` (checkpoint path or teacher name). The forward is jitted over the
  parameters (they are arguments, not baked-in constants) and may be called inside other jits.
  """

  def __init__(self, model, source: str):
    self.model = model
    self.config = model.cfg
    self.source = source
    self._graphdef, self._state = nnx.split(model)
    graphdef = self._graphdef

    def forward(state, images):
      return nnx.merge(graphdef, state).targets(images)

    self._forward = jax.jit(forward)

  @property
  def dtype(self):
    return DTYPES[self.config.dtype]

  def _check(self, images):
    cfg = self.config
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] != cfg.in_chans:
      hint = (' Channels-first input? Transpose with x.transpose(0, 2, 3, 1).'
              if len(shape) == 4 and shape[1] == cfg.in_chans else '')
      raise ValueError(f'teacher expects NHWC images [batch, height, width, {cfg.in_chans}], got '
                       f'shape {shape}.{hint}')
    h, w = shape[1:3]
    if h % cfg.patch_size or w % cfg.patch_size or h == 0 or w == 0:
      raise ValueError(f'teacher got images of shape {shape}: height and width must be positive '
                       f'multiples of the patch size {cfg.patch_size}.')
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f'teacher expects CLIP-normalized float images, got dtype {images.dtype} '
                       f'(shape {shape}). Normalize with the CLIP mean/std first.')

  def __call__(self, images) -> jax.Array:
    if not hasattr(images, 'shape') or not hasattr(images, 'dtype'):
      images = np.asarray(images)
    self._check(images)
    return self._forward(self._state, images)

  def __repr__(self):
    c = self.config
    return (f'Teacher({c.name}: width {c.width}, depth {c.depth}, heads {c.heads}, patch '
            f'{c.patch_size}, image {c.image_size}, out {c.out_dim}, dtype {c.dtype}; '
            f'from {self.source!r})')


def load_teacher(path, dtype=jnp.float32, *, heads: int | None = None, act: str | None = None,
                 seed: int = 0) -> Teacher:
  """Loads a frozen CLIP teacher; returns a jitted callable `teacher(images) -> targets`.

  path: one of
    - a transformers `save_pretrained` directory of CLIPVisionModelWithProjection or CLIPModel
      (safetensors or bin; the text tower of a CLIPModel is ignored), or its weights file;
    - OpenAI's ViT-*.pt (TorchScript archive) or a state dict with `visual.*` keys;
    - an open_clip checkpoint of an OpenAI-style tower (`visual.*` keys, possibly wrapped in
      {'state_dict': ...} with 'module.' prefixes).
    - a teacher name from eva_jax.models.TEACHER_NAMES ('clip-tiny', 'clip-L/14', ...) gives a
      RANDOM-INIT teacher of that architecture (demos and tests only), used only when no file or
      directory of that name exists.
  dtype: compute dtype (jnp.float32 / jnp.bfloat16 / jnp.float16 or their names); LayerNorm and the
    attention softmax run in float32 regardless, and the targets are float32. Parameters stay float32.
  heads, act: architecture facts a bare state dict does not record (config.teacher.heads /
    config.teacher.act). Read from config.json, the TorchScript archive or an open_clip_config.json
    next to the weights where present (a given value must agree); otherwise required, and the load
    is refused naming them. Every choice is logged with its source (convert/clip.py).
  seed: init seed of a random-init teacher (ignored for checkpoints).

  The architecture (width, depth, heads, MLP width, patch, image size, output dim) is inferred from
  the checkpoint, which is converted on the host one tensor at a time. Errors: FileNotFoundError for
  a missing path; eva_jax.convert.common.CheckpointError (a ValueError) when the file is not a CLIP
  vision tower or its keys do not match, with the missing / unexpected keys listed.
  """
  name = _dtype_name(dtype)
  src = os.fspath(path)
  if not os.path.exists(src):
    if src in TEACHER_NAMES:
      logging.warning('load_teacher(%r): RANDOM-INIT teacher (no checkpoint); demos and tests only.',
                      src)
      cfg = teacher_config(src)
      cfg.dtype = name
      return Teacher(create(cfg, seed=seed), source=src)
    raise FileNotFoundError(f'Teacher checkpoint {src!r} does not exist (nor is it a random-init '
                            f'teacher name: {", ".join(TEACHER_NAMES)}).')
  from eva_jax.convert import clip
  model = clip.load_clip_vision(src, dtype=name, heads=heads, act=act)
  return Teacher(model, source=src)


# -------------------------------------------------------------------------------------------------
# Encoder (load_encoder) goes here.
class Encoder:
  """A trained (or freshly initialized) EVA encoder: `encoder(images)` -> tokens.

  images: normalized NHWC [B, H, W, 3] float images (CLIP mean/std, as in training).
  returns float32 [B, 1 + N, D]: cls + patch tokens after the final norm (pretraining checkpoints;
  fine-tuned encoders have no final norm: fc_norm belongs to their classifier head).
  Attributes: `model` (nnx VisionTransformer), `config`, `meta` (checkpoint metadata), `source`,
  `weights` ('raw' or 'ema': which weights of an eva_jax checkpoint were loaded).
  """

  def __init__(self, model, meta: dict, source: str):
    self.model, self.meta, self.source = model, meta, source
    self.weights = meta.get('weights_used', 'raw')
    self.config = model.cfg
    graphdef, state = nnx.split(model)
    self._state = state
    self._forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x).astype(jnp.float32))

  def __call__(self, images, mask=None) -> jax.Array:
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != self.config.in_chans:
      raise ValueError(f'Expected NHWC images [batch, height, width, {self.config.in_chans}], got '
                       f'shape {tuple(images.shape)}.')
    if mask is not None:
      graphdef = nnx.graphdef(self.model)
      return jax.jit(lambda st, x, m: nnx.merge(graphdef, st)(x, m).astype(jnp.float32))(
          self._state, images, jnp.asarray(mask, bool))
    return self._forward(self._state, images)

  def __repr__(self):
    return (f'Encoder({self.config.name}: width {self.config.width}, depth {self.config.depth}, '
            f'patch {self.config.patch_size}, {self.weights} weights, from {self.source!r})')


def load_encoder(path, dtype=jnp.float32, *, weights: str = 'auto',
                 facts: dict | None = None) -> Encoder:
  """Loads an EVA encoder from anything eva_jax.checkpoint.read_encoder reads.

  path: WORKDIR (its latest checkpoint), WORKDIR/checkpoints, WORKDIR/checkpoints/<step>, or a
  timm / official EVA PyTorch file (.pth, .pt, .bin, .safetensors).
  dtype: compute dtype of the returned encoder (LayerNorm and softmax stay float32).
  weights: 'auto' (default: the EMA when the checkpoint has one -- an eva_jax run with
  config.ema_decay > 0 or an official training file -- i.e. the weights its evaluation used),
  'raw' (alias 'model') or 'ema' (alias 'model_ema'). The choice is logged and kept in
  `encoder.weights`.
  facts: for PyTorch files, the architecture facts the file may not record (heads, rope, ...);
  see checkpoint.read_encoder. Only the parameters are read (on the host), never the optimizer state.
  """
  from eva_jax import checkpoint as ckpt_lib
  model, meta = ckpt_lib.encoder_from_checkpoint(os.fspath(path), dtype=_dtype_name(dtype),
                                                 weights=weights, facts=facts)
  logging.info('load_encoder: %s', meta['source'])
  return Encoder(model, meta, os.fspath(path))
