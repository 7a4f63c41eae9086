"""mesh.layout='hybrid' (parallel.make_mesh): FSDP within each process's devices, data across
processes. Checked with 2 real processes (jax.distributed on localhost) x 2 CPU devices each."""
import json
import os
import socket
import subprocess
import sys

import pytest

import support
from eva_jax import parallel
from eva_jax.training import checks

SCRIPT = r'''
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from eva_jax import parallel
out = {}
for name, cfg in [('hybrid', dict(data=1, fsdp=-1, tensor=1, layout='hybrid')),
                  ('flat', dict(data=1, fsdp=-1, tensor=1, layout='flat'))]:
  m = parallel.make_mesh(cfg)
  out[name] = {'shape': [m.shape[a] for a in parallel.MESH_AXES],
               'process': [[[d.process_index for d in t] for t in f] for f in m.devices]}
try:
  parallel.make_mesh(dict(data=1, fsdp=3, tensor=1, layout='hybrid'))
except ValueError as e:
  out['error'] = str(e)
print('RESULT ' + json.dumps(out), flush=True)
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_hybrid_layout_puts_data_across_processes_and_fsdp_within():
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=support.ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  procs = [subprocess.Popen([sys.executable, '-c', SCRIPT, f'127.0.0.1:{port}', str(i)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=180)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  res = [json.loads(next(l for l in o.splitlines() if l.startswith('RESULT '))[7:]) for o in outs]
  assert res[0] == res[1]   # every process builds the same global mesh
  hybrid, flat = res[0]['hybrid'], res[0]['flat']
  # data 2 x fsdp 2: each data row is one process's devices, so the fsdp collectives (weight
  # gathers, gradient reduce-scatter) never leave a host; only the data all-reduce crosses.
  assert hybrid['shape'] == [2, 2, 1]
  assert [[t[0] for t in f] for f in hybrid['process']] == [[0, 0], [1, 1]]
  # flat FSDP over every device spans both processes on the fsdp axis.
  assert flat['shape'] == [1, 4, 1]
  assert sorted(t[0] for t in flat['process'][0]) == [0, 0, 1, 1]
  assert 'per process (2 devices on each of 2)' in res[0]['error']


def test_hybrid_on_one_process_equals_flat_and_unknown_layout_is_refused():
  n = len(parallel.jax.devices())
  hybrid = parallel.make_mesh(dict(data=1, fsdp=-1, tensor=1, layout='hybrid'))
  flat = parallel.make_mesh(dict(data=1, fsdp=-1, tensor=1, layout='flat'))
  assert dict(hybrid.shape) == dict(flat.shape) == {'data': 1, 'fsdp': n, 'tensor': 1}
  assert sorted(d.id for d in hybrid.devices.ravel()) == sorted(d.id for d in flat.devices.ravel())
  with pytest.raises(ValueError, match="mesh.layout='ring' unknown"):
    parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1, layout='ring'))
  cfg = support.recipe('pretrain_demo')
  cfg.mesh.layout = 'ring'   # refused by the config check, before anything is built
  with pytest.raises(ValueError, match="config.mesh.layout='ring' unknown"):
    checks.check_run(cfg)


def test_hybrid_device_grid_per_process_counts(caplog):
  # Device stand-ins (process_index, id) as a 4-process job would list them.
  import types
  fake = lambda p, i: types.SimpleNamespace(process_index=p, id=i)   # noqa: E731
  one_each = [fake(p, p) for p in range(4)]
  with caplog.at_level('WARNING'):
    grid = parallel._hybrid_device_array(dict(data=1, fsdp=-1, tensor=1), one_each)
  assert grid.shape == (4, 1, 1)   # one device per process: data 4 x fsdp 1, i.e. no FSDP at all
  assert 'plain data parallelism (data 4 x fsdp 1)' in caplog.text
  uneven = [fake(0, 0), fake(0, 1), fake(1, 2)]
  with pytest.raises(ValueError, match='same number of devices on every process'):
    parallel._hybrid_device_array(dict(data=1, fsdp=-1, tensor=1), uneven)
  # TPU: a granule is a slice (ICI joins all its chips, over several hosts), not a process.
  tpu = [types.SimpleNamespace(process_index=i // 2, id=i, slice_index=i // 4, platform='tpu')
         for i in range(8)]
  grid = parallel._hybrid_device_array(dict(data=1, fsdp=-1, tensor=1), tpu)
  assert grid.shape == (2, 4, 1)
  assert [{d.slice_index for d in row.ravel()} for row in grid] == [{0}, {1}]
  assert {d.process_index for d in grid[0].ravel()} == {0, 1}   # fsdp spans the slice's hosts
