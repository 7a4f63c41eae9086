"""Public entry points: load_teacher (frozen teacher tower -> EVA targets) and load_encoder.

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
  """Frozen teacher tower: `teacher(images)` -> EVA regression targets.

  images: normalized float images (the teacher's own mean/std), NHWC [B, H, W, 3], H and W
          multiples of the patch size (other sizes than config.image_size interpolate the pos-embed).
  returns float32 [B, (H/patch)*(W/patch), config.out_dim]: the patch tokens after the tower's final
          norm and its projection where it has one (config.family: clip ln_post + proj, eva_clip
          norm + head, siglip / dinov2 the final norm's tokens, out_dim = width).

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
    return (f'Teacher({c.get("family", "clip")} {c.name}: width {c.width}, depth {c.depth}, '
            f'heads {c.heads}, patch '
            f'{c.patch_size}, image {c.image_size}, out {c.out_dim}, dtype {c.dtype}; '
            f'from {self.source!r})')


def load_teacher(path, dtype=jnp.float32, *, family: str = 'clip', arch: str = '',
                 heads: int | None = None, act: str | None = None, facts: dict | None = None,
                 seed: int = 0) -> Teacher:
  """Loads a frozen teacher tower; returns a jitted callable `teacher(images) -> targets`.

  family (config.teacher.family): which kind of tower the file holds; never guessed from it.
    'clip'     OpenAI / open_clip / transformers CLIP: ln_post(patch tokens) @ proj.
               Files: a transformers save_pretrained directory (CLIPVisionModelWithProjection or
               CLIPModel) or its weights file, OpenAI's ViT-*.pt (TorchScript) or a `visual.*`
               state dict, an open_clip checkpoint of an OpenAI-style tower (convert/clip.py).
    'eva_clip' EVA-CLIP towers (EVA-02's teacher): head(norm(tokens))[:, 1:]. Official EVA-CLIP
               (`visual.*`, EVA block names), open_clip EVA (`visual.trunk.*`), timm *_clip_224
               (convert/eva_clip.py).
    'siglip'   transformers SiglipVisionModel / SiglipModel (SigLIP, fixed-resolution SigLIP2):
               post_layernorm(tokens), no projection (convert/hf_vit.py).
    'dinov2'   transformers Dinov2Model / Dinov2WithRegistersModel: layernorm(tokens) without cls
               and registers, no projection (convert/hf_vit.py).
    A whole CLIP (with a text tower) gives its vision tower; the rest is counted and logged.
  path: the checkpoint; or a teacher name from eva_jax.models.TEACHER_NAMES ('clip-tiny',
    'eva02-clip-L/14', 'dinov2-tiny', ...) gives a RANDOM-INIT teacher of that architecture (demos
    and tests only), used only when no file or directory of that name exists.
  dtype: compute dtype (jnp.float32 / jnp.bfloat16 / jnp.float16 or their names); LayerNorm and the
    attention softmax run in float32 regardless, and the targets are float32. Parameters stay float32.
  arch (config.teacher.arch): a named architecture the checkpoint must match; its facts (heads,
    RoPE, post-norm, ...) are used where the file does not record them (eva_clip; for the other
    families the files record them and arch is a shape check).
  heads, act (config.teacher.heads / .act), facts (eva_clip: FACTS of convert/eva_clip.py):
    architecture facts a bare state dict does not record. Read from the file's record where it
    has one (a given value must agree); otherwise required, and the load is refused naming them.
    Every choice is logged with its source.
  seed: init seed of a random-init teacher (ignored for checkpoints).

  The architecture (width, depth, MLP width, patch, image size, output dim, ...) is inferred from
  the checkpoint, which is converted on the host one tensor at a time. Errors: FileNotFoundError for
  a missing path; ValueError for an unknown family or arch; eva_jax.convert.common.CheckpointError
  (a ValueError) when the file is not a tower of that family or its keys do not match, with the
  missing / unexpected keys listed.
  """
  from eva_jax.models import config as config_lib
  name = _dtype_name(dtype)
  family = family or 'clip'
  if family not in config_lib.FAMILIES:
    raise ValueError(f'config.teacher.family must be one of {", ".join(config_lib.FAMILIES)}; got '
                     f'{family!r}.')
  src = os.fspath(path)
  if not os.path.exists(src):
    if src in TEACHER_NAMES:
      if config_lib.teacher_family(src) != family and family != 'clip':
        raise ValueError(f'config.teacher.name={src!r} is a {config_lib.teacher_family(src)!r} '
                         f'tower but config.teacher.family={family!r}.')
      logging.warning('load_teacher(%r): RANDOM-INIT teacher (no checkpoint); demos and tests only.',
                      src)
      cfg = teacher_config(src)
      cfg.dtype = name
      return Teacher(create(cfg, seed=seed), source=src)
    raise FileNotFoundError(f'Teacher checkpoint {src!r} does not exist (nor is it a random-init '
                            f'teacher name: {", ".join(TEACHER_NAMES)}).')
  if family == 'eva_clip':
    if act:
      raise ValueError('config.teacher.act does not apply to eva_clip towers (exact GELU or '
                       'SwiGLU, read from the shapes); leave it empty.')
    from eva_jax.convert import eva_clip
    model = eva_clip.load_eva_clip_vision(src, dtype=name, heads=heads, arch=arch or None,
                                          facts=facts)
  elif family in ('siglip', 'dinov2'):
    from eva_jax.convert import hf_vit
    model = hf_vit.load_hf_vision(src, family, dtype=name, heads=heads, act=act,
                                  arch=arch or None)
  else:
    if facts:
      raise ValueError("facts= applies to family='eva_clip'; CLIP towers take heads= and act=.")
    from eva_jax.convert import clip
    model = clip.load_clip_vision(src, dtype=name, heads=heads, act=act)
    if arch:
      _check_arch(model.cfg, arch, src)
  return Teacher(model, source=src)


def _check_arch(cfg, arch: str, src: str) -> None:
  """The loaded tower has the shapes of the named architecture (config.teacher.arch)."""
  ref = teacher_config(arch)
  fields = ('family', 'width', 'depth', 'heads', 'mlp_dim', 'patch_size', 'out_dim')
  bad = [f'{f}: file {cfg.get(f)} vs {arch} {ref.get(f)}' for f in fields
         if cfg.get(f) != ref.get(f)]
  if bad:
    from eva_jax.convert.common import CheckpointError
    raise CheckpointError(f'Teacher checkpoint {src!r} is not a {arch} tower: ' + '; '.join(bad)
                          + '. Set config.teacher.arch to its architecture (or leave it empty).')


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
