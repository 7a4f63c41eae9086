"""The trainer skeleton shared by every training program (pretraining, fine-tuning, and the ones to
come): mesh and distributed start-up, restore-or-init, the resolved config in the workdir, metric
writers and progress, the step loop with SIGTERM handling and evaluation hooks, and closing.

A program (`Program` subclass) keeps only what is its own: its task (model + loss, built with
training/task.py), its loader, frozen constants (a teacher), the first state of a fresh run
(`init_from`), its evaluation and its checkpoint metadata. See training/finetune.py for how little
that is.
"""
from __future__ import annotations

import json
from typing import Any

import jax
from etils import epath

from eva_jax import checkpoint as ckpt_lib
from eva_jax import parallel, paths
from eva_jax.models import config as model_config
from eva_jax.training import checks, loop
from eva_jax.training import metrics as metrics_lib


class Program:
  """What a training program supplies to `run`. Subclasses set `kind` and override the hooks."""

  kind = ''          # recorded in the checkpoint meta: 'eva_pretrain', 'eva_finetune', ...

  def __init__(self, cfg):
    self.cfg = cfg

  def validate(self) -> None:
    """Program-specific config checks (before anything is built). Raise ValueError naming the field."""

  def build(self, mesh):
    """The task (training/task.py Task) of this program on `mesh`."""
    raise NotImplementedError

  def train_loader(self, task):
    """The training loader (yields data.pipeline.Batch; get_state/set_state/close)."""
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
    """Checkpoint metadata: what a reader needs to rebuild the model without the config."""
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


def run(program: Program, workdir: str) -> dict:
  """Runs (or resumes) `program` in `workdir`; returns the last logged metrics.

  Running the same command on the same workdir resumes from the latest checkpoint (state and
  input-iterator position; randomness is a function of (seed, step)), so the continuation equals an
  uninterrupted run. SIGTERM finishes the current step, saves and returns.
  """
  cfg = program.cfg
  checks.check_run(cfg)
  program.validate()
  parallel.maybe_initialize_distributed(cfg)
  mesh = parallel.make_mesh(cfg.mesh)
  parallel.check_batch(cfg.batch_size, mesh)
  is_main = jax.process_index() == 0
  workdir = paths.as_path(workdir)   # local or an object store (gs://bucket/run)
  task = program.build(mesh)
  workdir.mkdir(parents=True, exist_ok=True)
  if is_main:
    write_config(workdir, cfg, {**program.resolved(task), 'mesh': dict(mesh.shape),
                                'num_devices': jax.device_count(),
                                'num_processes': jax.process_count()})

  loader = program.train_loader(task)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.keep_checkpoints)
  writer = progress = None
  try:
    start = ckpt.latest_step()
    if start is not None:
      state, data_state, _ = ckpt.restore(start, task.abstract_state, task.state_shardings)
      loader.set_state(data_state)
      if is_main:
        print(f'Resumed from step {start} in {ckpt.directory}.', flush=True)
    else:
      start = 0
      state = program.init_state(task)
    consts = program.consts(task)
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    progress = metrics_lib.Progress(total=cfg.total_steps, initial=start,
                                    enabled=is_main and cfg.progress)
    _, last, _ = loop.run(
        cfg, state=state, start=start, loader=loader, ckpt=ckpt, meta=program.meta(task),
        writer=writer, progress=progress,
        train_step=lambda s, b: task.train_step(s, consts, b),
        to_device=lambda arrays: parallel.host_to_global(arrays, mesh),
        evaluate=lambda s, step: program.evaluate(task, s, consts, step))
  finally:
    ckpt.close()
    for closable in (writer, progress, loader):
      if closable is not None:
        closable.close()
  return last
