"""The paper's EVA-01 g/14 pretraining recipe (../shared/EVA-SPEC.md "Pretraining recipe").

  python -m eva_jax.pretrain --config=configs/eva01_g14_pretrain.py \
      --config.teacher.checkpoint=/path/to/ViT-L-14.pt --workdir=gs://.../eva01_g14
  bf16 instead of the official fp16 + dynamic loss scaling:  --config=configs/eva01_g14_pretrain.py:bf16

Merged-30M: 29.6M images, batch 4096, 150 epochs, 2 warmup epochs, lr 1e-3 cosine to 1e-5.
"""
from eva_jax.data.config import merged30m_mixture
from eva_jax.defaults import pretrain_defaults

IMAGES = 29_600_000   # merged-30M


def get_config(arg: str = 'fp16'):
  c = pretrain_defaults(model='g/14', teacher='clip-L/14')
  c.precision = arg or 'fp16'
  c.batch_size = 4096
  steps_per_epoch = IMAGES // c.batch_size
  c.total_steps = 150 * steps_per_epoch
  c.optim.warmup_steps = 2 * steps_per_epoch
  c.optim.lr = 1e-3
  c.optim.min_lr = 1e-5
  c.model.drop_path = 0.1
  c.log_every = 100
  c.checkpoint_every = 2000
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1   # ZeRO-3-like FSDP over all chips
  c.teacher.shard = 'replicate'
  c.data.mixture = merged30m_mixture()
  c.data.source = ''
  c.data.workers = 16
  return c
