r"""eva-zero-shot: zero-shot classification and image<->text retrieval of a CLIP checkpoint.

  eva-zero-shot --checkpoint=workdirs/clip_demo [--zero_shot=demo:val] [--retrieval=demo:val]
  eva-zero-shot --checkpoint=/ckpt/open_clip_pytorch_model.bin --model=EVA02-B-16

--checkpoint: an eva-clip workdir or one of its checkpoint folders (the model comes from its
metadata), or an open_clip EVA-CLIP file (.bin / .pt / .safetensors, bare or {'state_dict'}
training checkpoint; or a hub folder holding open_clip_model.safetensors) whose architecture is
--model (an eva_jax CLIP name or open_clip's EVA01-g-14 / EVA02-B-16 / EVA02-L-14) or --config (a
CLIP recipe, e.g. clip_demo, with --config.* overrides); the file must match it
(convert/open_clip_import.py). --zero_shot: a labelled image folder (folder:DIR with one
sub-folder per class, or demo:val), with --classnames ('' = the demo's names or the folder names,
'imagenet', or names joined by ',') and --templates (demo | openai | simple). --retrieval:
image-text pairs (folder:DIR, webdataset:PATTERN, arrayrecord:GLOB, demo:val; a caption file's
lines are that image's captions). Either may be '' to skip it, not both. Prints one JSON line:
zero_shot/top1, zero_shot/top5, retrieval/{image_to_text,text_to_image}_R@{1,5,10}, and the
counts behind them (zero_shot/count, zero_shot/unreadable, retrieval/images, retrieval/captions,
retrieval/bad_pairs); --output also writes it to a file (its folder is created).
"""
import json
import os

from absl import flags

from eva_jax.cli import common

flags.DEFINE_string('checkpoint', None, 'eva-clip workdir or checkpoint folder, or an open_clip '
                    'file (.bin / .pt / .safetensors) or hub folder.')
flags.DEFINE_string('model', '', 'open_clip files: the CLIP architecture (eva_jax or open_clip '
                    'name; image size: --image_size, else the model\'s).')
common.define_config('open_clip files: a CLIP recipe whose model is the architecture.',
                     kind='clip')
flags.DEFINE_string('weights', 'auto', 'auto (the EMA if kept) | raw | ema.')
flags.DEFINE_string('zero_shot', 'demo:val', "Labelled image folder (folder:DIR, demo:val); '' = skip.")
flags.DEFINE_string('classnames', '', "'' = demo / folder names, 'imagenet', or 'a,b,c'.")
flags.DEFINE_string('templates', 'demo', 'demo | openai | simple.')
flags.DEFINE_string('retrieval', 'demo:val', "Image-text pair source; '' = skip.")
flags.DEFINE_integer('image_size', 0, "0 = the checkpoint's image size.")
flags.DEFINE_integer('batch_size', 32, 'Images / prompts per encoder call.')
flags.DEFINE_integer('limit', 0, '> 0: at most this many retrieval pairs.')
flags.DEFINE_string('output', '', 'Optional JSON file for the metrics.')
flags.mark_flag_as_required('checkpoint')
FLAGS = flags.FLAGS


EVAL_FLAGS = ('zero_shot', 'retrieval', 'classnames', 'templates', 'batch_size', 'limit')


def main(argv):
  del argv
  if not FLAGS.zero_shot and not FLAGS.retrieval:
    raise ValueError("--zero_shot='' and --retrieval='' leave nothing to evaluate: give a labelled "
                     'image folder, an image-text pair source, or both.')
  if FLAGS.output and os.path.isdir(FLAGS.output):   # found before the evaluation, not after
    raise ValueError(f'--output={FLAGS.output} is a folder: name the JSON file to write.')
  import ml_collections
  from eva_jax.defaults import clip_defaults
  from eva_jax.training import clip
  from eva_jax.convert import open_clip_import
  oc_file = open_clip_import.open_clip_file(FLAGS.checkpoint)
  if oc_file is not None:
    mcfg, params, source = _open_clip(open_clip_import, oc_file)
  elif FLAGS.model or FLAGS.config is not None:
    raise ValueError(f'--model / --config name the architecture of an open_clip file; '
                     f'{FLAGS.checkpoint} is no such file (an eva-clip run records its model).')
  else:
    mcfg, params, source = clip.load_checkpoint(FLAGS.checkpoint, FLAGS.weights)
  cfg = clip_defaults()
  cfg.image_size = FLAGS.image_size or mcfg.vision.image_size   # other sizes: pos-embed resized
  names = FLAGS.classnames
  cfg.eval = ml_collections.ConfigDict(dict(
      zero_shot=FLAGS.zero_shot, retrieval=FLAGS.retrieval, batch_size=FLAGS.batch_size,
      limit=FLAGS.limit, templates=FLAGS.templates,
      classnames=tuple(n.strip() for n in names.split(',')) if ',' in names else names))
  clip.ClipProgram(cfg).validate_eval()
  out = {'checkpoint': source, **clip.evaluate_params(clip.eval_model(mcfg), params, cfg, mcfg)}
  line = json.dumps(out)
  print(line, flush=True)   # first: a file that cannot be written loses nothing
  if FLAGS.output:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, 'w', encoding='utf-8') as f:
      f.write(line + '\n')


def _open_clip(open_clip_import, path: str):
  """(ClipModel config, params, description) of an open_clip file read against --model/--config."""
  from eva_jax.convert import common as convert_common
  from eva_jax.training import clip
  if bool(FLAGS.model) == (FLAGS.config is not None):
    raise ValueError(f'{path} is an open_clip file: give its architecture with '
                     'exactly one of --model (e.g. EVA02-B-16, eva02-clip-L/14) or --config.')
  if FLAGS.model:
    mcfg = open_clip_import.clip_config_for(FLAGS.model, image_size=FLAGS.image_size or None)
  else:
    mcfg = clip.clip_model_config(FLAGS.config)
  weights = {'raw': 'model', 'ema': 'model_ema'}.get(FLAGS.weights, FLAGS.weights)
  flat = open_clip_import.read_open_clip(path, mcfg, weights=weights)
  return mcfg, convert_common.unflatten(flat), f'{path} (open_clip, {mcfg.name})'


def run():
  common.run(main, __doc__, ['checkpoint', 'model', 'config', 'weights', 'zero_shot',
                             'classnames', 'templates', 'retrieval', 'image_size', 'batch_size',
                             'limit', 'output'],
             field_flags={f'config.eval.{name}': f'--{name}' for name in EVAL_FLAGS})


if __name__ == '__main__':
  run()
