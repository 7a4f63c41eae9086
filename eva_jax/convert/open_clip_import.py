"""Import an open_clip EVA-CLIP checkpoint into an EVA-CLIP ClipModel (eva_jax.models.clip).

The inverse of open_clip_export: a state dict as open_clip and the EVA-CLIP releases on the
open_clip hub save it (`open_clip_pytorch_model.bin` / `.pt` torch pickles, `open_clip_model.
safetensors`), bare or as an open_clip training checkpoint `{'state_dict': ..., 'epoch': ...}`
whose keys carry DDP's `module.` prefix (common.TensorSource unwraps both). Layout: open_clip's
`CustomTextCLIP` with a timm `Eva` trunk (open_clip_export module docstring):
`visual.trunk.*` (timm Eva names; `visual.trunk.head` = the CLIP projection, `fc_norm` with pool
'avg'), `text.*` (OpenAI text names), `logit_scale`, optional `logit_bias`.

The architecture is never read from the shapes alone: it is the caller's ClipModel config (our
EVA-CLIP names, `clip_config_for` also takes open_clip's config names EVA01-g-14 / EVA02-B-16 /
EVA02-L-14). The file's shapes, and an `open_clip_config.json` next to it when there is one (the
hub releases keep it), must agree with that config; each disagreement is named with both values.
Facts the shapes do not hold (heads, RoPE, eps, the text activation) come from the config,
checked against the json's record where it has one.
"""
from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np

from eva_jax.convert import clip_text, common, eva_clip, eva_torch, open_clip_export
from eva_jax.convert.common import CheckpointError
from eva_jax.models import clip as clip_lib

__all__ = ['clip_config_for', 'read_open_clip', 'load_open_clip', 'open_clip_file']

TRUNK, HEAD = 'visual.trunk.', 'visual.trunk.head.'
_SUFFIXES = ('.bin', '.pt', '.pth', '.safetensors')
_HUB_FILES = ('open_clip_model.safetensors', 'open_clip_pytorch_model.bin')   # hf-hub:... layout


def clip_config_for(name: str, **kwargs) -> ml_collections.ConfigDict:
  """Our ClipModel config for an eva_jax CLIP name (models.clip.CLIP_NAMES) or the open_clip
  config name of a released EVA-CLIP (open_clip_export.OPEN_CLIP_NAMES values, e.g. 'EVA02-B-16').
  kwargs go to clip_config (image_size, pool, logit_bias, dtype). Raises ValueError naming both
  lists for an unknown name."""
  ours = {oc: n for n, (oc, _) in open_clip_export.OPEN_CLIP_NAMES.items()}
  if name in ours:
    name = ours[name]
  if name not in clip_lib.CLIP_NAMES:
    raise ValueError(f'Unknown CLIP model {name!r}: eva_jax names {", ".join(clip_lib.CLIP_NAMES)}'
                     f'; open_clip names {", ".join(ours)}.')
  return clip_lib.clip_config(name, **kwargs)


def open_clip_file(path: str | os.PathLike) -> str | None:
  """The open_clip weights file `path` names, or None (eva_jax runs are other directories): a
  `.bin` / `.pt` / `.pth` / `.safetensors` file, or a hub download folder holding
  open_clip_model.safetensors or open_clip_pytorch_model.bin (safetensors preferred)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return path if path.endswith(_SUFFIXES) else None
  for name in _HUB_FILES:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  return None


def _check_record(path: str, cfg, what: str) -> None:
  """An open_clip_config.json next to the weights must describe `cfg` (names both values)."""
  f = common.beside(path, 'open_clip_config.json')
  rec = common.read_json_record(f)
  if rec is None:
    return
  rec = rec.get('model_cfg', rec)
  v, t = rec.get('vision_cfg') or {}, rec.get('text_cfg') or {}
  ours = open_clip_export.open_clip_model_config(cfg, v.get('timm_model_name') or 'custom')
  pairs = [('embed_dim', rec.get('embed_dim'), ours['embed_dim']),
           ('vision_cfg.timm_pool', v.get('timm_pool'), cfg.pool),
           ('vision_cfg.image_size', v.get('image_size'), cfg.vision.image_size),
           ('quick_gelu', rec.get('quick_gelu', False), ours['quick_gelu'])]
  pairs += [(f'text_cfg.{k}', t.get(k), ours['text_cfg'][k])
            for k in ('width', 'heads', 'layers', 'vocab_size', 'context_length')]
  trunk = eva_clip.TIMM_TRUNKS.get(v.get('timm_model_name'))
  if trunk is not None:   # the timm model definition fixes the facts the weights do not hold
    pairs += [(f'vision heads (timm {v["timm_model_name"]})', trunk['heads'], cfg.vision.heads),
              (f'vision rope (timm {v["timm_model_name"]})', trunk['rope'],
               bool(cfg.vision.rope))]
  bad = [f'{k}: {os.path.basename(f)} {a!r} vs config {b!r}' for k, a, b in pairs
         if a is not None and a != b and not (isinstance(a, (int, float)) and
                                              isinstance(b, (int, float)) and float(a) == float(b))]
  if bad:
    raise CheckpointError(f'{what} is not the configured model ({"; ".join(bad)}). Set the config '
                          'to the checkpoint\'s architecture (eva-zero-shot --model / --config).')


def _vision_params(src, cfg, what: str) -> dict[str, np.ndarray]:
  """ClipModel 'visual*' params from the `visual.trunk.*` keys (eva_torch's timm loaders)."""
  trunk = eva_clip._TowerSource(src, TRUNK)
  if 'patch_embed.proj.weight' not in trunk or 'head.weight' not in trunk:
    raise CheckpointError(f'{what} is not an open_clip EVA model: no {TRUNK}patch_embed.proj.weight'
                          f' / {HEAD}weight (keys: {", ".join(sorted(src)[:8])} ...).')
  vcfg = open_clip_export._vision_cfg(cfg)
  rope_keys = [k for k in trunk if eva_torch._is_rope_buffer(k)]
  extra = ('head.weight', 'head.bias', 'fc_norm.weight', 'fc_norm.bias')
  canon = eva_torch._canonical_names(k for k in trunk if k not in extra and k not in rope_keys)
  shapes = {n: trunk.shape(o) for n, o in canon.items()}
  try:
    got = eva_torch._shape_config(shapes)
  except (CheckpointError, ValueError, KeyError) as e:
    raise CheckpointError(f'{what}: the image trunk is no EVA encoder ({e}).') from None
  head = trunk.shape('head.weight')
  pool = 'avg' if 'fc_norm.weight' in trunk else 'token'
  pairs = [(f'vision.{k}', got[k], vcfg[k]) for k in ('width', 'depth', 'mlp_dim', 'patch_size',
                                                      'image_size', 'swiglu', 'sub_ln')]
  pairs += [('embed_dim (visual.trunk.head)', head[0], cfg.embed_dim), ('pool', pool, cfg.pool)]
  bad = [f'{k}: file {a!r} vs config {b!r}' for k, a, b in pairs if a != b]
  if bad:
    raise CheckpointError(f'{what}: the image tower does not match the model config '
                          f'({"; ".join(bad)}). Set the config to the checkpoint\'s architecture.')
  fused = 'blocks.0.attn.qkv.weight' in shapes
  packed = bool(vcfg.swiglu) and 'blocks.0.mlp.fc1.weight' in shapes
  common.check_keys(eva_torch.timm_shapes(vcfg, fused=fused, packed=packed), shapes,
                    f'{what} image trunk ({TRUNK}*, timm names)')
  src_np = eva_torch._Source(trunk)
  loaders = eva_torch._from_timm(src_np, canon, vcfg, fused, packed)
  out = {f'visual/{k}': loaders[k]() for k in common.model_params_abstract(vcfg)}
  out['visual_head/kernel'] = src_np['head.weight'].T
  out['visual_head/bias'] = src_np['head.bias']
  if pool == 'avg':
    out['visual_fc_norm/scale'] = src_np['fc_norm.weight']
    out['visual_fc_norm/bias'] = src_np['fc_norm.bias']
  if rope_keys:
    logging.info('%s: %d RoPE buffers not read (recomputed from the config).', what,
                 len(rope_keys))
  return out


def read_open_clip(path: str | os.PathLike, cfg, *, weights: str = 'auto'
                   ) -> dict[str, np.ndarray]:
  """Every ClipModel parameter for `cfg` from an open_clip EVA-CLIP file, flat 'a/b' -> float32.

  path: a `.bin` / `.pt` / `.pth` torch pickle or `.safetensors` file (bare state dict or
    {'state_dict': ...} training checkpoint, `module.` prefixes allowed). weights: raw or EMA of
    a training checkpoint (common.unwrap_state_dict).
  cfg: the ClipModel config (clip_config_for) the file must match.
  Raises FileNotFoundError; CheckpointError for another layout or a mismatch (width, depth, heads,
  embed dim, vocabulary, pool, ...: each named with the file's and the config's value), or keys
  outside the model (every key is used or named).
  """
  path = os.fspath(path)
  what = f'open_clip checkpoint {path!r}'
  _check_record(path, cfg, what)
  src = common.TensorSource(path, weights)
  flat = _vision_params(src, cfg, what)
  t = cfg.text
  w = clip_text.read_text_tower(path, act=t.act, heads=t.heads, ln_eps=t.ln_eps,
                                context_length=t.context_length)
  clip_text.check_text_tower(w, cfg)
  flat.update({f'text/{k}': v for k, v in w.params.items()})
  if 'logit_scale' not in src:
    raise CheckpointError(f'{what} has no logit_scale; an open_clip CLIP always saves it.')
  flat['logit_scale'] = np.asarray(src['logit_scale'], np.float32).reshape(())
  if cfg.logit_bias != ('logit_bias' in src):
    raise CheckpointError(f'{what}: logit_bias {"present" if "logit_bias" in src else "absent"} '
                          f'in the file vs config logit_bias={cfg.logit_bias} (SigLIP models '
                          'have one: set it to match).')
  if cfg.logit_bias:
    flat['logit_bias'] = np.asarray(src['logit_bias'], np.float32).reshape(())
  used_prefix = (TRUNK, 'text.')
  unknown = [k for k in src if not k.startswith(used_prefix) and k not in ('logit_scale',
                                                                          'logit_bias')]
  if unknown:   # e.g. an open_clip visual.head projection (timm_proj set): another architecture
    raise CheckpointError(f'{what}: keys outside the EVA-CLIP model ({len(unknown)}): '
                          f'{", ".join(sorted(unknown)[:10])}.')
  logging.info('Read %s: %d tensors into %d ClipModel parameters (%s).', what, len(src),
               len(flat), cfg.get('name', 'custom'))
  return flat


def load_open_clip(model, path: str | os.PathLike, *, weights: str = 'auto') -> None:
  """Loads an open_clip EVA-CLIP file (read_open_clip, against model.cfg) into the ClipModel
  `model` in place; every parameter is set (strict names and shapes)."""
  flat = read_open_clip(path, model.cfg, weights=weights)
  clip_text._set_params(model, flat, f'open_clip checkpoint {os.fspath(path)!r}')
