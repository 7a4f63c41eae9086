"""Video demo where time matters: the camera loops once around a square over a bundled photo,
starting at one of 4 corners; the label is the direction of the first pan (eva_jax.data.demo
pan_clip). The four classes show the same frames in another order, so a frame-averaged image
model is at chance (25%) and only space-time attention can learn it. Minutes on 2 CPU cores.

  eva-pretrain --config=pretrain_demo --workdir=workdirs/demo
  eva-video-finetune --config=video_demo --workdir=workdirs/video_demo \
      --config.init_from=workdirs/demo
  eva-video-finetune --config=video_demo --workdir=workdirs/video_demo_frames \
      --config.init_from=workdirs/demo --config.video.model=frame_average     # the baseline
"""
from eva_jax.training.video import video_finetune_defaults


def get_config():
  c = video_finetune_defaults(model='tiny')
  c.video.num_frames = 4            # all 4 written per clip (one per TSN segment)
  c.image_size = 28                 # 2x2 patches of 14 per frame: 1 + 4*4 = 17 tokens
  c.total_steps = 4000
  # The inflated pos-embed is identical over time, and on this set every time step sees the same
  # frame distribution, so nothing pushes the steps apart: start them apart with one random
  # offset per time step (a deviation from the spec's plain repeat, for the demo).
  c.video.time_noise = 0.1
  c.batch_size = 32
  c.log_every = 100
  c.checkpoint_every = 4000
  c.model.remat = 'none'            # tiny model: nothing to save
  c.model.drop_path = 0.0
  c.optim.lr = 3e-3
  c.freeze_patch_embed = False      # the tiny MIM patch embedding learns motion-friendly filters
  c.optim.min_lr = 1e-5
  c.optim.warmup_steps = 20
  c.optim.layer_decay = 1.0
  c.data.source = 'video_demo'
  c.eval_source = 'video_demo:val'
  c.data.hflip = 0.0                # a mirror swaps left and right: it would flip the labels
  # Whole frames (the pan moves one patch a frame; a rescaled crop would blur that).
  c.data.finetune_scale = (1.0, 1.0)
  c.data.ratio = (1.0, 1.0)
  c.data.label_smoothing = 0.0
  c.data.video.test_clips = 1       # the clip is one loop: 1 centred clip, 1 centre crop
  c.data.video.test_crops = 1
  c.data.workers = 0
  c.data.threads = 2
  return c
