"""The config a run saved: `--config=saved_run:WORKDIR` (or simply `--config=WORKDIR` or
`--config=WORKDIR/config.json`) repeats it; override fields as usual.

config.json holds the config as run plus a `resolved` section (derived facts, ignored here);
`config.model` holds the architecture name and the fields that were set.
"""
import json
import os

import ml_collections

from eva_jax.models.config import model_section


def get_config(arg: str):
  path = os.path.join(arg, 'config.json') if os.path.isdir(arg) else arg
  with open(path) as f:
    saved = json.load(f)
  saved.pop('resolved', None)
  model = saved.pop('model')
  c = ml_collections.ConfigDict(saved)
  c.model = model_section(**model)
  return c
