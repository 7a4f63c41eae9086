"""Config checks that run before anything is built or compiled: each names the field and the fix.

Every trainer calls `check_run(cfg)` (training/trainer.py); programs add their own in
Program.validate.
"""
from __future__ import annotations

from eva_jax.training import precision


def check_run(cfg) -> None:
  """Fields every trainer reads. Raises ValueError naming the field."""
  precision.compute_dtype(cfg.precision)
  for f in ('total_steps', 'batch_size', 'log_every', 'checkpoint_every', 'image_size'):
    if int(cfg[f]) <= 0:
      raise ValueError(f'config.{f} must be positive, got {cfg[f]}.')
