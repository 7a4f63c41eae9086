r"""eva-export: an eva_jax checkpoint as PyTorch weights (timm or the official EVA layout).

  eva-export --workdir=workdirs/demo --format=timm --out=eva_demo.safetensors
  eva-export --checkpoint=workdirs/demo/checkpoints/150 --format=eva --out=eva_demo.pth

--format=timm writes safetensors for timm's `Eva` plus its kwargs in OUT.json; --format=eva writes
`{"model": state_dict}` (.pth). --weights=auto (default) exports the EMA weights when the run kept
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
  path = f.checkpoint or f.workdir
  if not path:
    raise app.UsageError('--workdir=DIR (or --checkpoint=DIR/checkpoints/STEP) is required.')
  print(json.dumps(export.export(path, f.format, f.out, weights=f.weights)))


def run():
  flags.DEFINE_string('workdir', None, 'Run directory (its latest checkpoint).')
  flags.DEFINE_string('checkpoint', None, 'A checkpoints/<step> folder.')
  flags.DEFINE_enum('format', 'timm', ['timm', 'eva'], 'Output layout.')
  flags.DEFINE_string('out', None, 'Output file (.safetensors for timm, .pth for eva).')
  flags.DEFINE_enum('weights', 'auto', ['auto', 'raw', 'ema', 'model', 'model_ema'],
                    'auto = the EMA when the run kept one (the evaluated weights), else raw.')
  flags.mark_flag_as_required('out')
  common.run(main, __doc__, ['workdir', 'checkpoint', 'format', 'out', 'weights'])


if __name__ == '__main__':
  run()
