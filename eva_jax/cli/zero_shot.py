r"""eva-zero-shot: zero-shot classification and image<->text retrieval of a CLIP checkpoint.

  eva-zero-shot --checkpoint=workdirs/clip_demo [--zero_shot=demo:val] [--retrieval=demo:val]

--checkpoint: an eva-clip workdir or one of its checkpoint folders (the model comes from its
metadata). --zero_shot: a labelled image folder (folder:DIR with one sub-folder per class, or
demo:val), with --classnames ('' = the demo's names or the folder names, 'imagenet', or names
joined by ',') and --templates (demo | openai | simple). --retrieval: image-text pairs (folder:DIR,
webdataset:PATTERN, arrayrecord:GLOB, demo:val; a caption file's lines are that image's
captions). Either may be '' to skip it. Prints one JSON line: zero_shot/top1, zero_shot/top5,
retrieval/{image_to_text,text_to_image}_R@{1,5,10}; --output also writes it to a file.
"""
import json

from absl import flags

from eva_jax.cli import common

flags.DEFINE_string('checkpoint', None, 'eva-clip workdir or checkpoint folder.')
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


def main(argv):
  del argv
  import ml_collections
  from eva_jax.defaults import clip_defaults
  from eva_jax.training import clip
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
  if FLAGS.output:
    with open(FLAGS.output, 'w', encoding='utf-8') as f:
      f.write(line + '\n')
  print(line, flush=True)


def run():
  common.run(main, __doc__, ['checkpoint', 'weights', 'zero_shot', 'classnames', 'templates',
                             'retrieval', 'image_size', 'batch_size', 'limit', 'output'])


if __name__ == '__main__':
  run()
