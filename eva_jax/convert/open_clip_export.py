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

On disk (`eva-export --format=open_clip`, export_run / write_open_clip): open_clip's hub folder
layout, which `open_clip.create_model('local-dir:FOLDER')` reads without any registration: the
weights (.bin / .pth torch pickle or .safetensors), `open_clip_config.json` = {"model_cfg",
"preprocess_cfg"}, and for an image tower that is no released timm model (released_trunk) a timm
`local-dir:` folder `timm_trunk/config.json` (architecture + model_args = trunk_timm_kwargs) whose
absolute path the model config names as its timm_model_name.
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from eva_jax.convert import common, eva_torch

__all__ = ['open_clip_state_dict', 'state_dict_from_flat', 'open_clip_model_config',
           'trunk_timm_kwargs', 'released_trunk', 'write_open_clip', 'export_run',
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
  return state_dict_from_flat(common.model_params_numpy(model), model.cfg)


def state_dict_from_flat(flat: dict, cfg) -> dict[str, np.ndarray]:
  """open_clip_state_dict of flat ClipModel params ('visual/...', 'text/...', 'logit_scale': a
  checkpoint's params tree flattened with common.flatten) and their ClipModel config; float32."""
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


# ---------------------------------------------------------------------------------------------
# Files on disk (eva-export --format=open_clip): open_clip's hub folder layout.
CONFIG_NAME = 'open_clip_config.json'   # what open_clip's 'local-dir:' / 'hf-hub:' loaders read
TRUNK_DIR = 'timm_trunk'                # timm 'local-dir:' folder describing a custom image trunk
# The timm entrypoint a custom trunk is built through: its own arguments are a subset of
# trunk_timm_kwargs (patch, width, depth, heads, mlp ratio), so the recorded model_args replace
# every one of them and the entrypoint only names the Eva class.
_TRUNK_ARCH = 'eva_giant_patch14_224'
# The weights file kinds open_clip's 'local-dir:' loader finds (a .pt it does not look for).
WEIGHT_SUFFIXES = ('.bin', '.pth', '.safetensors')


def released_trunk(cfg) -> str | None:
  """The released timm trunk name open_clip builds `cfg`'s image tower from, or None when the
  tower is not exactly a released one (another name, image size, pool-independent override): timm
  builds a released name at its own defaults, open_clip passing only num_classes and the pool."""
  if cfg.get('name') not in OPEN_CLIP_NAMES:
    return None
  from eva_jax.models import clip as clip_lib
  ref = clip_lib.clip_config(cfg.name, pool=cfg.pool)
  if trunk_timm_kwargs(cfg) != trunk_timm_kwargs(ref):
    return None
  return OPEN_CLIP_NAMES[cfg.name][1]


def _pair(size) -> list[int]:
  return [int(size)] * 2 if np.ndim(size) == 0 else [int(s) for s in size]


def timm_trunk_config(cfg, mean, std) -> dict:
  """timm's `local-dir:` config.json (architecture, model_args, pretrained_cfg) building the
  image trunk of `cfg` (trunk_timm_kwargs) with `timm.create_model('local-dir:FOLDER')`.
  Raises ValueError for a vision LayerNorm eps other than 1e-6 (a JSON config cannot record it)."""
  kw = trunk_timm_kwargs(cfg)
  if 'norm_layer' in kw:
    raise ValueError(f'vision.ln_eps={cfg.vision.ln_eps}: a timm config.json cannot record a '
                     'LayerNorm eps other than 1e-6, so open_clip cannot build this image tower; '
                     'export it with the released eps (1e-6).')
  kw = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
  pretrained = dict(input_size=[3] + _pair(cfg.vision.image_size), mean=list(mean),
                    std=list(std), interpolation='bicubic', crop_pct=1.0,
                    num_classes=kw['num_classes'])
  return {'architecture': _TRUNK_ARCH, 'num_classes': kw['num_classes'],
          'num_features': int(cfg.vision.width), 'global_pool': kw['global_pool'],
          'model_args': kw, 'pretrained_cfg': pretrained}


def hub_config(cfg, timm_model_name: str, mean, std) -> dict:
  """open_clip_config.json as open_clip's hub folders hold it: {"model_cfg": the model config
  (open_clip_model_config), "preprocess_cfg": size, mean, std, bicubic, resize the shortest side
  then centre-crop (our evaluation transform)}."""
  return {'model_cfg': open_clip_model_config(cfg, timm_model_name),
          'preprocess_cfg': {'size': _pair(cfg.vision.image_size), 'mode': 'RGB',
                             'mean': list(mean), 'std': list(std), 'interpolation': 'bicubic',
                             'resize_mode': 'shortest', 'fill_color': 0}}


def write_open_clip(flat: dict, cfg, out: str, *, mean, std) -> dict:
  """Writes flat ClipModel params as an open_clip folder: `out` (the state dict: a torch pickle
  for .bin / .pth, safetensors for .safetensors), open_clip_config.json beside it (hub_config),
  and for a tower that is no released timm model timm_trunk/config.json, named in the model
  config as 'local-dir:<absolute path>'. `open_clip.create_model('local-dir:' + folder)` then
  builds the model and loads the weights strictly. Returns {'config': path, 'trunk': timm name}.
  Raises ValueError for another suffix or a tower timm cannot be told about (timm_trunk_config)."""
  from etils import epath
  from eva_jax import paths
  if not str(out).lower().endswith(WEIGHT_SUFFIXES):
    raise ValueError(f'open_clip weights are a {" / ".join(WEIGHT_SUFFIXES)} file (what its '
                     f'local-dir loader finds); name the output so (got {out!r}).')
  sd = state_dict_from_flat(flat, cfg)
  out_path = paths.as_path(out)
  folder = out_path.parent
  # open_clip's loader picks a weights file of the folder by its own name order, not ours: another
  # one there (an earlier export under another name, any .pth) would be loaded instead.
  others = sorted(p.name for p in folder.iterdir() if p.name != out_path.name
                  and p.name.lower().endswith(WEIGHT_SUFFIXES)) if folder.exists() else []
  if others:
    raise ValueError(f'{os.fspath(folder)} already holds {", ".join(others)}: open_clip would load '
                     f'one of them, not {out_path.name}. Export into a folder of its own.')
  folder.mkdir(parents=True, exist_ok=True)
  trunk = released_trunk(cfg)
  if trunk is None:
    tdir = folder / TRUNK_DIR
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / 'config.json').write_text(json.dumps(timm_trunk_config(cfg, mean, std), indent=2))
    # timm resolves local-dir paths against the working directory: record an absolute one.
    name = os.fspath(tdir)
    trunk = 'local-dir:' + (name if '://' in name else os.path.abspath(name))
  config_path = folder / CONFIG_NAME
  config_path.write_text(json.dumps(hub_config(cfg, trunk, mean, std), indent=2))
  if str(out).lower().endswith('.safetensors'):
    from safetensors.numpy import save
    out_path.write_bytes(save(sd, metadata={'format': 'pt', 'source': 'eva_jax'}))
  else:
    import torch  # lazy: only the pickle writer needs it
    with epath.Path(out_path).open('wb') as f:
      torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, f)
  return {'config': os.fspath(config_path), 'trunk': trunk, 'tensors': len(sd)}


def _run_normalization(step_dir: str) -> tuple[tuple, tuple]:
  """(mean, std) the run fed its images with: config.data of WORKDIR/config.json beside its
  checkpoints, else the CLIP defaults (eva_jax.data.config) every CLIP recipe uses."""
  from eva_jax import paths
  from eva_jax.data.config import CLIP_MEAN, CLIP_STD
  f = paths.as_path(step_dir).parent.parent / 'config.json'
  data = json.loads(f.read_text()).get('data', {}) if f.exists() else {}
  return tuple(data.get('mean', CLIP_MEAN)), tuple(data.get('std', CLIP_STD))


def export_run(path: str, out: str, weights: str = 'auto') -> dict:
  """Writes an EVA-CLIP run (eva-clip workdir or checkpoints/<step> folder; metadata kind
  'eva_clip') as an open_clip folder (write_open_clip). weights: 'auto' (the EMA when the run kept
  one), 'raw' or 'ema'. Returns a summary ('weights' says which were written). Raises ValueError
  for a checkpoint of another kind, naming the format that fits it."""
  from eva_jax import checkpoint as ckpt_lib
  from eva_jax.convert import export as export_lib
  step_dir, step = ckpt_lib.resolve(path)
  meta = ckpt_lib.read_meta(step_dir)
  export_lib.check_format(meta, 'open_clip', f'{path} (step {step})')   # which run fits which format
  if 'clip' not in meta:   # every eva-clip checkpoint records its model
    raise ValueError(f'{path} (step {step}) records no CLIP model config (metadata keys '
                     f'{sorted(meta)}): it was not written by eva-clip.')
  choice = ckpt_lib.weights_choice(weights)
  used, _ = ckpt_lib.weights_in(step_dir, choice)
  params, _, _ = ckpt_lib.restore_params(step_dir, weights=choice)
  cfg = ml_collections.ConfigDict(meta['clip'])
  mean, std = _run_normalization(step_dir)
  rec = write_open_clip(common.flatten(params), cfg, out, mean=mean, std=std)
  return {'checkpoint': path, 'step': step, 'format': 'open_clip', 'out': out,
          'kind': meta['kind'], 'weights': used, 'model': cfg.get('name'), **rec}
