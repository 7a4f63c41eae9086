r"""Export an eva_jax checkpoint to PyTorch.

  eva-export --workdir=workdirs/demo --format=timm --out=eva_demo.safetensors
  eva-export --checkpoint=workdirs/demo/checkpoints/150 --format=eva --out=eva_demo.pth

--format=timm  safetensors loadable by `timm.models.eva.Eva(**kwargs).load_state_dict(sd,
               strict=True)`; the kwargs go to FILE.json. A pretraining checkpoint becomes a
               backbone (the final `norm` kept, mask token and lm_head dropped: timm's Eva has
               neither); a fine-tuned one keeps fc_norm + head (global_pool='avg').
--weights      auto (default: the EMA when the run kept one, i.e. the weights its eval metrics
               came from), raw or ema; the summary line and the safetensors metadata say which.
--format=eva   the official layout `{"model": state_dict}` (.pth): mask_token and lm_head kept for
               pretraining checkpoints, fc_norm and head for fine-tuned ones; timm's
               `checkpoint_filter_fn` accepts it.
--format=detectron2  the official EVA-01 / EVA-02 detection backbone (`{"model": state_dict}` .pth
               with keys `backbone.net.*`, eva_jax.convert.detection) for detectron2's
               `train.init_checkpoint`; FILE.json holds the `model.backbone.net.*` arguments
               (det_image_size, window_size, global_blocks). See docs/detection.md.
--patch_size   resample the patch kernel to another patch size first (--patch_resample=pinv:
               FlexiViT / timm resample_patch_embed; bicubic: the official
               interpolate_patch_14to16.py) and re-grid the pos-embed (official bicubic) to
               image_size // patch_size; logged in the summary.
timm kwargs record dynamic_img_size=True: timm's Eva then runs the weights at any H x W
(pos-embed resampled with antialias, RoPE built per grid), as eva_jax does with
model.pos_interp='bicubic_aa'.
"""
from __future__ import annotations

import json
import os

import ml_collections
from etils import epath

from eva_jax import checkpoint as ckpt_lib
from eva_jax import paths
from eva_jax.convert import common, eva_torch


FORMATS = ('timm', 'eva', 'detectron2', 'video')
# The file kinds each format writes: an --out named otherwise is refused (a .pth holding
# safetensors bytes fails later, at load, with a misleading "truncated file" message).
EXTENSIONS = {'timm': ('.safetensors',), 'eva': ('.pth', '.pt', '.bin'),
              'detectron2': ('.pth', '.pt', '.bin'), 'video': ('.pth', '.pt', '.bin')}


def export(path: str, fmt: str, out: str, weights: str = 'auto', *, patch_size: int | None = None,
           patch_resample: str = 'pinv', det_image_size: int = 1024, window_size: int = 16,
           global_blocks=None) -> dict:
  """Writes `out` and `out`.json; returns a summary dict (its 'weights' says which).

  path: an eva_jax workdir or checkpoint (checkpoint.read_encoder). fmt: 'timm' | 'eva' |
  'detectron2' | 'video' (a video fine-tuning run, convert/video_export.py). weights: 'auto' (the EMA when the run kept one: the weights behind its eval
  metrics, else the raw ones), 'raw' or 'ema' (aliases 'model', 'model_ema').
  patch_size / patch_resample: resample to another patch size first (models.resample).
  det_image_size, window_size, global_blocks (None = every 6th block from the 6th, EVA-02-L's
  5, 11, 17, 23 pattern): the detectron2 backbone arguments (fmt='detectron2' only).
  Raises ValueError for a source that is not an eva_jax checkpoint (or a video one for an image
  format), an unknown format, an `out` not named for the format, or detection settings the
  backbone cannot take (naming the valid choices)."""
  if fmt not in FORMATS:
    raise ValueError(f'format must be one of {FORMATS}, got {fmt!r}.')
  if not str(out).lower().endswith(EXTENSIONS[fmt]):
    raise ValueError(f'--format={fmt} writes a {" / ".join(EXTENSIONS[fmt])} file; name --out '
                     f'so (got {out!r}).')
  if fmt == 'video':
    if patch_size:
      raise ValueError('--patch_size applies to image exports; the video layout keeps the '
                       "checkpoint's tubelet patch.")
    from eva_jax.convert import video_export
    return video_export.export(path, out, weights)
  weights = ckpt_lib.read_encoder(path, weights=weights)
  if weights.step is None:
    raise ValueError(f'{weights.source} is already a PyTorch file; export reads eva_jax '
                     'checkpoints.')
  meta, step = weights.meta, weights.step
  if meta.get('kind') == 'eva_video_finetune':
    raise ValueError(f'{weights.source} is a video fine-tuning checkpoint: export it with '
                     '--format=video (the official video layout).')
  cfg = ml_collections.ConfigDict(meta['student'])
  flat = common.flatten({'encoder': weights.params, **weights.extra})
  resampled = None
  if patch_size and patch_size != cfg.patch_size:
    from eva_jax.models import resample
    enc = {k[len('encoder/'):]: v for k, v in flat.items() if k.startswith('encoder/')}
    enc, cfg, resampled = resample.resample_encoder(enc, cfg, patch_size=patch_size,
                                                    method=patch_resample)
    flat.update({'encoder/' + k: v for k, v in enc.items()})
  out_path = paths.as_path(out)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  finetuned = meta.get('kind') == 'eva_finetune'
  if fmt == 'detectron2':
    from eva_jax.convert import detection
    if global_blocks is None:
      global_blocks = list(range(5, cfg.depth, 6)) or [cfg.depth - 1]
    sd, kwargs, dropped = detection.export_state_dict(
        flat, cfg, image_size=det_image_size, window_size=window_size,
        global_blocks=global_blocks)
    import torch  # lazy: only the .pth writer needs it
    with out_path.open('wb') as f:
      torch.save({'model': {k: torch.from_numpy(v) for k, v in sd.items()}}, f)
    epath.Path(os.fspath(out_path) + '.json').write_text(json.dumps(kwargs, indent=2))
    return {'checkpoint': path, 'step': step, 'format': fmt, 'out': out, 'tensors': len(sd),
            'kind': meta.get('kind'), 'weights': weights.weights, 'resampled': resampled,
            'not_exported': dropped + sorted(k for k in flat if not k.startswith('encoder/'))}
  kwargs = eva_torch.timm_kwargs(cfg, num_classes=meta['num_classes'] if finetuned else 0,
                                 global_pool='avg' if finetuned and meta.get('pool') == 'mean'
                                 else 'token',
                                 use_fc_norm=finetuned, dynamic_img_size=True)
  if fmt == 'timm':
    flat = {k: v for k, v in flat.items() if not k.startswith('lm_head/')}
    sd = eva_torch.to_torch_state_dict(flat, cfg, 'timm')
    from safetensors.numpy import save
    # Whole-object writes through epath: local folders and object stores (gs://) alike.
    out_path.write_bytes(save(sd, metadata={'format': 'pt', 'source': 'eva_jax', 'step': str(step),
                                         'weights': weights.weights}))
    epath.Path(os.fspath(out_path) + '.json').write_text(json.dumps(kwargs, indent=2))
  else:
    sd = eva_torch.to_torch_state_dict(flat, cfg, 'eva')
    import torch  # lazy: only the .pth writer needs it
    with out_path.open('wb') as f:
      torch.save({'model': {k: torch.from_numpy(v) for k, v in sd.items()}}, f)
    # The official layout records neither the head count nor RoPE: the timm kwargs beside it make
    # the file self-describing for read_encoder / load_encoder (and for timm).
    epath.Path(os.fspath(out_path) + '.json').write_text(json.dumps(kwargs, indent=2))
  return {'checkpoint': path, 'step': step, 'format': fmt, 'out': out, 'tensors': len(sd),
          'kind': meta.get('kind'), 'weights': weights.weights, 'resampled': resampled}
