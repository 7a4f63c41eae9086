"""The step loop of the trainer skeleton (training/trainer.py), shared by every training program.

One place for: feeding host batches to the device (through a prefetch thread when
`data.device_prefetch > 0`), fetching metrics one step late (the host never
blocks on the step it just dispatched), periodic and final checkpoints (never of non-finite
parameters nor during a divergence), divergence detection (`Divergence`), SIGTERM / SIGINT =
finish the step, save, return (`Preemption`); periodic evaluation.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import optax

from eva_jax.training import precision, prefetch


class Preemption:
  """Context manager turning SIGTERM and SIGINT into a flag checked after each step.

  The trainer holds it from start-up until the last checkpoint is committed (trainer.run), so a
  second signal during the final save is noted and ignored instead of killing the save. SIGKILL
  still stops a run at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name = ''
    self._previous = {}

  def __enter__(self):
    for s in self.SIGNALS:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested:
      print(f'{name} received again: still saving; the run exits once the checkpoint is '
            'committed (SIGKILL would lose it).', file=sys.stderr, flush=True)
      return
    self.requested, self.signal_name = True, name
    print(f'{name} received: finishing the current step, saving a checkpoint, then exiting.',
          file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


@jax.jit
def param_health(params) -> tuple[jax.Array, jax.Array]:
  """(global L2 norm, float32 scalar; all finite, bool scalar) of a parameter tree, in ONE compiled
  program. Eager `optax.tree.norm` and per-leaf `isfinite` compile a small program for every
  distinct leaf shape and op (about 100 for the demo model: 7 s of compiling at each start on 2
  CPU cores); this is one compile per parameter tree, its work sharded like the parameters."""
  return optax.tree.norm(params), precision.all_finite(params)


def check_finite(finite: bool, step: int) -> None:
  """Never write NaN/Inf parameters over a good checkpoint (`finite`: from param_health)."""
  if not finite:
    raise FloatingPointError(f'Parameters are not finite at step {step}; not saving. The previous '
                             'checkpoint is kept; lower the learning rate or increase warmup.')


class Divergence:
  """Stops a run whose losses went bad, and says whether the current state may be saved.

  config.divergence (defaults.py):
    max_nonfinite_steps: consecutive steps whose loss is not finite (or, in fp16, whose update was
      skipped although the loss scale is already at its minimum) that stop the run. In fp32/bf16 an
      update with non-finite gradients poisons the parameters, so one such step stops the run.
      In fp16 isolated skipped updates are ordinary loss scaling and never count.
    spike_factor, spike_window, spike_patience: a step spikes when its loss exceeds the median of
      the last spike_window normal losses by more than spike_factor times their median absolute
      deviation (floored at 1e-3 x |median| + 1e-6); spike_patience spiking steps in a row stop
      the run. spike_factor 0 turns the spike test off. The window restarts on resume.
    max_norm_growth: before each save, the global parameter norm may be at most this many times
      the norm at the start (or resume) or at the previous save; more stops the run (0 = off).
  `healthy` is False while such a streak is under way: no checkpoint is written then (the loop
  skips the save and says so), so keep-last-N rotation can only delete older good checkpoints in
  favour of newer good ones, never the last good one.
  """

  def __init__(self, cfg, last_saved=lambda: None):
    d = cfg.get('divergence') or {}
    self.max_nonfinite = int(d.get('max_nonfinite_steps', 5))
    self.spike_factor = float(d.get('spike_factor', 10.0))
    self.window = int(d.get('spike_window', 50))
    self.patience = int(d.get('spike_patience', 5))
    self.max_growth = float(d.get('max_norm_growth', 10.0))
    self.ref_norm = None   # parameter norm at the start, then at each checkpoint written
    for name, value in (('max_nonfinite_steps', self.max_nonfinite), ('spike_window', self.window),
                        ('spike_patience', self.patience)):
      if value < 1:
        raise ValueError(f'config.divergence.{name} must be >= 1, got {value}.')
    if self.max_growth < 0 or 0 < self.max_growth <= 1:
      raise ValueError(f'config.divergence.max_norm_growth must be > 1 (0 = off), got '
                       f'{self.max_growth}.')
    if self.spike_factor < 0:
      raise ValueError(f'config.divergence.spike_factor must be >= 0 (0 = no spike test), got '
                       f'{self.spike_factor}.')
    self.fp16 = cfg.precision == 'fp16'
    ls = cfg.get('loss_scale') or {}
    self.min_scale = float(ls.get('min_scale', 1.0))
    self.cfg = cfg
    self.last_saved = last_saved
    self.history: list[float] = []
    self.nonfinite = self.spikes = 0
    self.first_bad = None

  @property
  def healthy(self) -> bool:
    return self.nonfinite == 0 and self.spikes == 0

  def observe(self, step: int, loss: float, finite: float, scale: float) -> None:
    """One step's host scalars (loss, gradients all finite, loss scale in use). Raises
    FloatingPointError when the run has diverged."""
    bad = not math.isfinite(loss)
    if not self.fp16:
      if bad or not finite:
        self._stop(step, f'the {"loss" if bad else "gradient"} is not finite at step {step} '
                   f'(loss {loss}); in {self.cfg.precision} such an update corrupts the weights')
    elif not finite and scale <= self.min_scale:
      bad = True   # nothing left to lower: loss scaling cannot recover this
    if bad:
      self.first_bad = self.first_bad or step
      self.nonfinite += 1
      if self.nonfinite >= self.max_nonfinite:
        self._stop(step, f'{self.nonfinite} consecutive steps ({self.first_bad}..{step}) had a '
                   f'non-finite loss or an unrecoverable fp16 overflow (loss {loss}, loss scale '
                   f'{scale:g}; config.divergence.max_nonfinite_steps={self.max_nonfinite})')
      return
    self.nonfinite = 0
    if self.spike_factor > 0 and len(self.history) >= self.window:
      med = float(np.median(self.history))
      mad = float(np.median(np.abs(np.asarray(self.history) - med)))
      limit = med + self.spike_factor * max(mad, 1e-3 * abs(med) + 1e-6)
      if loss > limit:
        self.first_bad = self.first_bad if self.spikes else step
        self.spikes += 1
        if self.spikes >= self.patience:
          self._stop(step, f'the loss spiked for {self.spikes} steps in a row '
                     f'({self.first_bad}..{step}): {loss:.4g} against a running median of '
                     f'{med:.4g} (limit {limit:.4g} = median + {self.spike_factor:g} x '
                     f'{max(mad, 1e-3 * abs(med) + 1e-6):.3g}; config.divergence.spike_factor, '
                     'spike_window, spike_patience)')
        return
    self.spikes = 0
    self.first_bad = None
    self.history.append(loss)
    if len(self.history) > self.window:
      del self.history[0]

  def check_norm(self, step: int, norm: float) -> None:
    """Before a save: the global parameter norm (`norm`, from param_health) may not have grown by
    more than max_norm_growth since the start or the previous checkpoint. Weights that blow up
    (~1e6 after a huge learning rate) can keep a finite loss for steps; saving them would rotate
    good checkpoints away."""
    if not self.max_growth:
      return
    norm = float(norm)
    ref, self.ref_norm = self.ref_norm, norm
    if ref and norm > self.max_growth * ref:   # (an all-zero start defines no growth)
      self.ref_norm = ref
      self._stop(step, f'the parameter norm grew from {ref:.4g} to {norm:.4g} ({norm / ref:.3g}x '
                 f'since the previous checkpoint or the start; '
                 f'config.divergence.max_norm_growth={self.max_growth:g})')

  def _stop(self, step: int, why: str):
    last = self.last_saved()
    kept = (f'the last good checkpoint is step {last}: resuming (the same command) starts there'
            if last is not None else 'no checkpoint was saved yet')
    o = self.cfg.optim
    raise FloatingPointError(
        f'Training diverged at step {step}: {why}. No checkpoint is written from a diverged '
        f'state; {kept}. Lower optim.lr (now {o.get("lr")}) or lengthen optim.warmup_steps (now '
        f'{o.get("warmup_steps")}).')


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
        ckpt, meta: dict, writer, progress, evaluate: Callable | None = None,
        stop: Preemption | None = None) -> tuple[Any, dict, bool]:
  """Runs steps start+1..cfg.total_steps. Returns (state, last record, preempted).

  loader yields data.pipeline.Batch; to_device(batch.arrays) -> device arrays.
  train_step(state, device_arrays) -> (state, metrics dict of device scalars); `metrics['loss']`
  must exist ('finite' and 'loss_scale' too, as task.train_step gives them). evaluate(state, step)
  -> dict of scalars, called every cfg.eval_every steps (if > 0) and after the last step.
  stop: the caller's Preemption (held until its last save is committed); None = one of our own.
  Every step's loss is read on the host one step late (the device keeps one step in flight) for
  the divergence test; a step due for a checkpoint is read before its save.
  """
  with contextlib.ExitStack() as stack:
    if stop is None:
      stop = stack.enter_context(Preemption())
    feed_loader, feed = stack.enter_context(_device_feed(cfg, loader, to_device))
    return _steps(cfg, state, start, train_step, feed_loader, feed, ckpt, meta, writer, progress,
                  evaluate, stop)


def _steps(cfg, state, start, train_step, loader, to_device, ckpt, meta, writer, progress,
           evaluate, stop):
  monitor = Divergence(cfg, last_saved=lambda: ckpt.pending if ckpt.pending is not None
                       else ckpt.last_saved)
  if monitor.max_growth:   # the reference norm of this run's first state
    monitor.check_norm(start, param_health(state.params)[0])
  last: dict = {}
  inflight = None   # (step, device metrics, host extras, log it?)
  t_log, n_images = time.perf_counter(), 0
  step = start

  def settle():
    """Reads the step in flight on the host: divergence test, then its log record if due."""
    nonlocal inflight, last
    if inflight is None:
      return
    s, metrics, host, log = inflight
    inflight = None
    wanted = metrics if log else {k: metrics[k] for k in ('loss', 'finite', 'loss_scale')
                                  if k in metrics}
    m = {k: float(v) for k, v in jax.device_get(wanted).items()}
    monitor.observe(s, m['loss'], m.get('finite', 1.0), m.get('loss_scale', 1.0))
    if log:
      last = _log(writer, progress, s, m, host, cfg)

  while step < cfg.total_steps:
    batch = next(loader)   # host arrays, or device arrays from the prefetch thread
    state, metrics = train_step(state, to_device(batch.arrays))
    step += 1
    n_images += cfg.batch_size
    settle()   # the device runs step N while the host reads step N-1
    log = step % cfg.log_every == 0 or step in (1, cfg.total_steps) or stop.requested
    host = {}
    if log:
      now = time.perf_counter()
      host = {'images_per_sec': n_images / (now - t_log), 'data/skipped': batch.skipped}
      t_log, n_images = now, 0
    inflight = (step, metrics, host, log)
    progress.update(step)
    final = step == cfg.total_steps or stop.requested
    if step % cfg.checkpoint_every == 0 or final:
      settle()   # this step's loss decides whether its state may be saved
      if monitor.healthy:
        norm, finite = jax.device_get(param_health(state.params))
        check_finite(bool(finite), step)
        monitor.check_norm(step, norm)
        ckpt.save(step, state, loader.get_state(), meta, force=True)
      else:
        print(f'Not saving step {step}: the loss has been non-finite or spiking since step '
              f'{monitor.first_bad}; the last checkpoint kept is step '
              f'{ckpt.pending if ckpt.pending is not None else ckpt.last_saved}.',
              file=sys.stderr, flush=True)
    if evaluate is not None and ((cfg.get('eval_every', 0) and step % cfg.eval_every == 0
                                  and not final) or step == cfg.total_steps):
      settle()
      record = {'step': step, **evaluate(state, step)}
      writer.write(record)
      last.update(record)
    if stop.requested:
      break
  settle()
  return state, last, stop.requested


def _log(writer, progress, step, m, host, cfg) -> dict:
  record = {'step': step, **{k: v for k, v in m.items() if k not in ('finite', 'loss_scale',
                                                                     'masked_tokens')}, **host}
  if cfg.precision == 'fp16':
    record['loss_scale'] = m['loss_scale']
    record['skipped_update'] = 1.0 - m['finite']
  writer.write(record)
  progress.show(record)
  return record
