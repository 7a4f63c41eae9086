"""Orbax checkpoints of a run: train state (sharded arrays), input-iterator position, and metadata.

Layout under WORKDIR/checkpoints/<step>/: `state` (orbax PyTree: params, opt_state, step,
loss_scale), `data` (JSON: every process's grain iterator state), `meta` (JSON: config name, model config).
Saves are asynchronous; keep-last-N; restoring takes the target shardings, so a checkpoint written
on one mesh restores onto any other (8 devices -> 1 or 4, multi-host collective I/O).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from eva_jax.paths import as_path, url_scheme


def state_to_tree(state) -> dict:
  """Train-state dataclass -> plain dict (orbax stores dicts and optax's named tuples directly).
  Fields that are None (no EMA kept) are not stored."""
  tree = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if getattr(state, f.name) is not None}
  ls = tree.pop('loss_scale')
  tree['loss_scale'] = {'scale': ls.scale, 'since_overflow': ls.since_overflow,
                        'hysteresis': ls.hysteresis}
  return tree


def tree_to_state(tree: dict, template):
  tree = dict(tree)
  ls = template.loss_scale.replace(**tree.pop('loss_scale'))
  return template.replace(loss_scale=ls, **tree)


def abstract_tree(abstract_state, shardings) -> dict:
  """ShapeDtypeStructs carrying the target shardings: what a restore materializes into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      state_to_tree(abstract_state), state_to_tree(shardings))


def gather_process_states(own: Any) -> list:
  """Every process's input-iterator state, in process order (collective on multi-host runs).

  Orbax writes JSON items from the primary process only, so each host's position (its grain
  index, its own count of skipped bad records) is gathered to all first and saved as one list.
  """
  if jax.process_count() == 1:
    return [own]
  from jax.experimental import multihost_utils
  blob = np.frombuffer(json.dumps(own).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int64))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(rows[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def own_process_state(data: Any) -> Any:
  """This process's entry of a saved `data` item (older checkpoints hold one shared state)."""
  if not (isinstance(data, dict) and 'processes' in data):
    return data
  states, n, i = data['processes'], jax.process_count(), jax.process_index()
  if len(states) == n:
    return states[i]
  # Each host reads its own shard of the data, so a position saved by a different number of hosts
  # does not map exactly onto this run's shards; the step count and epoch position carry over.
  logging.warning('The checkpoint was written by %d processes and this run has %d: every process '
                  'resumes its input pipeline from process 0\'s position (same number of batches '
                  'read; the per-host shards differ, so the sample order is not the original one).',
                  len(states), n)
  return states[0]


def _require_gcs_client() -> None:
  """Orbax lists the steps of a gs:// directory after asking google-cloud-storage for the bucket's
  layout (hierarchical namespace or not); without that package it fails at the first resume."""
  try:
    from google.cloud import storage  # noqa: F401
  except ImportError as e:
    raise ImportError('A gs:// workdir needs the google-cloud-storage package (orbax uses it to '
                      'list checkpoint steps): pip install google-cloud-storage') from e


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with the three items above."""

  def __init__(self, workdir: epath.PathLike, keep: int = 3, async_save: bool = True):
    self.directory = as_path(workdir) / 'checkpoints'
    scheme = url_scheme(workdir)
    if scheme == 'gs':
      _require_gcs_client()
    elif scheme is not None:
      # orbax builds TensorStore's gcs driver spec for gs:// only; any other URL fails at the first
      # save with 'Checkpoint path should be absolute'.
      raise ValueError(f'Checkpoints go to a local folder or gs://; orbax-checkpoint '
                       f'{ocp.__version__} cannot write array data to {scheme}:// '
                       f'(workdir {os.fspath(workdir)!r}).')
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: Any, meta: dict, force: bool = False) -> bool:
    """Collective: every process calls it with its own input-iterator state."""
    data = {'processes': gather_process_states(data_state if data_state is not None else {})}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state_to_tree(state)),
                              data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state, shardings):
    """Returns (state tree, data iterator state, meta) for `step`, resharded to `shardings`."""
    target = abstract_tree(abstract_state, shardings)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return tree_to_state(out['state'], abstract_state), own_process_state(out['data']), out['meta']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class _quiet_missing_metadata(logging.Filter):
  """Drops orbax's 'Metadata file does not exist' warning while reading an item of a manager."""

  def filter(self, record):
    return 'Metadata file does not exist' not in record.getMessage()

  def __enter__(self):
    logging.getLogger('absl').addFilter(self)

  def __exit__(self, *exc):
    logging.getLogger('absl').removeFilter(self)


def resolve(path: epath.PathLike) -> tuple[str, int]:
  """(step directory, step) for a workdir, its checkpoints/ folder, or one step's folder.

  `path` may be local or a URL (gs://bucket/run): every access goes through etils.epath.
  """
  path = as_path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'{os.fspath(path)!r} is not a directory. Pass a pretraining workdir, '
                            'its checkpoints/ folder or one checkpoints/<step> folder.')
  if (path / 'state').is_dir() and (path / 'meta').is_dir():
    return os.fspath(path), int(path.name)
  ckpts = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
  # On object stores orbax writes a step in place and marks it done with commit_success.txt (no
  # rename), so a step folder alone does not mean a finished save; orbax's own test covers both.
  steps = sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit()
                 and (d / 'state').is_dir() and ocp.utils.is_checkpoint_finalized(d))
  if not steps:
    raise FileNotFoundError(f'No finished checkpoint under {os.fspath(ckpts)!r} (expected '
                            '<step>/state and <step>/meta folders written by eva-pretrain or '
                            'eva-finetune).')
  return os.fspath(ckpts / str(steps[-1])), steps[-1]


def restore_params(path: epath.PathLike) -> tuple[dict, dict, int]:
  """Host (numpy) parameters, metadata and step of a checkpoint; the optimizer state is not read."""
  step_dir, step = resolve(path)
  step_dir = epath.Path(step_dir)
  meta = json.loads((step_dir / 'meta' / 'metadata').read_text())
  ckptr = ocp.PyTreeCheckpointer()
  with _quiet_missing_metadata():  # the manager keeps that file one level up; harmless here
    metadata = ckptr.metadata(step_dir / 'state')
  tree = metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') else metadata
  # Restore only the params subtree, as numpy on the host (no device memory, no optimizer state).
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                              tree['params'])
  out = ckptr.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
      item={'params': tree['params']}, restore_args={'params': restore_args}, partial_restore=True))
  return out['params'], meta, step


@dataclasses.dataclass
class EncoderWeights:
  """An encoder read from any source the product accepts (see read_encoder)."""
  params: dict      # the encoder: nested dict of numpy arrays in VisionTransformer layout
  extra: dict       # the other parameter groups of an eva_jax checkpoint (lm_head; fc_norm, head)
  config: dict      # encoder config (models/config.py fields)
  meta: dict        # checkpoint metadata ({'kind': 'timm' | 'eva_official'} for PyTorch files)
  source: str       # what was read, for messages
  step: int | None = None   # training step of an eva_jax checkpoint


def read_encoder(path: epath.PathLike, *, weights: str = 'auto',
                 facts: dict | None = None) -> EncoderWeights:
  """The one function that decides what a path is and reads the encoder in it, on the host.

  path: an eva_jax workdir, its checkpoints/ folder or one checkpoints/<step> folder (pretraining or
  fine-tuning); or a PyTorch file (.pth/.pt/.bin/.safetensors) in timm's or the official EVA
  layout (eva_jax.convert.eva_torch; torch imported only then). Only parameters are read, never
  optimizer state.
  weights: for an official training checkpoint holding both, the raw ('model') or EMA
    ('model_ema') weights; 'auto' takes the EMA and logs it (convert.common.unwrap_state_dict).
  facts: architecture facts a PyTorch file may not record (heads, rope, rope_theta,
    rope_ref_grid, ln_eps; eva_torch.FACT_FIELDS); the file's own record wins, a contradiction is
    an error, and a fact neither recorded nor given is refused naming it.
  Raises FileNotFoundError for a missing path and ValueError (or the converter's CheckpointError)
  for something that holds no EVA encoder.
  """
  src = os.fspath(path)
  p = as_path(src)
  if p.is_dir():
    params, meta, step = restore_params(src)
    if 'student' not in meta or 'encoder' not in params:
      raise ValueError(f'{src!r} (step {step}) is not an eva_jax pretraining or fine-tuning '
                       f'checkpoint (metadata keys {sorted(meta)}, parameter groups '
                       f'{sorted(params)}).')
    return EncoderWeights(params=params['encoder'],
                          extra={k: v for k, v in params.items() if k != 'encoder'},
                          config=dict(meta['student']), meta=meta,
                          source=f'eva_jax checkpoint {src} (step {step})', step=step)
  if p.is_file():
    from eva_jax.convert import common, eva_torch
    enc_cfg, model, extras = eva_torch.from_torch_state_dict(
        common.TensorSource(src, weights=weights), facts=facts)
    logging.info('Imported %s; keys not used by the encoder: %s', src, sorted(extras))
    return EncoderWeights(params=common.unflatten(common.model_params_numpy(model)), extra={},
                          config=enc_cfg.to_dict(), meta={'kind': 'pytorch'},
                          source=f'PyTorch file {src}')
  raise FileNotFoundError(f'{src!r} does not exist. Pass an eva_jax workdir or checkpoint folder, '
                          'or a timm / official EVA .pth / .safetensors file.')


def encoder_from_checkpoint(path: epath.PathLike, dtype: str | None = None, **read_kwargs):
  """(VisionTransformer, meta) of anything read_encoder reads (read_kwargs: its weights, facts);
  `dtype` is the compute dtype ('float32' by default, for evaluation)."""
  import ml_collections
  from eva_jax.convert import common
  weights = read_encoder(path, **read_kwargs)
  cfg = ml_collections.ConfigDict(weights.config)
  cfg.dtype = dtype or 'float32'
  flat = common.flatten(weights.params)
  model = common.model_from_params(cfg, {k: np.shape(v) for k, v in flat.items()},
                                   flat.__getitem__, what=weights.source)
  return model, weights.meta
