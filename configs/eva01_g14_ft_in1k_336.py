"""EVA-01 g/14 ImageNet-1K fine-tuning at 336 from the IN-21K intermediate checkpoint (89.6 top-1
with EMA in the paper). The pos-embed is interpolated 16x16 -> 24x24 at load.

  python -m eva_jax.finetune --config=configs/eva01_g14_ft_in1k_336.py --workdir=DIR \
      --config.init_from=/ckpt/eva01_g14_in21k
"""
from eva_jax.defaults import finetune_recipe

IMAGES = 1_281_167


def get_config():
  c = finetune_recipe('g/14', images=IMAGES, image_size=336, batch_size=512, epochs=10,
                      warmup_epochs=2, lr=3e-5, min_lr=0.0, betas=(0.9, 0.999), eps=1e-8,
                      layer_decay=0.95, drop_path=0.4)
  c.data.source = 'tfds:imagenet2012:train'
  c.eval_source = 'tfds:imagenet2012:validation'
  c.data.cutmix, c.data.mixup, c.data.label_smoothing = 0.0, 0.0, 0.3
  c.data.finetune_scale = (0.08, 1.0)
  c.data.crop_pct = 1.0
  c.ema_decay = 0.9999
  c.log_every, c.checkpoint_every, c.eval_every = 100, 1000, 2500
  return c
