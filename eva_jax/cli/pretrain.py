r"""eva-pretrain: EVA pretraining (masked image modeling regressing a frozen teacher's features).

  eva-pretrain --config=pretrain_demo --workdir=workdirs/demo [--config.batch_size=8 ...]

Running the same command on the same workdir resumes from the latest checkpoint; SIGTERM finishes
the current step, saves and exits 0. `python -m eva_jax.cli.pretrain` is the same program.
"""
from absl import flags

from eva_jax.cli import common
from eva_jax.training import pretrain, trainer


def main(argv):
  del argv
  trainer.run(pretrain.PretrainProgram(flags.FLAGS.config), flags.FLAGS.workdir)


def run():
  common.define_config('Pretraining config.')
  common.define_workdir()
  common.run(main, __doc__, ['config', 'workdir'])


if __name__ == '__main__':
  run()
