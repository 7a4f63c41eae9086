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
tensors (`lm_head.*`, `fc_norm.*`, `head.*`) separately. torch is never imported here at module
level; numpy arrays go in and out.
"""
from __future__ import annotations

import functools
import json
import math
import re
import warnings
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
# Heads of the released EVA widths (head count is not visible in the weights).
_HEADS_BY_WIDTH = {64: 4, 192: 3, 384: 6, 768: 12, 1024: 16, 1408: 16, 1792: 16}


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


def infer_config(shapes: Mapping[str, tuple], *, heads: int | None = None,
                 head_dim: int | None = None) -> ml_collections.ConfigDict:
  """Encoder config from timm-named shapes. Not in the weights: the head count (from `heads`,
  `head_dim` (official RoPE buffers) or the released EVA widths), RoPE (assumed with SwiGLU, as in
  every EVA-02, reference grid 16 = 224/14) and LayerNorm eps (1e-6)."""
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
  f = shapes[b + 'mlp.fc2.weight'][1]
  swiglu = b + 'mlp.fc1_g.weight' in shapes or (
      b + 'mlp.fc1.weight' in shapes and shapes[b + 'mlp.fc1.weight'][0] == 2 * f)
  sub_ln = b + 'mlp.norm.weight' in shapes
  sub_ln_attn = b + 'attn.norm.weight' in shapes
  if sub_ln_attn and not sub_ln:
    raise CheckpointError('Checkpoint has attn.norm (inner_attn_ln) without mlp.norm (ffn_ln); '
                          'our encoder has no such variant.')
  if heads is None and head_dim:
    heads = d // head_dim
  if heads is None:
    heads = _HEADS_BY_WIDTH.get(d) or (d // 64 if d % 64 == 0 else None)
    if heads is None:
      raise CheckpointError(f'Cannot infer the head count of width {d}; pass heads= or cfg=.')
    if d not in _HEADS_BY_WIDTH:
      warnings.warn(f'Head count of width {d} not in the weights; assuming head dim 64 '
                    f'({heads} heads). Pass heads= or cfg= if that is wrong.')
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
  if swiglu or head_dim:
    cfg.rope = True
    cfg.rope_ref_grid = 16
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


def from_torch_state_dict(source: Mapping, cfg=None, *, heads: int | None = None,
                          weights: str = 'auto'):
  """Imports a timm `Eva` or official EVA-01/EVA-02 state dict. Returns (cfg, model, extras).

  source: a Mapping name -> tensor/array (common.TensorSource, a torch state dict, a dict of numpy
          arrays), possibly wrapped as {'model': ...}. Layout is detected from the names.
  cfg:    the encoder config to build; None infers it from the shapes (see infer_config; `heads`
          helps there). Names and shapes are checked strictly against it: missing or unexpected
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
  if cfg is None:
    cos = [k for k in rope_keys if k.endswith('freqs_cos')]  # official EVA-02: [N, head_dim]
    head_dim = src.shape(cos[0])[-1] if cos else None
    cfg = infer_config(shapes, heads=heads, head_dim=head_dim)
  else:
    cfg = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg))
    if heads is not None and heads != cfg.heads:
      raise ValueError(f'heads={heads} contradicts cfg.heads={cfg.heads}.')
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
      c = infer_config(shapes, heads=heads)
      looks = (f'\nThe checkpoint looks like: width {c.width}, depth {c.depth}, mlp {c.mlp_dim}, '
               f'patch {c.patch_size}, image {c.image_size}, swiglu={c.swiglu}, sub_ln={c.sub_ln}, '
               f'mask_token={c.mask_token}, final_norm={c.final_norm} (pass cfg=None to infer it).')
    except Exception:  # noqa: BLE001 - only a hint
      looks = ''
    raise CheckpointError(str(e) + looks) from None
  loaders = _from_timm(src, canon, cfg, fused, packed)
  ours = _model_shapes(cfg)
  unknown = sorted(set(ours) - set(loaders))
  if unknown:  # a model parameter this converter does not know: fail, never guess
    raise CheckpointError(f'No torch conversion for parameters {unknown}.')
  model = common.model_from_params(cfg, ours, lambda k: loaders[k](), what)
  extras = {k: src[k] for k in extras_keys}
  return cfg, model, extras
