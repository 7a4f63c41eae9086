"""Fine-tune the demo pretraining on the demo labels (8 photos = 8 classes), a few minutes on 2 CPUs.

  python -m eva_jax.finetune --config=configs/finetune_demo.py --workdir=workdirs/finetune_demo \
      --config.init_from=workdirs/demo
"""
from eva_jax.defaults import finetune_defaults


def get_config():
  c = finetune_defaults(model='tiny')
  c.image_size = 112
  c.total_steps = 120
  c.batch_size = 32
  c.log_every = 10
  c.checkpoint_every = 120
  c.optim.lr = 2e-3
  c.optim.min_lr = 1e-5
  c.optim.warmup_steps = 10
  c.optim.layer_decay = 0.75
  c.model.drop_path = 0.1
  c.data.source = 'demo'
  c.data.randaug = 'rand-m9-mstd0.5-inc1'
  c.data.mixup, c.data.cutmix = 0.0, 0.0
  c.data.label_smoothing = 0.1
  c.data.finetune_scale = (0.2, 1.0)
  return c
