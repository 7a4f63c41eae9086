r"""eva-finetune: fine-tune an EVA encoder for image classification.

  eva-finetune --config=finetune_demo --workdir=workdirs/finetune_demo \
      --config.init_from=workdirs/demo

config.init_from: an eva_jax workdir or checkpoint, or a timm / official EVA .pth or .safetensors
file; '' = random init. Resumes like eva-pretrain. `python -m eva_jax.cli.finetune` is the same.
"""
from absl import flags

from eva_jax.cli import common
from eva_jax.training import finetune, trainer


def main(argv):
  del argv
  trainer.run(finetune.FinetuneProgram(flags.FLAGS.config), flags.FLAGS.workdir)


def run():
  common.define_config('Fine-tuning config.')
  common.define_workdir()
  common.run(main, __doc__, ['config', 'workdir'])


if __name__ == '__main__':
  run()
