"""Export an EVA-CLIP ClipModel (eva_jax.models.clip) to open_clip.

open_clip's EVA models (model_configs EVA01-g-14, EVA02-B-16, EVA02-L-14) are `CustomTextCLIP`s:
- `visual` = TimmModel: a timm `Eva` trunk built with num_classes=embed_dim and the pool of
  `vision_cfg.timm_pool` ('token'), `timm_proj` null, so the CLIP projection is the trunk's own
  `head` (Linear with bias) and `visual.head` is empty. Keys `visual.trunk.*` in timm names
  (eva_jax.convert.eva_torch.to_torch_state_dict, layout 'timm'), `visual.trunk.head.*`, and with
  pool 'avg' `visual.trunk.fc_norm.*` instead of `visual.trunk.norm.*`.
- `text` = TextTransformer: `text.{token_embedding.weight, positional_embedding,
  transformer.resblocks.{i}.{ln_1, attn.in_proj_weight/bias, attn.out_proj, ln_2, mlp.c_fc,
  mlp.c_proj}.*, ln_final.*, text_projection}` (projection a [width, embed] Parameter: no bias).
- `logit_scale` (the log, as stored) and `logit_bias` for SigLIP-style models.

`open_clip_state_dict(model)` gives numpy arrays that load with strict=True into
`open_clip.create_model(name, pretrained=None)` for the matching config: one of open_clip's own
(OPEN_CLIP_NAMES) or the dict `open_clip_model_config(cfg, timm_model_name)` writes (register it
with open_clip.add_model_config; a custom trunk must be registered with timm, whose kwargs are
`eva_torch.timm_kwargs(vision config, num_classes=embed_dim, global_pool=pool)`).
"""
from __future__ import annotations

import ml_collections
import numpy as np

from eva_jax.convert import common, eva_torch

__all__ = ['open_clip_state_dict', 'open_clip_model_config', 'trunk_timm_kwargs',
           'OPEN_CLIP_NAMES']

# eva_jax CLIP name -> (open_clip model config name, timm trunk name) (open_clip model_configs).
OPEN_CLIP_NAMES = {
    'eva01-clip-g/14': ('EVA01-g-14', 'eva_giant_patch14_224'),
    'eva02-clip-B/16': ('EVA02-B-16', 'eva02_base_patch16_clip_224'),
    'eva02-clip-L/14': ('EVA02-L-14', 'eva02_large_patch14_clip_224'),
}


def _vision_cfg(cfg) -> ml_collections.ConfigDict:
  v = ml_collections.ConfigDict(cfg.vision.to_dict())
  if cfg.pool == 'avg':
    v.final_norm = False
  if v.get('post_norm', False):
    raise ValueError('Export of post-norm towers (EVA02-CLIP-E) to open_clip is not supported.')
  return v


def trunk_timm_kwargs(cfg) -> dict:
  """kwargs of timm.models.eva.Eva building the open_clip trunk of a CLIP config (head included)."""
  return eva_torch.timm_kwargs(_vision_cfg(cfg), num_classes=cfg.embed_dim, global_pool=cfg.pool)


def open_clip_model_config(cfg, timm_model_name: str | None = None) -> dict:
  """The open_clip model config dict (as in open_clip/model_configs/*.json) of a CLIP config.

  timm_model_name: the timm trunk; default the released one for the named EVA-CLIP models
  (OPEN_CLIP_NAMES). Raises ValueError when neither is known."""
  if timm_model_name is None:
    if cfg.name not in OPEN_CLIP_NAMES:
      raise ValueError(f'No released timm trunk for CLIP model {cfg.name!r}; pass '
                       'timm_model_name= (register the trunk with timm, trunk_timm_kwargs).')
    timm_model_name = OPEN_CLIP_NAMES[cfg.name][1]
  t = cfg.text
  text_cfg = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                  heads=t.heads, layers=t.depth, mlp_ratio=t.mlp_dim / t.width)
  if t.ln_eps != 1e-5:
    text_cfg['norm_kwargs'] = {'eps': t.ln_eps}
  out = dict(embed_dim=cfg.embed_dim,
             vision_cfg=dict(image_size=cfg.vision.image_size, timm_model_name=timm_model_name,
                             timm_model_pretrained=False, timm_pool=cfg.pool, timm_proj=None),
             text_cfg=text_cfg, custom_text=True, quick_gelu=t.act == 'quick_gelu')
  if cfg.logit_bias:
    out['init_logit_bias'] = cfg.logit_bias_init
  return out


def _text_state_dict(p: dict, tcfg) -> dict[str, np.ndarray]:
  d, L = tcfg.width, tcfg.depth
  lp = 'blocks/layers/'
  sd = {'token_embedding.weight': p['token_embedding'],
        'positional_embedding': p['positional_embedding'],
        'ln_final.weight': p['ln_final/scale'], 'ln_final.bias': p['ln_final/bias'],
        'text_projection': p['text_projection']}
  for i in range(L):
    b = f'transformer.resblocks.{i}.'
    g = lambda k: p[lp + k][i]   # noqa: E731
    sd[b + 'ln_1.weight'], sd[b + 'ln_1.bias'] = g('norm1/scale'), g('norm1/bias')
    sd[b + 'ln_2.weight'], sd[b + 'ln_2.bias'] = g('norm2/scale'), g('norm2/bias')
    sd[b + 'attn.in_proj_weight'] = g('attn/qkv').transpose(1, 2, 3, 0).reshape(3 * d, d)
    sd[b + 'attn.in_proj_bias'] = np.concatenate(
        [g(f'attn/{x}_bias').reshape(d) for x in 'qkv'])
    sd[b + 'attn.out_proj.weight'] = g('attn/proj').reshape(d, d).T
    sd[b + 'attn.out_proj.bias'] = g('attn/proj_bias')
    sd[b + 'mlp.c_fc.weight'], sd[b + 'mlp.c_fc.bias'] = g('mlp/fc1/kernel').T, g('mlp/fc1/bias')
    sd[b + 'mlp.c_proj.weight'] = g('mlp/fc2/kernel').T
    sd[b + 'mlp.c_proj.bias'] = g('mlp/fc2/bias')
  return sd


def open_clip_state_dict(model) -> dict[str, np.ndarray]:
  """open_clip CustomTextCLIP state dict (numpy, torch layouts) of a ClipModel; see module doc."""
  cfg = model.cfg
  flat = common.model_params_numpy(model)
  sub = lambda pre: {k[len(pre):]: v for k, v in flat.items() if k.startswith(pre)}  # noqa: E731
  vis = eva_torch.to_torch_state_dict(sub('visual/'), _vision_cfg(cfg), 'timm')
  sd = {f'visual.trunk.{k}': v for k, v in vis.items()}
  sd['visual.trunk.head.weight'] = flat['visual_head/kernel'].T
  sd['visual.trunk.head.bias'] = flat['visual_head/bias']
  if cfg.pool == 'avg':
    sd['visual.trunk.fc_norm.weight'] = flat['visual_fc_norm/scale']
    sd['visual.trunk.fc_norm.bias'] = flat['visual_fc_norm/bias']
  sd.update({f'text.{k}': v for k, v in _text_state_dict(sub('text/'), cfg.text).items()})
  sd['logit_scale'] = flat['logit_scale'].reshape(())
  if cfg.logit_bias:
    sd['logit_bias'] = flat['logit_bias'].reshape(())
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}
