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
  _add_missing(saved, _defaults_of(saved))
  c = ml_collections.ConfigDict(saved)
  if 'text' in saved and 'loss' in saved:
    # A contrastive (EVA-CLIP) run: config.model is the CLIP model's name and CLIP-level fields;
    # the towers' overrides are config.vision / config.text.
    c.model = ml_collections.ConfigDict(model)
  else:
    c.model = model_section(**model)
  return c


def _defaults_of(saved: dict) -> dict:
  """The current defaults of the saved config's kind (training/checks.py config_kind), as a dict;
  {} for a kind without defaults."""
  from eva_jax import defaults
  from eva_jax.training import checks
  kind = checks.config_kind(ml_collections.ConfigDict(saved))
  if kind == 'video':
    from eva_jax.training.video import video_finetune_defaults
    return video_finetune_defaults().to_dict()
  make = {'pretrain': defaults.pretrain_defaults, 'finetune': defaults.finetune_defaults,
          'clip': defaults.clip_defaults}.get(kind)
  return make().to_dict() if make else {}


def _add_missing(saved: dict, default: dict) -> None:
  """Adds to `saved` (in place, at every level but config.model, which keeps only what was set)
  the fields of `default` it lacks: a field added since the run was saved then exists, with its
  default, and can be overridden (--config=WORKDIR --config.eval_only=True)."""
  for k, v in default.items():
    if k == 'model':
      continue
    if k not in saved:
      saved[k] = v
    elif isinstance(v, dict) and isinstance(saved[k], dict):
      _add_missing(saved[k], v)
