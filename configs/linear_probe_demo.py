"""Linear probe + k-NN of the demo pretraining on the demo labels (a 25% stratified hold-out).

  python -m eva_jax.linear_probe --config=configs/linear_probe_demo.py --config.init_from=workdirs/demo
"""
from eva_jax.defaults import linear_probe_defaults


def get_config():
  c = linear_probe_defaults()
  c.data.source = 'demo'
  c.image_size = 112
  c.pool = 'mean'
  c.epochs = 100
  c.lr = 1e-2
  return c
