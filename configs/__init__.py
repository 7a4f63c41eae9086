"""The recipe configs, shipped inside the package as `eva_jax.configs` (this folder is their source).

Each recipe is a module with `get_config(arg=None)` returning an ml_collections ConfigDict
(big_vision style). A config *spec* names one:
  'pretrain_demo'                 a recipe by name          'eva01_g14_pretrain:bf16'  with its arg
  'configs/pretrain_demo.py'      a file (':arg' allowed)   'WORKDIR' / 'WORKDIR/config.json'  a run

  cfg = eva_jax.configs.get('pretrain_demo')
"""
from __future__ import annotations

import importlib.util
import logging
import os
import pathlib

_HERE = pathlib.Path(__file__).resolve().parent


def names() -> list[str]:
  """The recipe names shipped with the package."""
  return sorted(p.stem for p in _HERE.glob('*.py') if not p.stem.startswith('_'))


def resolve(spec: str) -> str:
  """A config spec -> 'FILE.py[:arg]' that ml_collections' config_flags loads.

  A saved run (a workdir, or a config.json) goes through the `saved_run` recipe. A bare recipe
  name is the recipe even where a folder or file of that name lies in the current directory (a
  run made there with --workdir=NAME): that one is read as ./NAME, and a warning says so. Raises
  FileNotFoundError naming the spec and the known recipes."""
  path, sep, arg = str(spec).partition(':')
  if path in names():
    if os.path.exists(path):
      logging.getLogger(__name__).warning(
          '--config=%s is the recipe %s; the %s ./%s in the current directory is not read (write '
          '--config=./%s for it).', spec, path, 'folder' if os.path.isdir(path) else 'file', path,
          path)
    return f'{_HERE / path}.py{sep}{arg}'
  if path.endswith('.json') or (os.path.isdir(path) and os.path.isfile(
      os.path.join(path, 'config.json'))):
    return f'{_HERE / "saved_run.py"}:{path}'
  if os.path.isfile(path):
    return spec
  if (_HERE / f'{path}.py').is_file() and not path.startswith('_'):
    return f'{_HERE / path}.py{sep}{arg}'
  raise FileNotFoundError(f'--config={spec!r} is neither a config file, a run directory with '
                          f'config.json, nor a recipe name. Recipes: {", ".join(names())}.')


def get(spec: str):
  """The ConfigDict of a config spec (see the module docstring)."""
  path, _, arg = resolve(spec).partition(':')
  module_spec = importlib.util.spec_from_file_location(f'eva_jax_config_{pathlib.Path(path).stem}',
                                                       path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
