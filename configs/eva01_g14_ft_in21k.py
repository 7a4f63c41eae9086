"""EVA-01 g/14 intermediate fine-tuning on ImageNet-21K at 224 (EVA-SPEC "ImageNet fine-tuning").

  python -m eva_jax.finetune --config=configs/eva01_g14_ft_in21k.py --workdir=DIR \
      --config.init_from=/ckpt/eva01_g14 --config.data.source=tfds:imagenet21k
"""
from eva_jax.defaults import finetune_defaults

IMAGES = 14_197_122


def get_config():
  c = finetune_defaults(model='g/14')
  c.precision = 'fp16'
  c.image_size = 224
  c.batch_size = 4096
  steps_per_epoch = IMAGES // c.batch_size
  c.total_steps = 60 * steps_per_epoch
  c.optim.update(dict(lr=1e-4, min_lr=1e-6, warmup_steps=15 * steps_per_epoch, b1=0.9, b2=0.98,
                      eps=1e-6, weight_decay=0.05, layer_decay=0.85))
  c.model.drop_path = 0.4
  c.data.source = 'tfds:imagenet21k'
  c.data.cutmix, c.data.mixup, c.data.label_smoothing = 1.0, 0.0, 0.1
  c.data.finetune_scale = (0.5, 1.0)
  c.ema_decay = 0.0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.data.workers = 16
  c.log_every, c.checkpoint_every, c.eval_every = 100, 2000, 10000
  return c
