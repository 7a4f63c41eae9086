"""Run logging: metrics.jsonl (one JSON object per log step), TensorBoard events, progress display.

The workdir may be local or an object-store URL (gs://bucket/run, s3://...): both files go through
etils.epath, the path layer orbax uses for the checkpoints.
"""
from __future__ import annotations

import io
import json
import os
import sys
import threading
import time

from etils import epath

from eva_jax.paths import url_scheme


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


class _ObjectFile:
  """A tensorboardX record file on an object store: the bytes are kept and the object rewritten.

  Object stores have no append, so each flush (tensorboardX's logger thread every `flush_secs`,
  MetricsWriter.flush, close) uploads the whole events file so far, through epath; the lock keeps
  an older, shorter upload from landing after a newer one. Every (re)start writes a new events
  file, so the size is bounded by one run's scalars (a few MB for a long run).
  """

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._buf = io.BytesIO()
    self._uploaded = -1
    self._lock = threading.Lock()

  def write(self, data: bytes) -> None:
    with self._lock:
      self._buf.write(data)

  def flush(self) -> None:
    with self._lock:
      if self._buf.tell() != self._uploaded:
        self._path.write_bytes(self._buf.getvalue())
        self._uploaded = self._buf.tell()

  def close(self) -> None:
    self.flush()


class _ObjectFileFactory:
  """tensorboardX writer factory (record_writer.register_writer_factory) writing through epath."""

  def open(self, path: str) -> _ObjectFile:
    return _ObjectFile(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no folders to create


class MetricsWriter:
  """Records to WORKDIR/metrics.jsonl, scalars mirrored to TensorBoard events (tensorboardX).

  Local workdir: metrics.jsonl is appended to and flushed at every record, as before.
  Object store (gs://, s3://): objects cannot be appended to, so the writer keeps the file's text
  (what an earlier run of the same workdir left, then this run's records) and rewrites the object
  at most every `flush_secs` and at close(); readers still see one metrics.jsonl, a JSON object a
  line, in the order written. A crash loses at most the last `flush_secs` of records (a resumed run
  logs those steps again anyway). TensorBoard events go through the same path layer (_ObjectFile).
  """

  def __init__(self, workdir: epath.PathLike, enabled: bool = True, flush_secs: float = 30.0):
    self.enabled = enabled
    if not enabled:
      return
    root = epath.Path(workdir)
    scheme = url_scheme(workdir)
    root.mkdir(parents=True, exist_ok=True)
    self._path = root / 'metrics.jsonl'
    self._remote = scheme is not None
    self._flush_secs = flush_secs
    if self._remote:
      earlier = self._path.read_text() if self._path.exists() else ''
      self._text = [earlier + '\n' if earlier and not earlier.endswith('\n') else earlier]
      self._pending, self._last_flush = False, time.monotonic()
    else:
      self._jsonl = self._path.open('a')
    writer_class = _summary_writer_class()
    if scheme is not None:
      from tensorboardX import record_writer
      record_writer.register_writer_factory(scheme, _ObjectFileFactory())
    self._tb = writer_class(os.fspath(root / 'tensorboard'))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    step = int(record['step'])
    for k, v in record.items():
      if k != 'step' and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)
    line = json.dumps(record) + '\n'
    if self._remote:
      self._text.append(line)
      self._pending = True
      if time.monotonic() - self._last_flush >= self._flush_secs:
        self.flush()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()

  def flush(self) -> None:
    """Makes every record written so far visible in metrics.jsonl and the events file."""
    if not self.enabled:
      return
    if self._remote:
      if self._pending:
        self._path.write_text(''.join(self._text))
        self._pending, self._last_flush = False, time.monotonic()
    else:
      self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.flush()
      if not self._remote:
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
