r"""What the machine can do: the dense bf16 peak per device kind, the matmul rate measured on a
step's own shapes, and per-device memory.

Memory: `peak_bytes_per_device` is the device's `peak_bytes_in_use` where the backend reports it
(GPU/TPU), else XLA's compiled memory analysis: arguments + non-aliased outputs + temporaries
(XLA:CPU's own `peak_memory_in_bytes` leaves the temporaries out).
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import jax


# Dense bf16 peak TFLOP/s per chip (EVA-SPEC), matched against jax's device_kind (lower case);
# the first matching entry wins, so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ('h100 pcie', 756.0),
    ('h100', 989.0),
    ('h200', 989.0),
    ('gh200', 989.0),
    ('a100', 312.0),
    ('tpu v4', 275.0),
    ('tpu v5 lite', 197.0),
    ('tpu v5e', 197.0),
    ('tpu v5p', 459.0),
    ('tpu v5', 459.0),
    ('tpu v6 lite', 918.0),
    ('tpu v6e', 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  if 'cpu' in kind:
    return None
  for name, peak in PEAK_TFLOPS:
    if name in kind:
      return peak
  return None


def memory_stats(compiled) -> dict[str, Any]:
  """Bytes per device from XLA's buffer assignment of the compiled step (no execution needed)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is None:
    return {}
  if isinstance(m, (list, tuple)):
    m = m[0]
  out = {k: int(getattr(m, k)) for k in ('argument_size_in_bytes', 'output_size_in_bytes',
                                          'alias_size_in_bytes', 'temp_size_in_bytes',
                                          'generated_code_size_in_bytes')
         if hasattr(m, k)}
  live = (out.get('argument_size_in_bytes', 0) + out.get('output_size_in_bytes', 0)
          - out.get('alias_size_in_bytes', 0) + out.get('temp_size_in_bytes', 0))
  # XLA:CPU's peak_memory_in_bytes leaves out the temp buffer; arguments + non-aliased outputs +
  # temps is an upper bound that holds on every backend, so the larger of the two is reported.
  out['peak_memory_in_bytes'] = int(getattr(m, 'peak_memory_in_bytes', 0) or 0)
  out['live_bytes'] = live
  out['peak_bytes'] = max(out['peak_memory_in_bytes'], live)
  return out


def device_peak_bytes(device) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def matmul_block(cfg, rows: int, dtype=None):
  """(jitted fn, its args, FLOPs): one block's weight matmuls (q, k, v, attention output, MLP in
  and out) of encoder `cfg` on `rows` = batch x tokens rows of random inputs in `dtype` (default:
  the compute dtype). experiments/torch_reference.py `matmul_block` builds the same in PyTorch."""
  from eva_jax.training.precision import DTYPES
  dt = DTYPES[cfg.dtype] if dtype is None else dtype
  d, f = cfg.width, cfg.mlp_dim
  mlp_in = 2 if cfg.get('swiglu', False) else 1
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (rows, d), dt)
  w = jax.random.normal(keys[1], (4, d, d), dt)
  w1 = jax.random.normal(keys[2], (mlp_in, d, f), dt)
  w2 = jax.random.normal(keys[3], (f, d), dt)

  @jax.jit
  def block(x, w, w1, w2):
    outs = [x @ w[i] for i in range(4)]
    h = [x @ w1[i] for i in range(mlp_in)]
    return outs, [hi @ w2 for hi in h]

  return block, (x, w, w1, w2), 2.0 * rows * d * (4 * d + 2 * mlp_in * f)


def matmul_rate(cfg, rows: int, dtype=None, repeats: int = 5) -> float:
  """The machine's matmul rate in TFLOP/s on the step's own shapes (`matmul_block`), jitted,
  median of `repeats` timed runs after one warm-up. The step's achieved TFLOP/s divided by this is
  the fraction of matmul-bound time it reaches (issue 17: the step cannot beat its own matmuls;
  the rest is attention, norms, elementwise work and the optimizer)."""
  block, args, flops = matmul_block(cfg, rows, dtype)
  jax.block_until_ready(block(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(block(*args))
    times.append(time.perf_counter() - t0)
  return flops / statistics.median(times) / 1e12
