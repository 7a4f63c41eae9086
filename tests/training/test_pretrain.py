"""Pretraining: the demo run, exact resume after SIGTERM, meshes, precisions, loss scaling, configs."""
import glob
import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eva_jax import defaults, parallel
from eva_jax.data.masking import BlockMaskGenerator
from eva_jax.training import checks, pretrain

import support

ROOT = support.ROOT


def demo_config(**overrides):
  return support.recipe('pretrain_demo', **overrides)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f]


def test_demo_pretraining_loss_falls_and_fills_workdir(tmp_path):
  cfg = demo_config(total_steps=60, log_every=5, checkpoint_every=30, eval_batches=2)
  pretrain.train(cfg, str(tmp_path))
  records = read_metrics(tmp_path)
  train = [r for r in records if 'loss' in r]
  for key in ('step', 'loss', 'lr', 'grad_norm', 'images_per_sec', 'mask_ratio', 'data/skipped'):
    assert key in train[0], key
  assert train[0]['step'] == 1 and train[-1]['step'] == 60
  first, last = train[0]['loss'], np.mean([r['loss'] for r in train[-4:]])
  print(f'demo loss: step 1 {first:.4f} -> last 4 logs {last:.4f}')
  assert last < first - 0.3          # negative cosine: from ~0 towards -1
  assert 0.3 < train[-1]['mask_ratio'] < 0.45
  assert 'val_loss' in records[-1] and records[-1]['val_loss'] < -0.1
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['30', '60']
  assert glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*'))
  resolved = json.load(open(tmp_path / 'config.json'))
  assert resolved['resolved']['student']['width'] == 64 and resolved['precision'] == 'fp32'


def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path):
  overrides = ['--config.total_steps=40', '--config.log_every=1', '--config.checkpoint_every=1000',
               '--config.progress=False', '--config.eval_batches=1']
  cmd = [sys.executable, '-m', 'eva_jax.cli.pretrain', '--config=pretrain_demo']
  ref_dir, run_dir = tmp_path / 'ref', tmp_path / 'run'
  # The reference reads batches synchronously; the interrupted run goes through the device-prefetch
  # thread (the default, data.device_prefetch=2), whose read-ahead must not leak into the checkpoint.
  subprocess.run(cmd + overrides + [f'--workdir={ref_dir}', '--config.data.device_prefetch=0'],
                 check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True)
  proc = subprocess.Popen(cmd + overrides + [f'--workdir={run_dir}'], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  metrics = run_dir / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline:   # preempt once training is under way
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  out = proc.communicate(timeout=300)[0].decode()
  assert proc.returncode == 0, out[-3000:]
  saved = [int(s) for s in os.listdir(run_dir / 'checkpoints')]
  assert len(saved) == 1 and 5 <= saved[0] < 40, saved   # stopped early, saved where it stopped
  # The resume repeats the run from its own saved config (WORKDIR/config.json as --config).
  resume = [sys.executable, '-m', 'eva_jax.cli.pretrain', f'--config={run_dir}',
            f'--workdir={run_dir}']
  subprocess.run(resume, check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                 capture_output=True)
  ref = {r['step']: r['loss'] for r in read_metrics(ref_dir) if 'loss' in r}
  got = {r['step']: r['loss'] for r in read_metrics(run_dir) if 'loss' in r}
  assert set(got) == set(ref) == set(range(1, 41))
  diff = max(abs(ref[s] - got[s]) for s in ref)
  print(f'interrupted at step {saved[0]}; max |loss diff| vs uninterrupted: {diff:.2e}')
  assert diff <= 1e-6


def test_mesh_2x2x2_on_8_devices_matches_one_device(multidevice):
  r = json.loads(multidevice('mesh_parity'))
  diff = max(abs(a - b) for a, b in zip(r['losses_1'], r['losses_8']))
  print(f'(data=2, fsdp=2, tensor=2) vs 1 device: max |loss diff| {diff:.2e}, '
        f'params {r["param_diff"]:.2e}; qkv {r["qkv_spec"]}')
  assert diff < 1e-3 and r['param_diff'] < 1e-4
  assert 'fsdp' in r['qkv_spec'] and 'tensor' in r['qkv_spec']   # really sharded both ways


def test_restore_onto_other_meshes(tmp_path, multidevice):
  r = json.loads(multidevice('restore_other_mesh', tmp_path / 'w'))
  for n in (1, 4):
    got = r[f'devices_{n}']
    assert got['params_equal'] and got['step'] == 3 and got['data_state'] == {'position': 3}
    assert abs(got['loss'] - r['loss_8']) < 1e-5
  assert r['devices_4']['qkv_spec'] == "P(None, 'fsdp', None, None, None)"


def test_saved_input_positions_are_per_process(caplog):
  from eva_jax import checkpoint
  a, b = {'grain': {'next_index': 48}, 'batches': 3, 'skipped': 0}, {'grain': {}, 'batches': 3, 'skipped': 2}
  assert checkpoint.gather_process_states(a) == [a]            # one process: its own state
  assert checkpoint.own_process_state({'processes': [b]}) == b
  assert checkpoint.own_process_state(a) == a                  # checkpoints from before the list
  with caplog.at_level('WARNING'):                              # written by 2 hosts, resumed on 1
    assert checkpoint.own_process_state({'processes': [a, b]}) == a
  assert 'written by 2 processes and this run has 1' in caplog.text


def _small(precision='fp32'):
  cfg = defaults.pretrain_defaults()
  cfg.image_size, cfg.batch_size, cfg.total_steps = 56, 8, 50
  cfg.optim.warmup_steps, cfg.model.drop_path = 2, 0.0
  cfg.precision = precision
  return cfg


def _run_losses(cfg, batches):
  mesh = parallel.make_mesh(cfg.mesh)
  task, _, tcfg = pretrain.build(cfg, mesh)
  state, teacher = task.init(0), pretrain.random_teacher(tcfg, task.consts_shardings, 1)
  losses = []
  for b in batches:
    state, m = task.train_step(state, teacher, parallel.host_to_global(b, mesh))
    losses.append(float(m['loss']))
  return losses


def test_masks_beyond_the_bound_are_counted():
  """The step runs its last blocks on K = the generator's count of token slots; masks from
  elsewhere with more masked patches lose the rest from the loss, and the step counts them."""
  from eva_jax.data.masking import max_masked
  cfg = _small()
  k = max_masked((4, 4), cfg.data.mask)
  good, = support.pretrain_batches(cfg, 1)
  rng = np.random.default_rng(0)
  random_masks = dict(good, mask=rng.random((cfg.batch_size, 16)) < 0.45)   # rows may exceed k
  gen = BlockMaskGenerator.from_config((4, 4), cfg.data.mask)
  drawn = dict(good, mask=np.stack([gen(rng).reshape(-1) for _ in range(cfg.batch_size)]))
  beyond = int(np.maximum(random_masks['mask'].sum(1) - k, 0).sum())
  assert k == 7 and beyond > 0
  mesh = parallel.make_mesh(cfg.mesh)
  task, _, tcfg = pretrain.build(cfg, mesh)
  state, teacher = task.init(0), pretrain.random_teacher(tcfg, task.consts_shardings, 1)
  for batch, want in ((random_masks, beyond), (drawn, 0)):
    state, m = task.train_step(state, teacher, parallel.host_to_global(batch, mesh))
    assert float(m['masked_beyond_bound']) == want
    assert float(m['masked_tokens']) == batch['mask'].sum() - want


def test_bf16_and_fp16_track_fp32():
  batches = support.pretrain_batches(_small(), 8)
  ref = _run_losses(_small('fp32'), batches)
  for p in ('bf16', 'fp16'):
    got = _run_losses(_small(p), batches)
    diff = max(abs(a - b) for a, b in zip(ref, got))
    print(f'{p} vs fp32 over 8 steps: max |loss diff| {diff:.2e} (fp32 losses {ref[0]:.3f}..{ref[-1]:.3f})')
    assert diff < 2e-2


def test_teacher_runs_with_the_students_attention_kernel():
  # The teacher preset says 'xla'; the run's config.model.attention decides for both towers.
  cfg = _small()
  cfg.model.attention = 'auto'
  _, scfg, tcfg = pretrain.build(cfg, parallel.make_mesh(cfg.mesh))
  assert (scfg.attention, tcfg.attention) == ('auto', 'auto')


def test_fp16_overflow_skips_update_and_lowers_scale():
  cfg = _small('fp16')
  mesh = parallel.make_mesh(cfg.mesh)
  task, _, tcfg = pretrain.build(cfg, mesh)
  state, teacher = task.init(0), pretrain.random_teacher(tcfg, task.consts_shardings, 1)
  good, = support.pretrain_batches(cfg, 1)
  bad = dict(good, image=good['image'] * 1e6)   # activations overflow float16 (max 65504)

  def params_of(s):
    return jax.tree.map(np.asarray, s.params)

  before = params_of(state)
  scales = [float(state.loss_scale.scale)]
  for _ in range(2):   # hysteresis 2: the first overflow spends the budget, the second halves
    state, m = task.train_step(state, teacher, parallel.host_to_global(bad, mesh))
    assert float(m['finite']) == 0.0
    scales.append(float(state.loss_scale.scale))
    after = params_of(state)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after))
  assert scales == [2.0 ** 16, 2.0 ** 16, 2.0 ** 15]
  adam = [s for s in state.opt_state if isinstance(s, optax.ScaleByAdamState)][0]
  assert int(adam.count) == 0 and not np.any(np.asarray(adam.mu['lm_head']['kernel']))  # untouched
  state, m = task.train_step(state, teacher, parallel.host_to_global(good, mesh))
  assert float(m['finite']) == 1.0 and float(m['loss_scale']) == 2.0 ** 15
  adam = [s for s in state.opt_state if isinstance(s, optax.ScaleByAdamState)][0]
  # The update happened (lr is 0 at the schedule's first step, so look at Adam's state).
  assert int(adam.count) == 1 and np.any(np.asarray(adam.mu['lm_head']['kernel']))


def test_loss_scale_grows_after_window():
  from eva_jax.training.precision import LossScale
  ls = LossScale.create(True, initial=4.0, growth_interval=3, hysteresis=2)
  seen = []
  for finite in [True, True, True, False, False, True, True, True]:
    ls = ls.update(jnp.asarray(finite))
    seen.append((float(ls.scale), int(ls.hysteresis)))
  # DeepSpeed: grow x2 after 3 clean steps; overflow 1 spends hysteresis, overflow 2 halves;
  # the budget is restored only when the scale grows again.
  assert seen == [(4, 2), (4, 2), (8, 2), (8, 1), (4, 1), (4, 1), (4, 1), (8, 2)]


@pytest.mark.parametrize('field,value,msg', [
    ('precision', 'fp8', 'precision'), ('total_steps', 0, 'total_steps'),
    ('teacher.shard', 'tp', 'teacher.shard'), ('model.name', 'H/14', 'Unknown encoder name'),
    ('model.heads', 5, 'not divisible by model.heads'), ('mesh.data', 3, 'devices'),
])
def test_bad_configs_fail_before_compiling(tmp_path, field, value, msg):
  cfg = demo_config()
  parent, _, leaf = field.rpartition('.')
  (cfg[parent] if parent else cfg)[leaf] = value
  with pytest.raises(ValueError, match=msg):
    pretrain.train(cfg, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_batch_and_mesh_divisibility_errors():
  assert parallel.resolve_mesh_shape({'data': -1, 'fsdp': 2, 'tensor': 2}, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match='do not divide'):
    parallel.resolve_mesh_shape({'data': -1, 'fsdp': 3, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match='At most one'):
    parallel.resolve_mesh_shape({'data': -1, 'fsdp': -1, 'tensor': 1}, 8)
  fake = types.SimpleNamespace(shape={'data': 2, 'fsdp': 2, 'tensor': 2})
  with pytest.raises(ValueError, match='not divisible by mesh data\\*fsdp=4'):
    parallel.check_batch(6, fake)


@pytest.mark.parametrize('path,arg', [
    ('pretrain_demo', None), ('eva01_g14_pretrain', None), ('eva01_g14_pretrain', 'bf16'),
    ('eva01_l14_pretrain', None), ('eva01_b16_pretrain', None), ('eva02_b14_pretrain', None),
    ('eva02_l14_pretrain', None)])
def test_every_config_builds_abstractly(path, arg):
  cfg = support.recipe(path, arg)
  # The paper recipes refuse a random-init teacher (test_robust_config.py); shapes need no weights.
  cfg.teacher.allow_random_init = True
  checks.check_run(cfg)
  pretrain.PretrainProgram(cfg).validate()
  mesh = parallel.make_mesh(cfg.mesh)
  task, scfg, tcfg = pretrain.build(cfg, mesh)
  grid = (cfg.image_size // scfg.patch_size) ** 2
  batch = {'image': jax.ShapeDtypeStruct((cfg.batch_size, cfg.image_size, cfg.image_size, 3), jnp.float32),
           'mask': jax.ShapeDtypeStruct((cfg.batch_size, grid), jnp.bool_)}
  teacher = jax.eval_shape(lambda: pretrain.random_teacher(tcfg, task.consts_shardings, 0))
  new_state, metrics = jax.eval_shape(task.train_step, task.abstract_state, teacher, batch)
  assert metrics['loss'].shape == () and new_state.step.shape == ()
  side = cfg.image_size // scfg.patch_size
  count = BlockMaskGenerator.from_config((side, side), cfg.data.mask).num_masking_patches
  assert 0.35 < count / grid < 0.45   # ~40% of the grid, whatever the recipe's image size
