"""Asynchronous host-to-device prefetch: a background thread reads the loader and puts batches on
the devices while the current step runs.

  loader = DevicePrefetcher(loader, lambda arrays: parallel.host_to_global(arrays, mesh), size=2)
  batch = next(loader)           # a data.pipeline.Batch whose arrays are global jax.Arrays
  ckpt.save(step, state, loader.get_state(), ...)

Exact resume. The thread runs up to `size` (+1 in flight) batches ahead of the training loop, so the
wrapped loader's own `get_state()` would describe batches that were read but never trained on.
Instead, the thread records the loader state right after reading each batch (`get_state()` is
called on the thread that owns the iterator, so it is never read mid-`next`) and queues it with the
batch. `DevicePrefetcher.get_state()` returns the state attached to the last batch handed out by
`__next__`: exactly "the batches consumed so far", whatever the thread has read beyond. Restoring
that state and reading on gives the next unconsumed batch. `set_state()` stops the thread, drops
what it had read ahead, sets the loader and restarts lazily at the next `__next__`.

Only `batch.arrays` are transferred; the host-side bookkeeping (`valid`, `skipped`) passes through.
"""
from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Callable, Iterator

_END = object()


class DevicePrefetcher(Iterator[Any]):
  """Wraps a loader of `Batch`es with get_state/set_state/close (data.pipeline.LoaderIterator)."""

  def __init__(self, loader, to_device: Callable[[dict[str, Any]], dict[str, Any]], size: int = 2):
    if size < 1:
      raise ValueError(f'prefetch size must be >= 1, got {size}.')
    self._loader, self._to_device, self._size = loader, to_device, int(size)
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._state = self._snapshot()     # state of the consumed prefix (nothing consumed yet)
    self._done = False

  # -- thread -------------------------------------------------------------------------------------
  def _snapshot(self):
    get = getattr(self._loader, 'get_state', None)
    return copy.deepcopy(get()) if get is not None else None

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _work(self):
    try:
      while not self._stop.is_set():
        try:
          host = next(self._loader)
        except StopIteration:
          self._put((_END, None, None))
          return
        state = self._snapshot()
        batch = host.replace(arrays=self._to_device(host.arrays))
        if not self._put((batch, state, None)):
          return
    except BaseException as e:  # handed to the consumer, raised there
      self._put((None, None, e))

  def _start(self):
    self._stop.clear()
    self._queue = queue.Queue(maxsize=self._size)
    self._thread = threading.Thread(target=self._work, name='device-prefetch', daemon=True)
    self._thread.start()

  def _halt(self):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread, self._queue = None, None

  # -- iterator protocol --------------------------------------------------------------------------
  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    if self._thread is None:
      self._start()
    batch, state, error = self._queue.get()
    if error is not None:
      self._halt()
      raise error
    if batch is _END:
      self._done = True
      self._halt()
      raise StopIteration
    self._state = state
    return batch

  def get_state(self):
    """The loader state after the last batch returned by __next__ (not after read-ahead ones)."""
    return copy.deepcopy(self._state)

  def set_state(self, state) -> None:
    self._halt()
    self._loader.set_state(state)
    self._state = copy.deepcopy(state)
    self._done = False

  def stop(self) -> None:
    """Stops the thread and drops read-ahead batches; the wrapped loader stays open."""
    self._halt()

  def close(self) -> None:
    self._halt()
    close = getattr(self._loader, 'close', None)
    if close is not None:
      close()
