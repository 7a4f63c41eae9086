r"""eva-plot: training curves of a run (loss, lr, grad norm, throughput, evaluation) as one PNG.

  eva-plot --workdir=workdirs/demo --out=curves.png
"""
from absl import flags

from eva_jax.cli import common
from eva_jax.evaluation import plot


def main(argv):
  del argv
  import matplotlib
  matplotlib.use('Agg')
  plot.check_png(flags.FLAGS.out)
  names = plot.plot(flags.FLAGS.workdir, flags.FLAGS.out)
  left = plot.undrawn(plot.read_metrics(flags.FLAGS.workdir))
  print(f'wrote {flags.FLAGS.out} ({", ".join(names)})'
        + (f'; logged but not drawn: {", ".join(left)}' if left else ''))


def run():
  flags.DEFINE_string('workdir', None, 'Run directory holding metrics.jsonl.')
  flags.DEFINE_string('out', None, 'Output PNG.')
  flags.mark_flag_as_required('workdir')
  flags.mark_flag_as_required('out')
  common.run(main, __doc__, ['workdir', 'out'])


if __name__ == '__main__':
  run()
