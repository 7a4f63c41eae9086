r"""Export an eva_jax checkpoint to PyTorch.

  eva-export --workdir=workdirs/demo --format=timm --out=eva_demo.safetensors
  eva-export --checkpoint=workdirs/demo/checkpoints/150 --format=eva --out=eva_demo.pth
  eva-export --workdir=workdirs/clip_demo --format=open_clip --out=oc/open_clip_pytorch_model.bin

--format=timm  safetensors loadable by `timm.models.eva.Eva(**kwargs).load_state_dict(sd,
               strict=True)`; the kwargs go to FILE.json. A pretraining checkpoint becomes a
               backbone (the final `norm` kept, mask token and lm_head dropped: timm's Eva has
               neither); a fine-tuned one keeps fc_norm + head (global_pool='avg').
--weights      auto (default: the EMA when the run kept one, i.e. the weights its eval metrics
               came from), raw or ema; the summary line and the safetensors metadata say which.
--format=eva   the official layout `{"model": state_dict}` (.pth): mask_token and lm_head kept for
               pretraining checkpoints, fc_norm and head for fine-tuned ones; timm's
               `checkpoint_filter_fn` accepts it.
--format=open_clip  an EVA-CLIP run (eva-clip; no image format takes one): open_clip's state dict
               (.bin / .pth torch pickle, or .safetensors) plus open_clip_config.json beside it
               ({"model_cfg", "preprocess_cfg"}, as open_clip's hub folders hold it), and, for an
               image tower that is no released timm model, timm_trunk/config.json, which the model
               config names as 'local-dir:<absolute path>'; `open_clip.create_model('local-dir:'
               + folder)` builds and loads it (convert/open_clip_export.py export_run).
--format=video a space-time video fine-tuning run in the official video layout. A frame-averaged
               run (video.model=frame_average: the image encoder on each frame, patch tokens
               averaged over frames) is an image classifier: timm / eva / detectron2 write it as
               a fine-tuned one (fc_norm + head) and the summary records num_frames.
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


FORMATS = ('timm', 'eva', 'detectron2', 'video', 'open_clip')
# The file kinds each format writes: an --out named otherwise is refused (a .pth holding
# safetensors bytes fails later, at load, with a misleading "truncated file" message). open_clip:
# the kinds its 'local-dir:' loader finds (open_clip_export.WEIGHT_SUFFIXES).
EXTENSIONS = {'timm': ('.safetensors',), 'eva': ('.pth', '.pt', '.bin'),
              'detectron2': ('.pth', '.pt', '.bin'), 'video': ('.pth', '.pt', '.bin'),
              'open_clip': ('.bin', '.pth', '.safetensors')}
# Checkpoint metadata kinds (training/clip.py ClipProgram.kind, training/video.py KIND), spelled
# out so that export does not import the trainers.
CLIP_KIND, VIDEO_KIND = 'eva_clip', 'eva_video_finetune'


def run_kind(path: str) -> tuple[str | None, dict]:
  """(metadata kind, metadata) of an eva_jax workdir or checkpoint folder, read from its JSON
  alone (no arrays); (None, {}) for anything else (a PyTorch file: read_encoder decides)."""
  if not paths.as_path(path).is_dir():
    return None, {}
  step_dir, _ = ckpt_lib.resolve(path)
  meta = ckpt_lib.read_meta(step_dir)
  return meta.get('kind'), meta


def check_format(meta: dict, fmt: str, source: str) -> None:
  """Raises ValueError (one line) when `fmt` cannot hold the model of a checkpoint with metadata
  `meta`, naming the format that can: an EVA-CLIP run goes to open_clip (both towers); open_clip
  takes nothing else; a space-time video run goes to the official video layout; a frame-averaged
  one (video.model=frame_average: the image encoder on each frame, features averaged) is an image
  classifier, so timm / eva / detectron2 and never the video layout, which has no such form."""
  kind = meta.get('kind')
  if kind == CLIP_KIND and fmt != 'open_clip':
    raise ValueError(f'{source} is an EVA-CLIP run (eva-clip): export it with --format=open_clip '
                     '(image and text towers in open_clip\'s layout).')
  if fmt == 'open_clip' and kind != CLIP_KIND:
    what = f'a checkpoint of kind {kind!r}' if kind else 'no eva_jax checkpoint'
    raise ValueError(f'{source} is {what}, not an EVA-CLIP run (eva-clip): --format=open_clip '
                     'writes both CLIP towers; export image encoders with --format=timm or '
                     '--format=eva.')
  if kind != VIDEO_KIND:
    return
  # Runs older than the 'video_model' field were all space-time.
  frame_average = meta.get('video_model', 'space_time') == 'frame_average'
  if frame_average and fmt == 'video':
    raise ValueError(f'{source} is a frame-averaged video run (video.model=frame_average): its '
                     'model is the image encoder on each frame, which the official video layout '
                     'cannot express; export it with --format=timm or --format=eva.')
  if not frame_average and fmt != 'video':
    raise ValueError(f'{source} is a space-time video fine-tuning checkpoint: export it with '
                     '--format=video (the official video layout).')


def export(path: str, fmt: str, out: str, weights: str = 'auto', *, patch_size: int | None = None,
           patch_resample: str = 'pinv', det_image_size: int = 1024, window_size: int = 16,
           global_blocks=None) -> dict:
  """Writes `out` and `out`.json (open_clip: open_clip_config.json beside `out`); returns a
  summary dict (its 'weights' says which).

  path: an eva_jax workdir or checkpoint (checkpoint.read_encoder). fmt: 'timm' | 'eva' |
  'detectron2' (image encoders, frame-averaged video runs included) | 'video' (a space-time video
  fine-tuning run, convert/video_export.py) | 'open_clip' (an EVA-CLIP run, writes `out` and
  open_clip_config.json beside it: convert/open_clip_export.py export_run); check_format names
  the one a run needs. weights: 'auto' (the EMA when the run kept one: the weights behind its eval
  metrics, else the raw ones), 'raw' or 'ema' (aliases 'model', 'model_ema').
  patch_size / patch_resample: resample to another patch size first (models.resample).
  det_image_size, window_size, global_blocks (None = every 6th block from the 6th, EVA-02-L's
  5, 11, 17, 23 pattern): the detectron2 backbone arguments (fmt='detectron2' only).
  Raises ValueError for a source that is not an eva_jax checkpoint, a run the format cannot hold
  (check_format: names the one that can), an unknown format, an `out` not named for the format,
  or detection settings the backbone cannot take (naming the valid choices)."""
  if fmt not in FORMATS:
    raise ValueError(f'format must be one of {FORMATS}, got {fmt!r}.')
  if not str(out).lower().endswith(EXTENSIONS[fmt]):
    raise ValueError(f'--format={fmt} writes a {" / ".join(EXTENSIONS[fmt])} file; name --out '
                     f'so (got {out!r}).')
  if paths.as_path(path).exists():   # a missing path: the reader's FileNotFoundError says so
    check_format(run_kind(path)[1], fmt, path)
  if fmt in ('video', 'open_clip') and patch_size:
    raise ValueError(f'--patch_size applies to image exports; --format={fmt} keeps the '
                     "checkpoint's patch.")
  if fmt == 'video':
    from eva_jax.convert import video_export
    return video_export.export(path, out, weights)
  if fmt == 'open_clip':
    from eva_jax.convert import open_clip_export
    return open_clip_export.export_run(path, out, weights)
  weights = ckpt_lib.read_encoder(path, weights=weights)
  if weights.step is None:
    raise ValueError(f'{weights.source} is already a PyTorch file; export reads eva_jax '
                     'checkpoints.')
  meta, step = weights.meta, weights.step
  check_format(meta, fmt, weights.source)   # the metadata as read (the check above read the JSON)
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
  # A frame-averaged video run is an image classifier (check_format let only those through).
  frames = meta.get('num_frames') if meta.get('kind') == VIDEO_KIND else None
  finetuned = meta.get('kind') in ('eva_finetune', VIDEO_KIND)
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
    info = {'format': 'pt', 'source': 'eva_jax', 'step': str(step), 'weights': weights.weights}
    if frames:
      info.update(video_model='frame_average', num_frames=str(frames))
    out_path.write_bytes(save(sd, metadata=info))
    epath.Path(os.fspath(out_path) + '.json').write_text(json.dumps(kwargs, indent=2))
  else:
    sd = eva_torch.to_torch_state_dict(flat, cfg, 'eva')
    import torch  # lazy: only the .pth writer needs it
    with out_path.open('wb') as f:
      torch.save({'model': {k: torch.from_numpy(v) for k, v in sd.items()}}, f)
    # The official layout records neither the head count nor RoPE: the timm kwargs beside it make
    # the file self-describing for read_encoder / load_encoder (and for timm).
    epath.Path(os.fspath(out_path) + '.json').write_text(json.dumps(kwargs, indent=2))
  summary = {'checkpoint': path, 'step': step, 'format': fmt, 'out': out, 'tensors': len(sd),
             'kind': meta.get('kind'), 'weights': weights.weights, 'resampled': resampled}
  if frames:   # the per-frame recipe the weights need (README "Export to PyTorch")
    summary.update(video_model='frame_average', num_frames=frames)
  return summary
