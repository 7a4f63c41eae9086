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

The architecture is read from the tensor shapes: width and patch from the patch conv, depth from
the block indices, MLP width from fc1/c_fc, grid (so image size) from the pos-embed length, output
dim from the projection. Three facts are not in the shapes: the MLP activation (quick_gelu or
gelu), the number of heads and the LayerNorm eps. They are never guessed (issue 12, kind A). Each
comes from, in this order:
  1. what the file records:
     - transformers: config.json (hidden_act, num_attention_heads, layer_norm_eps; a key the file
       leaves out means CLIPVisionConfig's default, as transformers itself reads it);
     - TorchScript archives (OpenAI's ViT-*.pt): the class of each block's `mlp.gelu` module
       (QuickGELU / GELU), MultiheadAttention.num_heads and LayerNorm.eps when the archive kept
       them (scripted archives do). Traced archives, as OpenAI released them, keep the classes but
       not num_heads/eps: there heads = width // 64 and eps = 1e-5, because that is how OpenAI's
       own loader (clip.model.build_model: vision_heads = vision_width // 64) and nn.LayerNorm
       rebuild those very files: the rule defines the format, it is not our guess;
     - open_clip: an `open_clip_config.json` next to the weights (as on the HF hub; `model_cfg`
       or a bare model config): quick_gelu (open_clip's default False -> gelu), vision_cfg.width //
       vision_cfg.head_width (default 64), vision_cfg.norm_kwargs.eps (default 1e-5);
  2. an explicit value: `act=` / `heads=` / `ln_eps=` (config.teacher.act, config.teacher.heads);
     it must agree with what the file records, else CheckpointError naming both;
  3. otherwise act and heads are refused: a CheckpointError names config.teacher.act /
     config.teacher.heads and the choices. A bare OpenAI/open_clip state dict (`visual.*`,
     `conv1.weight`) records neither. LayerNorm eps alone falls back to 1e-5, which every OpenAI,
     open_clip and transformers CLIP tower uses (nn.LayerNorm's default), with a log line.
Every choice is logged with its source ("act=gelu from config.json").

Every checkpoint key of the vision tower must be used and every model parameter filled: otherwise a
CheckpointError lists the missing, unexpected and mis-shaped keys (nothing is partially loaded).
"""
from __future__ import annotations

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
def block_keys(kind: str, pre: str, i: int) -> dict[str, str]:
  """Key prefixes of residual block i of a CLIP tower under namespace `pre`, in layout `kind`
  (HF: separate q/k/v projections; OPENAI / open_clip: a packed in_proj)."""
  if kind == HF:
    b = f'{pre}encoder.layers.{i}.'
    return dict(ln1=b + 'layer_norm1.', ln2=b + 'layer_norm2.', q=b + 'self_attn.q_proj.',
                k=b + 'self_attn.k_proj.', v=b + 'self_attn.v_proj.', out=b + 'self_attn.out_proj.',
                fc1=b + 'mlp.fc1.', fc2=b + 'mlp.fc2.')
  b = f'{pre}transformer.resblocks.{i}.'
  return dict(ln1=b + 'ln_1.', ln2=b + 'ln_2.', in_w=b + 'attn.in_proj_weight',
              in_b=b + 'attn.in_proj_bias', out=b + 'attn.out_proj.', fc1=b + 'mlp.c_fc.',
              fc2=b + 'mlp.c_proj.')


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
    return block_keys(self.kind, self.pre, i)

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
def _hf_vision_config(path: str) -> dict | None:
  """The vision part of a transformers config.json next to the weights, or None if there is none.

  An unreadable one raises CheckpointError: ignoring it would turn its record into a guess.
  """
  f = common.beside(path, 'config.json')
  c = common.read_json_record(f)
  if c is None:
    return None
  if not isinstance(c, dict):
    raise CheckpointError(f'{f} holds a {type(c).__name__}, not a transformers config; fix or '
                          'remove it.')
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


# -------------------------------------------------------------------------------------------------
# Architecture facts the shapes do not hold: act, heads, ln_eps (see the module docstring).
ACTS = ('quick_gelu', 'gelu')
# transformers' CLIPVisionConfig defaults: what a config.json that leaves a key out means.
_HF_DEFAULTS = {'hidden_act': 'quick_gelu', 'num_attention_heads': 12, 'layer_norm_eps': 1e-5}
_HF_ACTS = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu'}   # others (gelu_new, ...) are refused
_SCRIPT_ACTS = {'QuickGELU': 'quick_gelu', 'GELU': 'gelu'}
_OPENAI_HEAD_DIM = 64
_LN_EPS = 1e-5   # nn.LayerNorm's default; OpenAI, open_clip and transformers CLIP towers use it
_ACT_HELP = ("quick_gelu for OpenAI's CLIP and open_clip models named *-quickgelu, gelu for "
             "open_clip towers built with quick_gelu=False (open_clip's default; e.g. the LAION / "
             "DataComp ViT-*-14 without -quickgelu) and transformers configs with hidden_act='gelu'")


def _open_clip_config(path: str) -> tuple[dict, str] | None:
  """(model config, file) of an open_clip_config.json next to the weights, or None."""
  f = common.beside(path, 'open_clip_config.json')
  c = common.read_json_record(f)
  if c is None:
    return None
  c = c.get('model_cfg', c) if isinstance(c, dict) else None
  if not isinstance(c, dict) or not isinstance(c.get('vision_cfg'), dict):
    raise CheckpointError(f'{f} has no model_cfg.vision_cfg; fix or remove it.')
  return c, f


def _recorded_facts(path: str, src: common.TensorSource, names: _Names, hf_cfg: dict | None,
                    what: str) -> dict[str, tuple]:
  """field -> (value, source) for what the file records. heads may be ('width//64', source)."""
  rec: dict[str, tuple] = {}
  if names.kind == HF:
    if hf_cfg is None:
      return rec
    f = 'config.json'
    for field, key in (('act', 'hidden_act'), ('heads', 'num_attention_heads'),
                       ('ln_eps', 'layer_norm_eps')):
      if key in hf_cfg:
        rec[field] = (hf_cfg[key], f'{f} {key}')
      else:
        rec[field] = (_HF_DEFAULTS[key], f"{f} (no {key}: CLIPVisionConfig's default)")
    act = _HF_ACTS.get(rec['act'][0])
    if act is None:
      raise CheckpointError(f'{what}: config.json has hidden_act={rec["act"][0]!r}; supported: '
                            'quick_gelu, gelu (exact erf).')
    rec['act'] = (act, rec['act'][1])
    return rec
  if src.script_modules:
    mods = src.script_modules
    blk = re.compile(re.escape(names.pre) + r'transformer\.resblocks\.\d+\.')
    acts = {m['type'] for n, m in mods.items() if blk.match(n) and n.endswith('.mlp.gelu')}
    if not acts:   # another module name for the activation: take the non-Linear mlp children
      acts = {m['type'] for n, m in mods.items() if blk.match(n) and re.search(r'\.mlp\.[^.]+$', n)
              and m['type'] not in ('Linear', 'Dropout', 'Identity')}
    if len(acts) != 1 or next(iter(acts)) not in _SCRIPT_ACTS:
      raise CheckpointError(f'{what}: TorchScript archive with MLP activation modules '
                            f'{sorted(acts)}; supported: {sorted(_SCRIPT_ACTS)}.')
    approx = {m.get('approximate', 'none') for n, m in mods.items()
              if blk.match(n) and n.endswith('.mlp.gelu')}
    if approx - {'none'}:
      raise CheckpointError(f"{what}: GELU(approximate={sorted(approx)}) is not supported "
                            "(exact erf GELU or QuickGELU).")
    rec['act'] = (_SCRIPT_ACTS[next(iter(acts))], 'the TorchScript archive (module class '
                  f'{next(iter(acts))})')
    nh = {m['num_heads'] for n, m in mods.items() if blk.match(n) and 'num_heads' in m}
    if len(nh) == 1:
      rec['heads'] = (int(next(iter(nh))), 'the TorchScript archive (MultiheadAttention.num_heads)')
    else:
      rec['heads'] = ('width//64', 'the TorchScript archive: traced archives keep no num_heads; '
                      "OpenAI's loader rebuilds them with heads = width // 64")
    eps = {m['eps'] for n, m in mods.items() if n.startswith(names.pre) and 'eps' in m
           and m['type'] == 'LayerNorm'}
    if len(eps) == 1:
      rec['ln_eps'] = (float(next(iter(eps))), 'the TorchScript archive (LayerNorm.eps)')
    elif len(eps) > 1:
      raise CheckpointError(f'{what}: LayerNorms with different eps {sorted(eps)}; unsupported.')
    return rec
  oc = _open_clip_config(path)
  if oc is not None:
    c, f = oc
    v = c['vision_cfg']
    name = os.path.basename(f)
    rec['act'] = ('quick_gelu' if c.get('quick_gelu', False) else 'gelu',
                  f'{name} quick_gelu={c.get("quick_gelu", False)}'
                  + ('' if 'quick_gelu' in c else " (open_clip's default)"))
    if v.get('act_kwargs'):
      raise CheckpointError(f'{what}: {f} sets vision_cfg.act_kwargs={v["act_kwargs"]}; '
                            'unsupported (plain GELU / QuickGELU only).')
    hw = int(v.get('head_width', 64))
    if 'width' in v:
      if int(v['width']) % hw:
        raise CheckpointError(f'{what}: {f} has width {v["width"]} not divisible by head_width {hw}.')
      rec['heads'] = (int(v['width']) // hw, f'{name} vision_cfg.width // head_width '
                      f'({v["width"]} // {hw})')
    eps = (v.get('norm_kwargs') or {}).get('eps')
    if eps is not None:
      rec['ln_eps'] = (float(eps), f'{name} vision_cfg.norm_kwargs.eps')
  return rec


def resolve_facts(recorded: dict, *, act: str | None, heads: int | None, ln_eps: float | None,
                  what: str, layout: str) -> dict[str, tuple]:
  """act/heads/ln_eps as (value, source): the file's record, an explicit value, or an error.

  act '' and heads 0 mean "not given" (the config fields' defaults). An explicit value that
  contradicts the file raises CheckpointError naming both; act or heads known from neither raise
  CheckpointError naming config.teacher.act / config.teacher.heads and the choices.
  """
  out: dict[str, tuple] = {}
  given = {'act': act or None, 'heads': heads or None, 'ln_eps': ln_eps}
  field_names = {'act': 'config.teacher.act', 'heads': 'config.teacher.heads',
                 'ln_eps': 'ln_eps='}
  missing = []
  for field in ('act', 'heads', 'ln_eps'):
    g, r = given[field], recorded.get(field)
    if r is not None and g is not None:
      if r[0] != 'width//64' and r[0] != g:
        raise CheckpointError(
            f'{what}: {field_names[field]}={g!r} contradicts {r[1]}, which says {r[0]!r}. Unset '
            f'{field_names[field]} (the file records it) or fix the file.')
      out[field] = (g, f'{field_names[field]}' + ('' if r[0] == 'width//64' else
                                                  f' (agrees with {r[1]})'))
    elif g is not None:
      out[field] = (g, field_names[field])
    elif r is not None:
      out[field] = r
    elif field == 'ln_eps':
      out[field] = (_LN_EPS, 'not recorded in the file: 1e-5, the eps of every OpenAI, open_clip '
                    'and transformers CLIP tower (nn.LayerNorm default)')
    else:
      missing.append(field)
  if missing:
    lines = [f'{what} ({layout} layout) does not record the tower\'s '
             + ' or '.join({'act': 'MLP activation', 'heads': 'number of attention heads'}[m]
                           for m in missing)
             + f'; eva_jax will not guess {"them" if len(missing) > 1 else "it"}.']
    if 'act' in missing:
      lines.append(f'Set config.teacher.act (--config.teacher.act=..., load_teacher(act=...)) to '
                   f'one of {", ".join(ACTS)}: {_ACT_HELP}. The wrong one changes every target '
                   'without any error.')
    if 'heads' in missing:
      lines.append('Set config.teacher.heads (--config.teacher.heads=N, load_teacher(heads=N)): '
                   'width // 64 for OpenAI and open_clip ViTs (head_width 64), else what the '
                   'model was built with.')
    lines.append('Alternatively keep the record next to the weights: a transformers config.json '
                 'or an open_clip_config.json (model_cfg with quick_gelu and vision_cfg).')
    raise CheckpointError('\n'.join(lines))
  return out


def _resolve_heads(facts: dict, width: int, what: str) -> int:
  heads, source = facts['heads']
  if heads == 'width//64':
    if width % _OPENAI_HEAD_DIM:
      raise CheckpointError(
          f'{what}: width {width} is not a multiple of 64, so the OpenAI rule heads = width // 64 '
          'does not apply and the archive does not record the number of heads. Set '
          'config.teacher.heads (load_teacher(heads=N)).')
    heads = width // _OPENAI_HEAD_DIM
  return int(heads)


def _log_facts(facts: dict, heads: int, what: str) -> None:
  for field in ('act', 'heads', 'ln_eps'):
    value, source = facts[field]
    value = heads if field == 'heads' else value
    level = logging.WARNING if source.startswith('not recorded') else logging.INFO
    logging.log(level, '%s: %s=%s from %s.', what, field, value, source)


def _infer_sizes(src: common.TensorSource, names: _Names, ns_keys: list[str], hf_cfg: dict,
                 what: str) -> dict:
  """The tower's sizes (width, depth, mlp_dim, patch_size, image_size, out_dim) from the shapes."""
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

  if hf_cfg:
    for f, v in (('image_size', grid * patch), ('patch_size', patch), ('hidden_size', width)):
      if f in hf_cfg and hf_cfg[f] != v:
        logging.warning('%s: config.json says %s=%s but the weights say %s; using the weights.',
                        what, f, hf_cfg[f], v)
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, patch_size=patch, image_size=grid * patch,
              out_dim=out_dim)


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
                     act: str | None = None, ln_eps: float | None = None):
  """The CLIP vision tower at `path` as an eva_jax VisionTransformer (teacher config, out_dim > 0).

  path:  a transformers save_pretrained directory (or its model file), an OpenAI .pt (TorchScript or
         state dict) or an open_clip checkpoint (see the module docstring).
  dtype: compute dtype name of the returned model ('float32', 'bfloat16', 'float16'); parameters
         stay float32.
  act, heads, ln_eps: the architecture facts the weights do not hold (config.teacher.act,
         config.teacher.heads; None, '' and 0 mean "not given"). Where the file records them they
         may be omitted, and must agree; where it does not (bare state dicts), act and heads are
         required. See the module docstring for what each format records. Logged with sources.
  Raises FileNotFoundError (no such path), ValueError (bad act/heads values) or CheckpointError
  (not a CLIP tower, missing / unexpected / mis-shaped keys, unreadable file, act/heads neither
  recorded nor given, or given values that contradict the file).
  """
  path = os.fspath(path)
  if act and act not in ACTS:
    raise ValueError(f"config.teacher.act must be 'quick_gelu' or 'gelu' (exact erf), or '' to "
                     f'read it from the checkpoint; got {act!r}.')
  if heads is not None and (not isinstance(heads, (int, np.integer)) or isinstance(heads, bool)
                            or heads < 0):
    raise ValueError(f'config.teacher.heads must be a positive integer, or 0 to read it from the '
                     f'checkpoint; got {heads!r}.')
  if ln_eps is not None and not (isinstance(ln_eps, (int, float)) and 0 < ln_eps < 1):
    raise ValueError(f'ln_eps must be a small positive float, got {ln_eps!r}.')
  what = f'Checkpoint {path!r}'
  src = common.TensorSource(path)
  kind, pre = detect_layout(src.keys())
  names = _Names(kind, pre)
  ignored_known = [k for k in src if kind == HF and k in _HF_IGNORED]
  ns_keys = [k for k in src if names.in_namespace(k) and k not in ignored_known]
  others = len(src) - len(ns_keys) - len(ignored_known)
  hf_cfg = _hf_vision_config(path) if kind == HF else None
  layout = {HF: 'transformers', OPENAI: 'TorchScript' if src.script_modules else
            'OpenAI/open_clip state dict'}[kind]
  sizes = _infer_sizes(src, names, ns_keys, hf_cfg or {}, what)
  if others:
    logging.info('%s: ignoring %d keys outside the vision tower (text tower, logit_scale, ...).',
                 what, others)
  # Keys first: a file of the wrong architecture is reported as such before act/heads are asked.
  common.check_keys(_expected(names, ml_collections.ConfigDict(sizes)),
                    {k: src.shape(k) for k in ns_keys},
                    f'{what} ({kind} layout, inferred width {sizes["width"]}, depth '
                    f'{sizes["depth"]}, mlp {sizes["mlp_dim"]}, patch {sizes["patch_size"]}, '
                    f'image {sizes["image_size"]}, out {sizes["out_dim"]})')
  facts = resolve_facts(_recorded_facts(path, src, names, hf_cfg, what), act=act, heads=heads,
                        ln_eps=ln_eps, what=what, layout=layout)
  try:
    cfg = clip_config(**sizes, heads=_resolve_heads(facts, sizes['width'], what),
                      act=facts['act'][0], ln_eps=facts['ln_eps'][0], dtype=dtype)
  except ValueError as e:
    raise CheckpointError(f'{what}: invalid architecture: {e}') from e
  _log_facts(facts, cfg.heads, what)
  conv = _converters(src, names, cfg)
  model = common.model_from_params(cfg, _converted_shapes(cfg), lambda key: conv[key](), what)
  logging.info('Loaded CLIP teacher %s from %s (%s layout; %d tower tensors, %d other keys ignored).',
               cfg.name, path, kind, len(ns_keys), others)
  return model
