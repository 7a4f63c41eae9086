r"""eva-export: an eva_jax checkpoint as PyTorch weights (timm, the official EVA layout, open_clip).

  eva-export --workdir=workdirs/demo --format=timm --out=eva_demo.safetensors
  eva-export --checkpoint=workdirs/demo/checkpoints/150 --format=eva --out=eva_demo.pth
  eva-export --workdir=workdirs/clip_demo --format=open_clip --out=oc/open_clip_pytorch_model.bin

--format=timm writes safetensors for timm's `Eva` plus its kwargs in OUT.json; --format=eva writes
`{"model": state_dict}` (.pth); both also take a frame-averaged video run
(video.model=frame_average), an image classifier applied per frame. --format=video writes a
space-time video fine-tuning run in the official video layout (.pth, convert/video_export.py).
--format=open_clip writes an EVA-CLIP run (eva-clip) as an open_clip folder: OUT (.bin / .pth /
.safetensors), open_clip_config.json beside it and, for a tower that is no released timm model,
timm_trunk/config.json; load it with open_clip.create_model('local-dir:FOLDER'). A run given
a format that cannot hold it is refused naming the one that can. --format=detectron2 the official
EVA det backbone (`backbone.net.*`, docs/detection.md) with the LazyConfig arguments in OUT.json:
  eva-export --workdir=W --format=detectron2 --out=det.pth --patch_size=16 --det_image_size=1024 \
    --window_size=16 --global_blocks=5,11,17,23
--patch_size=P resamples the patch kernel first (--patch_resample=pinv | bicubic) and re-grids the
pos-embed. --weights=auto (default) exports the EMA weights when the run kept
one (config.ema_decay > 0): those are the weights its eval metrics came from; --weights=raw the
raw ones. Prints a JSON summary line whose "weights" says which were written.
"""
import json

from absl import app, flags

from eva_jax.cli import common
from eva_jax.convert import export


def main(argv):
  del argv
  f = flags.FLAGS
  if f.checkpoint and f.workdir:
    raise app.UsageError('Give --workdir=DIR or --checkpoint=DIR/checkpoints/STEP, not both.')
  path = f.checkpoint or f.workdir
  if not path:
    raise app.UsageError('--workdir=DIR (or --checkpoint=DIR/checkpoints/STEP) is required.')
  glb = [int(i) for i in f.global_blocks] if f.global_blocks else None
  print(json.dumps(export.export(path, f.format, f.out, weights=f.weights,
                                 patch_size=f.patch_size, patch_resample=f.patch_resample,
                                 det_image_size=f.det_image_size, window_size=f.window_size,
                                 global_blocks=glb)))


def run():
  flags.DEFINE_string('workdir', None, 'Run directory (its latest checkpoint).')
  flags.DEFINE_string('checkpoint', None, 'A checkpoints/<step> folder.')
  flags.DEFINE_enum('format', 'timm', list(export.FORMATS), 'Output layout.')
  flags.DEFINE_string('out', None, 'Output file (.safetensors for timm, .pth for eva / video / '
                    'detectron2; open_clip: .bin / .pth / .safetensors in a folder of its own).')
  flags.DEFINE_enum('weights', 'auto', ['auto', 'raw', 'ema', 'model', 'model_ema'],
                    'auto = the EMA when the run kept one (the evaluated weights), else raw.')
  flags.DEFINE_integer('patch_size', None, 'Resample to this patch size (e.g. 14 -> 16).')
  flags.DEFINE_enum('patch_resample', 'pinv', ['pinv', 'bicubic'],
                    'pinv = FlexiViT / timm resample_patch_embed; bicubic = official 14to16.')
  flags.DEFINE_integer('det_image_size', 1024, 'detectron2: detection input size (img_size).')
  flags.DEFINE_integer('window_size', 16, 'detectron2: window attention size.')
  flags.DEFINE_list('global_blocks', None, 'detectron2: global-attention block indices '
                    '(default every 6th from block 5: EVA-02-L 5,11,17,23).')
  flags.mark_flag_as_required('out')
  common.run(main, __doc__, ['workdir', 'checkpoint', 'format', 'out', 'weights', 'patch_size',
                             'patch_resample', 'det_image_size', 'window_size', 'global_blocks'])


if __name__ == '__main__':
  run()
