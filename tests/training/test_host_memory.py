"""host_memory.keep_step_buffers_resident: XLA:CPU's per-execution temporary buffer stops being
page-faulted in on every call (measured with getrusage minor faults in fresh subprocesses)."""
import json
import os
import subprocess
import sys

import support

PROBE = r'''
import json, resource, sys, time
from eva_jax import host_memory
applied = host_memory.keep_step_buffers_resident()
import jax, jax.numpy as jnp

@jax.jit
def f(x):   # ~100 MB of temporaries: [2048, 2048] f32 intermediates, each used twice (not fused away)
  ys = [jnp.cumsum(x * i, axis=0) for i in range(1, 7)]
  return sum(jnp.sum(y) + jnp.max(y) for y in ys)

x = jnp.ones((2048, 2048), jnp.float32)
jax.block_until_ready(f(x)); jax.block_until_ready(f(x))
per_call = []
for _ in range(7):
  # A step's host work between executions: XLA:CPU frees the temporary buffer after the execution
  # completes, on a runtime thread, so a call issued at once can still find it held.
  time.sleep(0.05)
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
faults = sorted(per_call)[3]   # the median call
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
late = host_memory.keep_step_buffers_resident()   # idempotent: the first answer again
print(json.dumps({'applied': applied, 'faults': faults, 'temp_pages': temp / 4096, 'late': late}))
'''

LATE = r'''
import jax, json
jax.devices()
from eva_jax import host_memory
print(json.dumps({'applied': host_memory.keep_step_buffers_resident()}))
'''


def _run(code, **env):
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                       env=dict(support.ENV, JAX_PLATFORMS='cpu', **env))
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_step_buffer_stays_mapped():
  if not sys.platform.startswith('linux'):
    return
  on, _ = _run(PROBE)
  off, _ = _run(PROBE, EVA_JAX_HOST_MALLOC='0')
  assert on['applied'] and on['late'] and not off['applied']
  assert off['temp_pages'] > 10000, off
  # Without the settings every call faults its whole temporary buffer in again; with them the
  # buffer is reused (what is left: outputs and small allocations).
  assert off['faults'] > 0.8 * off['temp_pages'], off
  assert on['faults'] < 0.1 * off['faults'], (on, off)


def test_too_late_is_logged_not_applied():
  if not sys.platform.startswith('linux'):
    return
  late, err = _run(LATE)
  assert late['applied'] is False
  assert 'already running' in err
