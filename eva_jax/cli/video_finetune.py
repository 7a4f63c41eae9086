r"""eva-video-finetune: fine-tune an EVA encoder on video clips (joint space-time attention).

  eva-video-finetune --config=video_demo --workdir=workdirs/video_demo \
      --config.init_from=workdirs/demo

config.init_from: an eva_jax image or video workdir / checkpoint, or a timm / official EVA file
(image weights are inflated over time); '' = random init. config.video.model=frame_average trains
the frame-averaged image baseline. Resumes like eva-finetune.
`python -m eva_jax.cli.video_finetune` is the same.
"""
from eva_jax.cli import common
from eva_jax.training import video


def run():
  common.run_training(video.VideoFinetuneProgram, __doc__, 'Video fine-tuning')


if __name__ == '__main__':
  run()
