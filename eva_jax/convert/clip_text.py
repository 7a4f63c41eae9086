"""Initialize the towers of an EVA-CLIP model (eva_jax.models.clip.ClipModel) from what users have.

Text tower (`read_text_tower`, `load_text_tower`), layouts detected from the key names:
- transformers `save_pretrained` directories (or files) of `CLIPTextModelWithProjection` or
  `CLIPModel`: `text_model.embeddings.{token,position}_embedding.weight`,
  `text_model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2,
  layer_norm2}.*`, `text_model.final_layer_norm.*`, `text_projection.weight` [embed, width];
- OpenAI layout (OpenAI CLIP state dicts / TorchScript `.pt`, open_clip models without custom
  text): `token_embedding.weight`, `positional_embedding`, `transformer.resblocks.{i}.{ln_1,
  attn.in_proj_weight/bias (q,k,v stacked), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}.*`,
  `ln_final.*`, `text_projection` [width, embed];
- open_clip custom text towers (EVA-CLIP configs, `custom_text: true`) and the official EVA-CLIP
  files: the OpenAI names under `text.`.
Everything else in the file (vision tower, logit_scale) is counted and logged, not used; a
`logit_scale` / `logit_bias` found is returned in `extra`.

Sizes come from the shapes. Not in the shapes, never guessed: the MLP activation, the head count
and the LayerNorm eps. They come from what the file records -- transformers config.json
(`text_config` of a CLIPModel; a missing key means CLIPTextConfig's default), an
open_clip_config.json next to the weights (`quick_gelu`, `text_cfg.heads` (default 8),
`text_cfg.norm_kwargs.eps`), a TorchScript archive's module classes (QuickGELU / GELU; heads =
width // 64 as OpenAI's own loader rebuilds them) -- or from explicit `act=` / `heads=` /
`ln_eps=`, which must agree with a record; act and heads known from neither raise CheckpointError.
The eps alone falls back to 1e-5 (nn.LayerNorm's default, every OpenAI / open_clip / transformers
CLIP text tower), logged.

Image tower (`load_image_tower`): anything eva_jax.checkpoint.read_encoder reads (an eva_jax MIM or
fine-tuning checkpoint, a timm or official EVA .pth / .safetensors), as the EVA-CLIP recipe does
(EVA-SPEC "EVA-CLIP": skip `lm_head`, `mask_token`, `head`). What is skipped and what keeps its
fresh init is logged by name.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from eva_jax.convert import common
from eva_jax.convert.clip import HF, OPENAI, block_keys
from eva_jax.convert.common import CheckpointError
from eva_jax.models import clip as clip_lib
from eva_jax.models.layers import resize_grid

__all__ = ['read_text_tower', 'load_text_tower', 'check_text_tower', 'load_image_tower',
           'TextTowerWeights']

_HF_DEFAULTS = {'hidden_act': 'quick_gelu', 'num_attention_heads': 8, 'layer_norm_eps': 1e-5}
_ACTS = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'QuickGELU': 'quick_gelu', 'GELU': 'gelu'}
_LN_EPS = 1e-5
_TEXT_FIELDS = ('width', 'depth', 'heads', 'mlp_dim', 'vocab_size', 'context_length', 'act',
                'ln_eps')


@dataclasses.dataclass
class TextTowerWeights:
  """A CLIP text tower read from a file: the ClipModel.text parameters as numpy arrays."""
  config: ml_collections.ConfigDict   # clip.text_config fields
  embed_dim: int
  params: dict                        # 'a/b/c' -> float32 array, TextTransformer paths
  extra: dict                         # logit_scale / logit_bias found next to the tower
  source: str


class _Dict(Mapping):
  """A state dict (torch tensors or arrays) with TensorSource's shape() and script_modules."""

  def __init__(self, sd: Mapping):
    self._sd = {k: v for k, v in sd.items() if hasattr(v, 'shape')}
    self.script_modules: dict = {}

  def __getitem__(self, k):
    v = self._sd[k]
    return np.asarray(v.detach().cpu().float().numpy() if hasattr(v, 'detach') else v, np.float32)

  def shape(self, k):
    return tuple(self._sd[k].shape)

  def __iter__(self):
    return iter(self._sd)

  def __len__(self):
    return len(self._sd)

  def __contains__(self, k):
    return k in self._sd


def _names(kind: str, pre: str) -> dict:
  if kind == HF:
    return dict(tok=pre + 'embeddings.token_embedding.weight',
                pos=pre + 'embeddings.position_embedding.weight',
                ln_final=pre + 'final_layer_norm.', proj='text_projection.weight',
                block_re=re.compile(re.escape(pre) + r'encoder\.layers\.(\d+)\.'))
  return dict(tok=pre + 'token_embedding.weight', pos=pre + 'positional_embedding',
              ln_final=pre + 'ln_final.', proj=pre + 'text_projection',
              block_re=re.compile(re.escape(pre) + r'transformer\.resblocks\.(\d+)\.'))


def detect_text_layout(keys) -> tuple[str, str]:
  """(layout, prefix) of a CLIP text tower from key names; CheckpointError when there is none."""
  keys = set(keys)
  if 'text_model.embeddings.token_embedding.weight' in keys:
    return HF, 'text_model.'
  for pre in ('text.', ''):
    if pre + 'token_embedding.weight' in keys:
      return OPENAI, pre
  sample = ', '.join(sorted(keys)[:12])
  raise CheckpointError(
      'No CLIP text tower found: expected text_model.embeddings.token_embedding.weight '
      '(transformers), token_embedding.weight (OpenAI / open_clip) or text.token_embedding.weight '
      f'(open_clip custom text, EVA-CLIP). Keys ({len(keys)}): {sample} ...')


def _records(path: str | None, src, kind: str) -> dict:
  """field -> (value, source) for act / heads / ln_eps the file records."""
  rec: dict = {}
  if path is None:
    return rec
  if kind == HF:
    c = common.read_json_record(common.beside(path, 'config.json'))
    if isinstance(c, dict):
      c = c.get('text_config', c) if isinstance(c.get('text_config'), dict) else c
      for field, key in (('act', 'hidden_act'), ('heads', 'num_attention_heads'),
                         ('ln_eps', 'layer_norm_eps')):
        rec[field] = ((c[key], f'config.json {key}') if key in c else
                      (_HF_DEFAULTS[key], f"config.json (no {key}: CLIPTextConfig's default)"))
      eos = c.get('eos_token_id', 2)
      if eos != 2:
        logging.info('%s: transformers pools at the first eos_token_id=%s; eva_jax pools at the '
                     'largest token id, the same token for CLIP tokenizers (EOT 49407 is the '
                     'largest id).', path, eos)
    return rec
  if src.script_modules:
    acts = {m['type'] for n, m in src.script_modules.items()
            if re.match(r'(text\.)?transformer\.resblocks\.\d+\.mlp\.gelu$', n)}
    if len(acts) == 1 and next(iter(acts)) in _ACTS:
      rec['act'] = (next(iter(acts)), 'the TorchScript archive (module class)')
    rec['heads'] = ('width//64', "the TorchScript archive: OpenAI's loader uses width // 64")
    return rec
  oc = common.read_json_record(common.beside(path, 'open_clip_config.json'))
  if isinstance(oc, dict):
    oc = oc.get('model_cfg', oc)
    t = oc.get('text_cfg') or {}
    rec['act'] = ('quick_gelu' if oc.get('quick_gelu', False) else 'gelu',
                  'open_clip_config.json quick_gelu' + ('' if 'quick_gelu' in oc else
                                                        " (absent: open_clip's default False)"))
    rec['heads'] = (int(t.get('heads', 8)), 'open_clip_config.json text_cfg.heads'
                    + ('' if 'heads' in t else " (absent: open_clip's default 8)"))
    eps = (t.get('norm_kwargs') or {}).get('eps')
    if eps is not None:
      rec['ln_eps'] = (float(eps), 'open_clip_config.json text_cfg.norm_kwargs.eps')
  return rec


def _resolve(rec: dict, given: dict, width: int, what: str) -> dict:
  out, missing = {}, []
  for field in ('act', 'heads', 'ln_eps'):
    g, r = given[field], rec.get(field)
    if r is not None and r[0] == 'width//64':
      r = (width // 64, r[1])
    if r is not None and field == 'act':
      r = (_ACTS.get(r[0], r[0]), r[1])
    if g is not None and r is not None and g != r[0]:
      raise CheckpointError(f'{what}: {field}={g!r} contradicts {r[1]}, which says {r[0]!r}; '
                            f'omit {field}= or fix the file.')
    if g is not None:
      out[field] = (g, f'{field}= argument')
    elif r is not None:
      out[field] = r
    elif field == 'ln_eps':
      out[field] = (_LN_EPS, 'not recorded: 1e-5, nn.LayerNorm default of every CLIP text tower')
    else:
      missing.append(field)
  if missing:
    raise CheckpointError(
        f'{what} does not record the text tower\'s {" and ".join(missing)}; eva_jax will not '
        f'guess. Pass {", ".join(m + "=" for m in missing)} (act: quick_gelu for OpenAI CLIP and '
        'open_clip *-quickgelu models, gelu for other open_clip / EVA-CLIP towers; heads: width // '
        '64 for OpenAI, text_cfg.heads for open_clip), or keep a config.json / '
        'open_clip_config.json next to the weights.')
  if out['act'][0] not in ('gelu', 'quick_gelu'):
    raise CheckpointError(f'{what}: activation {out["act"][0]!r} unsupported (gelu, quick_gelu).')
  return out


def read_text_tower(source, *, act: str | None = None, heads: int | None = None,
                    ln_eps: float | None = None, context_length: int | None = None
                    ) -> TextTowerWeights:
  """The CLIP text tower in `source` as ClipModel.text parameters (host numpy, float32).

  source: a path (transformers directory or file, OpenAI .pt, open_clip checkpoint) or a state
    dict (name -> torch tensor / array). act, heads, ln_eps: facts the file may not record (see
    module docstring). context_length: None = the positional embedding's length.
  Raises FileNotFoundError, CheckpointError (no text tower, missing / mis-shaped keys, facts
  unknown or contradicting the file).
  """
  path = None
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    src = common.TensorSource(path)
    what = f'Checkpoint {path!r}'
  else:
    src, what = _Dict(source), 'state dict'
  kind, pre = detect_text_layout(src.keys())
  n = _names(kind, pre)
  depth_ids = sorted({int(m.group(1)) for k in src for m in [n['block_re'].match(k)] if m})
  need = [n['tok'], n['pos'], n['ln_final'] + 'weight']
  if kind == OPENAI and n['proj'] not in src and n['proj'] + '.weight' in src:
    if n['proj'] + '.bias' in src:
      raise CheckpointError(f'{what}: the text projection has a bias ({n["proj"]}.bias); the '
                            'EVA-CLIP text tower has none (open_clip proj_bias=False).')
    n['proj'] += '.weight'   # open_clip Linear projection: [embed, width]
    kind_proj_t = True
  else:
    kind_proj_t = kind == HF
  need.append(n['proj'])
  missing = [k for k in need if k not in src] + ([] if depth_ids else ['<text blocks>'])
  if missing:
    hint = ('\nA CLIPTextModel has no projection: save a CLIPTextModelWithProjection or CLIPModel.'
            if n['proj'] in missing else '')
    raise CheckpointError(f'{what} ({kind} layout) lacks the text tower keys: '
                          f'{", ".join(missing)}.{hint}')
  vocab, width = src.shape(n['tok'])
  ctx = src.shape(n['pos'])[0]
  depth = depth_ids[-1] + 1
  fc1 = block_keys(kind, pre, 0)['fc1'] + 'weight'
  mlp = src.shape(fc1)[0]
  pshape = src.shape(n['proj'])
  embed = pshape[0] if kind_proj_t else pshape[1]
  facts = _resolve(_records(path, src, kind), dict(act=act, heads=heads, ln_eps=ln_eps), width,
                   what)
  for f, (v, s) in facts.items():
    logging.info('%s: text %s=%s from %s.', what, f, v, s)
  cfg = clip_lib.text_config('text-tiny', width=int(width), depth=depth,
                             heads=int(facts['heads'][0]), mlp_dim=int(mlp),
                             act=facts['act'][0], vocab_size=int(vocab),
                             context_length=int(context_length or ctx))
  cfg.ln_eps = float(facts['ln_eps'][0])
  cfg.name = 'custom'
  params = _convert(src, kind, pre, n, cfg, kind_proj_t, ctx, what)
  used = set(_expected_keys(kind, pre, n, depth))
  extra = {k.split('.')[-1]: src[k] for k in src if k in ('logit_scale', 'logit_bias')}
  ignored = [k for k in src if k not in used and k not in extra]
  unexpected = [k for k in ignored if _in_text_namespace(k, kind, pre)
                and not k.endswith(('position_ids', 'attn_mask'))]   # derived buffers
  if unexpected:
    raise CheckpointError(f'{what}: unexpected text tower keys ({len(unexpected)}): '
                          f'{", ".join(sorted(unexpected)[:20])}. Another text architecture '
                          '(e.g. a projection bias or a cls embedding) is not supported.')
  if ignored:
    logging.info('%s: %d keys outside the text tower ignored (vision tower etc.).', what,
                 len(ignored))
  return TextTowerWeights(config=cfg, embed_dim=int(embed), params=params, extra=extra,
                          source=what)


def _in_text_namespace(k: str, kind: str, pre: str) -> bool:
  if kind == HF:
    return k.startswith('text_model.') or k.startswith('text_projection')
  if pre:
    return k.startswith(pre)
  return k.startswith(('token_embedding', 'positional_embedding', 'transformer.', 'ln_final.',
                       'text_projection'))


def _expected_keys(kind, pre, n, depth):
  keys = [n['tok'], n['pos'], n['proj'], n['ln_final'] + 'weight', n['ln_final'] + 'bias']
  for i in range(depth):
    b = block_keys(kind, pre, i)
    for part in ('ln1', 'ln2', 'out', 'fc1', 'fc2') + (('q', 'k', 'v') if kind == HF else ()):
      keys += [b[part] + 'weight', b[part] + 'bias']
    if kind != HF:
      keys += [b['in_w'], b['in_b']]
  return keys


def _convert(src, kind, pre, n, cfg, proj_t, ctx, what) -> dict:
  d, h, L = cfg.width, cfg.heads, cfg.depth
  k = d // h
  g = lambda key: np.asarray(src[key], np.float32)   # noqa: E731
  blk = lambda i: block_keys(kind, pre, i)   # noqa: E731

  def qkv(i):
    b = blk(i)
    w = (np.concatenate([g(b[x] + 'weight') for x in 'qkv']) if kind == HF else g(b['in_w']))
    return w.reshape(3, h, k, d).transpose(3, 0, 1, 2)

  def qkv_bias(i):
    b = blk(i)
    return (np.stack([g(b[x] + 'bias') for x in 'qkv']) if kind == HF else g(b['in_b'])
            ).reshape(3, h, k)

  stack = lambda fn: np.stack([fn(i) for i in range(L)])   # noqa: E731
  pos = g(n['pos'])
  if cfg.context_length > ctx:
    raise CheckpointError(f'{what}: context_length {cfg.context_length} exceeds the positional '
                          f'embedding ({ctx}).')
  lp = 'blocks/layers/'
  biases = stack(qkv_bias)
  p = {
      'token_embedding': g(n['tok']), 'positional_embedding': pos[:cfg.context_length],
      'ln_final/scale': g(n['ln_final'] + 'weight'), 'ln_final/bias': g(n['ln_final'] + 'bias'),
      'text_projection': g(n['proj']).T if proj_t else g(n['proj']),
      lp + 'norm1/scale': stack(lambda i: g(blk(i)['ln1'] + 'weight')),
      lp + 'norm1/bias': stack(lambda i: g(blk(i)['ln1'] + 'bias')),
      lp + 'norm2/scale': stack(lambda i: g(blk(i)['ln2'] + 'weight')),
      lp + 'norm2/bias': stack(lambda i: g(blk(i)['ln2'] + 'bias')),
      lp + 'attn/qkv': stack(qkv),
      lp + 'attn/q_bias': biases[:, 0], lp + 'attn/k_bias': biases[:, 1],
      lp + 'attn/v_bias': biases[:, 2],
      lp + 'attn/proj': stack(lambda i: g(blk(i)['out'] + 'weight').reshape(d, h, k)
                              .transpose(1, 2, 0)),
      lp + 'attn/proj_bias': stack(lambda i: g(blk(i)['out'] + 'bias')),
      lp + 'mlp/fc1/kernel': stack(lambda i: g(blk(i)['fc1'] + 'weight').T),
      lp + 'mlp/fc1/bias': stack(lambda i: g(blk(i)['fc1'] + 'bias')),
      lp + 'mlp/fc2/kernel': stack(lambda i: g(blk(i)['fc2'] + 'weight').T),
      lp + 'mlp/fc2/bias': stack(lambda i: g(blk(i)['fc2'] + 'bias')),
  }
  return {key: np.ascontiguousarray(v) for key, v in p.items()}


def _set_params(module: nnx.Module, flat: Mapping[str, np.ndarray], what: str,
                skip_missing=()) -> list[str]:
  """Writes flat 'a/b' arrays into module's Params (strict shapes); returns params left as
  initialized (only those matching a `skip_missing` prefix are allowed)."""
  state = nnx.state(module, nnx.Param)
  have = common.flatten(nnx.to_pure_dict(state))
  expected = {k: tuple(v.shape) for k, v in have.items()}
  got = {k: tuple(np.shape(v)) for k, v in flat.items()}
  kept = [k for k in expected if k not in got and k.startswith(tuple(skip_missing))]
  common.check_keys({k: s for k, s in expected.items() if k not in kept}, got, what)
  new = {k: (jax.device_put(np.asarray(flat[k], np.float32), have[k].sharding)
             if hasattr(have[k], 'sharding') else np.asarray(flat[k], np.float32))
         if k in flat else have[k] for k in have}
  nnx.replace_by_pure_dict(state, common.unflatten(new))
  nnx.update(module, state)
  return kept


def check_text_tower(w: TextTowerWeights, cfg) -> None:
  """Raises CheckpointError naming each field (width, depth, heads, MLP width, vocabulary,
  context length, activation, eps, embed dim) where the tower read differs from the ClipModel
  config `cfg`, with both values."""
  bad = [f'text.{f}: file {w.config[f]!r} vs config {cfg.text[f]!r}' for f in _TEXT_FIELDS
         if w.config[f] != cfg.text[f]]
  if w.embed_dim != cfg.embed_dim:
    bad.append(f'embed_dim: file {w.embed_dim} vs config {cfg.embed_dim}')
  if bad:
    raise CheckpointError(f'{w.source}: the text tower does not match the model config ('
                          + '; '.join(bad) + '). Set the config to the file\'s tower or pick '
                          'a matching file.')


def load_text_tower(model, source, **read_kwargs) -> TextTowerWeights:
  """Loads the text tower in `source` (see read_text_tower) into `model.text` (a ClipModel) in
  place; a `logit_scale` found in the file is loaded too. Every text parameter must match:
  a tower of another width / depth / heads / vocabulary / embed dim than the model's config
  raises CheckpointError naming both values."""
  cfg = model.cfg
  w = read_text_tower(source, context_length=cfg.text.context_length, **read_kwargs)
  check_text_tower(w, cfg)
  _set_params(model.text, w.params, w.source)
  if 'logit_scale' in w.extra:
    model.logit_scale[...] = jax.numpy.asarray(np.asarray(w.extra['logit_scale']).reshape(()))
    logging.info('%s: logit_scale loaded (%.4f).', w.source, float(model.logit_scale[...]))
  logging.info('Loaded the text tower (width %d, depth %d, heads %d, act %s) from %s.',
               w.config.width, w.config.depth, w.config.heads, w.config.act, w.source)
  return w


# Vision parameters a MIM checkpoint may lack that the EVA-CLIP tower has: EVA-02 MIM (B/L) has
# only the MLP sub-LN, EVA-CLIP towers also the attention one (`inner_attn_ln`); the official
# EVA-CLIP code loads with strict=False and leaves it initialized. Nothing else may be missing.
_MAY_KEEP_INIT = ('blocks/layers/attn/norm/',)
_ARCH_FIELDS = ('width', 'depth', 'heads', 'mlp_dim', 'patch_size', 'swiglu', 'sub_ln', 'rope',
                'class_token', 'attn_bias', 'act', 'post_norm')


def load_image_tower(model, path, *, weights: str = 'auto', facts: dict | None = None,
                     patch_resample: str = 'bicubic') -> dict:
  """Initializes `model.visual` (+ the pooled norm) of a ClipModel from an EVA encoder anywhere
  eva_jax.checkpoint.read_encoder reads one. `lm_head`, `mask_token` and classifier `head` /
  `fc_norm` are skipped (EVA-SPEC "EVA-CLIP"); the CLIP `visual_head` keeps its init. A pos-embed
  of another grid is resized (official bicubic, as EVA-01 fine-tuning loads it). An encoder of
  another patch size gets its patch embedding resampled by `patch_resample` ('bicubic': the
  official interpolate_patch_14to16.py, how EVA02-CLIP-B/16 starts from EVA-02-B/14; 'pinv':
  FlexiViT / timm; models/resample.py), logged. Returns
  {'skipped': [...], 'kept_init': [...], 'source': str}; both lists are logged.
  Raises CheckpointError when the architecture differs (naming each field, file vs config)."""
  from eva_jax import checkpoint
  w = checkpoint.read_encoder(path, weights=weights, facts=facts)
  vcfg, ecfg = model.cfg.vision, w.config
  bad = [f'vision.{f}: file {ecfg.get(f, d)!r} vs config {vcfg.get(f, d)!r}'
         for f, d in ((f, _arch_default(f)) for f in _ARCH_FIELDS)
         if f != 'patch_size' and ecfg.get(f, d) != vcfg.get(f, d)]
  if bad:
    raise CheckpointError(f'{w.source}: the encoder does not match the CLIP image tower ('
                          + '; '.join(bad) + ').')
  flat = common.flatten(w.params)
  skipped = ['mask_token'] if flat.pop('mask_token', None) is not None else []
  skipped += [f'{g}/...' for g in sorted(w.extra)]   # lm_head (MIM), fc_norm/head (fine-tuned)
  if model.cfg.pool == 'avg' and 'norm/scale' in flat:   # timm's filter: MIM norm -> fc_norm
    fc = {'scale': flat.pop('norm/scale'), 'bias': flat.pop('norm/bias')}
    _set_params(model.visual_fc_norm, fc, w.source)
  p = model.cfg.vision.patch_size
  if flat['patch_kernel'].shape[0] != p:
    from eva_jax.models import resample
    old_p = flat['patch_kernel'].shape[0]
    flat['patch_kernel'] = resample.resample_patch_kernel(flat['patch_kernel'], p, patch_resample)
    logging.info('%s: patch embedding resampled %d -> %d (%s).', w.source, old_p, p,
                 patch_resample)
    skipped.append(f'patch_kernel resampled {old_p}->{p} ({patch_resample})')
  grid = (model.cfg.vision.image_size // p,) * 2
  npp = 1 if vcfg.class_token else 0
  pos = flat['pos_embed']
  old = int(round((pos.shape[0] - npp) ** 0.5))
  if (old, old) != grid:
    logging.info('%s: pos-embed resized %dx%d -> %dx%d (bicubic, official EVA).', w.source, old,
                 old, *grid)
    flat['pos_embed'] = np.concatenate(
        [pos[:npp], np.asarray(resize_grid(pos[npp:], (old, old), grid))], 0)
  kept = _set_params(model.visual, flat, w.source, skip_missing=_MAY_KEEP_INIT)
  kept = [f'visual/{k}' for k in kept] + ['visual_head (CLIP projection: new)']
  logging.info('Image tower from %s: skipped %s; kept at init %s.', w.source,
               skipped or 'nothing', kept)
  return {'skipped': skipped, 'kept_init': kept, 'source': w.source}


def _arch_default(field):
  return {'post_norm': False, 'class_token': True, 'attn_bias': 'qv', 'act': 'gelu'}.get(field)
