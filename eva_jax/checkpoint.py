"""Orbax checkpoints of a run: train state (sharded arrays), input-iterator position, and metadata.

Layout under WORKDIR/checkpoints/<step>/: `state` (orbax PyTree: params, opt_state, step,
loss_scale), `data` (JSON: every process's grain iterator state), `meta` (JSON: config name, model config).
Saves are asynchronous; keep-last-N; restoring takes the target shardings, so a checkpoint written
on one mesh restores onto any other (8 devices -> 1 or 4, multi-host collective I/O).

A step that cannot be restored although an older one of the same run can is set aside as
`<step>.corrupt` (kept for inspection, ignored by orbax) and the run resumes from the older one
(training/resume.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
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


def finished_steps(directory: epath.PathLike) -> list[int]:
  """Sorted steps of `directory` (a checkpoints/ folder) whose save was committed.

  On object stores orbax writes a step in place and marks it done with commit_success.txt (no
  rename), so a step folder alone does not mean a finished save; orbax's own test covers both."""
  directory = as_path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit()
                and (d / 'state').is_dir() and ocp.utils.is_checkpoint_finalized(d))


def read_meta(step_dir: epath.PathLike) -> dict:
  """The `meta` item of one step folder (plain JSON; no arrays are read)."""
  return json.loads((as_path(step_dir) / 'meta' / 'metadata').read_text())


def state_metadata(step_dir: epath.PathLike) -> dict:
  """The orbax metadata tree of a step's `state` item (shapes and dtypes; no arrays are read)."""
  ckptr = ocp.PyTreeCheckpointer()
  with _quiet_missing_metadata():  # the manager keeps that file one level up; harmless here
    metadata = ckptr.metadata(as_path(step_dir) / 'state')
  tree = metadata.item_metadata if hasattr(metadata, 'item_metadata') else metadata
  tree = getattr(tree, 'tree', tree)
  if not isinstance(tree, dict):
    # orbax logs a warning and returns None when the files it needs are missing or unreadable.
    raise ValueError(f'The array metadata of {os.fspath(step_dir)}/state cannot be read: the '
                     'checkpoint is incomplete or corrupt.')
  return tree


def params_fingerprint(tree) -> str:
  """A content hash of a tree of host arrays (names, shapes, dtypes and bytes), in sorted order.

  Recorded in the checkpoint meta (e.g. the teacher's) so a resume can tell other weights of the
  same shape apart. blake2b runs at about 1 GB/s, a second or so for a ViT-L teacher."""
  from eva_jax.convert import common
  h = hashlib.blake2b(digest_size=16)
  for k, v in sorted(common.flatten(tree).items()):
    a = np.ascontiguousarray(np.asarray(v))
    h.update(f'{k}|{a.dtype}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return 'blake2b:' + h.hexdigest()


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

    self.last_saved = self.latest_step()   # the newest committed step (after close())
    self.pending: int | None = None          # saved asynchronously, not yet committed

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    """Committed steps, oldest first."""
    return finished_steps(self.directory)

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def set_aside(self, step: int) -> epath.Path:
    """Renames a step that cannot be restored to `<step>.corrupt` (kept, never deleted): orbax no
    longer lists it, so it neither shadows the older good steps nor counts in keep-last-N."""
    src = self.step_dir(step)
    dst = self.directory / f'{step}.corrupt'
    n = 1
    while dst.exists():
      n += 1
      dst = self.directory / f'{step}.corrupt{n}'
    if jax.process_index() == 0:   # one writer; the others only re-list
      src.rename(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'set_aside_{step}')
    self.manager.reload()
    self.last_saved = self.latest_step()
    return dst

  def save(self, step: int, state, data_state: Any, meta: dict, force: bool = False) -> bool:
    """Collective: every process calls it with its own input-iterator state."""
    data = {'processes': gather_process_states(data_state if data_state is not None else {})}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state_to_tree(state)),
                              data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta))
    saved = self.manager.save(step, args=args, force=force)
    if saved:
      self.pending = step   # committed once wait()/close() returns
    return saved

  def restore(self, step: int, abstract_state, shardings):
    """Returns (state tree, data iterator state, meta) for `step`, resharded to `shardings`."""
    target = abstract_tree(abstract_state, shardings)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return tree_to_state(out['state'], abstract_state), own_process_state(out['data']), out['meta']

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._committed()

  def close(self) -> None:
    try:
      self.manager.wait_until_finished()
      self._committed()
    finally:
      self.manager.close()

  def _committed(self) -> None:
    if self.pending is not None:
      self.last_saved, self.pending = self.pending, None


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
    raise FileNotFoundError(f'{os.fspath(path)!r} is not a directory. Pass a run\'s workdir '
                            '(eva-pretrain, eva-finetune, eva-clip, ...), its checkpoints/ folder '
                            'or one checkpoints/<step> folder.')
  if (path / 'state').is_dir() and (path / 'meta').is_dir():
    return os.fspath(path), int(path.name)
  ckpts = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
  steps = finished_steps(ckpts)
  if not steps:
    raise FileNotFoundError(f'No finished checkpoint under {os.fspath(ckpts)!r} (expected '
                            '<step>/state and <step>/meta folders written by a training run: '
                            'eva-pretrain, eva-finetune, eva-clip, ...).')
  return os.fspath(ckpts / str(steps[-1])), steps[-1]


# The weights a reader may ask for. eva_jax checkpoints keep 'params' (raw) and, when the run kept an
# EMA (config.ema_decay > 0), 'ema' -- the weights its evaluation used. Official EVA training files
# call the same two 'model' and 'model_ema'; both spellings are accepted everywhere.
WEIGHTS = {'auto': 'auto', 'raw': 'raw', 'model': 'raw', 'ema': 'ema', 'model_ema': 'ema'}


def weights_choice(weights: str) -> str:
  """'auto' | 'raw' | 'ema' for any accepted spelling; ValueError naming the choices."""
  if weights not in WEIGHTS:
    raise ValueError(f'weights={weights!r} unknown; choose auto (the EMA when the checkpoint has '
                     "one: the weights evaluation used), raw (alias model) or ema (alias "
                     'model_ema).')
  return WEIGHTS[weights]


def restore_params(path: epath.PathLike, weights: str = 'auto') -> tuple[dict, dict, int]:
  """Host (numpy) parameters, metadata and step of a checkpoint; the optimizer state is not read.

  weights: 'auto' (the EMA when the run kept one -- the weights its evaluation used -- else the
  raw ones; logged), 'raw' (alias 'model') or 'ema' (alias 'model_ema'; ValueError when the
  checkpoint has none)."""
  choice = weights_choice(weights)
  step_dir, step = resolve(path)
  step_dir = epath.Path(step_dir)
  meta = read_meta(step_dir)
  tree = state_metadata(step_dir)
  key = _weights_key(tree, choice, f'{os.fspath(step_dir)} (step {step})')
  # Restore only that subtree, as numpy on the host (no device memory, no optimizer state).
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree[key])
  out = ocp.PyTreeCheckpointer().restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
      item={key: tree[key]}, restore_args={key: restore_args}, partial_restore=True))
  return out[key], meta, step


def weights_in(step_dir, choice: str) -> tuple[str, bool]:
  """('ema' | 'raw': the weights `choice` (weights_choice) reads from the checkpoint folder
  step_dir, whether it holds an EMA at all). Reads the state's metadata, no arrays."""
  has_ema = 'ema' in state_metadata(step_dir)
  return ('ema' if choice == 'ema' or (choice == 'auto' and has_ema) else 'raw'), has_ema


def _weights_key(tree: dict, choice: str, what: str) -> str:
  if choice == 'raw':
    return 'params'
  if 'ema' in tree:
    if choice == 'auto':
      logging.warning("%s: using the EMA weights, the ones its evaluation used; weights='raw' "
                      'reads the raw ones.', what)
    return 'ema'
  if choice == 'ema':
    raise ValueError(f'{what} holds no EMA weights (the run had config.ema_decay = 0); use '
                     "weights='raw' (or 'auto').")
  return 'params'


@dataclasses.dataclass
class EncoderWeights:
  """An encoder read from any source the product accepts (see read_encoder)."""
  params: dict      # the encoder: nested dict of numpy arrays in VisionTransformer layout
  extra: dict       # the other parameter groups (lm_head; fc_norm, head), of any source
  config: dict      # encoder config (models/config.py fields)
  meta: dict        # checkpoint metadata ({'kind': 'timm' | 'eva_official'} for PyTorch files)
  source: str       # what was read, for messages (names the weights used: raw or EMA)
  step: int | None = None   # training step of an eva_jax checkpoint
  # 'raw' or 'ema': which weights of an eva_jax checkpoint these are. For a PyTorch file, the
  # choice as given: 'auto' there is the file's EMA when it holds one (logged as a WARNING).
  weights: str = 'raw'


def read_encoder(path: epath.PathLike, *, weights: str = 'auto',
                 facts: dict | None = None) -> EncoderWeights:
  """The one function that decides what a path is and reads the encoder in it, on the host.

  path: an eva_jax workdir, its checkpoints/ folder or one checkpoints/<step> folder (pretraining or
  fine-tuning); or a PyTorch file (.pth/.pt/.bin/.safetensors) in timm's or the official EVA
  layout (eva_jax.convert.eva_torch; torch imported only then). Only parameters are read, never
  optimizer state.
  weights: 'auto' (default), 'raw' (alias 'model') or 'ema' (alias 'model_ema'). For a checkpoint
    holding both -- an eva_jax run with config.ema_decay > 0, or an official training file --
    'auto' takes the EMA, the weights the run evaluated, and logs the choice (WARNING). The choice
    is in the result's `weights` and `source`.
  facts: architecture facts a PyTorch file may not record (heads, rope, rope_theta,
    rope_ref_grid, ln_eps; eva_torch.FACT_FIELDS); the file's own record wins, a contradiction is
    an error, and a fact neither recorded nor given is refused naming it.
  Raises FileNotFoundError for a missing path and ValueError (or the converter's CheckpointError)
  for something that holds no EVA encoder.
  """
  src = os.fspath(path)
  p = as_path(src)
  choice = weights_choice(weights)
  if p.is_dir():
    step_dir, step = resolve(src)
    used, has_ema = weights_in(step_dir, choice)
    params, meta, step = restore_params(step_dir, weights=choice)   # logs an 'auto' -> EMA
    if 'student' not in meta or 'encoder' not in params:
      raise ValueError(f'{src!r} (step {step}) is not an eva_jax pretraining or fine-tuning '
                       f'checkpoint (metadata keys {sorted(meta)}, parameter groups '
                       f'{sorted(params)}).')
    label = ('EMA weights' if used == 'ema' else
             'raw weights' if has_ema else 'raw weights; the run kept no EMA')
    return EncoderWeights(params=params['encoder'],
                          extra={k: v for k, v in params.items() if k != 'encoder'},
                          config=dict(meta['student']), meta=meta,
                          source=f'eva_jax checkpoint {src} (step {step}, {label})',
                          step=step, weights=used)
  if p.is_file():
    from eva_jax.convert import common, eva_torch
    torch_name = {'auto': 'auto', 'raw': 'model', 'ema': 'model_ema'}[choice]
    enc_cfg, model, extras = eva_torch.from_torch_state_dict(
        common.TensorSource(src, weights=torch_name), facts=facts)
    logging.info('Imported %s; keys not used by the encoder: %s', src, sorted(extras))
    return EncoderWeights(params=common.unflatten(common.model_params_numpy(model)),
                          extra=common.unflatten(eva_torch.extras_to_params(
                              {k: v for k, v in extras.items()
                               if k.count('.') == 1 and k.endswith(('.weight', '.bias'))})),
                          config=enc_cfg.to_dict(), meta={'kind': 'pytorch'},
                          source=f'PyTorch file {src}', weights=choice)
  raise FileNotFoundError(f'{src!r} does not exist. Pass an eva_jax workdir or checkpoint folder, '
                          'or a timm / official EVA .pth / .safetensors file.')


def encoder_from_checkpoint(path: epath.PathLike, dtype: str | None = None, **read_kwargs):
  """(VisionTransformer, meta) of anything read_encoder reads (read_kwargs: its weights, facts);
  `dtype` is the compute dtype ('float32' by default, for evaluation). meta is the checkpoint's
  plus 'weights_used' ('raw' | 'ema' | the PyTorch selection) and 'source' (names them)."""
  import ml_collections
  from eva_jax.convert import common
  weights = read_encoder(path, **read_kwargs)
  cfg = ml_collections.ConfigDict(weights.config)
  cfg.dtype = dtype or 'float32'
  flat = common.flatten(weights.params)
  model = common.model_from_params(cfg, {k: np.shape(v) for k, v in flat.items()},
                                   flat.__getitem__, what=weights.source)
  return model, {**weights.meta, 'weights_used': weights.weights, 'source': weights.source}
