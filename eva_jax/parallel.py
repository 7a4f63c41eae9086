"""Device mesh, logical-axis sharding rules and multi-host start-up: the one place that decides
where every array lives.

Mesh axes: ('data', 'fsdp', 'tensor'). The batch is split over data x fsdp; parameters and
optimizer state are sharded by the rules below through the logical axis names every parameter
carries (see eva_jax/models/layers.py).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# logical axis name -> mesh axis (or None = replicated). First match wins; a mesh axis is used at
# most once per array, and a dimension not divisible by the mesh axis size stays replicated.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),       # ZeRO-3 style: every weight with a model-width axis is split over fsdp
    ('mlp', 'tensor'),       # Megatron-style: MLP hidden and attention heads over tensor
    ('heads', 'tensor'),
    ('out', None),
    ('kv', None),
    ('qkv', None),
    ('layers', None),
)


def maybe_initialize_distributed(cfg) -> None:
  """jax.distributed.initialize from config.distributed, else auto-detect (SLURM, TPU pods, ...).

  Empty coordinator and num_processes <= 1 with no cluster environment = single process.
  """
  d = cfg.distributed
  if jax.distributed.is_initialized():
    return
  if d.coordinator:
    if d.num_processes < 1 or d.process_id < 0 or d.process_id >= d.num_processes:
      raise ValueError(f'distributed.process_id={d.process_id} must be in [0, num_processes='
                       f'{d.num_processes}).')
    kwargs = dict(coordinator_address=d.coordinator, num_processes=d.num_processes,
                  process_id=d.process_id)
    if d.get('local_device_ids'):
      kwargs['local_device_ids'] = list(d.local_device_ids)
    jax.distributed.initialize(**kwargs)
  elif d.get('auto', True) and any(k in os.environ for k in (
      'SLURM_NTASKS', 'TPU_WORKER_HOSTNAMES', 'OMPI_COMM_WORLD_SIZE', 'JAX_COORDINATOR_ADDRESS')):
    if int(os.environ.get('SLURM_NTASKS', '2')) > 1:
      jax.distributed.initialize()


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Sizes for (data, fsdp, tensor); one -1 takes the devices left. Errors name the fix."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f'At most one of mesh.data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}.')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not '
                       f'divide the {num_devices} devices available.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but '
                     f'{num_devices} are available; set one axis to -1 to take the rest.')
  return tuple(sizes)


MESH_LAYOUTS = ('flat', 'hybrid')


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh of `mesh_cfg` over `devices` (default: every device).

  mesh.layout (absent = 'flat'):
    'flat'    the sizes describe the whole job (one -1 takes the devices left);
    'hybrid'  the sizes describe ONE granule's devices and the data axis is repeated across
              granules, so FSDP and tensor parallelism stay on the fast links and the slow ones
              carry only the gradient all-reduce: PyTorch FSDP's HYBRID_SHARD, MaxText's ici_* x
              dcn_data_parallelism. A granule is a TPU slice (ICI joins every chip of a slice;
              DCN joins slices) or elsewhere a process (one host: NVLink inside, InfiniBand
              between). 16 hosts x 8 GPUs with data=1, fsdp=-1 give data 16 x fsdp 8. With one
              granule (one process, one TPU slice) it equals 'flat'.
  Why hybrid: docs/speed.md section 2 (g/14 on 128 A100: 0.365 s per step with data 16 x fsdp 8,
  0.633 s with fsdp over all 128, which is bound by inter-node weight gathers).
  Raises ValueError for an unknown layout, sizes that do not match the devices, or processes
  holding different numbers of devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  layout = (mesh_cfg.get('layout') if hasattr(mesh_cfg, 'get') else None) or 'flat'
  if layout not in MESH_LAYOUTS:
    raise ValueError(f'mesh.layout={layout!r} unknown; use one of {MESH_LAYOUTS} ("hybrid": '
                     'fsdp/tensor within each host, data across hosts).')
  if layout == 'hybrid':
    return Mesh(_hybrid_device_array(mesh_cfg, devices), MESH_AXES)
  shape = resolve_mesh_shape(mesh_cfg, len(devices))
  try:  # topology-aware device order on GPU/TPU
    arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def _hybrid_device_array(mesh_cfg, devices) -> np.ndarray:
  # CPU and GPU devices carry a slice_index too (0): only TPU slices are granules.
  tpu_slices = all(getattr(d, 'platform', '') == 'tpu' and hasattr(d, 'slice_index')
                   for d in devices)
  granule_of = (lambda d: d.slice_index) if tpu_slices else (lambda d: d.process_index)
  kind = 'TPU slice' if tpu_slices else 'process'
  groups: dict[int, list] = {}
  for d in sorted(devices, key=lambda d: (granule_of(d), d.id)):
    groups.setdefault(granule_of(d), []).append(d)
  counts = {len(v) for v in groups.values()}
  if len(counts) != 1:
    raise ValueError(f'mesh.layout="hybrid" needs the same number of devices on every {kind}, got '
                     f'{ {h: len(v) for h, v in groups.items()} }; use layout="flat".')
  n, granules = counts.pop(), len(groups)
  try:
    per_granule = resolve_mesh_shape(mesh_cfg, n)
  except ValueError as e:
    raise ValueError(f'mesh.layout="hybrid": the sizes are per {kind} ({n} devices on each of '
                     f'{granules}): {e}') from None
  if n == 1 and granules > 1:
    # One process per GPU (a common SLURM launch) makes every "host" one device: no FSDP at all.
    logging.warning('mesh.layout="hybrid" with one device per %s is plain data parallelism '
                    '(data %d x fsdp 1): every device holds all weights and optimizer state. '
                    'Launch one process per host, or use --config.mesh.layout=flat.', kind,
                    granules)
  try:  # topology-aware order within each granule
    return jax.experimental.mesh_utils.create_hybrid_device_mesh(
        per_granule, (granules, 1, 1), devices=devices, process_is_granule=not tpu_slices)
  except Exception:
    return np.concatenate([np.asarray(v).reshape(per_granule) for _, v in sorted(groups.items())],
                          axis=0)


def rules_from_config(cfg) -> tuple[tuple[str, Any], ...]:
  """`config.sharding_rules` (pairs of logical axis, mesh axis / axes / None) placed before
  LOGICAL_RULES, so a config overrides any rule as MaxText's `logical_axis_rules` does:
  --config.sharding_rules="(('mlp', None),)" keeps the MLP hidden dimension replicated.

  Raises ValueError for a malformed pair or an unknown mesh axis."""
  extra = tuple(tuple(r) for r in (cfg.get('sharding_rules') or ()))
  for rule in extra:
    axes = rule[1] if len(rule) == 2 else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if len(rule) != 2 or not isinstance(rule[0], str) or any(a not in MESH_AXES for a in axes):
      raise ValueError(f'config.sharding_rules entry {rule!r} must be (logical axis name, mesh '
                       f'axis or tuple of {MESH_AXES} or None).')
  return extra + LOGICAL_RULES


_logged_replicated: set = set()


def spec_for(shape, names, mesh: Mesh, rules=LOGICAL_RULES) -> P:
  """PartitionSpec for an array of `shape` with logical axis `names`, under `rules` on `mesh`.

  The first rule naming a logical axis wins. A dimension that its mesh axes do not divide stays
  replicated, which is logged once per (axis, size, mesh axes): it costs memory on every device.
  """
  table: dict = {}
  for name, axes in rules:
    table.setdefault(name, axes)
  used: set[str] = set()
  out = []
  for dim, name in zip(shape, names or (None,) * len(shape)):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % size == 0:
      used.update(axes)
      out.append(axes if len(axes) > 1 else axes[0])
    else:
      if axes and (name, dim, axes) not in _logged_replicated:
        _logged_replicated.add((name, dim, axes))
        logging.warning('Logical axis %r of size %d is not divisible by mesh axes %s (size %d): '
                        'it stays replicated on every device. Pick a mesh size that divides it or '
                        'set config.sharding_rules.', name, dim, axes, size)
      out.append(None)
  return P(*out)


def state_shardings(abstract_state, mesh: Mesh, rules=LOGICAL_RULES, replicate: bool = False):
  """NamedShardings for an nnx.State (or any tree of nnx Variables) from their logical names."""
  def one(v):
    value = v.get_value() if isinstance(v, nnx.Variable) else v
    names = v.get_metadata().get('out_sharding') if isinstance(v, nnx.Variable) else None
    spec = P() if replicate or not hasattr(value, 'shape') else \
        spec_for(value.shape, names, mesh, rules)
    return NamedSharding(mesh, spec)
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def check_batch(global_batch: int, mesh: Mesh) -> None:
  n = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch % n:
    raise ValueError(f'batch_size={global_batch} is not divisible by mesh data*fsdp={n}; '
                     f'use a multiple of {n}.')
  if global_batch % jax.process_count():
    raise ValueError(f'batch_size={global_batch} is not divisible by the {jax.process_count()} '
                     'processes (hosts).')


def host_to_global(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-host numpy batch -> global jax.Arrays sharded over the batch axes (multi-host safe)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in batch.items()}


def opt_state_shardings(tx, abstract_opt_state, param_shardings, mesh: Mesh):
  """Optimizer-state shardings: parameter-shaped parts follow their parameter, the rest replicate.

  Frozen parameters (optax MaskedNode in multi_transform states) hold nothing and stay so.
  """
  import optax
  replicated = NamedSharding(mesh, P())
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return optax.tree_map_params(
      tx, lambda v, s: v if masked(v) else s, abstract_opt_state, param_shardings,
      transform_non_params=lambda _: replicated, is_leaf=masked)


def constrain_batch(x):
  """Pins an activation [batch, ...] to the batch sharding when traced under a mesh (no-op else).

  Without it XLA may let activations follow the FSDP-sharded weights, and with mesh.fsdp > 1 every
  device would compute the whole global batch (docs/memory_plan.md).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES, *([None] * (x.ndim - 1))))
