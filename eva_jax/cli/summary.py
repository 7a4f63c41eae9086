r"""eva-summary: the parameter table of a named architecture, computed abstractly (nothing is
allocated). The last line is `params: <total>`, the backbone count the paper reports.

  eva-summary --model=g/14          (or: eva-summary g/14)
"""
from absl import app, flags

from eva_jax.cli import common
from eva_jax.models import config as config_lib
from eva_jax.models import summary


def main(argv):
  names = [flags.FLAGS.model] if flags.FLAGS.model else argv[1:]
  if len(names) != 1:
    raise app.UsageError(f'Name one architecture: --model=NAME. Encoders: '
                         f'{", ".join(config_lib.ENCODER_NAMES)}; teachers: '
                         f'{", ".join(config_lib.TEACHER_NAMES)}.')
  print(summary.report(names[0]))


def run():
  flags.DEFINE_string('model', None, 'Encoder or teacher name, e.g. g/14, eva02-L/14, clip-L/14.')
  common.run(main, __doc__, ['model'])


if __name__ == '__main__':
  run()
