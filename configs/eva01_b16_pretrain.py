"""EVA-01 B/16. A patch-16 student needs a patch-16 teacher for the token grids to line up (14x14
at 224), so the teacher is CLIP-B/16 (512-d targets) rather than the paper's CLIP-L/14.

  python -m eva_jax.pretrain --config=configs/eva01_b16_pretrain.py \
      --config.teacher.checkpoint=/path/to/ViT-B-16.pt --workdir=DIR
"""
from eva_jax.defaults import merged30m_pretrain


def get_config(arg: str = 'bf16'):
  c = merged30m_pretrain('B/16', 'clip-B/16', precision=arg or 'bf16', batch_size=2048, lr=1.5e-3)
  c.data.mask.num_masking_patches = 80   # ~41% of the 14x14 grid (105/256 on 16x16)
  return c
