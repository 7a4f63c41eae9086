r"""eva-pretrain: EVA pretraining (masked image modeling regressing a frozen teacher's features).

  eva-pretrain --config=pretrain_demo --workdir=workdirs/demo [--config.batch_size=8 ...]

Running the same command on the same workdir resumes from the latest checkpoint; SIGTERM finishes
the current step, saves and exits 0. `python -m eva_jax.cli.pretrain` is the same program.
"""
from eva_jax.cli import common
from eva_jax.training import pretrain


def run():
  common.run_training(pretrain.PretrainProgram, __doc__, 'Pretraining')


if __name__ == '__main__':
  run()
