r"""eva-clip: contrastive image-text training (EVA-CLIP) from an EVA image tower.

  eva-clip --config=clip_demo --workdir=workdirs/clip_demo --config.init.image=workdirs/demo

config.init.image: an eva_jax MIM / fine-tuning workdir or checkpoint, or a timm / official EVA
file; config.init.text: a transformers CLIP directory, an OpenAI .pt or an open_clip file; '' =
random init. Zero-shot and retrieval metrics go to WORKDIR/metrics.jsonl every
config.eval_every steps and at the end. Resumes like eva-pretrain.
`python -m eva_jax.cli.clip` is the same.
"""
from eva_jax.cli import common
from eva_jax.training import clip


def run():
  common.run_training(clip.ClipProgram, __doc__, 'Contrastive (EVA-CLIP) training')


if __name__ == '__main__':
  run()
