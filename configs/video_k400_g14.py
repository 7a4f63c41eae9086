"""EVA-01 g/14 video on Kinetics-400, 16 frames at 224 (EVA-SPEC "Video: Kinetics fine-tuning"),
from the K-722 stage (configs/video_k722_g14.py); K-600/700 are the same with their lists.

  eva-video-finetune --config=video_k400_g14 --workdir=DIR --config.init_from=K722_WORKDIR \
      --config.data.source=video_list:/data/k400/train.txt \
      --config.eval_source=video_list:/data/k400/val.txt

The K-722 checkpoint has 8 frames: its pos-embed is resized trilinearly to 16 at init.
arg: the number of training videos of your copy (default K400_VIDEOS).

From the spec: 16 frames, 1 epoch, lr 1e-6, layer decay 0.95, drop path 0.2, label smoothing
0.1, colour jitter 0.8, grayscale 0.2; test 4 temporal clips x 3 spatial crops, scores averaged;
activation checkpointing (g/14 x 16 x 224 = 4,097 tokens). Not in the spec (chosen here): batch
256 and AdamW (0.9, 0.98, eps 1e-6, wd 0.05) as the K-722 stage, no warmup in a 1-epoch run,
min_lr 1e-8, bf16.
"""
from eva_jax.training.video import video_finetune_defaults

# Not in EVA-SPEC: the K-400 train list as commonly available today (clips lost to dead links are
# gone); pass the count of your copy as the config arg.
K400_VIDEOS = 240_436


def get_config(arg: str = ''):
  videos = int(arg) if arg else K400_VIDEOS
  c = video_finetune_defaults(model='g/14')
  c.precision = 'bf16'
  c.image_size = 224
  c.video.num_frames = 16              # 1 + 16 * 256 = 4,097 tokens
  c.video.tubelet = 1
  c.batch_size = 256
  c.total_steps = videos // c.batch_size   # 1 epoch
  c.optim.update(dict(lr=1e-6, min_lr=1e-8, warmup_steps=0, b1=0.9, b2=0.98, eps=1e-6,
                      weight_decay=0.05, layer_decay=0.95, clip_norm=0.0))
  c.model.drop_path = 0.2
  c.model.remat = 'full'
  c.model.attention = 'auto'
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.mesh.layout = 'hybrid'   # FSDP within each host, data across hosts (docs/speed.md 2)
  c.data.source = 'video_list:train.txt'
  c.data.label_smoothing = 0.1
  c.data.video.color_jitter, c.data.video.grayscale = 0.8, 0.2
  c.data.video.test_clips, c.data.video.test_crops = 4, 3
  c.data.video.decode_short_side = 256
  c.data.workers = 16
  c.eval_batches = 0
  c.log_every, c.checkpoint_every = 50, 500
  return c
