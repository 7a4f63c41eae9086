"""ViTDet backbone on an EVA encoder: window / global attention blocks and a simple feature pyramid.

Li et al. 2022, "Exploring Plain Vision Transformer Backbones for Object Detection"; the EVA-01 and
EVA-02 detection code (baaivision/EVA EVA-0{1,2}/det/detectron2/modeling/backbone/vit.py):
- patch tokens only (no cls token in the sequence); the absolute pos-embed is resized to the input
  grid with the official bicubic (get_abs_pos: F.interpolate(bicubic, align_corners=False));
- blocks at `global_blocks` attend globally, the others inside non-overlapping `window_size`
  windows (window_partition / window_unpartition; the MLP stays per token);
- EVA-02 RoPE: one table for the window grid (rope_win) and one for the whole grid (rope_glb),
  both with coordinates rescaled to the pretraining grid (pt_hw_seq_len = model.rope_ref_grid);
- no final norm: the last block's output [B, H/p, W/p, D] feeds SimpleFeaturePyramid
  (scale factors 4, 2, 1, 0.5: deconvs / identity / max-pool, then 1x1 and 3x3 convs with
  channel LayerNorm; strides 4, 8, 16, 32 at patch 16), plus p6 = stride-2 subsample of the last
  level (detectron2's LastLevelMaxPool) when `top_block`.

Per-block attention kinds vs stacked params: the encoder keeps its stacked `Blocks` (one param tree,
the same as pretraining, so weights load unchanged) and runs them as ONE `lax.scan` whose body
picks global or window attention per layer with `lax.cond` on a static per-layer flag
(Blocks.run(global_mask=...)): one compiled body holding both kinds, only one executed per layer.
The first version split the depth into scans over runs of one kind (0-4 window, 5 global, ...:
8 scans for EVA-02-L); XLA gave each loop its own temporaries, and L/14 at 1022 needed 29.5 GiB
of temporaries against 8.5 GiB for an all-global single scan (docs/memory_plan.md).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from eva_jax.models import vit as vit_lib
from eva_jax.models.layers import (LayerNorm, Window, create_module, param, rope_sincos,
                                   zeros)


def vitdet_config(**overrides) -> ml_collections.ConfigDict:
  """Detection-backbone settings (EVA-02-L COCO: window 16, global blocks 5, 11, 17, 23, 1024^2).

  global_blocks: block indices with global attention (negative = from the end).
  window_pad: False = a window that does not tile the grid is an error; True = ViTDet's zero
    padding (the official code pads; needed e.g. for L/14 at 1024: a 73x73 grid).
  fpn_dim: pyramid channels (detectron2 out_channels=256); scale_factors: SimpleFeaturePyramid's.
  top_block: add p6 (LastLevelMaxPool). image_size: the detection input size (square_pad).
  """
  cfg = ml_collections.ConfigDict(dict(
      image_size=1024, window_size=16, global_blocks=(5, 11, 17, 23), window_pad=False,
      fpn_dim=256, scale_factors=(4.0, 2.0, 1.0, 0.5), top_block=True, fpn_eps=1e-6))
  cfg.update(overrides)
  return cfg


def _encoder_cfg(cfg):
  enc = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg))
  # ViTDet keeps the pretraining pos-embed (with its cls row) and resizes it with the official
  # bicubic; it has no [MASK] token and no final norm.
  enc.mask_token, enc.final_norm, enc.pos_interp = False, False, 'bicubic'
  if enc.get('ln_pre') or enc.get('out_dim') or enc.get('registers') or enc.get('post_norm'):
    raise ValueError('ViTDetBackbone takes EVA encoder configs (no ln_pre / out_dim / registers / '
                     'post_norm).')
  return enc


class Deconv2x2(nnx.Module):
  """ConvTranspose2d(kernel 2, stride 2): each input pixel becomes a 2x2 block; kernel [2, 2, in,
  out] (torch's [in, out, 2, 2] transposed (2, 3, 0, 1)). With stride = kernel the outputs do not
  overlap, so it is one einsum."""

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.variance_scaling(1.0 / 3, 'fan_in', 'uniform', in_axis=(0, 1, 2))
    self.kernel = param(rngs, init, (2, 2, din, dout), (None, None, 'embed', None))
    self.bias = param(rngs, zeros, (dout,), (None,))

  def __call__(self, x):
    b, h, w, _ = x.shape
    y = jnp.einsum('bhwi,acio->bhawco', x, self.kernel[...].astype(x.dtype))
    return y.reshape(b, 2 * h, 2 * w, -1) + self.bias[...].astype(x.dtype)


class ConvNorm(nnx.Module):
  """detectron2 Conv2d(bias=False, norm='LN'): k x k conv ('same' padding) then channel LayerNorm."""

  def __init__(self, din: int, dout: int, k: int, eps: float, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.he_normal(in_axis=(0, 1, 2))   # detectron2 c2_msra_fill
    self.kernel = param(rngs, init, (k, k, din, dout), (None, None, None, None))
    self.norm = LayerNorm(dout, eps, rngs=rngs, axis_name=None)
    self.k = k

  def __call__(self, x):
    p = self.k // 2
    y = jax.lax.conv_general_dilated(x, self.kernel[...].astype(x.dtype), (1, 1),
                                     [(p, p), (p, p)], dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return self.norm(y)


class SimpleFeaturePyramid(nnx.Module):
  """ViTDet's SimpleFeaturePyramid on a [B, H, W, D] map of stride `patch`: one stage per scale
  factor (4: deconv, LN, GELU, deconv; 2: deconv; 1: -; 0.5: 2x2 max-pool), each followed by 1x1
  and 3x3 ConvNorm to `fpn_dim`. Output dict 'p{round(log2 stride)}' -> [B, H', W', fpn_dim]
  (p2..p5 at strides 4..32 for patch 16; patch 14 gives strides 3.5..28 under the same names),
  plus 'p6' with `top_block`. Raises ValueError for an unsupported scale factor."""

  def __init__(self, dim: int, patch: int, fpn_dim: int = 256,
               scale_factors=(4.0, 2.0, 1.0, 0.5), top_block: bool = True, eps: float = 1e-6, *,
               rngs: nnx.Rngs):
    self.scale_factors = tuple(float(s) for s in scale_factors)
    self.top_block = top_block
    self.strides = tuple(patch / s for s in self.scale_factors)
    self.names = tuple(f'p{round(math.log2(s))}' for s in self.strides)
    stages = []
    for s in self.scale_factors:
      if s == 4.0:
        pre = nnx.List([Deconv2x2(dim, dim // 2, rngs=rngs), LayerNorm(dim // 2, eps, rngs=rngs,
                                                                       axis_name=None),
                        Deconv2x2(dim // 2, dim // 4, rngs=rngs)])
        d = dim // 4
      elif s == 2.0:
        pre, d = nnx.List([Deconv2x2(dim, dim // 2, rngs=rngs)]), dim // 2
      elif s in (1.0, 0.5):
        pre, d = nnx.List([]), dim
      else:
        raise ValueError(f'scale factor {s} is not supported; choose from 4.0, 2.0, 1.0, 0.5 '
                         '(ViTDet SimpleFeaturePyramid).')
      stages.append(nnx.Dict(pre=pre, lateral=ConvNorm(d, fpn_dim, 1, eps, rngs=rngs),
                             output=ConvNorm(fpn_dim, fpn_dim, 3, eps, rngs=rngs)))
    self.stages = nnx.List(stages)

  def __call__(self, x):
    out = {}
    for s, name, stage in zip(self.scale_factors, self.names, self.stages):
      y = x
      if s == 4.0:
        d1, ln, d2 = stage['pre']
        y = d2(jax.nn.gelu(ln(d1(y)), approximate=False))
      elif s == 2.0:
        y = stage['pre'][0](y)
      elif s == 0.5:
        y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
      out[name] = stage['output'](stage['lateral'](y))
    if self.top_block:   # LastLevelMaxPool: max_pool2d(kernel 1, stride 2) = subsampling
      last = out[self.names[-1]]
      out[f'p{round(math.log2(self.strides[-1])) + 1}'] = last[:, ::2, ::2]
    return out


class ViTDetBackbone(nnx.Module):
  """EVA encoder as a ViTDet backbone; see the module docstring.

  encoder_cfg: an EVA encoder config (models/config.py; EVA-01: no RoPE, EVA-02: RoPE); its
    `image_size` is the pretraining size whose pos-embed is stored. det_cfg: vitdet_config().
  `features(images)`: last block output [B, H/p, W/p, D] (float32 maps in the compute dtype);
  `__call__(images)`: the pyramid dict (SimpleFeaturePyramid). Images are NHWC, H and W multiples
  of the patch size. Raises ValueError for a global block index out of range, a window that does
  not tile the grid (unless det_cfg.window_pad) or a bad image size, naming the valid choices.
  """

  def __init__(self, encoder_cfg, det_cfg, *, rngs: nnx.Rngs):
    ecfg = _encoder_cfg(encoder_cfg)
    try:   # checked before anything is built
      self.global_blocks = tuple(vit_lib.take_indices(ecfg.depth, list(det_cfg.global_blocks)))
    except ValueError as e:
      raise ValueError(f'det.global_blocks={tuple(det_cfg.global_blocks)}: {e}') from None
    if det_cfg.window_size < 1:
      raise ValueError(f'det.window_size={det_cfg.window_size} must be >= 1.')
    # Static attributes (part of the graphdef): the window may be changed between calls.
    self.window_size, self.window_pad = int(det_cfg.window_size), bool(det_cfg.window_pad)
    self.encoder = vit_lib.VisionTransformer(ecfg, rngs=rngs)
    ecfg = self.encoder.cfg
    self.fpn = SimpleFeaturePyramid(ecfg.width, ecfg.patch_size, det_cfg.fpn_dim,
                                    det_cfg.scale_factors, det_cfg.top_block, det_cfg.fpn_eps,
                                    rngs=rngs)

  def _rope(self, grid):
    ecfg = self.encoder.cfg
    if not ecfg.rope:
      return None
    sin, cos = rope_sincos(grid, ecfg.width // ecfg.heads, ecfg.rope_theta, ecfg.rope_ref_grid)
    return jnp.asarray(sin), jnp.asarray(cos)

  def features(self, images):
    enc = self.encoder
    x, grid = enc.embed(images)
    x = x[:, enc.num_prefix:]          # ViTDet: patch tokens only (the cls row of pos is unused)
    ws = self.window_size
    window = Window(grid, ws, self.window_pad)
    rope_glb, rope_win = self._rope(grid), self._rope((ws, ws))
    depth = enc.cfg.depth
    mask = np.array([i in self.global_blocks for i in range(depth)])
    if mask.all():
      x = enc.blocks.run(x, 0, depth, rope_glb, 0)
    else:
      x = enc.blocks.run(x, 0, depth, rope_win, 0, window=window, global_mask=mask,
                         rope_global=rope_glb)
    return x.reshape(x.shape[0], grid[0], grid[1], x.shape[-1])

  def __call__(self, images):
    return self.fpn(self.features(images))


def create(encoder_cfg, det_cfg, seed: int = 0) -> ViTDetBackbone:
  """A randomly initialized backbone (one compiled init)."""
  return create_module(
      lambda: ViTDetBackbone(encoder_cfg, det_cfg, rngs=nnx.Rngs(params=seed)))


def from_pretrained(encoder_cfg, det_cfg, encoder_params: dict, seed: int = 0):
  """(backbone, unused names): the encoder part from pretrained params (nested numpy,
  VisionTransformer layout, e.g. checkpoint.read_encoder(...).params), the pyramid initialized as
  detectron2 does (convs: c2_msra_fill = He normal over fan_out, no bias; deconvs: PyTorch's
  default uniform +-1/sqrt(fan_in); LayerNorms 1/0). Built from host arrays: no random-init
  program is compiled. Unused: mask_token and the final norm (ViTDet has neither). Raises
  ValueError naming a missing or misshaped key (another patch size: models.resample first)."""
  from eva_jax.convert import common
  model = nnx.eval_shape(lambda: ViTDetBackbone(encoder_cfg, det_cfg, rngs=nnx.Rngs(params=0)))
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  want = common.flatten(nnx.to_pure_dict(state))
  got = common.flatten(encoder_params)
  rng = np.random.default_rng(seed)
  flat = {}
  for k, a in want.items():
    shape = tuple(a.shape)
    if k.startswith('encoder/'):
      name = k[len('encoder/'):]
      if name not in got:
        raise ValueError(f'pretrained encoder lacks {name!r} (has {len(got)} tensors).')
      v = np.asarray(got[name], np.float32)
      if v.shape != shape:
        raise ValueError(f'pretrained {name} has shape {v.shape}, the backbone wants {shape} '
                         '(another patch size? see models.resample).')
    elif k.endswith('/scale'):
      v = np.ones(shape, np.float32)
    elif k.endswith('/bias'):
      v = np.zeros(shape, np.float32)
    elif len(shape) == 4 and shape[:2] == (2, 2) and 'pre' in k.split('/'):   # deconv [2,2,in,out]
      bound = 1.0 / np.sqrt(shape[3] * 4)   # torch ConvTranspose2d: fan_in = out * k * k
      v = rng.uniform(-bound, bound, shape).astype(np.float32)
    else:                                                      # conv [k, k, in, out]
      v = (rng.standard_normal(shape) * np.sqrt(2.0 / (shape[0] * shape[1] * shape[3])))
      v = v.astype(np.float32)
    flat[k] = jnp.asarray(v)
  nnx.replace_by_pure_dict(state, common.unflatten(flat))
  unused = sorted(k for k in got if 'encoder/' + k not in want)
  return nnx.merge(graphdef, state, rest), unused
