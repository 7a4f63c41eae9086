"""EVA-01 L/14 with the CLIP-L/14 teacher: the g/14 recipe applied to L (same data and schedule).

  python -m eva_jax.pretrain --config=configs/eva01_l14_pretrain.py \
      --config.teacher.checkpoint=/path/to/ViT-L-14.pt --workdir=DIR
"""
from eva_jax.defaults import merged30m_pretrain


def get_config(arg: str = 'bf16'):
  return merged30m_pretrain('L/14', 'clip-L/14', precision=arg or 'bf16', batch_size=4096, lr=1e-3)
