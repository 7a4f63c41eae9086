"""What the trainer skeleton checks before it touches a workdir (training/trainer.py).

- `WorkdirLock`: one live run per workdir (WORKDIR/run.lock: pid, host, time); a lock left by a
  dead process on this host is taken over with a warning.
- `check_meta`: a resume is compared with its checkpoint's metadata field by field (resolved
  student and teacher, teacher weights fingerprint, class count, ...) before anything is restored or
  overwritten; a difference stops the run naming the field, unless config.resume_accept lists it.
  That includes `train_data`, the fingerprint of the training listing every program records
  (data/sources.py listing_fingerprint, added by training/trainer.py): the loader's saved position
  is an index into that listing (grain 'next_index'), so a folder or shard set changed since the
  save (files added, removed, renamed, links now followed) would continue on other data without a
  word. A copy of the same tree elsewhere matches (relative paths); a changed listing is refused
  (`--config.resume_accept=train_data` continues on purpose, e.g. after cleaning the data);
  checkpoints written before it was recorded are resumed with a warning that it is not checked.
- `check_shapes`: the parameters the run would restore into have the checkpoint's shapes (also for
  checkpoints written before the metadata recorded everything); never overridable.
- `restore`: the newest restorable step; a step that fails to restore while an older one restores
  with the same config is corrupt: it is set aside (`<step>.corrupt`) with a warning.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
from typing import Any

from etils import epath

from eva_jax import checkpoint as ckpt_lib
from eva_jax.paths import url_scheme

LOCK_NAME = 'run.lock'


class WorkdirLock:
  """WORKDIR/run.lock, held by the main process for the whole run (a context manager).

  Local workdirs use an exclusive create (atomic); object stores have none, so there the lock is
  check-then-write: it stops the common mistake (a second command on a live run), not a race."""

  def __init__(self, workdir: epath.Path, enabled: bool = True):
    self.path = workdir / LOCK_NAME
    self.enabled = enabled
    self.held = False
    self.record = {'pid': os.getpid(), 'host': socket.gethostname(),
                   'started': datetime.datetime.now(datetime.timezone.utc).isoformat(
                       timespec='seconds')}

  def __enter__(self):
    if self.enabled:
      self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def acquire(self) -> None:
    text = json.dumps(self.record)
    if self._create(text):
      self.held = True
      return
    try:
      other = json.loads(self.path.read_text())
    except (OSError, ValueError):
      other = {}
    if other.get('host') == self.record['host'] and not _alive(other.get('pid')):
      logging.warning('Taking over the stale lock %s: its run (pid %s, started %s) is no longer '
                      'alive on this host.', os.fspath(self.path), other.get('pid'),
                      other.get('started'))
      print(f'Taking over the stale lock {os.fspath(self.path)} (pid {other.get("pid")} is not '
            'running).', flush=True)
      self.path.write_text(text)
      self.held = True
      return
    who = (f'pid {other.get("pid")} on {other.get("host")}, started {other.get("started")}'
           if other else 'unreadable lock file')
    raise WorkdirInUse(
        f'{os.fspath(self.path.parent)} is in use by another run ({who}). Wait for it to finish or '
        f'stop it; if no run is alive (e.g. its machine went away), delete {os.fspath(self.path)}.')

  def _create(self, text: str) -> bool:
    if url_scheme(self.path) is None:
      try:
        fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, 'w') as f:
        f.write(text)
      return True
    if self.path.exists():
      return False
    self.path.write_text(text)
    return True

  def release(self) -> None:
    """Removes the lock if it is still ours (a takeover by another run is left alone)."""
    if not self.held:
      return
    self.held = False
    try:
      if json.loads(self.path.read_text()).get('pid') == self.record['pid']:
        self.path.unlink()
    except (OSError, ValueError):
      pass


class WorkdirInUse(ValueError):
  """Another live run holds the workdir: reported as one line (exit 2) by the commands."""


def _alive(pid: Any) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # alive, someone else's
    return True
  return True


def differences(saved: Any, current: Any, prefix: str = '') -> list[tuple[str, Any, Any]]:
  """(dotted field, saved value, current value) for every leaf that differs; a field absent on one
  side is reported with the value `MISSING`."""
  if isinstance(saved, dict) and isinstance(current, dict):
    out = []
    for k in sorted(set(saved) | set(current), key=str):
      out += differences(saved.get(k, MISSING), current.get(k, MISSING), f'{prefix}{k}.')
    return out
  if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
    saved, current = list(saved), list(current)   # JSON turns tuples into lists
  return [] if saved == current else [(prefix[:-1], saved, current)]


EXECUTION_FIELDS = frozenset({'attention', 'remat', 'scan_unroll'})


class _Missing:
  def __repr__(self):
    return '(not recorded)'


MISSING = _Missing()


def accepted(field: str, accept) -> bool:
  """config.resume_accept entries: a field ('teacher_fingerprint'), a section ('student' covers
  student.*), or '*' (every metadata difference; shapes are still checked)."""
  return any(a == '*' or field == a or field.startswith(a + '.') for a in accept)


def check_meta(saved: dict, current: dict, step: int, step_dir: str, accept=()) -> list[str]:
  """Raises ValueError naming the first field of the checkpoint's metadata that this run changes
  (unless config.resume_accept lists it). Returns the accepted differences, for the log."""
  diffs = differences(saved, current)
  unrecorded = [f for f, s, _ in diffs if s is MISSING]
  diffs = [d for d in diffs if d[1] is not MISSING]
  # How a tower is executed (attention kernel, remat policy, scan unrolling) changes neither its
  # parameters nor its function: resuming on a GPU with attention=cudnn, or with more remat to fit
  # memory, is allowed and logged, never refused.
  refused = [d for d in diffs if not accepted(d[0], accept)
             and d[0].rsplit('.', 1)[-1] not in EXECUTION_FIELDS]
  if refused:
    field, was, now = refused[0]
    more = f' (and {len(refused) - 1} more: {", ".join(d[0] for d in refused[1:4])})' \
        if len(refused) > 1 else ''
    raise ValueError(
        f'Resume refused: {field} was {_show(was)} in checkpoint step {step} ({step_dir}) and is '
        f'{_show(now)} in this run{more}. Nothing was changed. Use the original config (e.g. '
        f'--config=WORKDIR) to continue, a new --workdir for a new run, or, to continue on '
        f'purpose, --config.resume_accept={field!r} (a field, a section, or "*").')
  # A field the old checkpoint never recorded (written by an older eva_jax) cannot be compared:
  # said once, not silently passed. Only once the resume is accepted: next to a refusal (e.g.
  # train_data of a folder vs a TFDS source, whose keys differ) it would misdirect.
  if unrecorded:
    logging.warning('Checkpoint %s records no %s (written by an older eva_jax); those cannot be '
                    'checked on this resume.', step_dir, ', '.join(unrecorded))
    print(f'warning: checkpoint step {step} records no {", ".join(unrecorded)}; not checked.',
          flush=True)
  return [f'{f}: {_show(s)} -> {_show(c)}' for f, s, c in diffs]


def _show(v) -> str:
  s = repr(v)
  return s if len(s) <= 80 else s[:77] + '...'


def check_shapes(state_tree: dict, abstract_tree: dict, step: int, step_dir: str) -> None:
  """Every parameter (and the EMA) the run restores has the checkpoint's shape; raises ValueError
  naming the first that differs. orbax would otherwise print a long trace advising strict=False."""
  from eva_jax.convert import common
  for item in ('params', 'ema'):
    saved, want = item in state_tree, item in abstract_tree
    if saved != want:
      raise ValueError(
          f'Resume refused: checkpoint step {step} ({step_dir}) {"holds" if saved else "has no"} '
          f'EMA weights and this run {"keeps" if want else "keeps none"} (config.ema_decay). Resume '
          'with the ema_decay of the run that wrote it, or start a new --workdir.')
    if not saved:
      continue
    a = {k: tuple(getattr(v, 'shape', ())) for k, v in common.flatten(state_tree[item]).items()}
    b = {k: tuple(v.shape) for k, v in common.flatten(abstract_tree[item]).items()}
    for k in sorted(set(a) | set(b)):
      if a.get(k) != b.get(k):
        was = a.get(k, 'absent')
        now = b.get(k, 'absent')
        raise ValueError(
            f'Resume refused: {item}/{k} has shape {was} in checkpoint step {step} ({step_dir}) '
            f'and {now} in this run: the model differs (architecture, image size or class count). '
            'Resume with the original config (--config=WORKDIR), or start a new --workdir (a '
            'fine-tuning run can take these weights through config.init_from).')


def restore(ckpt: ckpt_lib.Checkpointer, task, current_meta: dict, accept=()):
  """(step, state, data state) of the newest restorable checkpoint, after the checks above.

  A step whose files fail to restore although the previous step restores with the same config is
  corrupt (a torn write, a lost file): it is renamed `<step>.corrupt` (kept), with a warning. If the
  previous one fails too, the problem is the config, not the files: the first error is raised."""
  steps = ckpt.steps()
  abstract = ckpt_lib.state_to_tree(task.abstract_state)
  first_error = None
  failed: list[int] = []
  for step in reversed(steps):
    step_dir = os.fspath(ckpt.step_dir(step))
    try:
      saved_meta = ckpt_lib.read_meta(step_dir)
      state_tree = ckpt_lib.state_metadata(step_dir)
    except Exception as e:  # pylint: disable=broad-except
      error = e
    else:
      check_meta(saved_meta, current_meta, step, step_dir, accept)   # refusals are not corruption
      check_shapes(state_tree, abstract, step, step_dir)
      try:
        state, data_state, _ = ckpt.restore(step, task.abstract_state, task.state_shardings)
      except Exception as e:  # pylint: disable=broad-except
        error = e
      else:
        if failed:
          for bad in failed:
            where = ckpt.set_aside(bad)
            logging.warning('Checkpoint step %d could not be read (%s); kept as %s.', bad,
                            first_error, os.fspath(where))
            print(f'warning: checkpoint step {bad} is incomplete or corrupt '
                  f'({_one_line(first_error)}); set aside as {os.fspath(where)} and resumed from '
                  f'step {step}.', flush=True)
        return step, state, data_state
    failed.append(step)
    first_error = first_error or error
    logging.warning('Checkpoint step %d failed to restore: %s', step, _one_line(error))
  if first_error is None:
    return None
  raise ValueError(
      f'No checkpoint under {os.fspath(ckpt.directory)} can be restored (tried steps '
      f'{", ".join(map(str, failed))}; the newest failed with: {_one_line(first_error)}). The '
      'files are unchanged. If the config changed, resume with the original (--config=WORKDIR).')


def _one_line(e) -> str:
  s = f'{type(e).__name__}: {e}'.splitlines()[0] if e is not None else ''
  return s if len(s) <= 300 else s[:297] + '...'
