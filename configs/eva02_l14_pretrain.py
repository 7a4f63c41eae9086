"""EVA-02 L/14 MIM (SwiGLU, sub-LN, 2D RoPE), lr 1.5e-3 at batch 2048, 224px.

Deviation: the paper's EVA-02 teacher is EVA-CLIP g/14 (1024-d), an EVA-architecture CLIP that the
teacher importers here do not read yet; the default teacher is OpenAI-style CLIP-L/14 (768-d).
  python -m eva_jax.pretrain --config=configs/eva02_l14_pretrain.py \
      --config.teacher.checkpoint=/path/to/ViT-L-14.pt --workdir=DIR
"""
from eva_jax.data.config import merged30m_mixture
from eva_jax.defaults import pretrain_defaults

IMAGES = 29_600_000


def get_config(arg: str = 'bf16'):
  c = pretrain_defaults(model='eva02-L/14', teacher='clip-L/14')
  c.precision = arg or 'bf16'
  c.batch_size = 2048
  steps_per_epoch = IMAGES // c.batch_size
  c.total_steps = 150 * steps_per_epoch
  c.optim.warmup_steps = 2 * steps_per_epoch
  c.optim.lr = 1.5e-3
  c.optim.b2 = 0.98
  c.model.drop_path = 0.1
  c.log_every = 100
  c.checkpoint_every = 2000
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  c.data.mixture = merged30m_mixture()
  c.data.source = ''
  c.data.workers = 16
  return c
