"""The trainer skeleton shared by every training program (pretraining, fine-tuning, and the ones to
come): mesh and distributed start-up, restore-or-init, the resolved config in the workdir, metric
writers and progress, the step loop with SIGTERM handling and evaluation hooks, and closing.

A program (`Program` subclass) keeps only what is its own: its task (model + loss, built with
training/task.py), its loader, frozen constants (a teacher), the first state of a fresh run
(`init_from`), its evaluation and its checkpoint metadata. See training/finetune.py for how little
that is.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from eva_jax import checkpoint as ckpt_lib
from eva_jax import parallel, paths
from eva_jax.data import sources as data_sources
from eva_jax.models import config as model_config
from eva_jax.training import checks, loop, resume
from eva_jax.training import metrics as metrics_lib


class Program:
  """What a training program supplies to `run`. Subclasses set `kind` and override the hooks."""

  kind = ''          # recorded in the checkpoint meta: 'eva_pretrain', 'eva_finetune', ...
  config_kind = ''   # checks.config_kind of its configs ('pretrain', 'finetune', ...; '' = any)
  # Config fields read only by a fresh start (init_state): a resume takes its weights from the
  # checkpoint, so config.json keeps the values the run started from (keep_started_init).
  init_fields: tuple[str, ...] = ()
  # The checkpoint folder a resume continues from, set by `run` before build (None: a fresh start).
  resume_step_dir = None

  def __init__(self, cfg):
    self.cfg = cfg

  def validate(self) -> None:
    """Program-specific config checks (before anything is built). Raise ValueError naming the field."""

  def build(self, mesh):
    """The task (training/task.py Task) of this program on `mesh`."""
    raise NotImplementedError

  def open_train_sources(self) -> list[tuple[Any, float]] | None:
    """The training data as (source, weight) pairs (data.pipeline.open_sources), or None for a
    program that reads no listed source. Called once, through `train_sources`."""
    return None

  def train_sources(self) -> list[tuple[Any, float]] | None:
    """`open_train_sources()`, opened on the first call and kept: the training loader reads these
    objects and the checkpoint records their listing (meta 'train_data'), so a folder is listed
    once and the recorded listing is the one the loader's position indexes."""
    if not hasattr(self, '_train_sources'):
      self._train_sources = self.open_train_sources()
    return self._train_sources

  def open_eval_source(self, spec: str) -> Any:
    """The evaluation source named by config.eval_source (this program's kind of source)."""
    raise NotImplementedError

  def eval_sources(self) -> list[tuple[Any, float]] | None:
    """[(config.eval_source opened, 1.0)], opened on the first call and kept, so a folder is
    listed once (validate's class check and every evaluation read the same listing), with its
    labels numbered by the training source's class names (data/sources.py align_classes); the
    training sources when config.eval_source is unset."""
    spec = self.cfg.get('eval_source', '')
    if not spec:
      return self.train_sources()
    if not hasattr(self, '_eval_sources'):
      # Labels by the training source's class names (a split lacking a class shifts no label).
      train = (self.train_sources() or [(None, 1.0)])[0][0]
      with data_sources.source_field('config.eval_source', spec):
        opened = self.open_eval_source(spec)
      self._eval_sources = [(data_sources.align_classes(opened, train, 'config.eval_source'), 1.0)]
    return self._eval_sources

  def eval_split_note(self) -> str:
    """' training' when evaluation reads the training sources (config.eval_source unset), printed
    before 'images' / 'videos': those scores are no held-out figures; '' otherwise."""
    return '' if self.cfg.get('eval_source') else ' training'

  def eval_class_mask(self, num_classes: int) -> np.ndarray:
    """bool [num_classes]: the classes evaluation predicts among. Those of config.eval_source when
    it holds a subset of the training classes (data/sources.py split_labels: the ImageNet-A / -R
    protocol), else every class."""
    labels = (data_sources.split_labels(self.eval_sources()[0][0])
              if self.cfg.get('eval_source') else None)
    mask = np.ones(num_classes, bool)
    if labels is not None:
      mask[:] = False
      mask[labels] = True
    return mask

  def classifier_num_classes(self) -> int:
    """The head size of a classifier program: config.num_classes, or 0 = the training source's
    class count. Refuses, before anything is built (ValueError naming the field and the fix):
    config.data.mixture (one labeled source trains a classifier; refused before any source is
    opened), a training or evaluation source without labels, and one with more classes than the
    head, which would train anyway (the missing labels one-hot to zeros) and report nonsense (an
    8-class set on a 3-way head scores top-5 = 1.0)."""
    cfg = self.cfg
    if cfg.data.get('mixture'):
      raise ValueError('config.data.mixture is for pretraining: a classifier trains on one '
                       'labeled source. Set config.data.source and config.data.mixture=().')
    named = [(f'config.data.source={cfg.data.source!r}', self.train_sources()[0][0])]
    if cfg.get('eval_source'):
      named.append((f'config.eval_source={cfg.eval_source!r}', self.eval_sources()[0][0]))
    for what, source in named:
      if source.num_classes is None:
        raise ValueError(f'{what} has no labels; a classifier needs a labeled source (class '
                         'sub-folders, a packed folder with classes, or a TFDS dataset with a '
                         'label feature).')
    num_classes = cfg.num_classes or named[0][1].num_classes
    for i, (what, source) in enumerate(named):
      n = source.num_classes
      if n > num_classes:
        fix = f'0 (= the source\'s {n}) or at least {n}' if i == 0 else f'at least {n}'
        raise ValueError(f'{what} has {n} classes but the head has {num_classes} '
                         f'(config.num_classes={cfg.num_classes}): no logit for labels '
                         f'{num_classes}..{n - 1}. Set config.num_classes to {fix}.')
    return num_classes

  def train_loader(self, task):
    """The training loader (yields data.pipeline.Batch; get_state/set_state/close), reading
    `train_sources()`."""
    raise NotImplementedError

  def consts(self, task) -> Any:
    """Frozen inputs of every step (e.g. teacher parameters), on the devices. {} = none."""
    return {}

  def init_state(self, task):
    """The state of a fresh run (random init; a program may load pretrained weights here)."""
    return task.init(self.cfg.seed)

  def evaluate(self, task, state, consts, step: int) -> dict:
    """Evaluation metrics (a dict of floats; {} = no evaluation)."""
    return {}

  def meta(self, task) -> dict:
    """Checkpoint metadata: what a reader needs to rebuild the model without the config. (The
    skeleton adds 'train_data', the training listing's fingerprint.)"""
    return {'kind': self.kind}

  def resolved(self, task) -> dict:
    """Facts derived from the config (resolved architectures, ...), written to config.json."""
    return {}


def per_host_batch(cfg) -> int:
  return cfg.batch_size // jax.process_count()


def saved_config(cfg, resolved: dict) -> dict:
  """The config as written to WORKDIR/config.json: `--config=WORKDIR/config.json` repeats the run
  (eva_jax.configs.get). config.model keeps only the fields that were set."""
  out = cfg.to_dict()
  out['model'] = model_config.model_overrides(cfg.model)
  out['resolved'] = resolved
  return out


def write_config(workdir: epath.Path, cfg, resolved: dict) -> None:
  (workdir / 'config.json').write_text(
      json.dumps(saved_config(cfg, resolved), indent=2, default=str))


def keep_started_init(workdir: epath.Path, cfg, fields, step: int):
  """`cfg` with the values of `fields` (dotted config paths; a section stands for its fields) that
  WORKDIR/config.json recorded at the run's start. A resume reads no init weights, so another
  value given now is not used: each is named in one printed line, and config.json goes on saying
  what the run started from."""
  path = workdir / 'config.json'
  saved = json.loads(path.read_text()) if path.exists() else {}
  out = None
  for field in fields:
    for leaf, old in _leaves(field, _lookup(saved, field)):
      now = _lookup(cfg, leaf)
      if old is None or now is None or json.loads(json.dumps(now, default=str)) == old:
        continue   # (compared as config.json writes it: a tuple is a list there)
      if now != '':   # an init left out on resume needs no note; config.json keeps it all the same
        print(f'Not used: config.{leaf}={now!r}; the run resumes from step {step} with its '
              f"checkpoint's weights (it started from {old!r}, as config.json keeps).", flush=True)
      if out is None:
        out = ml_collections.ConfigDict(cfg.to_dict())
      *heads, last = leaf.split('.')
      section = out
      for key in heads:
        section = section[key]
      section[last] = old
  return cfg if out is None else out


def _lookup(tree, dotted: str):
  """tree['a']['b'] for 'a.b' (dicts or ConfigDicts); None where a key is missing."""
  for key in dotted.split('.'):
    tree = tree.get(key) if hasattr(tree, 'get') else None
  return tree


def _leaves(prefix: str, value):
  """(dotted path, value) of every non-dict value under `value`."""
  if isinstance(value, dict):
    for key, sub in value.items():
      yield from _leaves(f'{prefix}.{key}', sub)
  else:
    yield prefix, value


def run(program: Program, workdir: str) -> dict:
  """Runs (or resumes) `program` in `workdir`; returns the last logged metrics.

  Running the same command on the same workdir resumes from the latest checkpoint (state and
  input-iterator position; randomness is a function of (seed, step)), so the continuation equals an
  uninterrupted run. Before anything in the workdir is written, a resume is checked against its
  checkpoint (training/resume.py: metadata field by field, parameter shapes; a run already at
  total_steps stops there) and the workdir is locked against a second live run. SIGTERM or SIGINT
  finishes the current step, saves and returns; further signals wait for that save. Every exit
  prints the last saved step.
  """
  cfg = program.cfg
  checks.check_run(cfg, program.config_kind or None)
  loop.Divergence(cfg)   # its config.divergence checks, before anything is built
  program.validate()
  parallel.maybe_initialize_distributed(cfg)
  mesh = parallel.make_mesh(cfg.mesh)
  parallel.check_batch(cfg.batch_size, mesh)
  is_main = jax.process_index() == 0
  workdir = paths.as_path(workdir)   # local or an object store (gs://bucket/run)
  if cfg.get('eval_only'):
    return evaluate_only(program, workdir, mesh)
  # What a refused start removes again (if still empty): the folders made for the workdir, and
  # its checkpoints/ folder where there was none.
  created = _missing_folders(workdir)
  created = ([] if (workdir / 'checkpoints').exists() else [workdir / 'checkpoints']) + created
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt = None
  try:
    # Signals are taken over from here until the last save is committed (loop.Preemption).
    with resume.WorkdirLock(workdir, enabled=is_main), loop.Preemption() as stop:
      try:
        with disk_errors(workdir):
          ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.keep_checkpoints)
          return _run(program, cfg, workdir, mesh, is_main, ckpt, stop)
      finally:
        if ckpt is not None:
          with disk_errors(workdir):
            ckpt.close()   # commits the last asynchronous save
  except BaseException:
    if created and is_main:
      _remove_empty(created)   # a refused start leaves no trace
    raise
  finally:
    if is_main:   # every exit from here on says what is on disk
      print(last_saved_line(workdir, ckpt), flush=True)


def _missing_folders(workdir) -> list:
  """The workdir and those of its parents that do not exist yet, innermost first: the folders
  workdir.mkdir(parents=True) is about to create. On an object store (gs://) folders are only
  name prefixes, so only the workdir itself is considered."""
  missing = []
  candidates = [workdir] if paths.url_scheme(workdir) else [workdir, *workdir.parents]
  for d in candidates:
    if d.exists():
      break
    missing.append(d)
  return missing


def _remove_empty(folders) -> None:
  """Removes `folders` (innermost first) that are empty: the checkpoints/ folder, the workdir and
  the parents this run created, after a refused init_from, data or teacher path; never anything
  that holds a file."""
  for d in folders:
    try:
      if d.exists() and not any(d.iterdir()):
        d.rmdir()
    except Exception:   # pylint: disable=broad-except
      pass   # best effort: never replace the error that refused the run


def evaluate_only(program: Program, workdir: epath.Path, mesh) -> dict:
  """config.eval_only: config.init_from's weights (program.init_state: fc_norm and head included,
  the EMA when it holds one) evaluated once, as the official run_class_finetuning.py --eval.
  Nothing is trained or checkpointed; the record goes to WORKDIR/eval.json. ValueError without
  config.init_from, and for one whose fc_norm and head do not fit the run (the scores would be of a
  random head)."""
  cfg = program.cfg
  if not cfg.get('init_from'):
    raise ValueError('config.eval_only=True evaluates config.init_from: set it to the fine-tuned '
                     'workdir, checkpoint or file.')
  task = program.build(mesh)
  state = program.init_state(task)
  heads = getattr(program, 'init_heads', None)   # classifier programs: what init_from held
  if heads is not None and not {'fc_norm', 'head'} <= set(heads):
    raise ValueError(f'config.eval_only=True: {cfg.init_from} holds no fc_norm and head for this '
                     f'run ({", ".join(heads) or "neither"} taken), so the scores would be of a '
                     'random head. Give a fine-tuned run of the same classes (config.num_classes).')
  record = program.evaluate(task, state, program.consts(task), 0)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    out = {'init_from': getattr(program, 'init_source', cfg.init_from),
           'eval_source': cfg.get('eval_source') or cfg.data.source, **record}
    (workdir / 'eval.json').write_text(json.dumps(out, indent=2, default=str))
    print(f'Wrote {workdir / "eval.json"}.', flush=True)
  return record


def last_saved_line(workdir, ckpt=None) -> str:
  """'last saved step: N (WORKDIR/checkpoints/N)': the newest committed checkpoint."""
  directory = workdir / 'checkpoints'
  if ckpt is not None:
    step = ckpt.last_saved
  else:
    steps = ckpt_lib.finished_steps(directory)
    step = steps[-1] if steps else None
  if step is None:
    where = directory if directory.exists() else workdir   # a refused fresh start removed both
    return f'last saved step: none (no checkpoint in {where})'
  return f'last saved step: {step} ({directory / str(step)})'


@contextlib.contextmanager
def disk_errors(workdir):
  """A full disk (or quota) names the path being written: the workdir when the OS does not say."""
  try:
    yield
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and not e.filename:
      raise OSError(e.errno, e.strerror or os.strerror(e.errno), os.fspath(workdir)) from e
    raise


def _run(program, cfg, workdir, mesh, is_main, ckpt, stop) -> dict:
  steps = ckpt.steps()   # one listing (an object store round trip on gs://)
  latest = steps[-1] if steps else None
  if latest is not None and latest >= cfg.total_steps:
    if is_main:
      print(f'{workdir}: already at step {latest} >= total_steps={cfg.total_steps}; nothing to do '
            '(raise --config.total_steps to train further).', flush=True)
    return {'step': latest}
  # The training data is opened (a folder listed) once, before the model is built: its errors
  # come first, and its listing is what the checkpoint records.
  sources = program.train_sources()
  if latest is not None:   # what build may need of the run itself (finetune native_image_size)
    program.resume_step_dir = ckpt.directory / str(latest)
  task = program.build(mesh)
  meta = program.meta(task)
  if sources is not None:
    # The loader's saved position is an index into this listing (grain 'next_index'): a resume
    # on another listing (files added, removed, renamed; links followed) would continue silently
    # on other data, so every checkpoint records it and resume.check_meta compares it.
    meta['train_data'] = data_sources.train_data_fingerprint(sources)
  restored = None
  if latest is not None:
    restored = resume.restore(ckpt, task, meta, accept=tuple(cfg.get('resume_accept', ())))
  loader = program.train_loader(task)
  writer = progress = None
  try:
    if restored is not None:
      start, state, data_state = restored
      loader.set_state(data_state)
      if is_main:
        print(f'Resumed from step {start} in {ckpt.directory}.', flush=True)
    else:
      start = 0
      state = program.init_state(task)
    consts = program.consts(task)
    # The run is accepted and its weights (init_from, teacher) are read: only now is config.json
    # (re)written, so a refused start leaves the workdir as it was.
    if is_main:
      record = cfg if restored is None else keep_started_init(workdir, cfg, program.init_fields,
                                                              start)
      write_config(workdir, record, {**program.resolved(task), 'mesh': dict(mesh.shape),
                                  'num_devices': jax.device_count(),
                                  'num_processes': jax.process_count()})
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    progress = metrics_lib.Progress(total=cfg.total_steps, initial=start,
                                    enabled=is_main and cfg.progress)
    _, last, _ = loop.run(
        cfg, state=state, start=start, loader=loader, ckpt=ckpt, meta=meta,
        writer=writer, progress=progress, stop=stop,
        train_step=lambda s, b: task.train_step(s, consts, b),
        to_device=lambda arrays: parallel.host_to_global(arrays, mesh),
        evaluate=lambda s, step: program.evaluate(task, s, consts, step))
  finally:
    for closable in (writer, progress, loader):
      if closable is not None:
        closable.close()
  return last
