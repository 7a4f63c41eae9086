r"""eva-data-benchmark: input-pipeline throughput (images/s, images per CPU-second).

  eva-data-benchmark --config=data_bench [--compare_tfdata] [--config.data.workers=4]

--compare_tfdata also times the equivalent tf.data pipeline on the same files. Prints a JSON line.
"""
import json

from absl import flags

from eva_jax.cli import common
from eva_jax.data import benchmark


def main(argv):
  del argv
  print(json.dumps(benchmark.run(flags.FLAGS.config, flags.FLAGS.compare_tfdata)), flush=True)


def run():
  common.define_config('Input benchmark config.', kind='data_bench')
  flags.DEFINE_bool('compare_tfdata', False, 'Also time an equivalent tf.data pipeline.')
  common.run(main, __doc__, ['config', 'compare_tfdata'])


if __name__ == '__main__':
  run()
