"""Issue 12 kind I: divergence never costs good work.

The step loop (training/loop.py) is driven with scripted losses, a tiny parameter tree and a real
orbax Checkpointer (keep-last-2), so every case runs in a second; one real fp16 run with
optim.lr=1e6 checks the whole trainer.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from eva_jax import checkpoint as ckpt_lib
from eva_jax.training import loop, precision, pretrain
from eva_jax.training.task import TrainState

import support


class Loader:
  def __init__(self):
    self.n = 0

  def __next__(self):
    self.n += 1
    return type('Batch', (), {'arrays': {}, 'skipped': 0})()

  def get_state(self):
    return {'n': self.n}


class Quiet:
  def write(self, record):
    pass

  def update(self, step):
    pass

  def show(self, record):
    pass


def config(precision_name='fp32', total_steps=30, checkpoint_every=2, **divergence):
  cfg = ml_collections.ConfigDict(dict(
      total_steps=total_steps, batch_size=4, log_every=1, checkpoint_every=checkpoint_every,
      precision=precision_name, eval_every=0, data={'device_prefetch': 0},
      optim={'lr': 1e6, 'warmup_steps': 0},
      loss_scale={'initial': 2.0 ** 16, 'growth_interval': 500, 'hysteresis': 2,
                  'min_scale': 1.0}))
  cfg.divergence = {**dict(max_nonfinite_steps=5, spike_factor=10.0, spike_window=50,
                           spike_patience=5), **divergence}
  return cfg


def drive(tmp_path, cfg, script):
  """Runs the loop; script(step) -> (loss, finite, weight). The parameter is the weight, so a
  checkpoint records which step wrote it."""
  def train_step(state, _):
    step = int(state.step) + 1
    loss, finite, weight = script(step)
    new = state.replace(step=jnp.asarray(step, jnp.int32), params={'w': jnp.full((3,), weight)})
    return new, {'loss': jnp.float32(loss), 'finite': jnp.float32(finite),
                 'loss_scale': jnp.float32(2.0 ** 10)}

  state = TrainState(step=jnp.asarray(0, jnp.int32), params={'w': jnp.zeros(3)}, opt_state={},
                     loss_scale=precision.LossScale.create(cfg.precision == 'fp16'))
  ckpt = ckpt_lib.Checkpointer(tmp_path, keep=2)
  try:
    loop.run(cfg, state=state, start=0, train_step=train_step, loader=Loader(),
             to_device=lambda a: a, ckpt=ckpt, meta={'kind': 'test'}, writer=Quiet(),
             progress=Quiet())
  finally:
    ckpt.close()
  return ckpt


def saved_weights(tmp_path):
  out = {}
  for step in ckpt_lib.finished_steps(tmp_path / 'checkpoints'):
    params, _, _ = ckpt_lib.restore_params(tmp_path / 'checkpoints' / str(step))
    out[step] = float(np.asarray(params['w'])[0])
  return out


def test_fp16_nan_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, capsys):
  """The issue's run: from step 7 the weights are ~1e6 (finite) and every loss is NaN. Isolated
  fp16 skipped updates (step 3) are ordinary loss scaling and do not count."""
  def script(step):
    if step == 3:
      return 0.5, 0.0, step               # an overflow skipped by loss scaling: normal
    if step >= 7:
      return math.nan, 0.0, 1e6           # diverged weights, NaN loss on every step
    return 1.0 / step, 1.0, step
  with pytest.raises(FloatingPointError) as e:
    drive(tmp_path, config('fp16'), script)
  message = str(e.value)
  print(message)
  assert message.startswith('Training diverged at step 11: 5 consecutive steps (7..11)')
  assert 'the last good checkpoint is step 6' in message and 'optim.lr' in message
  # Steps 8 and 10 were due for a checkpoint but diverged: not written; keep-last-2 rotation
  # therefore kept 4 and 6, and 6 (weights 6, not 1e6) is what a resume picks.
  assert saved_weights(tmp_path) == {4: 4.0, 6: 6.0}
  assert ckpt_lib.resolve(tmp_path)[1] == 6
  err = capsys.readouterr().err
  assert 'Not saving step 8' in err and 'Not saving step 10' in err


def test_fp32_nonfinite_loss_stops_at_once(tmp_path):
  with pytest.raises(FloatingPointError, match=r'diverged at step 5: the loss is not finite at '
                     r'step 5 .* last good checkpoint is step 4'):
    drive(tmp_path, config('fp32'), lambda s: (math.nan if s == 5 else 1.0, 1.0, s))
  assert saved_weights(tmp_path) == {2: 2.0, 4: 4.0}


def test_loss_spike_stops_the_run_without_saving_the_spiking_state(tmp_path):
  """A bounded loss (negative cosine) does not go NaN: it jumps from about -0.41 to +0.01."""
  rng = np.random.default_rng(0)
  noise = rng.normal(0, 0.01, 100)

  def script(step):
    if step > 30:
      return 0.01 + noise[step], 1.0, 1e6
    return -0.41 + noise[step], 1.0, step
  with pytest.raises(FloatingPointError, match=r'diverged at step 33: the loss spiked for 3 steps '
                     r'in a row \(31..33\).* last good checkpoint is step 30'):
    drive(tmp_path, config('bf16', total_steps=60, spike_window=20, spike_patience=3), script)
  assert saved_weights(tmp_path) == {28: 28.0, 30: 30.0}


def test_noisy_but_healthy_losses_run_to_the_end(tmp_path):
  """No false alarm: a falling, noisy loss (fine-tuning cross-entropy with mixup) over 200 steps,
  with fp16 overflows every 7th step."""
  rng = np.random.default_rng(1)
  noise = rng.normal(0, 0.3, 201)
  ckpt = drive(tmp_path, config('fp16', total_steps=200, checkpoint_every=50),
               lambda s: (2.0 * math.exp(-s / 100) + abs(noise[s]), float(s % 7 != 0), s))
  assert ckpt.last_saved == 200


def test_exploding_weights_with_a_finite_loss_are_not_saved(tmp_path):
  """Weights jump 1000x at step 5 while the loss still looks fine: the save at step 6 is refused."""
  with pytest.raises(FloatingPointError, match=r'diverged at step 6: the parameter norm grew from '
                     r'6\.928 to 1\.039e\+04 \(1\.5e\+03x .*last good checkpoint is step 4'):
    drive(tmp_path, config('fp32'), lambda s: (1.0, 1.0, s if s < 5 else 1000.0 * s))
  assert saved_weights(tmp_path) == {2: 2.0, 4: 4.0}


@pytest.mark.parametrize('field', ['max_nonfinite_steps', 'spike_window', 'spike_patience'])
def test_divergence_settings_are_checked(field):
  cfg = config()
  cfg.divergence[field] = 0
  with pytest.raises(ValueError, match=f'config.divergence.{field} must be >= 1'):
    loop.Divergence(cfg)
  cfg = config(max_norm_growth=0.5)
  with pytest.raises(ValueError, match='config.divergence.max_norm_growth must be > 1'):
    loop.Divergence(cfg)


def test_fp16_lr_1e6_pretraining_stops_with_its_good_checkpoint(tmp_path):
  """The issue's example end to end: fp16 with a learning rate far too high. The issue's 1e6 is
  now refused by the range checks (optim.lr <= 1, test_robust_config.py); 1.0, the largest lr
  accepted, still blows an AdamW run up within a few steps."""
  cfg = support.recipe('pretrain_demo', image_size=56, batch_size=4, total_steps=30,
                       checkpoint_every=2, log_every=1, eval_batches=1, precision='fp16',
                       keep_checkpoints=2)
  cfg.optim.lr, cfg.optim.warmup_steps = 1.0, 4
  cfg.data.mask.num_masking_patches, cfg.data.mask.min_num_patches = 6, 2
  with pytest.raises(FloatingPointError, match='Training diverged at step') as e:
    pretrain.train(cfg, str(tmp_path))
  print(e.value)
  steps = ckpt_lib.finished_steps(tmp_path / 'checkpoints')
  for step in steps:
    params, _, _ = ckpt_lib.restore_params(tmp_path / 'checkpoints' / str(step))
    biggest = max(float(np.abs(v).max()) for v in jax.tree.leaves(params))
    print(f'checkpoint {step}: largest |weight| {biggest:.3g}')
    assert biggest < 100   # not the ~1e5-1e6 weights of the blown-up run
  print(f'checkpoints kept: {steps}')
