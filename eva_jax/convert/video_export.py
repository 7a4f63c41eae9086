"""Export an eva_jax video classifier to the official EVA-01 video layout (PyTorch).

The official video model (../shared/EVA-SPEC.md "Video") is the EVA-01 encoder with a Conv3d patch
embedding and a space-time pos-embed, so its state dict is the image one
(convert/eva_torch.to_torch_state_dict, layout 'eva': blocks, fc_norm, head) with two tensors
changed:
  patch_embed.proj.weight  Conv3d [D, 3, t, p, p]   (ours: [t, p, p, 3, D])
  pos_embed                [1, 1 + T/t * N, D]      (frame-major tokens, as Conv3d's flatten(2))
wrapped in {"model": state_dict}. The writer adds FILE.json with the video facts (frames,
tubelet, frame size) and timm Eva kwargs of the blocks, which the layout itself does not record.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import ml_collections
import numpy as np

from eva_jax.convert import common, eva_torch


def to_official_video_state_dict(params_flat: Mapping[str, np.ndarray], cfg, *,
                                 layout: str = 'eva') -> dict[str, np.ndarray]:
  """Flat video classifier params ('encoder/...', 'fc_norm/...', 'head/...') -> torch-ordered numpy
  state dict of the official EVA-01 video model (layout 'eva'; 'timm' gives timm's block names).

  cfg: the encoder config (its image_size is the frame size). Raises ValueError when the params
  are not a video encoder's (patch kernel not 5-D)."""
  params = {k: np.asarray(v) for k, v in params_flat.items()}
  key = 'encoder/patch_kernel' if 'encoder/patch_kernel' in params else 'patch_kernel'
  prefix = key[:-len('patch_kernel')]
  kernel = params[key]
  if kernel.ndim != 5:
    raise ValueError(f'{key} has shape {kernel.shape}; a video encoder kernel is [t, p, p, C, D].')
  pos = params[prefix + 'pos_embed']
  # The image converter checks image shapes: hand it one frame's slot and put the video
  # tensors in after (every other tensor is the image model's).
  n = (cfg.image_size // cfg.patch_size) ** 2
  image_view = dict(params)
  image_view[key] = kernel[0]
  image_view[prefix + 'pos_embed'] = pos[:1 + n]
  sd = eva_torch.to_torch_state_dict(image_view, cfg, layout)
  sd['patch_embed.proj.weight'] = np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2))
  sd['pos_embed'] = np.ascontiguousarray(pos[None])
  return sd


def video_facts(cfg, num_frames: int, tubelet: int, num_classes: int) -> dict:
  """What FILE.json records beside the weights: timm Eva kwargs of the blocks plus the video
  geometry (the official layout records neither)."""
  kwargs = eva_torch.timm_kwargs(cfg, num_classes=num_classes, global_pool='avg',
                                 use_fc_norm=True)
  return {'timm_kwargs': kwargs, 'num_frames': int(num_frames), 'tubelet': int(tubelet),
          'image_size': int(cfg.image_size), 'patch_size': int(cfg.patch_size)}


def export(path: str, out: str, weights: str = 'auto') -> dict:
  """Writes the official-layout `out` (.pth, {"model": state_dict}) and `out`.json from an
  eva_jax space-time video fine-tuning workdir or checkpoint (kind 'eva_video_finetune'). Returns a
  summary. Raises ValueError for another kind of checkpoint, naming the format that fits it (a
  frame-averaged run is an image classifier: --format=timm / eva; an EVA-CLIP run: open_clip)."""
  from eva_jax import checkpoint as ckpt_lib
  from eva_jax import paths
  from eva_jax.convert import export as export_lib
  # CLIP and frame-averaged runs: named with their format (other kinds are refused below).
  export_lib.check_format(export_lib.run_kind(path)[1], 'video', path)
  w = ckpt_lib.read_encoder(path, weights=weights)
  if w.meta.get('kind') != 'eva_video_finetune':
    raise ValueError(f'{w.source} holds a checkpoint of kind {w.meta.get("kind")!r}, not of a '
                     'video fine-tuning run (eva-video-finetune); export image models with '
                     'eva-export --format=timm or --format=eva.')
  cfg = ml_collections.ConfigDict(w.meta['student'])
  flat = common.flatten({'encoder': w.params, **w.extra})
  sd = to_official_video_state_dict(flat, cfg)
  import torch  # lazy: only the .pth writer needs it
  out_path = paths.as_path(out)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  with out_path.open('wb') as f:
    torch.save({'model': {k: torch.from_numpy(v) for k, v in sd.items()}}, f)
  facts = video_facts(cfg, w.meta['num_frames'], w.meta['tubelet'], w.meta['num_classes'])
  paths.as_path(os.fspath(out) + '.json').write_text(json.dumps(facts, indent=2))
  return {'checkpoint': path, 'step': w.step, 'out': out, 'tensors': len(sd),
          'weights': w.weights}
