"""Host memory of the XLA:CPU backend: keep the per-step temporary buffer mapped between steps.

XLA:CPU allocates one temporary buffer per execution of a compiled program (the step's
activations and scratch: 195 MB for `configs/bench_cpu.py`) with `posix_memalign` from the calling
runtime thread. glibc serves a request that large from a thread's own arena by a fresh `mmap`, and
returns it to the kernel with `munmap` when the step ends, so every step page-faults the whole
buffer in again (48k minor faults and 0.12 CPU-s of kernel time per `bench_cpu` step, measured
with `getrusage`; PyTorch's eager step takes 8.7k). With one arena, no `mmap` for large blocks and
a high trim threshold, glibc keeps the freed block in its heap and the next step reuses it (4.8k
faults, 0.013 s of kernel time per step).

The settings are process-wide and only take hold for threads that have not yet allocated, so
`keep_step_buffers_resident` must run before jax starts its CPU client (the `eva-*` commands and
the test suite call it first thing). It acts only where the step runs on the CPU (JAX_PLATFORMS
is 'cpu', or the host has no GPU or TPU device files); EVA_JAX_HOST_MALLOC=0 turns it off.
The same effect without code: MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<bytes>.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys

# glibc <malloc.h> parameter numbers for mallopt(3).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Freed memory above this stays in the heap (mallopt takes an int: 2 GiB - 1 is its maximum).
_TRIM_THRESHOLD = 2 ** 31 - 1
_ACCELERATOR_DEVICES = ('/dev/nvidia[0-9]*', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*')

_done: list[bool] = []


def runs_on_cpu() -> bool:
  """True when jax will run on the host CPU: JAX_PLATFORMS names only 'cpu', or no GPU / TPU
  device file exists. Decided without starting a jax backend."""
  platforms = [p.strip() for p in os.environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if platforms:
    return platforms == ['cpu']
  return not any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def keep_step_buffers_resident() -> bool:
  """Sets glibc's malloc so freed step buffers stay mapped (one arena, no mmap for large blocks,
  2 GiB trim threshold). Returns True if applied. Does nothing, and returns False, off Linux/glibc,
  off CPU (`runs_on_cpu`), with EVA_JAX_HOST_MALLOC=0, or once jax has started a backend (too late
  to move the runtime threads to the main arena; logged). Idempotent."""
  if _done:
    return _done[0]
  ok = False
  if os.environ.get('EVA_JAX_HOST_MALLOC', '1') != '0' and sys.platform.startswith('linux') \
      and runs_on_cpu():
    if _backend_started():
      logging.warning('eva_jax: host malloc settings not applied: a jax backend is already '
                      'running (call host_memory.keep_step_buffers_resident() before using jax).')
    else:
      try:
        libc = ctypes.CDLL('libc.so.6')
        ok = all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)))
      except (OSError, AttributeError):   # not glibc (musl, macOS): nothing to tune
        ok = False
  _done.append(ok)
  return ok


def _backend_started() -> bool:
  xb = sys.modules.get('jax._src.xla_bridge')
  return bool(xb is not None and getattr(xb, '_backends', None))
