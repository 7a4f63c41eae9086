"""Multi-host pretraining on one machine: 2 processes x 2 CPU devices through the real entry point.

Each process runs `python -m eva_jax.cli.pretrain ... --config.distributed.coordinator=127.0.0.1:PORT
--config.distributed.num_processes=2 --config.distributed.process_id=i` with 2 fake CPU devices
(jax.distributed over gloo CPU collectives), reading its own half of every batch. The losses must
match a 1-process run on 4 devices (same global batches, permuted rows; the loss is a token-weighted
mean, drop path is off in the demo config), the collective checkpoint must be written, and a
resume from it must reproduce the remaining steps.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import support

ROOT = support.ROOT
STEPS = 6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _cmd(workdir, *extra):
  return [sys.executable, '-m', 'eva_jax.cli.pretrain', '--config=pretrain_demo',
          f'--workdir={workdir}', f'--config.total_steps={STEPS}', '--config.log_every=1',
          '--config.checkpoint_every=3', '--config.progress=False', '--config.eval_batches=1',
          '--config.optim.warmup_steps=2', *extra]


def _env(devices, cache=None):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  if cache:  # the resume run reuses the first run's executables (one cache per process)
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    recs = [json.loads(l) for l in f]
  out = {}
  for r in recs:
    if 'loss' in r:
      out[r['step']] = r['loss']   # a resumed run appends; the later record wins
  return out


def _run_two_processes(workdir, cache, timeout=600):
  port = _free_port()
  procs = [subprocess.Popen(
      _cmd(workdir, f'--config.distributed.coordinator=127.0.0.1:{port}',
           '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}'),
      cwd=ROOT, env=_env(2, cache / f'p{i}'), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f'process {i} exited {p.returncode}:\n{out[-4000:]}'
  return outs


def test_two_processes_match_one_process_then_resume(tmp_path):
  ref_dir, mh_dir = tmp_path / 'ref', tmp_path / 'mh'
  out = subprocess.run(_cmd(ref_dir), cwd=ROOT, env=_env(4), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  ref = _losses(ref_dir)
  assert sorted(ref) == list(range(1, STEPS + 1))

  outs = _run_two_processes(mh_dir, tmp_path / 'jax_cache')
  resolved = json.load(open(mh_dir / 'config.json'))['resolved']
  assert resolved['num_processes'] == 2 and resolved['num_devices'] == 4, resolved
  got = _losses(mh_dir)
  assert sorted(got) == list(range(1, STEPS + 1)), outs[0][-2000:]
  diff = max(abs(ref[s] - got[s]) for s in ref)
  print(f'2 processes x 2 devices vs 1 process x 4 devices, {STEPS} steps: max |loss diff| {diff:.2e}')
  assert diff < 1e-3

  # The collective (multi-process) checkpoint: one orbax step directory per save, written once.
  ckpts = mh_dir / 'checkpoints'
  assert sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) == [3, STEPS]
  assert (ckpts / '3' / 'state').is_dir() and (ckpts / '3' / 'data').is_dir()
  # Each process's own input-iterator position is saved (orbax writes JSON from process 0 only).
  data = json.loads((ckpts / '3' / 'data' / 'metadata').read_text())
  assert len(data['processes']) == 2 and all(p['batches'] == 3 for p in data['processes']), data

  # Resume: drop the last checkpoint, run again -> both processes restore step 3 and redo 4..6.
  shutil.rmtree(ckpts / str(STEPS))
  outs = _run_two_processes(mh_dir, tmp_path / 'jax_cache')
  assert 'Resumed from step 3' in outs[0], outs[0][-2000:]
  resumed = _losses(mh_dir)
  rdiff = max(abs(ref[s] - resumed[s]) for s in range(4, STEPS + 1))
  print(f'resumed at step 3 on 2 processes: steps 4..{STEPS} max |loss diff| vs reference {rdiff:.2e}, '
        f'vs the uninterrupted 2-process run {max(abs(got[s] - resumed[s]) for s in range(4, STEPS + 1)):.2e}')
  assert rdiff < 1e-3
  assert max(abs(got[s] - resumed[s]) for s in range(4, STEPS + 1)) < 1e-5
