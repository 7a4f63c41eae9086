"""The step loop of the trainer skeleton (training/trainer.py), shared by every training program.

One place for: feeding host batches to the device (through a prefetch thread when
`data.device_prefetch > 0`), fetching metrics one step late (the host never
blocks on the step it just dispatched), periodic and final checkpoints (never of non-finite
parameters), SIGTERM = finish the step, save, return; periodic evaluation.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from typing import Any, Callable

import jax

from eva_jax.training import precision, prefetch


class Preemption:
  """Context manager turning SIGTERM into a flag checked after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def check_finite(params, step: int) -> None:
  """Never write NaN/Inf parameters over a good checkpoint."""
  if not bool(precision.all_finite(params)):
    raise FloatingPointError(f'Parameters are not finite at step {step}; not saving. The previous '
                             'checkpoint is kept; lower the learning rate or increase warmup.')


@contextlib.contextmanager
def _device_feed(cfg, loader, to_device):
  """(loader, to_device) for the loop: as given, or with `data.device_prefetch > 0` a thread that
  reads and transfers the next batches while the step runs (stopped on exit). Its get_state() is
  the state after the last batch handed out, so checkpoints stay exact (training/prefetch.py)."""
  depth = int(cfg.data.get('device_prefetch', 0))
  if depth < 0:
    raise ValueError(f'config.data.device_prefetch must be >= 0 (0 = off), got {depth}.')
  if depth == 0:
    yield loader, to_device
    return
  prefetcher = prefetch.DevicePrefetcher(loader, to_device, size=depth)
  try:
    yield prefetcher, lambda batch: batch   # batches arrive on the devices already
  finally:
    prefetcher.stop()


def run(cfg, *, state, start: int, train_step: Callable, loader, to_device: Callable,
        ckpt, meta: dict, writer, progress, evaluate: Callable | None = None) -> tuple[Any, dict, bool]:
  """Runs steps start+1..cfg.total_steps. Returns (state, last record, preempted).

  loader yields data.pipeline.Batch; to_device(batch.arrays) -> device arrays.
  train_step(state, device_arrays) -> (state, metrics dict of device scalars); `metrics['loss']`
  must exist. evaluate(state, step) -> dict of scalars, called every cfg.eval_every steps (if > 0)
  and after the last step.
  """
  pending = None
  last: dict = {}
  t_log, n_images = time.perf_counter(), 0
  step = start
  with _device_feed(cfg, loader, to_device) as (loader, to_device), Preemption() as stop:
    while step < cfg.total_steps:
      batch = next(loader)   # host arrays, or device arrays from the prefetch thread
      state, metrics = train_step(state, to_device(batch.arrays))
      step += 1
      n_images += cfg.batch_size
      if pending is not None:   # the device runs step N while the host reads step N-1
        last = _log(writer, progress, pending, cfg)
        pending = None
      if step % cfg.log_every == 0 or step in (1, cfg.total_steps) or stop.requested:
        now = time.perf_counter()
        pending = (step, metrics, {'images_per_sec': n_images / (now - t_log),
                                   'data/skipped': batch.skipped})
        t_log, n_images = now, 0
      progress.update(step)
      final = step == cfg.total_steps or stop.requested
      if step % cfg.checkpoint_every == 0 or final:
        check_finite(state.params, step)
        ckpt.save(step, state, loader.get_state(), meta, force=True)
      if evaluate is not None and ((cfg.get('eval_every', 0) and step % cfg.eval_every == 0
                                    and not final) or step == cfg.total_steps):
        if pending is not None:
          last = _log(writer, progress, pending, cfg)
          pending = None
        record = {'step': step, **evaluate(state, step)}
        writer.write(record)
        last.update(record)
      if stop.requested:
        break
    if pending is not None:
      last.update(_log(writer, progress, pending, cfg))
  return state, last, stop.requested


def _log(writer, progress, pending, cfg) -> dict:
  step, metrics, host = pending
  m = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not math.isfinite(m['loss']) and cfg.precision != 'fp16':
    raise FloatingPointError(f'Loss is {m["loss"]} at step {step}; the last checkpoint is kept. '
                             'Lower optim.lr or use a longer warmup.')
  record = {'step': step, **{k: v for k, v in m.items() if k not in ('finite', 'loss_scale',
                                                                     'masked_tokens')}, **host}
  if cfg.precision == 'fp16':
    record['loss_scale'] = m['loss_scale']
    record['skipped_update'] = 1.0 - m['finite']
  writer.write(record)
  progress.show(record)
  return record
