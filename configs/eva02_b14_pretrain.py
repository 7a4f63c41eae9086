"""EVA-02 B/14 MIM (SwiGLU, sub-LN, 2D RoPE), lr 1.5e-3 at batch 2048, 224px.

Deviation: the paper's EVA-02 teacher is EVA-CLIP g/14 (1024-d), an EVA-architecture CLIP that the
teacher importers here do not read yet; the default teacher is OpenAI-style CLIP-L/14 (768-d).
  python -m eva_jax.pretrain --config=configs/eva02_b14_pretrain.py \
      --config.teacher.checkpoint=/path/to/ViT-L-14.pt --workdir=DIR
"""
from eva_jax.defaults import merged30m_pretrain


def get_config(arg: str = 'bf16'):
  return merged30m_pretrain('eva02-B/14', 'clip-L/14', precision=arg or 'bf16', batch_size=2048,
                            lr=1.5e-3)
