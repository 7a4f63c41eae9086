"""Per-module parameter table, computed abstractly (jax.eval_shape: nothing is allocated).

  eva-summary g/14          (or python -m eva_jax.models.summary g/14)
  eva-summary clip-L/14

The last line is `params: <total>`, the *backbone* count the paper reports: everything except the
MIM-only parts (mask token, final `norm`, which fine-tuning replaces by fc_norm). The lines above it
give the full count with those parts.
"""
from __future__ import annotations

import math
from collections import OrderedDict

from eva_jax.convert.common import model_params_abstract
from eva_jax.models import config as config_lib

# Parameters that are not part of the backbone the paper counts (1,011,143,296 for g/14).
NON_BACKBONE_PREFIXES = ('mask_token', 'norm/')


def table(cfg) -> tuple[list[tuple[str, str, int]], int, int]:
  """Rows (module, shapes, count) grouped by top-level module and per-block module; totals."""
  shapes = model_params_abstract(cfg)
  groups: OrderedDict[str, list[tuple[str, tuple]]] = OrderedDict()
  for k, s in sorted(shapes.items()):
    parts = k.split('/')
    # blocks/layers/attn/qkv -> blocks.attn (x depth); norm/scale -> norm; pos_embed -> pos_embed
    group = f'blocks.{parts[2]}' if parts[0] == 'blocks' else parts[0]
    groups.setdefault(group, []).append((k, s))
  rows = []
  for g, items in groups.items():
    n = sum(math.prod(s) for _, s in items)
    skip = 3 if g.startswith('blocks.') else 1  # drop 'blocks/layers/<module>/' or '<module>/'
    names = ['.'.join(k.split('/')[skip:]) or k for k, _ in items]
    rows.append((g, ', '.join(f'{nm}{list(s)}' for nm, (_, s) in zip(names, items)), n))
  total = sum(math.prod(s) for s in shapes.values())
  backbone = sum(math.prod(s) for k, s in shapes.items() if not k.startswith(NON_BACKBONE_PREFIXES))
  return rows, total, backbone


def report(name: str) -> str:
  """The printed table of an encoder or teacher name; ValueError for an unknown name."""
  if name in config_lib.TEACHER_NAMES:
    cfg = config_lib.teacher_config(name)
  elif name in config_lib.ENCODER_NAMES:
    cfg = config_lib.encoder_config(name)
  else:   # encoder_config's own message is about config.model.name, which this command lacks
    raise ValueError(f'Unknown architecture {name!r}. Encoders: '
                     f'{", ".join(config_lib.ENCODER_NAMES)}; teachers: '
                     f'{", ".join(config_lib.TEACHER_NAMES)}.')
  rows, total, backbone = table(cfg)
  w = max(len(r[0]) for r in rows)
  lines = [f'{name}: width {cfg.width}, depth {cfg.depth}, heads {cfg.heads}, mlp {cfg.mlp_dim}, '
           f'patch {cfg.patch_size}, image {cfg.image_size}',
           f'{"module":<{w}}  {"params":>14}  shapes (blocks stacked over depth)']
  lines += [f'{g:<{w}}  {n:>14,}  {s}' for g, s, n in rows]
  lines += [f'total (with mask token and final norm): {total:,}', f'params: {backbone:,}']
  return '\n'.join(lines)


if __name__ == '__main__':   # `python -m eva_jax.models.summary` = eva-summary
  from eva_jax.cli.summary import run
  run()
