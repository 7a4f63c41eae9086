"""The config a run saved: `--config=saved_run:WORKDIR` (or simply `--config=WORKDIR` or
`--config=WORKDIR/config.json`) repeats it; override fields as usual.

config.json holds the config as run plus a `resolved` section (derived facts, ignored here);
`config.model` holds the architecture name and the fields that were set.
"""
import json

import ml_collections
from etils import epath

from eva_jax.models.config import model_section


def get_config(arg: str):
  path = epath.Path(arg)
  saved = json.loads((path / 'config.json' if path.is_dir() else path).read_text())
  saved.pop('resolved', None)
  model = saved.pop('model')
  # Fields added since the run was saved get their defaults, so they can be overridden.
  teacher = saved.get('teacher')
  if isinstance(teacher, dict):
    # Runs saved before the field existed ran a random-init teacher whenever checkpoint was
    # empty: repeating them keeps doing so (the banner still says it).
    teacher.setdefault('allow_random_init', not teacher.get('checkpoint'))
  c = ml_collections.ConfigDict(saved)
  if 'text' in saved and 'loss' in saved:
    # A contrastive (EVA-CLIP) run: config.model is the CLIP model's name and CLIP-level fields;
    # the towers' overrides are config.vision / config.text.
    c.model = ml_collections.ConfigDict(model)
  else:
    c.model = model_section(**model)
  return c
