"""Demo pretraining: tiny EVA student + tiny random CLIP teacher on the bundled demo photos.

Finishes in about a minute on 2 CPU cores; the loss falls from ~0 towards -1.
  python -m eva_jax.pretrain --config=configs/pretrain_demo.py --workdir=workdirs/demo
"""
from eva_jax.defaults import pretrain_defaults


def get_config():
  c = pretrain_defaults(model='tiny', teacher='clip-tiny')
  c.total_steps = 150
  c.batch_size = 16
  c.image_size = 112                 # 8x8 patches of 14
  c.log_every = 10
  c.checkpoint_every = 50
  c.eval_batches = 8
  c.optim.lr = 2e-3
  c.optim.min_lr = 1e-5
  c.optim.warmup_steps = 15
  c.model.drop_path = 0.0
  c.data.source = 'demo'
  c.teacher.allow_random_init = True   # a random-init teacher on purpose (no download)
  c.data.workers = 0
  # ~40% of an 8x8 grid, with blocks scaled down from the 16x16 recipe (16 of 256 patches).
  c.data.mask.num_masking_patches = 0   # the recipe ratio 105/256: 26 of 64 here, any size
  c.data.mask.min_num_patches = 4
  return c
