r"""Training curves of a run from its metrics.jsonl (pretraining, fine-tuning, video, EVA-CLIP).

  eva-plot --workdir=workdirs/demo --out=curves.png

Panels: loss (+ val_loss / eval_loss points), learning rate, gradient norm, fp16 loss scale (when
logged), images/s; fine-tuning and video runs add train/eval top-1 (+ top-5); EVA-CLIP runs add
zero-shot top-1/5, retrieval recall@1/5/10 and the logit scale. Logged numbers no panel draws
(counts, mask statistics) are named by `undrawn`. Uses matplotlib's Agg backend.
"""
from __future__ import annotations

import io
import json
import math
import os

from eva_jax import paths

# (panel title, metric keys drawn as lines, metric keys drawn as points, log-scale y)
PANELS = (
    ('loss', ('loss',), ('val_loss', 'eval_loss'), False),
    ('learning rate', ('lr',), (), False),
    ('gradient norm', ('grad_norm',), (), False),
    ('loss scale (fp16)', ('loss_scale',), (), True),
    ('images / s', ('images_per_sec',), (), False),
    ('top-1', ('train_top1',), ('eval_top1', 'eval_top5'), False),
    ('zero-shot top-k', (), ('zero_shot/top1', 'zero_shot/top5'), False),
    ('image -> text recall', (), tuple(f'retrieval/image_to_text_R@{k}' for k in (1, 5, 10)), False),
    ('text -> image recall', (), tuple(f'retrieval/text_to_image_R@{k}' for k in (1, 5, 10)), False),
    ('logit scale (exp)', ('logit_scale',), (), False),
)


def read_metrics(workdir_or_file: str) -> list[dict]:
  """Records of WORKDIR/metrics.jsonl (or a .jsonl path); errors when missing or empty."""
  path = paths.as_path(workdir_or_file)   # local or an object store (gs://)
  if path.is_dir() or not path.name.endswith('.jsonl'):
    path = path / 'metrics.jsonl'
  if not path.is_file():
    raise FileNotFoundError(f'No metrics file {os.fspath(path)!r}: pass the --workdir of a '
                            'pretraining or fine-tuning run (it writes metrics.jsonl at the first '
                            'log step).')
  lines = [(i, l.strip()) for i, l in enumerate(path.read_text().splitlines(), 1) if l.strip()]
  records = []
  for j, (i, line) in enumerate(lines):
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      if j == len(lines) - 1:   # a run killed mid-write leaves a partial last line
        continue
      raise ValueError(f'{path}:{i} is not JSON: {line[:80]!r}') from None
    if isinstance(rec, dict) and 'step' in rec:
      records.append(rec)
  if not records:
    raise ValueError(f'{path!r} holds no metrics records yet (empty file); wait for the first '
                     'log step (config.log_every).')
  return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
  xs, ys = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and math.isfinite(v):
      xs.append(int(r['step']))
      ys.append(float(v))
  return xs, ys


def panels_for(records: list[dict]) -> list[tuple]:
  """The PANELS that have data in `records`."""
  return [p for p in PANELS if any(series(records, k)[0] for k in p[1] + p[2])]


def undrawn(records: list[dict]) -> list[str]:
  """The numeric keys of `records` that no panel draws (e.g. eval_count, data/skipped), sorted."""
  drawn = {k for p in PANELS for k in p[1] + p[2]} | {'step'}
  return sorted({k for r in records for k, v in r.items()
                 if k not in drawn and isinstance(v, (int, float))})


def check_png(out: str, flag: str = '--out') -> None:
  """ValueError unless `out` names a .png file: the figures are written as PNG only (a .jpg name
  would hold PNG bytes)."""
  if not str(out).lower().endswith('.png'):
    raise ValueError(f'{flag}={out}: the figure is written as PNG; name the file .png.')


def plot_metrics(records: list[dict], axes=None, title: str = ''):
  """Draws the curves; returns the figure (a new one unless `axes` is given, one per panel)."""
  import matplotlib.pyplot as plt
  panels = panels_for(records)
  fig = None
  if axes is None:
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), layout='constrained',
                             squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(panels):]:
      ax.remove()
  for ax, (name, lines, points, log) in zip(axes, panels):
    for k in lines:
      xs, ys = series(records, k)
      if xs:
        ax.plot(xs, ys, label=k, marker='.' if len(xs) < 30 else None)
    for i, k in enumerate(points):
      xs, ys = series(records, k)
      if xs:
        ax.scatter(xs, ys, label=f'{k} ({ys[-1]:.4f})', color=f'C{3 + i}', zorder=3)
    if log:
      ax.set_yscale('log')
    ax.set_title(name)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > 1 or points:
      ax.legend(fontsize=8)
  if fig is not None and title:
    fig.suptitle(title)
  return fig if fig is not None else axes[0].figure


def save_figure(fig, out: str, panels: list[str], dpi: int = 100) -> None:
  """Writes `fig` as PNG to `out` (creating its folder), lists the panels in the PNG metadata and
  closes the figure. Shared with eva_jax.visualize."""
  import matplotlib.pyplot as plt
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=dpi, metadata={'Description': 'panels: ' + ','.join(panels)})
  plt.close(fig)
  out = paths.as_path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(buf.getvalue())


def plot(workdir: str, out: str, dpi: int = 100) -> list[str]:
  """CLI body: writes `out`; returns the panel names drawn."""
  records = read_metrics(workdir)
  names = [p[0] for p in panels_for(records)]
  fig = plot_metrics(records, title=f'{paths.as_path(workdir)} ({records[-1]["step"]} steps)')
  save_figure(fig, out, names, dpi)
  return names
