"""EVA for video: the image encoder over T frames with joint space-time attention
(../shared/EVA-SPEC.md "Video: Kinetics fine-tuning", EVA-01/video).

  videos [B, T, H, W, 3] -> per-frame patch embedding (tubelet t: t frames per token, t=1 is
  per-frame 2D) -> [B, T/t * N, D] -> prepend cls -> + pos-embed [1 + T/t*N, D] -> Blocks (joint
  attention over every patch token of every frame plus cls) -> mean-pool patch tokens -> fc_norm
  -> head.

`VideoEncoder` is `VisionTransformer` with a video `embed`: the blocks, the cls token, the
initializers and the call path are the image encoder's own (subclass, no copied model code); only
the patch kernel ([t, p, p, C, D]) and the pos-embed ([1 + T/t*N, D], token order frame-major as a
Conv3d's flatten(2)) change shape. `VideoClassifier` is `models/classifier.Classifier` with that
encoder, so features()/__call__ (mean pool -> fc_norm -> head) are the image classifier's.

Inflation from an image checkpoint (`inflate_image_params`): the 2D kernel repeated over t and
divided by t (a static clip then embeds as the image did, I3D's inflation), the pos-embed's cls
row once and its patch rows repeated T/t times. A frame count or size other than the configured
one resizes the patch part of the pos-embed trilinearly (`resize_pos_3d`, torch
F.interpolate(mode='trilinear', align_corners=False), the same corner convention as the image
code's bicubic resize).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from eva_jax.models import classifier as clf_lib
from eva_jax.models.layers import Dense, LayerNorm, param, trunc_normal
from eva_jax.models.vit import VisionTransformer, _initializers


def check_frames(num_frames: int, tubelet: int) -> int:
  """Temporal token count T/t; ValueError naming both when t does not divide T."""
  if tubelet < 1:
    raise ValueError(f'model tubelet size must be >= 1, got {tubelet}.')
  if num_frames < 1 or num_frames % tubelet:
    raise ValueError(f'num_frames={num_frames} is not divisible by the tubelet size '
                     f'{tubelet}; use a multiple of {tubelet} frames or tubelet=1.')
  return num_frames // tubelet


@functools.lru_cache(maxsize=None)
def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's linear interpolation, align_corners=False (ATen
  area_pixel_compute_source_index: src = max((i + 0.5) * in/out - 0.5, 0))."""
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    src = max((i + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(np.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    lam = src - i0
    m[i, i0] += 1.0 - lam
    m[i, i1] += lam
  return m.astype(np.float32)


def resize_pos_3d(x, old: tuple[int, int, int], new: tuple[int, int, int]):
  """Trilinear resize of a [..., T*H*W, C] token grid (frame-major) to `new` (T', H', W'):
  torch F.interpolate(x [1, C, T, H, W], size=new, mode='trilinear', align_corners=False)."""
  old, new = tuple(map(int, old)), tuple(map(int, new))
  if old == new:
    return x
  lead, c = x.shape[:-2], x.shape[-1]
  g = x.reshape(*lead, *old, c).astype(jnp.float32)
  mt, my, mx = (jnp.asarray(_linear_matrix(a, b)) for a, b in zip(old, new))
  g = jnp.einsum('st,...thwc->...shwc', mt, g)
  g = jnp.einsum('yh,...thwc->...tywc', my, g)
  g = jnp.einsum('xw,...tywc->...tyxc', mx, g)
  return g.reshape(*lead, new[0] * new[1] * new[2], c).astype(x.dtype)


class VideoEncoder(VisionTransformer):
  """The EVA encoder over clips; call with normalized videos [B, T, H, W, C] (any T divisible by
  the tubelet, any H, W multiple of the patch size). Returns tokens [B, 1 + T/t*N, D].

  cfg: an encoder config (models/config.py) whose image_size is the frame size; num_frames and
  tubelet fix the pos-embed's temporal length T/t. RoPE (EVA-02) is refused: the official video
  model is EVA-01 with a learned pos-embed, and no 3D RoPE is specified."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, num_frames: int, tubelet: int = 1,
               rngs: nnx.Rngs):
    if cfg.rope:
      raise ValueError('The video model has a learned space-time pos-embed (EVA-01/video); '
                       'set model.rope=False (RoPE encoders have no 3D variant here).')
    if cfg.get('registers', 0) or not cfg.class_token:
      raise ValueError('The video model needs one class token and no registers (EVA-01/video).')
    self.num_frames, self.tubelet = int(num_frames), int(tubelet)
    self.temporal = check_frames(self.num_frames, self.tubelet)
    super().__init__(cfg, rngs=rngs)
    _, tinit = _initializers(self.cfg)
    d = self.cfg.width
    n = self.grid[0] * self.grid[1]
    # Replace the image-shaped pieces; everything else (cls, blocks, norms) is the image encoder's.
    k2d = self.patch_kernel[...]
    self.patch_kernel = nnx.Param(
        jnp.repeat(k2d[None], self.tubelet, 0) / self.tubelet,
        out_sharding=(None, None, None, None, 'embed'), eager_sharding=False)
    self.pos_embed = param(rngs, tinit, (1 + self.temporal * n, d), (None, 'embed'))

  @property
  def thw(self) -> tuple[int, int, int]:
    """The (temporal, grid h, grid w) token grid the pos-embed was built for."""
    return (self.temporal,) + tuple(self.grid)

  def embed(self, videos, mask=None):
    """Patch tokens -> cls -> space-time pos-embed. Returns ([B, 1 + T/t*N, D], (T/t, gh, gw))."""
    if mask is not None:
      raise ValueError('The video encoder takes no [MASK] input.')
    cfg, dt = self.cfg, self.dtype
    if videos.ndim != 5 or videos.shape[-1] != cfg.in_chans:
      raise ValueError(f'Expected videos [batch, frames, height, width, {cfg.in_chans}], got '
                       f'shape {tuple(videos.shape)}.')
    b, t_in, h, w, c = videos.shape
    t = check_frames(t_in, self.tubelet)
    gh, gw = self._check_images(videos[:, 0])
    p, k = cfg.patch_size, self.tubelet
    x = videos.astype(dt).reshape(b, t, k, gh, p, gw, p, c)
    x = jnp.einsum('bskyhxwc,khwcd->bsyxd', x, self.patch_kernel[...].astype(dt))
    x = x.reshape(b, t * gh * gw, -1)
    if self.patch_bias is not None:
      x = x + self.patch_bias[...].astype(dt)
    cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    pos = self.pos_embed[...]
    if (t, gh, gw) != self.thw:
      pos = jnp.concatenate([pos[:1], resize_pos_3d(pos[1:], self.thw, (t, gh, gw))], axis=0)
    x = x + pos.astype(dt)
    if self.ln_pre is not None:
      x = self.ln_pre(x)
    return x, (gh, gw)


class VideoClassifier(clf_lib.Classifier):
  """Video classifier: VideoEncoder -> mean of the patch tokens -> fc_norm -> head (float32
  logits [B, num_classes]). Same parameter tree as the image Classifier ({'encoder', 'fc_norm',
  'head'}), so layer decay, the frozen patch embedding and checkpoints work unchanged."""

  def __init__(self, encoder_cfg: ml_collections.ConfigDict, num_classes: int, *,
               num_frames: int, tubelet: int = 1, head_init_scale: float = 0.001,
               rngs: nnx.Rngs):
    if num_classes <= 0:
      raise ValueError(f'num_classes must be positive, got {num_classes}.')
    self.pool = 'mean'
    self.encoder = VideoEncoder(clf_lib.finetune_encoder_config(encoder_cfg),
                                num_frames=num_frames, tubelet=tubelet, rngs=rngs)
    d = encoder_cfg.width
    self.fc_norm = LayerNorm(d, encoder_cfg.ln_eps, rngs=rngs)
    scaled = lambda key, shape, dtype: trunc_normal(0.02, 2.0)(key, shape, dtype) * head_init_scale
    self.head = Dense(d, num_classes, ('embed', 'out'), init=scaled, bias=True, rngs=rngs)


# ----------------------------------------------------------------------------------------------
# Initialization from an image checkpoint (numpy, host side)

def inflate_image_params(image_params: dict, image_cfg: dict, *, patch_size: int, num_frames: int,
                         tubelet: int, image_size: int) -> tuple[dict, list[str]]:
  """Video encoder params (numpy) from an image encoder's (checkpoint.read_encoder().params).

  patch_kernel [p, p, C, D] -> [t, p, p, C, D] repeated over t and divided by t; pos_embed
  [1 + N, D] -> cls row once + patch rows repeated T/t times, then trilinearly resized when the
  frame size differs from the checkpoint's. mask_token and the pretraining `norm` are dropped
  (returned by name). Raises ValueError when the checkpoint's patch size differs from the
  config's (naming both) or the checkpoint holds no class token."""
  kernel = np.asarray(image_params['patch_kernel'], np.float32)
  p = int(image_cfg.get('patch_size', kernel.shape[0]))
  if kernel.ndim != 4 or p != patch_size or kernel.shape[0] != patch_size:
    raise ValueError(f'The image checkpoint has patch size {p} (kernel {kernel.shape}) but the '
                     f'video config has model.patch_size={patch_size}; set '
                     f'--config.model.patch_size={p} (or a model name with patch {p}).')
  out = {k: v for k, v in image_params.items() if k not in ('mask_token', 'norm')}
  dropped = [k for k in ('mask_token', 'norm') if k in image_params]
  temporal = check_frames(num_frames, tubelet)
  out['patch_kernel'] = np.repeat(kernel[None], tubelet, 0) / tubelet
  pos = np.asarray(image_params['pos_embed'], np.float32)
  if 'cls_token' not in image_params:
    raise ValueError('The image checkpoint has no class token; the video model needs one.')
  g_from = int(image_cfg.get('image_size', 224)) // p
  if pos.shape[0] != 1 + g_from * g_from:
    raise ValueError(f'image pos_embed has {pos.shape[0]} rows, expected 1 + {g_from}^2 for '
                     f'image_size={image_cfg.get("image_size")} patch {p}.')
  g_to = image_size // p
  patches = np.tile(pos[1:], (temporal, 1))
  patches = np.asarray(resize_pos_3d(jnp.asarray(patches), (temporal, g_from, g_from),
                                     (temporal, g_to, g_to)))
  out['pos_embed'] = np.concatenate([pos[:1], patches], 0)
  return out, dropped


def resize_video_params(video_params: dict, *, old_thw, new_thw) -> dict:
  """A video encoder's params (numpy) at another frame count/size: the pos-embed's patch part
  resized trilinearly (cls row kept). The tubelet must stay (its kernel is copied)."""
  out = dict(video_params)
  pos = np.asarray(video_params['pos_embed'], np.float32)
  out['pos_embed'] = np.concatenate(
      [pos[:1], np.asarray(resize_pos_3d(jnp.asarray(pos[1:]), old_thw, new_thw))], 0)
  return out


class FrameAveragedClassifier(clf_lib.Classifier):
  """The frame-averaged image baseline (TSN-style): the image encoder on every frame alone
  (attention within a frame, the image pos-embed), patch tokens averaged over frames and
  positions -> fc_norm -> head. Blind to frame order by construction; the video demo compares it
  with VideoClassifier. Parameters are the image Classifier's. Call with [B, T, H, W, C]."""

  def __init__(self, encoder_cfg: ml_collections.ConfigDict, num_classes: int, *,
               head_init_scale: float = 0.001, rngs: nnx.Rngs):
    super().__init__(encoder_cfg, num_classes, pool='mean', head_init_scale=head_init_scale,
                     rngs=rngs)

  def features(self, videos, *, dropout_key=None):
    if videos.ndim != 5:
      raise ValueError(f'Expected videos [batch, frames, height, width, channels], got shape '
                       f'{tuple(videos.shape)}.')
    b, t = videos.shape[:2]
    x = self.encoder.patch_tokens(videos.reshape((b * t,) + videos.shape[2:]),
                                  dropout_key=dropout_key)
    return self.fc_norm(x.reshape(b, t * x.shape[1], x.shape[2]).mean(1))
