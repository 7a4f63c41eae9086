"""Issue 12 kinds H and J (resume checks; signals, crashes, locks, disks) on tiny pretraining runs.

H: a resume is checked against its checkpoint before anything is overwritten (teacher identity,
resolved model); config.json is written only once the run is accepted; a run already at
total_steps says so. J: SIGINT/SIGTERM save and every exit names the last saved step, a second
signal cannot kill the save, a corrupt latest checkpoint falls back to the previous one, one live
run per workdir, a full disk is one line naming the path.
"""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from eva_jax import checkpoint as ckpt_lib
from eva_jax.cli import common
from eva_jax.training import pretrain, resume, trainer

import support


def tiny(**overrides):
  """56 px, batch 4: a run compiles and trains in seconds on 2 cores."""
  cfg = support.recipe('pretrain_demo', image_size=56, batch_size=4, total_steps=4,
                       checkpoint_every=2, log_every=1, eval_batches=1)
  # A constant learning rate after one warmup step: the schedule does not depend on total_steps, so
  # a continuation to 6 steps repeats steps 3-4 of a 4-step run exactly.
  cfg.optim.warmup_steps, cfg.optim.min_lr = 1, cfg.optim.lr
  cfg.data.mask.num_masking_patches = 6
  cfg.data.mask.min_num_patches = 2
  for k, v in overrides.items():
    if '.' in k:
      section, field = k.split('.')
      cfg[section][field] = v
    else:
      cfg[k] = v
  return cfg


def losses(workdir):
  out = {}
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    r = json.loads(line)
    if 'loss' in r:
      out[r['step']] = r['loss']   # a resumed run appends; the later record wins
  return out


snapshot = support.snapshot


@pytest.fixture(scope='module')
def run4(tmp_path_factory):
  """4 steps, checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp('run4')
  pretrain.train(tiny(), str(workdir))
  assert ckpt_lib.finished_steps(workdir / 'checkpoints') == [2, 4]
  return workdir


@pytest.mark.parametrize('overrides, field', [
    ({'seed': 1}, 'teacher_fingerprint'),                 # another teacher, same shape
    ({'model.depth': 3}, 'student.depth'),                # another architecture
    ({'image_size': 112}, 'student.image_size'),          # another image size
])
def test_mismatched_resume_is_refused_naming_the_field_and_changes_nothing(
    run4, overrides, field):
  before = snapshot(run4)
  with pytest.raises(ValueError, match=rf'Resume refused: {field} was .* in checkpoint step 4') as e:
    pretrain.train(tiny(total_steps=6, **overrides), str(run4))
  message = str(e.value)
  assert 'resume_accept' in message and '\n' not in message
  assert snapshot(run4) == before   # config.json included


def test_execution_choices_do_not_block_a_resume():
  # A run started on CPU (xla attention, no remat) resumes on a GPU with cudnn and remat: the
  # parameters and the function are the same, so the difference is reported, not refused.
  saved = {'student': {'depth': 2, 'attention': 'xla', 'remat': 'none', 'scan_unroll': 1},
           'teacher': {'attention': 'xla'}}
  current = {'student': {'depth': 2, 'attention': 'cudnn', 'remat': 'dots', 'scan_unroll': 2},
             'teacher': {'attention': 'cudnn'}}
  changed = resume.check_meta(saved, current, 4, '/w/4')
  assert sorted(c.split(':')[0] for c in changed) == [
      'student.attention', 'student.remat', 'student.scan_unroll', 'teacher.attention']
  current['student']['depth'] = 3
  with pytest.raises(ValueError, match='Resume refused: student.depth was 2'):
    resume.check_meta(saved, current, 4, '/w/4')


def test_accepting_a_field_still_checks_shapes(run4):
  before = snapshot(run4)
  with pytest.raises(ValueError, match=r'params/encoder/.* has shape .* in checkpoint step 4'):
    pretrain.train(tiny(total_steps=6, resume_accept=('*',), **{'model.depth': 3}), str(run4))
  assert snapshot(run4) == before


def test_resume_at_total_steps_has_nothing_to_do(run4, capsys):
  before = snapshot(run4)
  assert pretrain.train(tiny(total_steps=3, **{'model.depth': 3}), str(run4)) == {'step': 4}
  out = capsys.readouterr().out
  assert 'already at step 4 >= total_steps=3; nothing to do' in out
  assert f'last saved step: 4 ({run4}/checkpoints/4)' in out
  assert snapshot(run4) == before


def test_teacher_fingerprint_tells_weights_apart():
  rng = np.random.default_rng(0)
  a = {'blocks': {'w': rng.normal(size=(4, 3)).astype(np.float32)}, 'b': np.zeros(3, np.float32)}
  b = {'blocks': {'w': a['blocks']['w'].copy()}, 'b': np.zeros(3, np.float32)}
  assert ckpt_lib.params_fingerprint(a) == ckpt_lib.params_fingerprint(b)
  b['blocks']['w'][0, 0] += 1e-6
  assert ckpt_lib.params_fingerprint(a) != ckpt_lib.params_fingerprint(b)


def test_accepted_teacher_change_and_stale_lock_takeover(run4, tmp_path, capsys):
  workdir = tmp_path / 'w'
  shutil.copytree(run4, workdir)
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  (workdir / 'run.lock').write_text(json.dumps({'pid': dead.pid, 'host': socket.gethostname(),
                                                'started': 'earlier'}))
  pretrain.train(tiny(total_steps=6, seed=1, resume_accept=('teacher_fingerprint',)),
                 str(workdir))
  out = capsys.readouterr().out
  assert f'Taking over the stale lock {workdir}/run.lock' in out
  assert 'Resumed from step 4' in out
  assert not (workdir / 'run.lock').exists()        # released at exit
  meta = ckpt_lib.read_meta(workdir / 'checkpoints' / '6')
  assert meta['teacher_fingerprint'] == 'random-init seed 2'
  assert json.load(open(workdir / 'config.json'))['seed'] == 1   # written once accepted


def test_live_lock_refuses_a_second_run(run4, tmp_path):
  workdir = tmp_path / 'w'
  shutil.copytree(run4, workdir)
  (workdir / 'run.lock').write_text(json.dumps({'pid': os.getpid(), 'host': 'other-host',
                                                'started': 'now'}))
  before = snapshot(workdir)
  with pytest.raises(resume.WorkdirInUse, match=r'in use by another run \(pid \d+ on other-host.*'
                     r'delete .*run.lock'):
    pretrain.train(tiny(total_steps=6), str(workdir))
  assert snapshot(workdir) == before


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(run4, tmp_path, capsys):
  workdir = tmp_path / 'w'
  shutil.copytree(run4, workdir)
  step4 = workdir / 'checkpoints' / '4'
  data_files = [os.path.join(r, f) for r, _, fs in os.walk(step4 / 'state') for f in fs
                if os.sep + 'd' + os.sep in os.path.join(r, f)]
  assert data_files
  for f in data_files:              # a torn write: the array chunks lost their contents
    with open(f, 'r+b') as fh:
      fh.truncate(0)
  pretrain.train(tiny(total_steps=6), str(workdir))
  out = capsys.readouterr().out
  assert 'checkpoint step 4 is incomplete or corrupt' in out
  assert 'resumed from step 2' in out and 'Resumed from step 2' in out
  assert (workdir / 'checkpoints' / '4.corrupt').is_dir()   # kept for inspection
  assert ckpt_lib.finished_steps(workdir / 'checkpoints') == [2, 4, 6]
  ref, got = losses(run4), losses(workdir)
  diff = max(abs(ref[s] - got[s]) for s in (3, 4))
  print(f'fallback to step 2 then steps 3-4: max |loss diff| vs the original run {diff:.2e}')
  assert diff <= 1e-6


def test_disk_full_is_one_line_naming_the_path(run4, tmp_path, monkeypatch, capsys):
  """Simulated: the first write of an accepted resume (config.json) finds the disk full. Every
  write of the run goes through the same handler (trainer.disk_errors), saves included."""
  workdir = tmp_path / 'w'
  shutil.copytree(run4, workdir)

  def full(*args):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(trainer, 'write_config', full)
  with pytest.raises(OSError) as e:
    pretrain.train(tiny(total_steps=6), str(workdir))
  line = common.known_error_message(e.value)
  print(line)
  assert line.startswith(f'no space left on device writing {workdir}') and '\n' not in line
  assert f'last saved step: 4 ({workdir}/checkpoints/4)' in capsys.readouterr().out
  assert ckpt_lib.finished_steps(workdir / 'checkpoints') == [2, 4]
  assert not (workdir / 'run.lock').exists()
  # When the OS names the file, the line names it; other OS errors keep their trace.
  named = OSError(errno.ENOSPC, 'No space left on device', '/data/run/metrics.jsonl')
  assert 'writing /data/run/metrics.jsonl' in common.known_error_message(named)
  assert common.known_error_message(OSError(errno.EACCES, 'denied')) is None


def test_sigint_then_more_signals_save_and_name_the_last_step(tmp_path):
  """SIGINT is a preemption like SIGTERM; signals during the final save cannot kill it."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'eva_jax.cli.pretrain', '--config=pretrain_demo',
         f'--workdir={workdir}', '--config.image_size=56', '--config.batch_size=4',
         '--config.total_steps=400', '--config.checkpoint_every=1000', '--config.log_every=1',
         '--config.progress=False', '--config.eval_batches=1', '--config.optim.warmup_steps=1',
         '--config.data.mask.num_masking_patches=6', '--config.data.mask.min_num_patches=2']
  proc = subprocess.Popen(cmd, cwd=support.ROOT, env=support.ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGINT)
  for s in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):   # an impatient user, a scheduler
    time.sleep(0.05)
    if proc.poll() is None:
      proc.send_signal(s)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  saved = ckpt_lib.finished_steps(workdir / 'checkpoints')
  assert len(saved) == 1 and 3 <= saved[0] < 400, saved
  assert 'SIGINT received: finishing the current step, saving' in err
  assert f'last saved step: {saved[0]} ({workdir}/checkpoints/{saved[0]})' in out
  assert not (workdir / 'run.lock').exists()
  print(f'stopped at step {saved[0]}; stderr: '
        f'{[l for l in err.splitlines() if "received" in l]}')
