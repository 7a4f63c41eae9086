"""Import transformers SigLIP and DINOv2 vision towers as teachers (families 'siglip', 'dinov2').

Targets (VisionTransformer.targets): the patch tokens after the tower's final norm, no projection
(out_dim = width):
- SigLIP / fixed-resolution SigLIP2 (`SiglipVisionModel`, `SiglipModel`): `last_hidden_state`, which
  transformers returns after `post_layernorm`; SigLIP has no class token, so every token is a patch
  token. The MAP head (`head.*`: probe, attention, layernorm, mlp) pools ONE vector per image from
  those tokens and takes no part in per-patch targets, so it is not built (its keys are counted and
  logged). Per-patch features through the MAP head do not exist.
- DINOv2 (`Dinov2Model`, `Dinov2WithRegistersModel`, the backbone of `Dinov2For*` under `dinov2.`):
  `last_hidden_state[:, 1 + registers:]` (after `layernorm`): cls and register tokens dropped.
  Layer scale (`layer_scale{1,2}.lambda1`), registers (after cls, no position embedding) and the
  SwiGLU MLP of ViT-g are read from the shapes. Position embeddings at another grid are resized as
  transformers does: bicubic without antialias for Dinov2Model, with antialias for
  Dinov2WithRegistersModel (the class with register tokens). The official DINOv2 code resizes with
  a scale factor and an offset of 0.1 instead; parity here is with transformers.
  `embeddings.mask_token` (DINOv2's iBOT mask token) is not used by a teacher: counted and logged.

Files: save_pretrained directories (safetensors or bin, sharded or not) or their weights file, with
the key names transformers writes (hub names: DINOv2 `attention.attention.{query,key,value}`,
`attention.output.dense`, `mlp.{fc1,fc2}` or `mlp.{weights_in,weights_out}`; the names of the
in-memory transformers 5 modules, `attention.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, are read
too). Prefixes: none, `vision_model.` (SiglipModel, transformers 4 SiglipVisionModel), `dinov2.`.
A text tower (SiglipModel: text_model.*, logit_scale, logit_bias) is counted, ignored and logged.

Refused, with what to use instead: SigLIP2 NaFlex (`Siglip2VisionModel` / `Siglip2Model`,
model_type 'siglip2*': variable-resolution, variable-aspect patch sequences through a Linear patch
embedding, its position embedding resized bilinearly per image to each image's patch grid). The
fixed-resolution SigLIP2 checkpoints (google/siglip2-*-patch16-224 ... -512, model_type 'siglip')
are SigLIP towers and load here (`SiglipVisionModel`).

Never guessed (issue 12 kind A): the activation and head count come from config.json
(`hidden_act`, `num_attention_heads`, `layer_norm_eps`; a key it leaves out means the transformers
config class's default, as transformers reads it), else from config.teacher.arch (a named
architecture the shapes must match) or config.teacher.act / config.teacher.heads; else refused.
"""
from __future__ import annotations

import logging
import math
import os
import re

import numpy as np

from eva_jax.convert import common
from eva_jax.convert.common import CheckpointError
from eva_jax.models import config as config_lib

__all__ = ['load_hf_vision']

_ACTS = {'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh',
         'quick_gelu': 'quick_gelu'}
# transformers config defaults (SiglipVisionConfig, Dinov2Config): what a missing key means.
_DEFAULTS = {'siglip': {'hidden_act': 'gelu_pytorch_tanh', 'num_attention_heads': 12,
                        'layer_norm_eps': 1e-6},
             'dinov2': {'hidden_act': 'gelu', 'num_attention_heads': 12, 'layer_norm_eps': 1e-6}}
_PATCH = {'siglip': 'embeddings.patch_embedding.weight',
          'dinov2': 'embeddings.patch_embeddings.projection.weight'}
_PREFIXES = {'siglip': ('', 'vision_model.'), 'dinov2': ('', 'dinov2.')}

# canonical block part -> candidate checkpoint names (first found wins), per family
_BLOCK = {
    'siglip': dict(norm1='layer_norm1', norm2='layer_norm2', q='self_attn.q_proj',
                   k='self_attn.k_proj', v='self_attn.v_proj', o='self_attn.out_proj',
                   fc1='mlp.fc1', fc2='mlp.fc2'),
    'dinov2': dict(norm1='norm1', norm2='norm2', q=('attention.attention.query', 'attention.q_proj'),
                   k=('attention.attention.key', 'attention.k_proj'),
                   v=('attention.attention.value', 'attention.v_proj'),
                   o=('attention.output.dense', 'attention.o_proj'),
                   fc1='mlp.fc1', fc2=('mlp.fc2', 'mlp.weights_out', 'mlp.down_proj'),
                   w12='mlp.weights_in', gate='mlp.gate_proj', up='mlp.up_proj',
                   ls1='layer_scale1.lambda1', ls2='layer_scale2.lambda1'),
}
_BLOCK_RE = {'siglip': r'encoder\.layers\.(\d+)\.', 'dinov2': r'encoder\.layer\.(\d+)\.'}


def _config_json(path: str, family: str) -> tuple[dict, str] | None:
  f = common.beside(path, 'config.json')
  c = common.read_json_record(f)
  if c is None:
    return None
  if not isinstance(c, dict):
    raise CheckpointError(f'{f} is not a transformers config; fix or remove it.')
  if isinstance(c.get('vision_config'), dict):
    c = c['vision_config']
  mt = str(c.get('model_type', ''))
  if family == 'siglip' and mt.startswith('siglip2'):
    raise CheckpointError(_naflex_refusal(f'{f} has model_type={mt!r}'))
  if mt and not mt.startswith(family):
    raise CheckpointError(f'{f} has model_type={mt!r}, not a {family} model: set '
                          'config.teacher.family to the checkpoint\'s family.')
  return c, f


def _naflex_refusal(why: str) -> str:
  return (f'{why}: a SigLIP2 NaFlex tower (transformers Siglip2VisionModel: variable-resolution '
          'patches, Linear patch embedding, position embedding resized per image), which eva_jax '
          'does not read as a teacher. Use a fixed-resolution SigLIP2 checkpoint '
          "(google/siglip2-*-patch16-224 / -256 / -384 / -512, model_type 'siglip'), which loads "
          "as SiglipVisionModel with config.teacher.family='siglip'.")


def _detect(keys: set, family: str, what: str) -> str:
  for prefix in _PREFIXES[family]:
    if prefix + _PATCH[family] in keys:
      return prefix
  other = {f: any(k.endswith(_PATCH[f]) for k in keys) for f in _PATCH if f != family}
  hint = ''
  for f, found in other.items():
    if found:
      hint = f"\nIt looks like a {f} tower: set config.teacher.family='{f}'."
  if any(k.startswith(('visual.', 'vision_model.embeddings.class_embedding', 'conv1.')) for k in keys):
    hint = "\nIt looks like a CLIP tower: set config.teacher.family='clip' (or 'eva_clip')."
  if any(k.endswith('patch_embed.proj.weight') for k in keys):
    hint = ("\nIt looks like a timm / EVA checkpoint: EVA-CLIP towers are family 'eva_clip', EVA "
            'encoders load with eva_jax.load_encoder.')
  raise CheckpointError(
      f'{what} is not a transformers {family} vision tower: missing key '
      + ' or '.join(p + _PATCH[family] for p in _PREFIXES[family])
      + f'. Keys ({len(keys)}): {", ".join(sorted(keys)[:10])}' + (' ...' if len(keys) > 10 else '')
      + hint)


def load_hf_vision(path, family: str, *, dtype: str = 'float32', heads: int | None = None,
                   act: str | None = None, arch: str | None = None, ln_eps: float | None = None):
  """The transformers SigLIP / DINOv2 tower at `path` as a VisionTransformer (see module doc)."""
  if family not in _PATCH:
    raise ValueError(f"family must be 'siglip' or 'dinov2' here, got {family!r}.")
  path = os.fspath(path)
  if act and act not in set(_ACTS.values()):
    raise ValueError(f'config.teacher.act must be one of {sorted(set(_ACTS.values()))} (or empty '
                     f'to read config.json); got {act!r}.')
  what = f'{family} checkpoint {path!r}'
  src = common.TensorSource(path)
  keys = set(src)
  pre = _detect(keys, family, what)
  tower = [k for k in keys if k.startswith(pre)]
  rel = {k[len(pre):]: k for k in tower}
  g = lambda k: np.asarray(src[rel[k]], np.float32)   # noqa: E731
  shape = lambda k: tuple(src.shape(rel[k]))          # noqa: E731

  cj = _config_json(path, family)   # first: it names the model type (a NaFlex one is refused)

  # -- shapes
  pw = shape(_PATCH[family])
  if family == 'siglip' and len(pw) == 2:
    raise CheckpointError(_naflex_refusal(f'{what}: {pre}{_PATCH[family]} is a Linear {pw}'))
  if len(pw) != 4 or pw[2] != pw[3] or pw[1] != 3:
    raise CheckpointError(f'{what}: {_PATCH[family]} has shape {pw}; expected [D, 3, P, P].')
  width, patch = pw[0], pw[2]
  blk_re = re.compile(_BLOCK_RE[family])
  ids = sorted({int(m.group(1)) for k in rel for m in [blk_re.match(k)] if m})
  if not ids:
    raise CheckpointError(f'{what}: no transformer blocks ({_BLOCK_RE[family]}*).')
  depth = ids[-1] + 1
  bprefix = 'encoder.layers.{i}.' if family == 'siglip' else 'encoder.layer.{i}.'

  def bname(i, part):
    cands = _BLOCK[family].get(part)
    if cands is None:
      return None
    for c in (cands,) if isinstance(cands, str) else cands:
      if bprefix.format(i=i) + c + ('' if part in ('ls1', 'ls2') else '.weight') in rel:
        return bprefix.format(i=i) + c
    return None

  swiglu = family == 'dinov2' and (bname(0, 'w12') is not None or bname(0, 'gate') is not None)
  if swiglu:
    mlp_dim = shape(bname(0, 'fc2') + '.weight')[1]
  else:
    if bname(0, 'fc1') is None:
      raise CheckpointError(f'{what}: no MLP weights in block 0 ({_BLOCK[family]["fc1"]}).')
    mlp_dim = shape(bname(0, 'fc1') + '.weight')[0]
  registers = 0
  if family == 'siglip':
    pos_key, final = 'embeddings.position_embedding.weight', 'post_layernorm'
    n = shape(pos_key)[0]
    class_token = False
  else:
    pos_key, final = 'embeddings.position_embeddings', 'layernorm'
    n = shape(pos_key)[1] - 1
    class_token = True
    if 'embeddings.register_tokens' in rel:
      registers = shape('embeddings.register_tokens')[1]
  grid = math.isqrt(n)
  if grid * grid != n:
    raise CheckpointError(f'{what}: {pos_key} {shape(pos_key)} is not a square grid.')
  layer_scale = family == 'dinov2' and bname(0, 'ls1') is not None
  has_qkv_bias = (bname(0, 'q') or '') + '.bias' in rel

  # -- facts: config.json, then arch / explicit values, all agreeing
  rec: dict[str, tuple] = {}
  if cj is not None:
    c, f = cj
    name = os.path.basename(f)
    for field, key in (('act', 'hidden_act'), ('heads', 'num_attention_heads'),
                       ('ln_eps', 'layer_norm_eps')):
      v = c.get(key, _DEFAULTS[family][key])
      s = f'{name} {key}' if key in c else f"{name} (no {key}: transformers' default)"
      if field == 'act':
        if v not in _ACTS:
          raise CheckpointError(f'{what}: {name} has hidden_act={v!r}; supported: {sorted(_ACTS)}.')
        v = _ACTS[v]
      rec[field] = (v, s)
  sizes = dict(width=width, depth=depth, mlp_dim=mlp_dim, patch_size=patch, registers=registers,
               swiglu=swiglu)
  cands: dict[str, list] = {f: ([rec[f]] if f in rec else []) for f in ('act', 'heads', 'ln_eps')}
  if arch:
    ref = config_lib.teacher_config(arch)
    if ref.family != family:
      raise ValueError(f'config.teacher.arch={arch!r} is a {ref.family!r} tower, not {family}.')
    bad = [f'{k}: file {v} vs {arch} {ref[k]}' for k, v in sizes.items() if ref[k] != v]
    if bad:
      raise CheckpointError(f'{what} is not a {arch} tower: ' + '; '.join(bad) + '.')
    for f in cands:
      cands[f].append((ref[f], f'config.teacher.arch={arch!r}'))
  for f, v in (('act', act), ('heads', heads), ('ln_eps', ln_eps)):
    if v:
      cands[f].append((v, f'config.teacher.{f}'))
  facts, missing = {}, []
  for f, cs in cands.items():
    if not cs:
      if f == 'ln_eps':
        facts[f] = (1e-6, f'not recorded in the file: 1e-6, the eps of every {family} tower')
      else:
        missing.append(f)
      continue
    for v, s in cs[1:]:
      if v != cs[0][0]:
        raise CheckpointError(f'{what}: {s} says {f}={v!r} but {cs[0][1]} says {cs[0][0]!r}.')
    facts[f] = cs[0]
  if missing:
    raise CheckpointError(
        f'{what} (no config.json) does not record the '
        + ' or '.join({'act': 'MLP activation', 'heads': 'number of attention heads'}[m]
                      for m in missing)
        + '; eva_jax will not guess. Keep the transformers config.json next to the weights, or set '
        + ', '.join(f'config.teacher.{m}' for m in missing)
        + (" (act: 'gelu_tanh' for SigLIP, 'gelu' for DINOv2)" if 'act' in missing else '')
        + f', or config.teacher.arch to a named architecture '
        f'({", ".join(config_lib.teacher_names(family))}).')

  # -- config
  cfg = config_lib.teacher_config(config_lib.teacher_names(family)[0])
  cfg.update(dict(width=width, depth=depth, heads=int(facts['heads'][0]), mlp_dim=mlp_dim,
                  patch_size=patch, image_size=grid * patch, act=facts['act'][0],
                  ln_eps=float(facts['ln_eps'][0]), out_dim=width, swiglu=swiglu,
                  attn_bias='qkv' if has_qkv_bias else 'none', class_token=class_token,
                  layer_scale=layer_scale, registers=registers, dtype=dtype,
                  pos_interp='bicubic_aa' if registers else 'bicubic'))
  try:
    config_lib.validate(cfg)
  except ValueError as e:
    raise CheckpointError(f'{what}: invalid architecture: {e}') from e
  cfg.name = arch or _known_name(cfg, family)
  for f in ('act', 'heads', 'ln_eps'):
    v, s = facts[f]
    logging.log(logging.WARNING if s.startswith('not recorded') else logging.INFO,
                '%s: %s=%s from %s.', what, f, v, s)

  # -- tensors
  d, h = width, cfg.heads
  hd = d // h
  L = depth
  used: set[str] = set()

  def get(k):
    used.add(k)
    return g(k)

  def stack(fn):
    return lambda: np.stack([fn(i) for i in range(L)])

  def bw(i, part, leaf='.weight'):
    name = bname(i, part)
    if name is None:
      raise CheckpointError(f'{what}: block {i} has no {_BLOCK[family][part]}{leaf}.')
    return get(name + leaf)

  def qkv(i):
    w = np.concatenate([bw(i, z) for z in 'qkv'], 0)
    return w.reshape(3, h, hd, d).transpose(3, 0, 1, 2)

  def swiglu_part(i, j, leaf):
    if bname(i, 'w12') is not None:
      w = bw(i, 'w12', leaf)
      half = w.shape[0] // 2
      return w[j * half:(j + 1) * half]
    return bw(i, 'gate' if j == 0 else 'up', leaf)

  lp = 'blocks/layers/'
  conv = {
      'patch_kernel': lambda: get(_PATCH[family]).transpose(2, 3, 1, 0),
      'patch_bias': lambda: get(_PATCH[family][:-len('weight')] + 'bias'),
      'pos_embed': lambda: get(pos_key).reshape(-1, d),
      'norm/scale': lambda: get(final + '.weight'),
      'norm/bias': lambda: get(final + '.bias'),
      lp + 'attn/qkv': stack(qkv),
      lp + 'attn/proj': stack(lambda i: bw(i, 'o').reshape(d, h, hd).transpose(1, 2, 0)),
      lp + 'attn/proj_bias': stack(lambda i: bw(i, 'o', '.bias')),
      lp + 'mlp/fc2/kernel': stack(lambda i: bw(i, 'fc2').T),
      lp + 'mlp/fc2/bias': stack(lambda i: bw(i, 'fc2', '.bias')),
  }
  for ours, part in (('norm1', 'norm1'), ('norm2', 'norm2')):
    conv[f'{lp}{ours}/scale'] = stack(lambda i, p=part: bw(i, p))
    conv[f'{lp}{ours}/bias'] = stack(lambda i, p=part: bw(i, p, '.bias'))
  for j, z in enumerate('qkv'):
    conv[f'{lp}attn/{z}_bias'] = stack(lambda i, z=z: bw(i, z, '.bias').reshape(h, hd))
  if swiglu:
    for j, m in enumerate(('fc1_g', 'fc1_x')):
      conv[f'{lp}mlp/{m}/kernel'] = stack(lambda i, j=j: swiglu_part(i, j, '.weight').T)
      conv[f'{lp}mlp/{m}/bias'] = stack(lambda i, j=j: swiglu_part(i, j, '.bias'))
  else:
    conv[lp + 'mlp/fc1/kernel'] = stack(lambda i: bw(i, 'fc1').T)
    conv[lp + 'mlp/fc1/bias'] = stack(lambda i: bw(i, 'fc1', '.bias'))
  if layer_scale:
    conv[lp + 'ls1'] = stack(lambda i: bw(i, 'ls1', ''))
    conv[lp + 'ls2'] = stack(lambda i: bw(i, 'ls2', ''))
  if class_token:
    conv['cls_token'] = lambda: get('embeddings.cls_token').reshape(d)
  if registers:
    conv['reg_tokens'] = lambda: get('embeddings.register_tokens').reshape(registers, d)
  shapes = common.model_params_abstract(cfg)
  unknown = sorted(set(shapes) - set(conv))
  if unknown:
    raise CheckpointError(f'{what}: no conversion for parameters {unknown}.')
  model = common.model_from_params(cfg, shapes, lambda k: conv[k](), what)

  # Every tower key must be used, except the ones that are not part of per-patch targets.
  not_targets = [k for k in rel if k.startswith('head.') or k == 'embeddings.mask_token'
                 or k == 'embeddings.position_ids']
  rest = sorted(set(rel) - used - set(not_targets))
  if rest:
    raise CheckpointError(f'{what}: unexpected keys ({len(rest)}): {", ".join(rest[:20])}'
                          + (' ...' if len(rest) > 20 else '') + '. A variant eva_jax does not '
                          'implement; refused.')
  others = len(keys) - len(tower)
  if not_targets or others:
    logging.info('%s: ignoring %d keys outside the vision tower (text tower, logit_scale, ...) and '
                 '%d tower keys that take no part in per-patch targets (%s).', what, others,
                 len(not_targets), 'MAP head' if family == 'siglip' else 'mask_token')
  logging.info('Loaded %s teacher %s from %s (%d tower tensors).', family, cfg.name, path,
               len(tower))
  return model


def _known_name(cfg, family: str) -> str:
  fields = ('width', 'depth', 'heads', 'mlp_dim', 'patch_size', 'registers', 'swiglu', 'act')
  for name in config_lib.teacher_names(family):
    ref = config_lib.teacher_config(name)
    if all(ref[f] == cfg[f] for f in fields):
      return name
  return f'{family}-custom'
