"""Run logging: metrics.jsonl (one JSON object per log step), TensorBoard events, progress display."""
from __future__ import annotations

import json
import os
import sys
import time


def _summary_writer_class():
  """tensorboardX.SummaryWriter, imported without torch.

  tensorboardX's writer module tries `import torch` at import time, only so that it can accept torch
  tensors; that import costs ~2.7 s of start-up in every training process. We log Python floats, so
  when torch is not loaded already it is hidden for the duration of the import (tensorboardX then
  takes its numpy-only path); a later `import torch` (converters) is unaffected.
  """
  if 'torch' in sys.modules or 'tensorboardX.writer' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricsWriter:
  """Appends records to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard (tensorboardX)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tb = _summary_writer_class()(os.path.join(workdir, 'tensorboard'))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    step = int(record['step'])
    for k, v in record.items():
      if k != 'step' and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """A tqdm bar (step, loss, images/s, ETA) on a terminal; plain log lines when not a TTY."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.total = total
    self.start_step, self.start_time = initial, time.perf_counter()
    self.bar = None
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True)

  def update(self, step: int) -> None:
    if self.bar is not None:
      self.bar.update(step - self.bar.n)

  def show(self, record: dict) -> None:
    if not self.enabled:
      return
    text = f"loss {record['loss']:.4f} img/s {record['images_per_sec']:.1f}"
    if self.bar is not None:
      self.bar.set_postfix_str(text)
      return
    step = record['step']
    done = step - self.start_step
    elapsed = time.perf_counter() - self.start_time
    eta = elapsed / max(done, 1) * (self.total - step)
    print(f'step {step}/{self.total} {text} lr {record["lr"]:.2e} eta {eta:.0f}s', flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
