"""Import a CLIP vision tower (the frozen EVA teacher) into eva_jax's VisionTransformer.

Reads, one tensor at a time (see common.TensorSource):
- transformers `save_pretrained` directories of `CLIPVisionModelWithProjection` or `CLIPModel`
  (safetensors or bin, sharded or not): keys `vision_model.*` and `visual_projection.weight`;
  the text tower of a CLIPModel is counted and ignored.
- the OpenAI layout (`visual.*` keys, as in ViT-L-14.pt): TorchScript archives or plain state
  dicts; `visual.proj` is already [width, out_dim].
- open_clip checkpoints of OpenAI-style towers: the same `visual.*` keys, possibly wrapped as
  {'state_dict': {'module.visual....'}} (TensorSource unwraps), or a bare `VisionTransformer`
  state dict (`conv1.weight`, `transformer.resblocks.*`, ...).

The architecture is inferred from the tensor shapes: width and patch from the patch conv, depth from
the block indices, MLP width from fc1/c_fc, grid (so image size) from the pos-embed length, output
dim from the projection. Two things the weights cannot tell: the number of heads (transformers'
config.json gives it; otherwise width // 64 as in every OpenAI/open_clip tower) and the MLP
activation (config.json's hidden_act; otherwise QuickGELU as in OpenAI CLIP and open_clip's
`quick_gelu` models). Both can be overridden (`heads=`, `act=`) for non-standard towers.

Every checkpoint key of the vision tower must be used and every model parameter filled: otherwise a
CheckpointError lists the missing, unexpected and mis-shaped keys (nothing is partially loaded).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Callable, Mapping

import ml_collections
import numpy as np

from eva_jax.convert import common
from eva_jax.convert.common import CheckpointError
from eva_jax.models import config as config_lib

__all__ = ['load_clip_vision', 'detect_layout', 'clip_config']

HF = 'transformers'
OPENAI = 'openai'

# HF buffers that older transformers versions saved next to the weights; harmless, skipped.
_HF_IGNORED = ('vision_model.embeddings.position_ids',)


# -------------------------------------------------------------------------------------------------
# Layouts: checkpoint key names of each part of the tower.
class _Names:
  """Checkpoint key names of one layout (`pre` = namespace prefix of the vision tower)."""

  def __init__(self, kind: str, pre: str):
    self.kind, self.pre = kind, pre
    if kind == HF:
      self.patch = pre + 'embeddings.patch_embedding.weight'
      self.cls = pre + 'embeddings.class_embedding'
      self.pos = pre + 'embeddings.position_embedding.weight'
      self.ln_pre = pre + 'pre_layrnorm.'        # (sic) transformers' spelling
      self.ln_post = pre + 'post_layernorm.'
      self.proj = 'visual_projection.weight'     # [out, width]: outside vision_model.
      self.block_re = re.compile(re.escape(pre) + r'encoder\.layers\.(\d+)\.')
      self.block_tmpl = pre + 'encoder.layers.{i}.*'
    else:
      self.patch = pre + 'conv1.weight'
      self.cls = pre + 'class_embedding'
      self.pos = pre + 'positional_embedding'
      self.ln_pre = pre + 'ln_pre.'
      self.ln_post = pre + 'ln_post.'
      self.proj = pre + 'proj'                   # [width, out]
      self.block_re = re.compile(re.escape(pre) + r'transformer\.resblocks\.(\d+)\.')
      self.block_tmpl = pre + 'transformer.resblocks.{i}.*'

  def block(self, i: int) -> dict[str, str]:
    if self.kind == HF:
      b = f'{self.pre}encoder.layers.{i}.'
      return dict(ln1=b + 'layer_norm1.', ln2=b + 'layer_norm2.', q=b + 'self_attn.q_proj.',
                  k=b + 'self_attn.k_proj.', v=b + 'self_attn.v_proj.', out=b + 'self_attn.out_proj.',
                  fc1=b + 'mlp.fc1.', fc2=b + 'mlp.fc2.')
    b = f'{self.pre}transformer.resblocks.{i}.'
    return dict(ln1=b + 'ln_1.', ln2=b + 'ln_2.', in_w=b + 'attn.in_proj_weight',
                in_b=b + 'attn.in_proj_bias', out=b + 'attn.out_proj.', fc1=b + 'mlp.c_fc.',
                fc2=b + 'mlp.c_proj.')

  def in_namespace(self, key: str) -> bool:
    if self.kind == HF:
      return key.startswith(self.pre) or key == self.proj
    return key.startswith(self.pre)


def detect_layout(keys) -> tuple[str, str]:
  """(layout, prefix) of a CLIP checkpoint from its key names; CheckpointError when it is none."""
  keys = list(keys)
  if any(k.startswith('vision_model.') for k in keys):
    return HF, 'vision_model.'
  if any(k.startswith('visual.') for k in keys):
    return OPENAI, 'visual.'
  if 'conv1.weight' in keys and any(k.startswith('transformer.resblocks.') for k in keys):
    return OPENAI, ''   # a bare open_clip / OpenAI VisionTransformer state dict
  # Top-level names first (they identify the architecture), then the per-block ones.
  ordered = sorted(keys, key=lambda k: (any(p.isdigit() for p in k.split('.')), k))
  sample = ', '.join(ordered[:20]) + (' ...' if len(keys) > 20 else '')
  hint = ''
  if any(k.startswith(('patch_embed.', 'blocks.')) for k in keys):
    hint = ('\nIt looks like a timm / official EVA (or other ViT) encoder checkpoint, not a CLIP '
            'vision tower: use eva_jax.load_encoder for EVA encoders.')
  elif any(k.startswith(('text_model.', 'token_embedding.')) for k in keys):
    hint = '\nIt holds a text tower but no vision tower.'
  raise CheckpointError(
      'Not a CLIP vision tower checkpoint: it has neither the transformers layout '
      '(vision_model.*, visual_projection.weight) nor the OpenAI/open_clip layout (visual.*).\n'
      'Missing keys: vision_model.embeddings.patch_embedding.weight (transformers) or '
      'visual.conv1.weight (OpenAI/open_clip), and the rest of the tower.\n'
      f'Unexpected keys ({len(keys)}): {sample}' + hint)


# -------------------------------------------------------------------------------------------------
def _hf_vision_config(path: str) -> dict:
  """The vision part of a transformers config.json next to the weights, or {} if there is none."""
  d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  f = os.path.join(d, 'config.json')
  if not os.path.isfile(f):
    return {}
  try:
    with open(f) as fh:
      c = json.load(fh)
  except (OSError, ValueError) as e:
    logging.warning('Ignoring unreadable %s: %s', f, e)
    return {}
  if not isinstance(c, dict):
    return {}
  if isinstance(c.get('vision_config'), dict):   # CLIPModel
    return c['vision_config']
  return c


def _known_name(cfg) -> str:
  fields = ('width', 'depth', 'heads', 'mlp_dim', 'patch_size', 'image_size', 'out_dim', 'act')
  for name in config_lib.TEACHER_NAMES:
    ref = config_lib.teacher_config(name)
    if all(ref[f] == cfg[f] for f in fields):
      return name
  return 'clip-custom'


def clip_config(*, width: int, depth: int, heads: int, mlp_dim: int, patch_size: int,
                image_size: int, out_dim: int, act: str = 'quick_gelu', ln_eps: float = 1e-5,
                dtype: str = 'float32') -> ml_collections.ConfigDict:
  """A teacher_config-compatible ConfigDict for a CLIP vision tower of the given sizes."""
  cfg = config_lib.teacher_config(config_lib.TEACHER_NAMES[0])
  cfg.update(dict(width=int(width), depth=int(depth), heads=int(heads), mlp_dim=int(mlp_dim),
                  patch_size=int(patch_size), image_size=int(image_size), out_dim=int(out_dim),
                  act=act, ln_eps=float(ln_eps), dtype=dtype))
  config_lib.validate(cfg)
  cfg.name = _known_name(cfg)
  return cfg


def _infer(src: common.TensorSource, names: _Names, ns_keys: list[str], hf_cfg: dict,
           heads: int | None, act: str | None, dtype: str, what: str):
  """The tower's ConfigDict from the tensor shapes (+ config.json for heads/act/eps)."""
  needed = [names.patch, names.pos, names.proj]
  missing = [k for k in needed if k not in src]
  depth_ids = sorted({int(m.group(1)) for k in ns_keys for m in [names.block_re.match(k)] if m})
  fc1_key = (names.block(0)['fc1'] + 'weight') if depth_ids else None
  if not depth_ids:
    missing.append(names.block_tmpl)
  elif fc1_key not in src:
    missing.append(fc1_key)
  if missing:
    known = set(needed) | ({fc1_key} if fc1_key else set())
    unexpected = [k for k in ns_keys if k not in known and not names.block_re.match(k)]
    hint = ''
    if names.proj in missing and len(missing) == 1:
      hint = ('\nThe tower has no projection (e.g. a CLIPVisionModel instead of '
              'CLIPVisionModelWithProjection); EVA targets are the projected features.')
    raise CheckpointError(
        f'{what} does not match a CLIP vision tower ({names.kind} layout).\n'
        f'Missing keys ({len(missing)}): {", ".join(missing)}\n'
        f'Unexpected keys ({len(unexpected)}): {", ".join(unexpected[:20])}'
        + (' ...' if len(unexpected) > 20 else '') + hint)

  pshape = src.shape(names.patch)
  if len(pshape) != 4 or pshape[2] != pshape[3]:
    raise CheckpointError(f'{what}: {names.patch} has shape {pshape}; expected a square patch conv '
                          '[width, 3, patch, patch].')
  width, in_chans, patch = pshape[0], pshape[1], pshape[2]
  if in_chans != 3:
    raise CheckpointError(f'{what}: {names.patch} has {in_chans} input channels; CLIP towers take RGB.')
  depth = depth_ids[-1] + 1
  mlp_dim = src.shape(fc1_key)[0]
  pos_len = src.shape(names.pos)[0]
  grid = math.isqrt(max(pos_len - 1, 0))
  if grid * grid != pos_len - 1 or grid == 0:
    raise CheckpointError(f'{what}: {names.pos} has {pos_len} rows; expected 1 + a square number of '
                          'patch positions (cls + grid x grid).')
  pr = src.shape(names.proj)
  out_dim = pr[0] if names.kind == HF else pr[-1]

  if heads is None:
    heads = hf_cfg.get('num_attention_heads')
    if heads is None:
      if width % 64:
        raise CheckpointError(
            f'{what}: width {width} is not a multiple of 64, so the OpenAI rule heads = width // 64 '
            'does not apply and the checkpoint does not record the number of heads. Pass heads=.')
      heads = width // 64
  if act is None:
    hf_act = hf_cfg.get('hidden_act', 'quick_gelu')
    act = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu'}.get(hf_act)
    if act is None:
      raise CheckpointError(f'{what}: config.json has hidden_act={hf_act!r}; supported: quick_gelu, '
                            'gelu (exact erf).')
  ln_eps = hf_cfg.get('layer_norm_eps', 1e-5)
  if hf_cfg:
    for f, v in (('image_size', grid * patch), ('patch_size', patch), ('hidden_size', width)):
      if f in hf_cfg and hf_cfg[f] != v:
        logging.warning('%s: config.json says %s=%s but the weights say %s; using the weights.',
                        what, f, hf_cfg[f], v)
  try:
    cfg = clip_config(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, patch_size=patch,
                      image_size=grid * patch, out_dim=out_dim, act=act, ln_eps=ln_eps, dtype=dtype)
  except ValueError as e:
    raise CheckpointError(f'{what}: inferred an invalid architecture: {e}') from e
  return cfg


# -------------------------------------------------------------------------------------------------
def _expected(names: _Names, cfg) -> dict[str, tuple]:
  """Checkpoint key -> shape that a tower of `cfg` has in this layout."""
  d, f, p, o = cfg.width, cfg.mlp_dim, cfg.patch_size, cfg.out_dim
  n = (cfg.image_size // p) ** 2 + 1
  e = {names.patch: (d, 3, p, p), names.cls: (d,), names.pos: (n, d),
       names.proj: (o, d) if names.kind == HF else (d, o)}
  for ln in (names.ln_pre, names.ln_post):
    e[ln + 'weight'] = e[ln + 'bias'] = (d,)
  for i in range(cfg.depth):
    b = names.block(i)
    for ln in (b['ln1'], b['ln2']):
      e[ln + 'weight'] = e[ln + 'bias'] = (d,)
    if names.kind == HF:
      for x in ('q', 'k', 'v'):
        e[b[x] + 'weight'], e[b[x] + 'bias'] = (d, d), (d,)
    else:
      e[b['in_w']], e[b['in_b']] = (3 * d, d), (3 * d,)
    e[b['out'] + 'weight'], e[b['out'] + 'bias'] = (d, d), (d,)
    e[b['fc1'] + 'weight'], e[b['fc1'] + 'bias'] = (f, d), (f,)
    e[b['fc2'] + 'weight'], e[b['fc2'] + 'bias'] = (d, f), (d,)
  return e


def _stacked(depth: int, fn: Callable[[int], np.ndarray]) -> np.ndarray:
  """np.stack([fn(i) for i in range(depth)]) without holding the per-layer list."""
  first = np.asarray(fn(0), np.float32)
  out = np.empty((depth,) + first.shape, np.float32)
  out[0] = first
  del first
  for i in range(1, depth):
    out[i] = fn(i)
  return out


def _converters(src: Mapping[str, np.ndarray], names: _Names, cfg) -> dict[str, Callable[[], np.ndarray]]:
  """Model parameter 'a/b/c' -> function producing its float32 host array (called once)."""
  d, h = cfg.width, cfg.heads
  k = d // h
  L = cfg.depth
  g = lambda key: np.asarray(src[key], np.float32)
  blk = names.block

  def qkv_weight(i):   # torch [3D (q,k,v; head-major), D] -> [D, 3, H, K]
    b = blk(i)
    if names.kind == HF:
      w = np.concatenate([g(b[x] + 'weight') for x in ('q', 'k', 'v')], axis=0)
    else:
      w = g(b['in_w'])
    return w.reshape(3, h, k, d).transpose(3, 0, 1, 2)

  def qkv_bias(i, which):
    b = blk(i)
    if names.kind == HF:
      return g(b['qkv'[which]] + 'bias').reshape(h, k)
    return g(b['in_b']).reshape(3, h, k)[which]

  def proj():
    p = g(names.proj)
    return p.T if names.kind == HF else p

  conv = {
      'patch_kernel': lambda: g(names.patch).transpose(2, 3, 1, 0),   # [D,3,P,P] -> [P,P,3,D]
      'cls_token': lambda: g(names.cls),
      'pos_embed': lambda: g(names.pos),
      'ln_pre/scale': lambda: g(names.ln_pre + 'weight'),
      'ln_pre/bias': lambda: g(names.ln_pre + 'bias'),
      'ln_post/scale': lambda: g(names.ln_post + 'weight'),
      'ln_post/bias': lambda: g(names.ln_post + 'bias'),
      'proj': proj,
  }
  lp = 'blocks/layers/'
  conv.update({
      lp + 'norm1/scale': lambda: _stacked(L, lambda i: g(blk(i)['ln1'] + 'weight')),
      lp + 'norm1/bias': lambda: _stacked(L, lambda i: g(blk(i)['ln1'] + 'bias')),
      lp + 'norm2/scale': lambda: _stacked(L, lambda i: g(blk(i)['ln2'] + 'weight')),
      lp + 'norm2/bias': lambda: _stacked(L, lambda i: g(blk(i)['ln2'] + 'bias')),
      lp + 'attn/qkv': lambda: _stacked(L, qkv_weight),
      lp + 'attn/q_bias': lambda: _stacked(L, lambda i: qkv_bias(i, 0)),
      lp + 'attn/k_bias': lambda: _stacked(L, lambda i: qkv_bias(i, 1)),
      lp + 'attn/v_bias': lambda: _stacked(L, lambda i: qkv_bias(i, 2)),
      # out_proj.weight [out D, in D], in index = h*K + k -> [H, K, D]
      lp + 'attn/proj': lambda: _stacked(
          L, lambda i: g(blk(i)['out'] + 'weight').reshape(d, h, k).transpose(1, 2, 0)),
      lp + 'attn/proj_bias': lambda: _stacked(L, lambda i: g(blk(i)['out'] + 'bias')),
      lp + 'mlp/fc1/kernel': lambda: _stacked(L, lambda i: g(blk(i)['fc1'] + 'weight').T),
      lp + 'mlp/fc1/bias': lambda: _stacked(L, lambda i: g(blk(i)['fc1'] + 'bias')),
      lp + 'mlp/fc2/kernel': lambda: _stacked(L, lambda i: g(blk(i)['fc2'] + 'weight').T),
      lp + 'mlp/fc2/bias': lambda: _stacked(L, lambda i: g(blk(i)['fc2'] + 'bias')),
  })
  return conv


def _converted_shapes(cfg) -> dict[str, tuple]:
  """Shapes the converters above produce (derived from the layout rules, checked by the model)."""
  d, h, f, L, p, o = cfg.width, cfg.heads, cfg.mlp_dim, cfg.depth, cfg.patch_size, cfg.out_dim
  k = d // h
  n = (cfg.image_size // p) ** 2 + 1
  lp = 'blocks/layers/'
  s = {'patch_kernel': (p, p, 3, d), 'cls_token': (d,), 'pos_embed': (n, d), 'proj': (d, o),
       lp + 'attn/qkv': (L, d, 3, h, k), lp + 'attn/proj': (L, h, k, d), lp + 'attn/proj_bias': (L, d),
       lp + 'mlp/fc1/kernel': (L, d, f), lp + 'mlp/fc1/bias': (L, f),
       lp + 'mlp/fc2/kernel': (L, f, d), lp + 'mlp/fc2/bias': (L, d)}
  for ln in ('ln_pre', 'ln_post'):
    s[ln + '/scale'] = s[ln + '/bias'] = (d,)
  for ln in ('norm1', 'norm2'):
    s[f'{lp}{ln}/scale'] = s[f'{lp}{ln}/bias'] = (L, d)
  for b in ('q', 'k', 'v'):
    s[f'{lp}attn/{b}_bias'] = (L, h, k)
  return s


# -------------------------------------------------------------------------------------------------
def load_clip_vision(path: str | os.PathLike, *, dtype: str = 'float32', heads: int | None = None,
                     act: str | None = None):
  """The CLIP vision tower at `path` as an eva_jax VisionTransformer (teacher config, out_dim > 0).

  path:  a transformers save_pretrained directory (or its model file), an OpenAI .pt (TorchScript or
         state dict) or an open_clip checkpoint (see the module docstring).
  dtype: compute dtype name of the returned model ('float32', 'bfloat16', 'float16'); parameters
         stay float32.
  heads, act: override what the checkpoint cannot say (defaults: config.json, else width // 64 and
         'quick_gelu').
  Raises FileNotFoundError (no such path) or CheckpointError (not a CLIP tower, missing /
  unexpected / mis-shaped keys, unreadable file).
  """
  path = os.fspath(path)
  if act is not None and act not in ('quick_gelu', 'gelu'):
    raise ValueError(f"act must be 'quick_gelu' or 'gelu' (exact erf), got {act!r}.")
  if heads is not None and (not isinstance(heads, (int, np.integer)) or heads <= 0):
    raise ValueError(f'heads must be a positive integer, got {heads!r}.')
  what = f'Checkpoint {path!r}'
  src = common.TensorSource(path)
  kind, pre = detect_layout(src.keys())
  names = _Names(kind, pre)
  ignored_known = [k for k in src if kind == HF and k in _HF_IGNORED]
  ns_keys = [k for k in src if names.in_namespace(k) and k not in ignored_known]
  others = len(src) - len(ns_keys) - len(ignored_known)
  hf_cfg = _hf_vision_config(path) if kind == HF else {}
  cfg = _infer(src, names, ns_keys, hf_cfg, heads, act, dtype, what)
  if others:
    logging.info('%s: ignoring %d keys outside the vision tower (text tower, logit_scale, ...).',
                 what, others)
  common.check_keys(_expected(names, cfg), {k: src.shape(k) for k in ns_keys},
                    f'{what} ({kind} layout, inferred {cfg.name}: width {cfg.width}, depth '
                    f'{cfg.depth}, heads {cfg.heads}, mlp {cfg.mlp_dim}, patch {cfg.patch_size}, '
                    f'image {cfg.image_size}, out {cfg.out_dim})')
  conv = _converters(src, names, cfg)
  model = common.model_from_params(cfg, _converted_shapes(cfg), lambda key: conv[key](), what)
  logging.info('Loaded CLIP teacher %s from %s (%s layout; %d tower tensors, %d other keys ignored).',
               cfg.name, path, kind, len(ns_keys), others)
  return model
