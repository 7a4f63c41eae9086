r"""eva-finetune: fine-tune an EVA encoder for image classification.

  eva-finetune --config=finetune_demo --workdir=workdirs/finetune_demo \
      --config.init_from=workdirs/demo

config.init_from: an eva_jax workdir or checkpoint, or a timm / official EVA .pth or .safetensors
file; '' = random init. Resumes like eva-pretrain. `python -m eva_jax.cli.finetune` is the same.
"""
from eva_jax.cli import common
from eva_jax.training import finetune


def run():
  common.run_training(finetune.FinetuneProgram, __doc__, 'Fine-tuning')


if __name__ == '__main__':
  run()
