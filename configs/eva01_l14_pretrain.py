"""EVA-01 L/14 with the CLIP-L/14 teacher, the g/14 recipe scaled to L (same data and schedule).

  python -m eva_jax.pretrain --config=configs/eva01_l14_pretrain.py \
      --config.teacher.checkpoint=/path/to/ViT-L-14.pt --workdir=DIR
"""
from eva_jax.data.config import merged30m_mixture
from eva_jax.defaults import pretrain_defaults

IMAGES = 29_600_000


def get_config(arg: str = 'bf16'):
  c = pretrain_defaults(model='L/14', teacher='clip-L/14')
  c.precision = arg or 'bf16'
  c.batch_size = 4096
  steps_per_epoch = IMAGES // c.batch_size
  c.total_steps = 150 * steps_per_epoch
  c.optim.warmup_steps = 2 * steps_per_epoch
  c.model.drop_path = 0.1
  c.log_every = 100
  c.checkpoint_every = 2000
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  c.data.mixture = merged30m_mixture()
  c.data.source = ''
  c.data.workers = 16
  return c
