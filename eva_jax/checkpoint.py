"""Orbax checkpoints of a run: train state (sharded arrays), input-iterator position, and metadata.

Layout under WORKDIR/checkpoints/<step>/: `state` (orbax PyTree: params, opt_state, step,
loss_scale), `data` (JSON: the grain iterator state), `meta` (JSON: config name, model config).
Saves are asynchronous; keep-last-N; restoring takes the target shardings, so a checkpoint written
on one mesh restores onto any other (8 devices -> 1 or 4, multi-host collective I/O).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def state_to_tree(state) -> dict:
  """TrainState -> plain dict (orbax stores dicts and optax's named tuples directly)."""
  return {'step': state.step, 'params': state.params, 'opt_state': state.opt_state,
          'loss_scale': {'scale': state.loss_scale.scale,
                         'since_overflow': state.loss_scale.since_overflow,
                         'hysteresis': state.loss_scale.hysteresis}}


def tree_to_state(tree: dict, template):
  ls = template.loss_scale.replace(**tree['loss_scale'])
  return template.replace(step=tree['step'], params=tree['params'], opt_state=tree['opt_state'],
                          loss_scale=ls)


def abstract_tree(abstract_state, shardings) -> dict:
  """ShapeDtypeStructs carrying the target shardings: what a restore materializes into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      state_to_tree(abstract_state), state_to_tree(shardings))


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with the three items above."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: Any, meta: dict, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state_to_tree(state)),
                              data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                              meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state, shardings):
    """Returns (state tree, data iterator state, meta) for `step`, resharded to `shardings`."""
    target = abstract_tree(abstract_state, shardings)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return tree_to_state(out['state'], abstract_state), out['data'], out['meta']

  def restore_params(self, step: int | None = None) -> tuple[dict, dict]:
    """Host copies of the parameters and metadata only (for load_encoder, export, fine-tuning)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint under {self.directory}.')
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    state_dir = os.path.join(self.directory, str(step), 'state')
    tree = ocp.StandardCheckpointer().restore(state_dir)  # no target: numpy/host arrays
    return tree['params'], meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
