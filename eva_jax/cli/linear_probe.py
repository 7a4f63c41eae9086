r"""eva-linear-probe: linear probe and k-NN on the frozen features of an encoder.

  eva-linear-probe --config=linear_probe_demo --config.init_from=workdirs/demo [--workdir=DIR]

config.init_from: an eva_jax workdir or checkpoint, or a timm / official EVA file. Prints a JSON
line (probe_top1, knn_top1, counts); with --workdir also writes WORKDIR/probe.json.
"""
from eva_jax.cli import common


def run():
  common.run_evaluation('linear_probe', __doc__, 'Linear-probe', 'probe.json')


if __name__ == '__main__':
  run()
