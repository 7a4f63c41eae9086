"""EVA-01 g/14 intermediate fine-tuning on ImageNet-21K at 224 (EVA-SPEC "ImageNet fine-tuning").

  python -m eva_jax.finetune --config=configs/eva01_g14_ft_in21k.py --workdir=DIR \
      --config.init_from=/ckpt/eva01_g14 --config.data.source=tfds:imagenet21k
"""
from eva_jax.defaults import finetune_recipe

IMAGES = 14_197_122


def get_config():
  c = finetune_recipe('g/14', images=IMAGES, image_size=224, batch_size=4096, epochs=60,
                      warmup_epochs=15, lr=1e-4, min_lr=1e-6, betas=(0.9, 0.98), eps=1e-6,
                      layer_decay=0.85, drop_path=0.4)
  c.data.source = 'tfds:imagenet21k'
  c.data.cutmix, c.data.mixup, c.data.label_smoothing = 1.0, 0.0, 0.1
  c.data.finetune_scale = (0.5, 1.0)
  c.ema_decay = 0.0
  c.log_every, c.checkpoint_every, c.eval_every = 100, 2000, 10000
  return c
