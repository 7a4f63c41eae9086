"""The paper's EVA-01 g/14 pretraining recipe (../shared/EVA-SPEC.md "Pretraining recipe").

  python -m eva_jax.pretrain --config=configs/eva01_g14_pretrain.py \
      --config.teacher.checkpoint=/path/to/ViT-L-14.pt --workdir=/ckpt/eva01_g14
  bf16 instead of the official fp16 + dynamic loss scaling:  --config=configs/eva01_g14_pretrain.py:bf16

Merged-30M: 29.6M images, batch 4096, 150 epochs, 2 warmup epochs, lr 1e-3 cosine to 1e-5.
"""
from eva_jax.defaults import merged30m_pretrain


def get_config(arg: str = 'fp16'):
  c = merged30m_pretrain('g/14', 'clip-L/14', precision=arg or 'fp16', batch_size=4096, lr=1e-3)
  # FSDP (ZeRO-3-like) over each host's chips, data parallel across hosts (HSDP): FSDP over all
  # 128 A100s is bound by inter-node weight gathers, 0.63 s per step predicted vs 0.37 s for
  # data 16 x fsdp 8 (docs/speed.md section 2). Flat FSDP over every chip:
  # --config.mesh.layout=flat.
  c.mesh.data, c.mesh.fsdp, c.mesh.layout = 1, -1, 'hybrid'
  return c
