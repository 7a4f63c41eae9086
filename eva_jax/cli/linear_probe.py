r"""eva-linear-probe: linear probe and k-NN on the frozen features of an encoder.

  eva-linear-probe --config=linear_probe_demo --config.init_from=workdirs/demo [--workdir=DIR]

config.init_from: an eva_jax workdir or checkpoint, or a timm / official EVA file. Prints a JSON
line (probe_top1, knn_top1, counts); with --workdir also writes WORKDIR/probe.json.
"""
import json

from absl import flags
from etils import epath

from eva_jax.cli import common
from eva_jax.evaluation import linear_probe
from eva_jax.training import checks


def main(argv):
  del argv
  # Range-checks every field before reading any weights (evaluation/linear_probe.evaluate's
  # callers from Python should do the same: checks.check_config(cfg)).
  checks.check_config(flags.FLAGS.config, 'linear_probe')
  out = linear_probe.evaluate(flags.FLAGS.config)
  if flags.FLAGS.workdir:
    workdir = epath.Path(flags.FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'probe.json').write_text(json.dumps(out, indent=2))
  print(json.dumps(out), flush=True)


def run():
  common.define_config('Linear-probe config.')
  common.define_workdir('Optional: writes probe.json here.', required=False)
  common.run(main, __doc__, ['config', 'workdir'])


if __name__ == '__main__':
  run()
