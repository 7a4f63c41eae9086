"""EVA-01 B/16. A patch-16 student needs a patch-16 teacher for the token grids to line up (14x14
at 224), so the teacher is CLIP-B/16 (512-d targets) rather than the paper's CLIP-L/14.

  python -m eva_jax.pretrain --config=configs/eva01_b16_pretrain.py \
      --config.teacher.checkpoint=/path/to/ViT-B-16.pt --workdir=DIR
"""
from eva_jax.data.config import merged30m_mixture
from eva_jax.defaults import pretrain_defaults

IMAGES = 29_600_000


def get_config(arg: str = 'bf16'):
  c = pretrain_defaults(model='B/16', teacher='clip-B/16')
  c.precision = arg or 'bf16'
  c.batch_size = 2048
  steps_per_epoch = IMAGES // c.batch_size
  c.total_steps = 150 * steps_per_epoch
  c.optim.warmup_steps = 2 * steps_per_epoch
  c.optim.lr = 1.5e-3
  c.model.drop_path = 0.1
  c.log_every = 100
  c.checkpoint_every = 2000
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  c.data.mixture = merged30m_mixture()
  c.data.source = ''
  c.data.workers = 16
  # 14x14 grid: scale the 105/256 block-mask target to ~41% of 196 patches.
  c.data.mask.num_masking_patches = 80
  return c
