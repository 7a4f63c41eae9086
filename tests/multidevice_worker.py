"""Runs in a subprocess with 8 fake CPU devices (XLA_FLAGS set by the caller, before jax loads).

  python tests/multidevice_worker.py mesh_parity
  python tests/multidevice_worker.py restore_other_mesh WORKDIR

Prints one JSON line with the measured numbers; tests/test_pretrain.py asserts on them.
"""
import json
import sys

import jax
import numpy as np

from eva_jax import checkpoint as ckpt_lib
from eva_jax import defaults, parallel
from eva_jax.training import pretrain

import support   # tests/support.py (this script runs from tests/)


def small_config():
  cfg = defaults.pretrain_defaults(model='tiny', teacher='clip-tiny')
  cfg.image_size = 56
  cfg.batch_size = 8
  cfg.total_steps = 20
  cfg.optim.warmup_steps = 2
  cfg.optim.lr = 1e-3
  cfg.model.drop_path = 0.1
  return cfg


def batches(n, cfg, seed=0):
  return iter(support.pretrain_batches(cfg, n, seed))


def run(cfg, devices, steps=5):
  mesh = parallel.make_mesh(cfg.mesh, devices=devices)
  task, _, tcfg = pretrain.build(cfg, mesh)
  state = task.init(cfg.seed)
  teacher = pretrain.random_teacher(tcfg, task.consts_shardings, cfg.seed + 1)
  losses = []
  for b in batches(steps, cfg):
    state, m = task.train_step(state, teacher, parallel.host_to_global(b, mesh))
    losses.append(float(m['loss']))
  return task, state, teacher, losses


def mesh_parity():
  cfg = small_config()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
  _, s1, _, l1 = run(cfg, jax.devices()[:1])
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  task, s8, _, l8 = run(cfg, jax.devices())
  qkv_sharding = s8.params['encoder']['blocks']['layers']['attn']['qkv'].sharding
  pdiff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)))
  print(json.dumps({'losses_1': l1, 'losses_8': l8, 'param_diff': pdiff,
                    'qkv_spec': str(qkv_sharding.spec),
                    'mu_spec': str(jax.tree.leaves(s8.opt_state)[1].sharding.spec)}))


def restore_other_mesh(workdir):
  cfg = small_config()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  task8, s8, teacher8, _ = run(cfg, jax.devices(), steps=3)
  ck = ckpt_lib.Checkpointer(workdir)
  ck.save(3, s8, {'position': 3}, {'kind': 'test'}, force=True)
  ck.wait()
  ref = jax.tree.map(np.asarray, s8.params)
  b = next(batches(1, cfg, seed=9))
  _, m8 = task8.train_step(s8, teacher8, parallel.host_to_global(b, task8.mesh))
  out = {'loss_8': float(m8['loss'])}
  for n, mesh_sizes in ((1, (1, 1, 1)), (4, (1, 4, 1))):
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_sizes
    mesh = parallel.make_mesh(cfg.mesh, devices=jax.devices()[:n])
    task, _, tcfg = pretrain.build(cfg, mesh)
    state, data_state, _ = ck.restore(3, task.abstract_state, task.state_shardings)
    same = all(np.array_equal(np.asarray(a), b) for a, b in
               zip(jax.tree.leaves(state.params), jax.tree.leaves(ref)))
    step = int(state.step)
    spec = str(state.params['encoder']['blocks']['layers']['attn']['qkv'].sharding.spec)
    teacher = pretrain.random_teacher(tcfg, task.consts_shardings, cfg.seed + 1)
    _, m = task.train_step(state, teacher, parallel.host_to_global(b, mesh))  # donates state
    out[f'devices_{n}'] = {'params_equal': same, 'loss': float(m['loss']),
                           'data_state': data_state, 'step': step, 'qkv_spec': spec}
  ck.close()
  print(json.dumps(out))


if __name__ == '__main__':
  {'mesh_parity': mesh_parity, 'restore_other_mesh': restore_other_mesh}[sys.argv[1]](*sys.argv[2:])
