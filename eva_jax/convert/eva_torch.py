"""EVA encoders <-> PyTorch state dicts: timm's `Eva` and the official EVA-01 / EVA-02 release.

Two torch layouts (names, shapes as torch stores them):

- 'timm': exactly the keys of `timm.models.eva.Eva(**timm_kwargs(cfg))` (load with strict=True).
  No `mask_token` (timm's Eva has none), `norm.*` is the final norm (global_pool='token').
- 'eva': the official release (EVA-01/eva, EVA-02/asuka): `mask_token`, `cls_token` [1,1,D],
  `pos_embed` [1,1+N,D], fused `attn.qkv.weight` + `attn.{q_bias,v_bias}`; with EVA-02's sub-LN
  separate `attn.{q,k,v}_proj.weight` (no bias) + `attn.{q_bias,v_bias}`, `mlp.ffn_ln`,
  `attn.inner_attn_ln` (EVA-CLIP style, only with cfg.sub_ln_attn); SwiGLU as `mlp.w1/w2/w3`
  (with sub-LN) or packed `mlp.w12/w3` (xformers SwiGLU, without); optional `lm_head.*`.
  timm's `checkpoint_filter_fn` accepts it (it moves `norm` -> `fc_norm` for MIM checkpoints, so
  build the timm model with `timm_kwargs(cfg, global_pool='avg')` for that path).

q/k/v are fused in both layouts unless cfg.sub_ln (timm eva02_{base,large} and the official B/L
use separate projections exactly when sub-LN is on). Conversions are pure transposes/reshapes:
our params -> torch -> our params is bit-exact.

Import (`from_torch_state_dict`) takes either layout (detected from the names), unwraps
{'model': ...}, drops derived RoPE buffers (`*rope.freqs_*`, as timm does), infers the config from
shapes when none is given, checks names and shapes strictly and returns the head/classifier
tensors (`lm_head.*`, `fc_norm.*`, `head.*`) separately.

What the shapes do not hold is never guessed (issue 12, kind A): the head count, RoPE (on/off,
theta, reference grid) and the LayerNorm eps (FACT_FIELDS). Each comes from what the file records,
else an explicit value (`facts=` / `heads=`, or a whole `cfg=`), else the import is refused naming
the field. Records: the timm kwargs json that `eva_jax.export` writes next to a safetensors file
(FILE.json: num_heads, use_rot_pos_emb, rope_temperature, ref_feat_shape; no norm_layer means
timm's LayerNorm eps 1e-6) and the official EVA-02 RoPE buffers (`rope.freqs_cos` [N, head_dim]:
the head dim, RoPE on, and theta / reference grid, checked against the table they imply). The eps
alone falls back to 1e-6, the eps of every timm Eva and official EVA model, with a log line.
Explicit values that contradict the record are refused. Every choice is logged with its source. torch is never imported here at module
level; numpy arrays go in and out.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from typing import Iterator, Mapping

import ml_collections
import numpy as np

from eva_jax.convert import common
from eva_jax.convert.common import CheckpointError
from eva_jax.models import config as config_lib

LAYOUTS = ('timm', 'eva')
EXTRA_PREFIXES = ('lm_head.', 'fc_norm.', 'head.')
# Our head params (MIM lm_head, classifier fc_norm/head) <-> torch names.
_HEADS = ('lm_head', 'fc_norm', 'head')
# Architecture facts the weights do not hold (see the module docstring).
FACT_FIELDS = ('heads', 'rope', 'rope_theta', 'rope_ref_grid', 'ln_eps')
# Heads of the released EVA models, quoted in the refusal message only (never applied).
_RELEASED_HEADS = 'EVA-01 g (1408): 16; EVA-02 Ti (192): 3, S (384): 6, B (768): 12, L (1024): 16'
_LN_EPS = 1e-6   # timm Eva's LayerNorm default and the official code's partial(nn.LayerNorm, 1e-6)


# -------------------------------------------------------------------------------------------------
# timm model arguments
def _model_shapes(cfg) -> dict[str, tuple]:
  return dict(_model_shapes_cached(json.dumps(cfg.to_dict(), sort_keys=True, default=str)))


@functools.lru_cache(maxsize=32)
def _model_shapes_cached(cfg_json: str):
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  return tuple(common.model_params_abstract(cfg).items())


def _check_supported(cfg) -> None:
  bad = []
  if cfg.attn_bias == 'qkv':
    bad.append("attn_bias='qkv' (timm Eva has q/v biases only)")
  if cfg.act != 'gelu':
    bad.append(f'act={cfg.act!r}')
  if cfg.ln_pre or cfg.out_dim:
    bad.append('ln_pre/out_dim (CLIP teacher towers)')
  if not cfg.patch_bias:
    bad.append('patch_bias=False')
  if bad:
    raise ValueError('EVA torch conversion supports EVA encoders only; this config has '
                     + ', '.join(bad) + '. CLIP teachers have their own converter.')


def _mlp_ratio(width: int, mlp_dim: int) -> float:
  """A float r with int(width * r) == mlp_dim (timm's hidden size rule)."""
  r = mlp_dim / width
  for _ in range(8):
    h = int(width * r)
    if h == mlp_dim:
      return r
    r = np.nextafter(r, np.inf if h < mlp_dim else -np.inf)
  raise ValueError(f'No float mlp_ratio gives int({width} * r) == {mlp_dim}.')


def _qkv_fused(cfg) -> bool:
  return not cfg.sub_ln


def timm_kwargs(cfg, *, num_classes: int = 0, global_pool: str = 'token',
                use_fc_norm: bool | None = None, **overrides) -> dict:
  """Arguments of `timm.models.eva.Eva(**kwargs)` building our encoder `cfg`.

  Default: a backbone (num_classes=0) with the final `norm` on all tokens, so
  `forward_features(x)` equals our encoder's tokens and its state dict is
  `to_torch_state_dict(p, cfg, 'timm')`. `global_pool='avg'` turns fc_norm on (timm's default)
  and our final norm becomes timm's `fc_norm` (no `norm`): what `checkpoint_filter_fn` produces
  from an official MIM checkpoint; then tokens = `fc_norm(forward_features(x))`.
  Extra keyword arguments override (e.g. dynamic_img_size=True).
  """
  _check_supported(cfg)
  config_lib.validate(cfg)
  if use_fc_norm is None:
    use_fc_norm = global_pool == 'avg'
  if global_pool == 'token' and not cfg.class_token:
    # timm's 'token' pool is x[:, 0]: without a class token that is the first patch token. Pool
    # the mean of every patch token instead, as our probe and classifier do (the norm layout,
    # use_fc_norm, stays as chosen above).
    global_pool = 'avg'
  kw = dict(
      img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
      num_classes=num_classes, global_pool=global_pool,
      embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads,
      qkv_bias=cfg.attn_bias == 'qv', qkv_fused=_qkv_fused(cfg),
      mlp_ratio=_mlp_ratio(cfg.width, cfg.mlp_dim),
      swiglu_mlp=bool(cfg.swiglu), scale_mlp=bool(cfg.sub_ln),
      scale_attn_inner=bool(cfg.sub_ln and cfg.get('sub_ln_attn', True)),
      class_token=bool(cfg.class_token),
      use_rot_pos_emb=bool(cfg.rope), rope_temperature=float(cfg.rope_theta),
      ref_feat_shape=(cfg.rope_ref_grid,) * 2 if cfg.rope and cfg.rope_ref_grid else None,
      use_fc_norm=use_fc_norm,
      use_post_transformer_norm=bool(cfg.final_norm) and not use_fc_norm,
      drop_path_rate=0.0,
  )
  if cfg.ln_eps != 1e-6:
    from timm.layers import LayerNorm
    kw['norm_layer'] = functools.partial(LayerNorm, eps=cfg.ln_eps)
  kw.update(overrides)
  return kw


# -------------------------------------------------------------------------------------------------
# expected torch names/shapes ('timm' names; official names are renamed to these on import)
def _dims(cfg):
  d, h = cfg.width, cfg.heads
  n = (cfg.image_size // cfg.patch_size) ** 2 + (1 if cfg.class_token else 0)
  return d, h, d // h, cfg.mlp_dim, n


def timm_shapes(cfg, *, fused: bool | None = None, packed: bool | None = None,
                mask_token: bool = False) -> dict[str, tuple]:
  """timm-named torch keys -> shapes for `cfg` (fused/packed default to what timm_kwargs builds)."""
  _check_supported(cfg)
  fused = _qkv_fused(cfg) if fused is None else fused
  packed = (cfg.swiglu and not cfg.sub_ln) if packed is None else packed
  d, _, _, f, n = _dims(cfg)
  p, c = cfg.patch_size, cfg.in_chans
  out = {'patch_embed.proj.weight': (d, c, p, p), 'patch_embed.proj.bias': (d,)}
  if cfg.class_token:
    out['cls_token'] = (1, 1, d)
  if mask_token and cfg.mask_token:
    out['mask_token'] = (1, 1, d)
  out['pos_embed'] = (1, n, d)
  bias = cfg.attn_bias == 'qv'
  for i in range(cfg.depth):
    b = f'blocks.{i}.'
    out[b + 'norm1.weight'] = out[b + 'norm1.bias'] = (d,)
    if fused:
      out[b + 'attn.qkv.weight'] = (3 * d, d)
      if bias:
        out[b + 'attn.q_bias'] = out[b + 'attn.v_bias'] = (d,)
    else:
      for z in 'qkv':
        out[b + f'attn.{z}_proj.weight'] = (d, d)
      if bias:
        out[b + 'attn.q_proj.bias'] = out[b + 'attn.v_proj.bias'] = (d,)
    if cfg.sub_ln and cfg.get('sub_ln_attn', True):
      out[b + 'attn.norm.weight'] = out[b + 'attn.norm.bias'] = (d,)
    out[b + 'attn.proj.weight'] = (d, d)
    out[b + 'attn.proj.bias'] = (d,)
    out[b + 'norm2.weight'] = out[b + 'norm2.bias'] = (d,)
    if cfg.swiglu and packed:
      out[b + 'mlp.fc1.weight'], out[b + 'mlp.fc1.bias'] = (2 * f, d), (2 * f,)
    elif cfg.swiglu:
      for g in ('fc1_g', 'fc1_x'):
        out[b + f'mlp.{g}.weight'], out[b + f'mlp.{g}.bias'] = (f, d), (f,)
    else:
      out[b + 'mlp.fc1.weight'], out[b + 'mlp.fc1.bias'] = (f, d), (f,)
    if cfg.sub_ln:
      out[b + 'mlp.norm.weight'] = out[b + 'mlp.norm.bias'] = (f,)
    out[b + 'mlp.fc2.weight'], out[b + 'mlp.fc2.bias'] = (d, f), (d,)
  if cfg.final_norm:
    out['norm.weight'] = out['norm.bias'] = (d,)
  return out


# -------------------------------------------------------------------------------------------------
# export
def _split_params(params_flat: Mapping[str, np.ndarray]):
  """(encoder params, head params) from an encoder, MIM or classifier flat dict."""
  if any(k.startswith('encoder/') for k in params_flat):
    enc = {k[len('encoder/'):]: v for k, v in params_flat.items() if k.startswith('encoder/')}
    rest = {k: v for k, v in params_flat.items() if not k.startswith('encoder/')}
  else:
    enc = {k: v for k, v in params_flat.items() if k.split('/')[0] not in _HEADS}
    rest = {k: v for k, v in params_flat.items() if k.split('/')[0] in _HEADS}
  return enc, rest


def heads_to_torch(head_params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our 'lm_head/kernel', 'fc_norm/scale', 'head/bias', ... -> torch 'lm_head.weight', ..."""
  out = {}
  for k, v in head_params.items():
    mod, _, leaf = k.partition('/')
    if mod not in _HEADS or leaf not in ('kernel', 'bias', 'scale'):
      raise ValueError(f'Unknown head parameter {k!r}; expected {"/".join(_HEADS)} params.')
    v = np.asarray(v)
    out[f'{mod}.{"bias" if leaf == "bias" else "weight"}'] = \
        np.ascontiguousarray(v.T) if leaf == 'kernel' else v
  return out


def extras_to_params(extras: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of heads_to_torch: torch 'head.weight' [out, in] -> our 'head/kernel' [in, out]."""
  out = {}
  for k, v in extras.items():
    mod, _, leaf = k.partition('.')
    if mod not in _HEADS or leaf not in ('weight', 'bias'):
      raise ValueError(f'Unknown head tensor {k!r}.')
    v = np.asarray(v)
    if leaf == 'bias':
      out[f'{mod}/bias'] = v
    elif v.ndim == 2:
      out[f'{mod}/kernel'] = np.ascontiguousarray(v.T)
    else:
      out[f'{mod}/scale'] = v
  return out


def to_torch_state_dict(params_flat: Mapping[str, np.ndarray], cfg, layout: str = 'timm',
                        extras: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Our flat params ('a/b/c' -> array, e.g. common.model_params_numpy(model)) -> torch state dict.

  Values are numpy arrays in torch order (make tensors with torch.from_numpy). `params_flat` may
  also be a MIM or classifier flat dict ('encoder/...', 'lm_head/...', 'fc_norm/...', 'head/...');
  head params and `extras` (torch-named arrays, passed through) are added. layout='timm' drops
  the mask token and refuses lm_head (timm's Eva has neither).
  """
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}.')
  _check_supported(cfg)
  enc, head_params = _split_params(params_flat)
  expected = _model_shapes(cfg)
  common.check_keys(expected, {k: np.shape(v) for k, v in enc.items()}, 'Parameters')
  p = {k: np.asarray(v) for k, v in enc.items()}
  d, h, hd, f, _ = _dims(cfg)
  fused, packed = _qkv_fused(cfg), cfg.swiglu and not cfg.sub_ln
  c = np.ascontiguousarray
  sd: dict[str, np.ndarray] = {
      'patch_embed.proj.weight': c(p['patch_kernel'].transpose(3, 2, 0, 1)),
      'patch_embed.proj.bias': p['patch_bias']}
  if cfg.class_token:
    sd['cls_token'] = p['cls_token'].reshape(1, 1, d)
  if cfg.mask_token and layout == 'eva':
    sd['mask_token'] = p['mask_token'].reshape(1, 1, d)
  sd['pos_embed'] = p['pos_embed'][None]
  L = 'blocks/layers/'
  has_bias = cfg.attn_bias == 'qv'
  for i in range(cfg.depth):
    b = f'blocks.{i}.'
    g = lambda k: p[L + k][i]  # noqa: E731
    sd[b + 'norm1.weight'], sd[b + 'norm1.bias'] = g('norm1/scale'), g('norm1/bias')
    qkv = g('attn/qkv')                                     # [D, 3, H, K]
    if fused:
      sd[b + 'attn.qkv.weight'] = c(qkv.transpose(1, 2, 3, 0).reshape(3 * d, d))
      if has_bias:
        sd[b + 'attn.q_bias'] = g('attn/q_bias').reshape(d)
        sd[b + 'attn.v_bias'] = g('attn/v_bias').reshape(d)
    else:
      for j, z in enumerate('qkv'):
        sd[b + f'attn.{z}_proj.weight'] = c(qkv[:, j].reshape(d, d).T)
      if has_bias:
        sd[b + 'attn.q_proj.bias'] = g('attn/q_bias').reshape(d)
        sd[b + 'attn.v_proj.bias'] = g('attn/v_bias').reshape(d)
    if cfg.sub_ln and cfg.get('sub_ln_attn', True):
      sd[b + 'attn.norm.weight'], sd[b + 'attn.norm.bias'] = g('attn/norm/scale'), g('attn/norm/bias')
    sd[b + 'attn.proj.weight'] = c(g('attn/proj').reshape(h * hd, d).T)
    sd[b + 'attn.proj.bias'] = g('attn/proj_bias')
    sd[b + 'norm2.weight'], sd[b + 'norm2.bias'] = g('norm2/scale'), g('norm2/bias')
    if cfg.swiglu and packed:
      sd[b + 'mlp.fc1.weight'] = c(np.concatenate([g('mlp/fc1_g/kernel').T, g('mlp/fc1_x/kernel').T]))
      sd[b + 'mlp.fc1.bias'] = np.concatenate([g('mlp/fc1_g/bias'), g('mlp/fc1_x/bias')])
    elif cfg.swiglu:
      for m in ('fc1_g', 'fc1_x'):
        sd[b + f'mlp.{m}.weight'] = c(g(f'mlp/{m}/kernel').T)
        sd[b + f'mlp.{m}.bias'] = g(f'mlp/{m}/bias')
    else:
      sd[b + 'mlp.fc1.weight'], sd[b + 'mlp.fc1.bias'] = c(g('mlp/fc1/kernel').T), g('mlp/fc1/bias')
    if cfg.sub_ln:
      sd[b + 'mlp.norm.weight'], sd[b + 'mlp.norm.bias'] = g('mlp/norm/scale'), g('mlp/norm/bias')
    sd[b + 'mlp.fc2.weight'], sd[b + 'mlp.fc2.bias'] = c(g('mlp/fc2/kernel').T), g('mlp/fc2/bias')
  if cfg.final_norm:
    sd['norm.weight'], sd['norm.bias'] = p['norm/scale'], p['norm/bias']
  if layout == 'eva':
    sd = {_timm_to_official(k, cfg): v for k, v in sd.items()}
  heads = heads_to_torch(head_params)
  heads.update({k: np.asarray(v) for k, v in (extras or {}).items()})
  if layout == 'timm' and any(k.startswith('lm_head.') for k in heads):
    raise ValueError("timm's Eva has no lm_head; export MIM heads with layout='eva'.")
  clash = sorted(set(heads) & set(sd))
  if clash:
    raise ValueError(f'extras overwrite encoder tensors: {clash}')
  sd.update(heads)
  return {k: c(v) for k, v in sd.items()}


def _timm_to_official(k: str, cfg) -> str:
  """timm block names -> official EVA-01/EVA-02 names."""
  m = re.match(r'(blocks\.\d+\.)(.*)', k)
  if not m:
    return k
  b, rest = m.groups()
  rest = {'attn.q_proj.bias': 'attn.q_bias', 'attn.v_proj.bias': 'attn.v_bias',
          'attn.norm.weight': 'attn.inner_attn_ln.weight', 'attn.norm.bias': 'attn.inner_attn_ln.bias',
          'mlp.norm.weight': 'mlp.ffn_ln.weight', 'mlp.norm.bias': 'mlp.ffn_ln.bias'}.get(rest, rest)
  if cfg.swiglu:
    rest = re.sub(r'^mlp\.(fc1_g|fc1_x|fc1|fc2)\.',
                  lambda mm: {'fc1_g': 'mlp.w1.', 'fc1_x': 'mlp.w2.', 'fc1': 'mlp.w12.',
                              'fc2': 'mlp.w3.'}[mm.group(1)], rest)
  return b + rest


# -------------------------------------------------------------------------------------------------
# import
class _Source(Mapping):
  """Uniform view of a state dict: unwrapped, 'module.' stripped, values as numpy on access."""

  def __init__(self, source: Mapping, weights: str = 'auto'):
    if not isinstance(source, common.TensorSource):   # a TensorSource chose when it read the file
      source = common.unwrap_state_dict(source, weights, 'state dict')
    self._src = source
    self._orig = {}
    for k in source.keys():
      if not isinstance(k, str):
        continue
      self._orig[k[len('module.'):] if k.startswith('module.') else k] = k

  def shape(self, k: str) -> tuple[int, ...]:
    if isinstance(self._src, common.TensorSource):
      return tuple(self._src.shape(self._orig[k]))
    v = self._src[self._orig[k]]
    return tuple(v.shape) if hasattr(v, 'shape') else ()

  def __getitem__(self, k: str) -> np.ndarray:
    v = self._src[self._orig[k]]
    if type(v).__module__.startswith('torch'):
      v = common._to_numpy(v)
    return np.asarray(v)

  def __iter__(self) -> Iterator[str]:
    return iter(self._orig)

  def __len__(self) -> int:
    return len(self._orig)


def _is_rope_buffer(k: str) -> bool:
  return 'rope.' in k or k.startswith('rope')


def detect_layout(keys) -> str:
  """'eva' (official release names or a MIM checkpoint) or 'timm'."""
  keys = set(keys)
  official = ('mask_token' in keys or any(k.startswith('lm_head.') for k in keys) or any(
      re.search(r'\.(mlp\.(w1|w2|w3|w12|ffn_ln)|attn\.inner_attn_ln)\.', k)
      or (k.endswith(('attn.q_bias', 'attn.v_bias')) and k.replace('q_bias', 'q_proj.weight')
          .replace('v_bias', 'v_proj.weight') in keys) for k in keys))
  return 'eva' if official else 'timm'


def _canonical_names(keys) -> dict[str, str]:
  """Official names -> timm names (the renames of timm's checkpoint_filter_fn); canonical -> orig."""
  keys = list(keys)
  no_qkv = 'blocks.0.attn.q_proj.weight' in keys
  out = {}
  for k in keys:
    n = k.replace('mlp.ffn_ln', 'mlp.norm').replace('attn.inner_attn_ln', 'attn.norm')
    n = n.replace('mlp.w12', 'mlp.fc1').replace('mlp.w1', 'mlp.fc1_g').replace('mlp.w2', 'mlp.fc1_x')
    n = n.replace('mlp.w3', 'mlp.fc2')
    if no_qkv:
      n = n.replace('attn.q_bias', 'attn.q_proj.bias').replace('attn.v_bias', 'attn.v_proj.bias')
    if n in out:
      raise CheckpointError(f'Checkpoint has both {out[n]!r} and {k!r} for {n!r}.')
    out[n] = k
  return out


def _not_eva_error(keys) -> CheckpointError:
  keys = sorted(keys)
  hint = ''
  if any(k.startswith(('vision_model.', 'text_model.', 'visual.', 'conv1.', 'transformer.resblocks',
                       'visual_projection')) or k in ('class_embedding', 'positional_embedding')
         for k in keys):
    hint = ('It looks like a CLIP checkpoint (HF CLIPVisionModel / OpenAI / open_clip): CLIP '
            'towers are teachers here; import them with the CLIP teacher converter. ')
  return CheckpointError(
      'Not an EVA encoder checkpoint (timm Eva or official EVA): no patch_embed.proj.weight. '
      + hint + f'First keys: {", ".join(keys[:8])}')


def infer_config(shapes: Mapping[str, tuple], facts: Mapping) -> ml_collections.ConfigDict:
  """Encoder config from timm-named shapes plus the resolved `facts` (FACT_FIELDS: heads, rope,
  rope_theta, rope_ref_grid, ln_eps; see resolve_facts). Raises CheckpointError for shapes that
  are no EVA encoder."""
  pw = shapes['patch_embed.proj.weight']
  if len(pw) != 4 or pw[2] != pw[3]:
    raise CheckpointError(f'patch_embed.proj.weight has shape {pw}; expected [D, C, P, P].')
  d, in_chans, p = pw[0], pw[1], pw[2]
  block_ids = {int(m.group(1)) for k in shapes if (m := re.match(r'blocks\.(\d+)\.', k))}
  if not block_ids:
    raise CheckpointError('Checkpoint has no blocks.{i}.* tensors.')
  depth = max(block_ids) + 1
  class_token = 'cls_token' in shapes
  n = shapes['pos_embed'][1] - (1 if class_token else 0) if 'pos_embed' in shapes else 0
  g = math.isqrt(n)
  if g * g != n or n == 0:
    raise CheckpointError(f'pos_embed {shapes.get("pos_embed")} is not a square grid (+cls).')
  b = 'blocks.0.'
  if b + 'mlp.fc2.weight' not in shapes:
    raise CheckpointError('Checkpoint has no blocks.0.mlp.fc2.weight (nor official mlp.w3).')
  f = shapes[b + 'mlp.fc2.weight'][1]
  swiglu = b + 'mlp.fc1_g.weight' in shapes or (
      b + 'mlp.fc1.weight' in shapes and shapes[b + 'mlp.fc1.weight'][0] == 2 * f)
  sub_ln = b + 'mlp.norm.weight' in shapes
  sub_ln_attn = b + 'attn.norm.weight' in shapes
  if sub_ln_attn and not sub_ln:
    raise CheckpointError('Checkpoint has attn.norm (inner_attn_ln) without mlp.norm (ffn_ln); '
                          'our encoder has no such variant.')
  heads = int(facts['heads'])
  if heads <= 0 or d % heads:
    raise CheckpointError(f'heads={heads} does not divide the width {d}.')
  cfg = config_lib._base(d, depth, heads, f, p)
  cfg.name = 'custom'
  cfg.image_size = g * p
  cfg.in_chans = in_chans
  cfg.class_token = class_token
  cfg.mask_token = 'mask_token' in shapes
  cfg.final_norm = 'norm.weight' in shapes
  has_q = b + 'attn.q_bias' in shapes or b + 'attn.q_proj.bias' in shapes
  cfg.attn_bias = 'qv' if has_q else 'none'
  cfg.swiglu, cfg.sub_ln, cfg.sub_ln_attn = swiglu, sub_ln, sub_ln_attn or not sub_ln
  cfg.ln_eps = float(facts['ln_eps'])
  cfg.rope = bool(facts['rope'])
  if cfg.rope:
    cfg.rope_theta = float(facts['rope_theta'])
    cfg.rope_ref_grid = int(facts['rope_ref_grid'])
  if swiglu or cfg.rope:
    cfg.init = 'eva02'
  fields = ('width', 'depth', 'heads', 'mlp_dim', 'patch_size', 'swiglu', 'sub_ln', 'rope')
  for name in config_lib.ENCODER_NAMES:
    ref = config_lib.encoder_config(name)
    if all(ref[k] == cfg[k] for k in fields) and (
        not sub_ln or ref.get('sub_ln_attn', True) == cfg.sub_ln_attn):
      cfg.name = name
      cfg.init, cfg.init_std = ref.init, ref.init_std
      break
  config_lib.validate(cfg)
  return cfg


def _shape_config(shapes: Mapping[str, tuple]) -> ml_collections.ConfigDict:
  """A config with the checkpoint's shapes, for checking key names/shapes only: heads=1, no RoPE
  are placeholders (key names and shapes do not depend on them), never used to build a model."""
  return infer_config(shapes, dict(heads=1, rope=False, rope_theta=1e4, rope_ref_grid=0,
                                   ln_eps=_LN_EPS))


def timm_kwargs_record(path: str) -> tuple[dict, str] | None:
  """(timm Eva kwargs, json path) written next to a weights file by eva_jax.export (FILE.json), or
  None. Raises CheckpointError for an unreadable one (ignoring it would turn a record into a guess)."""
  f = path + '.json'
  kw = common.read_json_record(f)
  if kw is None:
    return None
  if not isinstance(kw, dict) or 'embed_dim' not in kw:
    raise CheckpointError(f'{f} is not a timm Eva kwargs json (no embed_dim); fix or remove it.')
  return kw, f


def _rope_record(src: '_Source', rope_keys: list[str], width: int, grid: int) -> dict[str, tuple]:
  """Facts the official EVA-02 RoPE buffer records: head dim, RoPE on, theta and reference grid.

  The buffer is rope_sincos's cos table; theta and the reference grid are read from it (the
  first band has frequency 1: row (y=1, x=0) holds cos(ref/grid)) and the whole table is then
  compared with the one they imply, so a buffer we cannot explain is refused, not half-read."""
  from eva_jax.models.layers import rope_sincos
  cos_keys = sorted(k for k in rope_keys if k.endswith('freqs_cos'))
  if not cos_keys:
    return {}
  key = 'rope.freqs_cos' if 'rope.freqs_cos' in cos_keys else cos_keys[0]
  table = np.asarray(src[key], np.float64)
  n, head_dim = table.shape[-2], table.shape[-1]
  what = f'RoPE buffer {key} {tuple(table.shape)}'
  if n != grid * grid or head_dim % 4 or width % head_dim:
    raise CheckpointError(f'{what} does not fit the patch grid {grid}x{grid} and width {width}.')
  src_name = f'the checkpoint\'s {key}'
  rec = {'heads': (width // head_dim, f'{src_name} (head dim {head_dim})'),
         'rope': (True, src_name)}
  if grid > 1:
    nb = head_dim // 4
    row = table[grid, 0:2 * nb:2]              # y=1, x=0: cos(ref / grid * band_i), i < nb
    thetas = [1e4]
    # Another base: two neighbouring bands whose angles are well inside (0, pi) (arccos exact
    # there, float32 cos too coarse near 0) give theta = (angle_i / angle_i+1) ** nb.
    ang = np.arccos(np.clip(row, -1, 1))
    for i in range(nb - 1):
      if 0.2 < ang[i + 1] < ang[i] < 3.0:
        thetas.append(float(f'{(ang[i] / ang[i + 1]) ** nb:.4g}'))   # float32 table: ~4 digits
    thetas = list(dict.fromkeys(thetas))
    refs = np.arange(1, 1025, dtype=np.float64)
    for theta in thetas:
      bands = 1.0 / theta ** (np.arange(nb) / nb)
      err = np.abs(np.cos(refs[:, None] / grid * bands[None]) - row[None]).max(1)
      ref_grid = int(refs[int(np.argmin(err))])
      # ref == grid gives the same table as "own grid" (0) here; the official code always scales
      # to its pt_seq_len (the reference), so the reference it was built with is what we keep.
      _, cos = rope_sincos((grid, grid), head_dim, theta, ref_grid)
      if np.abs(cos - table).max() < 1e-4:
        rec['rope_theta'] = (theta, f'{src_name} (verified)')
        rec['rope_ref_grid'] = (ref_grid, f'{src_name} (verified)')
        return rec
    raise CheckpointError(f'{what} is no 2D axial RoPE table eva_jax can reproduce (tried theta '
                          f'{thetas}, reference grids 1..1024); pass cfg= with the encoder config.')
  return rec


def resolve_facts(recorded: Mapping[str, tuple], given: Mapping, what: str) -> dict[str, tuple]:
  """FACT_FIELDS -> (value, source): the file's record, else the explicit value, else an error.

  An explicit value that contradicts the record raises CheckpointError naming both. rope_theta /
  rope_ref_grid are needed only with RoPE; ln_eps alone falls back to 1e-6 (logged)."""
  out: dict[str, tuple] = {}
  missing = []
  for field in FACT_FIELDS:
    g, r = given.get(field), recorded.get(field)
    if field in ('rope_theta', 'rope_ref_grid') and not (out.get('rope') or (False,))[0]:
      out[field] = (0 if field == 'rope_ref_grid' else 1e4, 'unused without RoPE')
      continue
    if r is not None and g is not None:
      if r[0] != g and not (isinstance(g, float) and abs(r[0] - g) <= 1e-9 * abs(g)):
        # The given facts come from facts= or, in a training run, from the run's model config.
        raise CheckpointError(f'{what}: {field}={g!r} (from the run\'s model config, or facts=) '
                              f'contradicts {r[1]}, which says {r[0]!r}. Choose the model that '
                              'matches the file (config.model.name, for EVA-CLIP also '
                              f'config.vision.{field}), or drop {field} from facts=.')
      out[field] = (g, f'the explicit {field} (agrees with {r[1]})')
    elif g is not None:
      out[field] = (g, f'the explicit {field}')
    elif r is not None:
      out[field] = r
    elif field == 'ln_eps':
      out[field] = (_LN_EPS, 'not recorded in the file: 1e-6, the eps of every timm Eva and '
                    'official EVA model')
    else:
      missing.append(field)
  if missing:
    help_ = {'heads': f'the number of attention heads (released: {_RELEASED_HEADS})',
             'rope': 'whether the encoder uses 2D RoPE (EVA-02: True, EVA-01: False)',
             'rope_theta': 'the RoPE base (EVA-02: 10000.0)',
             'rope_ref_grid': 'the grid RoPE coordinates are defined on (EVA-02: 16 = 224 / 14)'}
    raise CheckpointError(
        f'{what} does not record ' + ', '.join(missing) + '; eva_jax will not guess. Give them: '
        'facts={' + ', '.join(f"'{m}': ..." for m in missing) + '} (or heads=, or a whole cfg=; '
        'fine-tuning takes them from the fine-tuning config\'s model). '
        + ' '.join(f'{m}: {help_[m]}.' for m in missing)
        + ' From a command line, keep the record next to the weights: FILE.json, the timm Eva '
        'kwargs that eva-export writes, e.g. {"embed_dim": 768, "num_heads": 12, '
        '"use_rot_pos_emb": true, "rope_temperature": 10000.0, "ref_feat_shape": [16, 16]}.')
  return out


def _from_timm(src: _Source, canon: dict[str, str], cfg, fused: bool, packed: bool):
  """our key -> loader of the stacked array, from canonical (timm) names."""
  d, h, hd, f, _ = _dims(cfg)
  get = lambda n: src[canon[n]]  # noqa: E731
  L = cfg.depth

  def stack(fn):
    return lambda: np.stack([fn(f'blocks.{i}.') for i in range(L)])

  def qkv(b):
    if fused:
      return get(b + 'attn.qkv.weight').reshape(3, h, hd, d).transpose(3, 0, 1, 2)
    return np.stack([get(b + f'attn.{z}_proj.weight').T.reshape(d, h, hd) for z in 'qkv'], 1)

  qb = 'attn.q_bias' if fused else 'attn.q_proj.bias'
  vb = 'attn.v_bias' if fused else 'attn.v_proj.bias'
  loaders = {
      'patch_kernel': lambda: get('patch_embed.proj.weight').transpose(2, 3, 1, 0),
      'patch_bias': lambda: get('patch_embed.proj.bias'),
      'pos_embed': lambda: get('pos_embed').reshape(-1, d),
      'blocks/layers/attn/qkv': stack(qkv),
      'blocks/layers/attn/q_bias': stack(lambda b: get(b + qb).reshape(h, hd)),
      'blocks/layers/attn/v_bias': stack(lambda b: get(b + vb).reshape(h, hd)),
      'blocks/layers/attn/proj': stack(lambda b: get(b + 'attn.proj.weight').T.reshape(h, hd, d)),
      'blocks/layers/attn/proj_bias': stack(lambda b: get(b + 'attn.proj.bias')),
      'blocks/layers/mlp/fc2/kernel': stack(lambda b: get(b + 'mlp.fc2.weight').T),
      'blocks/layers/mlp/fc2/bias': stack(lambda b: get(b + 'mlp.fc2.bias')),
  }
  for tok in ('cls_token', 'mask_token'):
    loaders[tok] = (lambda t: lambda: get(t).reshape(d))(tok)
  for ours, theirs in (('norm1', 'norm1'), ('norm2', 'norm2'), ('attn/norm', 'attn.norm'),
                       ('mlp/norm', 'mlp.norm')):
    loaders[f'blocks/layers/{ours}/scale'] = stack(lambda b, t=theirs: get(f'{b}{t}.weight'))
    loaders[f'blocks/layers/{ours}/bias'] = stack(lambda b, t=theirs: get(f'{b}{t}.bias'))
  loaders['norm/scale'] = lambda: get('norm.weight')
  loaders['norm/bias'] = lambda: get('norm.bias')
  if cfg.swiglu and packed:
    for j, m in enumerate(('fc1_g', 'fc1_x')):
      loaders[f'blocks/layers/mlp/{m}/kernel'] = stack(
          lambda b, j=j: get(b + 'mlp.fc1.weight')[j * f:(j + 1) * f].T)
      loaders[f'blocks/layers/mlp/{m}/bias'] = stack(
          lambda b, j=j: get(b + 'mlp.fc1.bias')[j * f:(j + 1) * f])
  else:
    for m in ('fc1', 'fc1_g', 'fc1_x'):
      loaders[f'blocks/layers/mlp/{m}/kernel'] = stack(lambda b, m=m: get(f'{b}mlp.{m}.weight').T)
      loaders[f'blocks/layers/mlp/{m}/bias'] = stack(lambda b, m=m: get(f'{b}mlp.{m}.bias'))
  return loaders


def _recorded_facts(source, src: _Source, rope_keys: list[str], shape_cfg, record, what: str):
  """FACT_FIELDS -> (value, source) for what the checkpoint records (see the module docstring)."""
  rec: dict[str, tuple] = {}
  name = 'the given timm kwargs'
  if record is None and isinstance(source, common.TensorSource) and len(source._files) == 1:
    found = timm_kwargs_record(source._files[0])
    if found is not None:
      record, name = found[0], os.path.basename(found[1])
  if record is not None:
    for k, v in (('embed_dim', shape_cfg.width), ('depth', shape_cfg.depth)):
      if k in record and record[k] != v:
        raise CheckpointError(f'{what}: {name} says {k}={record[k]} but the weights have {v}; '
                              'the json belongs to another model. Fix or remove it.')
    if 'num_heads' in record:
      rec['heads'] = (int(record['num_heads']), f'{name} num_heads')
    rope = bool(record.get('use_rot_pos_emb', False))   # timm Eva's defaults where absent
    rec['rope'] = (rope, f'{name} use_rot_pos_emb')
    if rope:
      rec['rope_theta'] = (float(record.get('rope_temperature', 10000.0)),
                           f'{name} rope_temperature')
      ref = record.get('ref_feat_shape')
      if ref is not None and (len(ref) != 2 or ref[0] != ref[1]):
        raise CheckpointError(f'{what}: {name} ref_feat_shape={ref}; only square grids are supported.')
      rec['rope_ref_grid'] = (int(ref[0]) if ref else 0, f'{name} ref_feat_shape')
    if 'norm_layer' not in record:
      rec['ln_eps'] = (_LN_EPS, f"{name} (no norm_layer: timm's LayerNorm eps)")
  grid = shape_cfg.image_size // shape_cfg.patch_size
  for field, v in _rope_record(src, rope_keys, shape_cfg.width, grid).items():
    if field in rec and rec[field][0] != v[0]:
      raise CheckpointError(f'{what}: {rec[field][1]} says {field}={rec[field][0]!r} but '
                            f'{v[1]} says {v[0]!r}.')
    rec.setdefault(field, v)
  return rec


def from_torch_state_dict(source: Mapping, cfg=None, *, heads: int | None = None,
                          facts: Mapping | None = None, record: Mapping | None = None,
                          weights: str = 'auto'):
  """Imports a timm `Eva` or official EVA-01/EVA-02 state dict. Returns (cfg, model, extras).

  source: a Mapping name -> tensor/array (common.TensorSource, a torch state dict, a dict of numpy
          arrays), possibly wrapped as {'model': ...}. Layout is detected from the names.
  cfg:    the encoder config to build (explicit: every fact given); None infers it from the
          shapes plus the facts the shapes do not hold (FACT_FIELDS), from the file's record or
          `facts` / `heads` (explicit), else CheckpointError naming the missing ones.
  facts:  explicit {'heads', 'rope', 'rope_theta', 'rope_ref_grid', 'ln_eps'} (any subset);
          `heads=` is a shorthand for facts={'heads': ...}. Contradicting the record is an error.
  record: timm Eva kwargs recorded with the weights; default: FILE.json next to a TensorSource's
          single file (eva_jax.export writes it). Names and shapes are checked strictly against it: missing or unexpected
          tensors raise CheckpointError listing them (e.g. a timm backbone has no mask_token: pass a
          cfg with mask_token=False, or cfg=None).
  weights: raw or EMA weights of an in-memory training checkpoint ('auto', 'model', 'model_ema';
          see common.unwrap_state_dict); a TensorSource was given its choice when it read the file.
  extras: the torch-named tensors that are not encoder parameters (lm_head.*, fc_norm.*, head.*),
          as numpy arrays; extras_to_params converts them to our naming.
  """
  src = _Source(source, weights)
  keys = list(src)
  if 'patch_embed.proj.weight' not in keys:
    raise _not_eva_error(keys)
  layout = detect_layout(keys)
  extras_keys = [k for k in keys if k.startswith(EXTRA_PREFIXES)]
  rope_keys = [k for k in keys if _is_rope_buffer(k)]
  canon = _canonical_names(k for k in keys if k not in extras_keys and k not in rope_keys)
  shapes = {n: src.shape(o) for n, o in canon.items()}
  given = dict(facts or {})
  unknown = sorted(set(given) - set(FACT_FIELDS))
  if unknown:
    raise ValueError(f'facts has unknown fields {unknown}; known: {FACT_FIELDS}.')
  if heads:
    if given.get('heads') not in (None, heads):
      raise ValueError(f'heads={heads} contradicts facts["heads"]={given["heads"]}.')
    given['heads'] = heads
  given = {k: v for k, v in given.items() if v is not None and v != ''}
  cfg_given = False
  if cfg is None:
    shape_cfg = _shape_config(shapes)    # key names/shapes first: a wrong file says so first
    common.check_keys(timm_shapes(shape_cfg, fused='blocks.0.attn.qkv.weight' in shapes,
                                  packed=bool(shape_cfg.swiglu) and 'blocks.0.mlp.fc1.weight' in shapes,
                                  mask_token=True), shapes,
                      f'{"Official EVA" if layout == "eva" else "timm Eva"} checkpoint')
    what = f'{"Official EVA" if layout == "eva" else "timm Eva"} checkpoint' + (
        f' {source.path!r}' if isinstance(source, common.TensorSource) else '')
    recorded = _recorded_facts(source, src, rope_keys, shape_cfg, record, what)
    resolved = resolve_facts(recorded, given, what)
    cfg = infer_config(shapes, {k: v for k, (v, _) in resolved.items()})
    for field in FACT_FIELDS:
      value, from_ = resolved[field]
      if from_ != 'unused without RoPE':
        logging.log(logging.WARNING if from_.startswith('not recorded') else logging.INFO,
                    '%s: %s=%s from %s.', what, field, value, from_)
  else:
    cfg_given = True
    cfg = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg))
    for field, v in given.items():
      if cfg[field] != v:
        raise ValueError(f'{field}={v!r} contradicts cfg.{field}={cfg[field]!r}.')
    config_lib.validate(cfg)
  _check_supported(cfg)
  fused = 'blocks.0.attn.qkv.weight' in shapes
  packed = bool(cfg.swiglu) and 'blocks.0.mlp.fc1.weight' in shapes
  expected = timm_shapes(cfg, fused=fused, packed=packed, mask_token=True)
  kind = ('Official EVA checkpoint (names shown as timm names)' if layout == 'eva'
          else 'timm Eva checkpoint')
  what = (f'{kind} for encoder {cfg.name!r} (width {cfg.width}, depth {cfg.depth}, '
          f'mlp {cfg.mlp_dim}, patch {cfg.patch_size}, image {cfg.image_size}, '
          f'swiglu={cfg.swiglu}, sub_ln={cfg.sub_ln}, mask_token={cfg.mask_token})')
  try:
    common.check_keys(expected, shapes, what)
  except CheckpointError as e:
    try:  # say what the checkpoint is, when it is a well-formed EVA checkpoint of another size
      c = _shape_config(shapes)
      looks = (f'\nThe checkpoint looks like: width {c.width}, depth {c.depth}, mlp {c.mlp_dim}, '
               f'patch {c.patch_size}, image {c.image_size}, swiglu={c.swiglu}, sub_ln={c.sub_ln}, '
               f'mask_token={c.mask_token}, final_norm={c.final_norm} (pass cfg=None to infer it).')
    except Exception:  # noqa: BLE001 - only a hint
      looks = ''
    raise CheckpointError(str(e) + looks) from None
  if cfg_given:   # an explicit cfg must agree with what the file records, like any explicit fact
    rec = _recorded_facts(source, src, rope_keys, _shape_config(shapes), record, what)
    for field, (v, from_) in rec.items():
      if field.startswith('rope_') and not cfg.rope:
        continue
      if cfg[field] != v:
        raise CheckpointError(f'{what}: cfg.{field}={cfg[field]!r} contradicts {from_}, which says '
                              f'{v!r}. Fix the config (or the file).')
  loaders = _from_timm(src, canon, cfg, fused, packed)
  ours = _model_shapes(cfg)
  unknown = sorted(set(ours) - set(loaders))
  if unknown:  # a model parameter this converter does not know: fail, never guess
    raise CheckpointError(f'No torch conversion for parameters {unknown}.')
  model = common.model_from_params(cfg, ours, lambda k: loaders[k](), what)
  extras = {k: src[k] for k in extras_keys}
  return cfg, model, extras
