"""Foreign checkpoints as users have them (issue 12, kind F): the official EVA training checkpoint
{model, optimizer, epoch, scaler, args, model_ema} imports safely, EMA or raw weights selectable,
and a pickled global that is not plain data is refused (never executed)."""
import argparse
import logging
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from eva_jax.convert import common, eva_torch  # noqa: E402
from eva_jax.convert.common import CheckpointError  # noqa: E402
from eva_jax.models import encoder_config  # noqa: E402


def _cfg():
  cfg = encoder_config('tiny')
  cfg.image_size = 56
  return cfg


def _params(cfg, seed):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32)
          for k, s in common.model_params_abstract(cfg).items()}


def _official_training_checkpoint(path, ema=True, legacy=False):
  """What the official EVA / BEiT fine-tuning script's save_model writes."""
  cfg = _cfg()
  raw, avg = _params(cfg, 0), _params(cfg, 1)
  to_t = lambda p: {'module.' + k: torch.from_numpy(v)   # noqa: E731 - DDP-saved names
                    for k, v in eva_torch.to_torch_state_dict(p, cfg, 'eva').items()}
  model = torch.nn.Linear(4, 2)
  opt = torch.optim.AdamW(model.parameters())
  model(torch.ones(1, 4)).sum().backward()
  opt.step()
  obj = {'model': to_t(raw), 'optimizer': opt.state_dict(), 'epoch': 3,
         'scaler': {'scale': 65536.0, 'growth_factor': 2.0, '_growth_tracker': 17},
         'args': argparse.Namespace(model='eva02_tiny_patch14_224', lr=3e-4, layer_decay=0.9,
                                    model_ema=ema, output_dir='/tmp/out', input_size=56)}
  if ema:
    obj['model_ema'] = to_t(avg)
  kw = {'_use_new_zipfile_serialization': False} if legacy else {}
  torch.save(obj, path, **kw)
  return cfg, raw, avg


def _same(model, params):
  got = common.model_params_numpy(model)
  return set(got) == set(params) and all(np.array_equal(got[k], params[k]) for k in params)


@pytest.mark.parametrize('legacy', [False, True])
def test_official_training_checkpoint_imports_ema_by_default(tmp_path, caplog, legacy):
  path = str(tmp_path / 'checkpoint-best.pth')
  cfg, raw, avg = _official_training_checkpoint(path, legacy=legacy)
  with caplog.at_level(logging.INFO):
    src = common.TensorSource(path)
  assert "using the EMA weights 'model_ema'" in caplog.text and "weights='model'" in caplog.text
  assert 'blocks.0.attn.qkv.weight' in src            # 'module.' stripped
  _, m, _ = eva_torch.from_torch_state_dict(src, cfg)
  assert _same(m, avg) and not _same(m, raw)
  _, m, _ = eva_torch.from_torch_state_dict(common.TensorSource(path, weights='model'), cfg)
  assert _same(m, raw)
  _, m, _ = eva_torch.from_torch_state_dict(common.TensorSource(path, weights='model_ema'), cfg)
  assert _same(m, avg)


def test_weight_selection_errors(tmp_path):
  path = str(tmp_path / 'no_ema.pth')
  cfg, raw, _ = _official_training_checkpoint(path, ema=False)
  _, m, _ = eva_torch.from_torch_state_dict(common.TensorSource(path), cfg)   # auto: the raw ones
  assert _same(m, raw)
  with pytest.raises(CheckpointError, match="has no EMA weights .*'model_ema'.*weights='model'"):
    common.TensorSource(path, weights='model_ema')
  with pytest.raises(ValueError, match=r"weights must be one of \('auto', 'model', 'model_ema'\)"):
    common.TensorSource(path, weights='ema')
  # The same choice for an in-memory checkpoint dict.
  sd = {k: torch.from_numpy(v) for k, v in eva_torch.to_torch_state_dict(raw, cfg, 'eva').items()}
  with pytest.raises(CheckpointError, match='bare state dict without EMA'):
    eva_torch.from_torch_state_dict(sd, cfg, weights='model_ema')
  _, m, _ = eva_torch.from_torch_state_dict({'model': sd, 'model_ema': sd}, cfg, weights='model')
  assert _same(m, raw)


def _touch(path):   # what a malicious pickle would run; must never be called
  open(path, 'w').close()
  return {}


class Payload:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (_touch, (self.path,))


class TrainerState:   # an innocent class of someone's training code: still code, still refused
  def __init__(self):
    self.step = 3


@pytest.mark.parametrize('legacy', [False, True])
def test_pickled_code_is_refused_and_never_run(tmp_path, legacy):
  marker = str(tmp_path / 'pwned')
  cfg = _cfg()
  sd = {k: torch.from_numpy(v)
        for k, v in eva_torch.to_torch_state_dict(_params(cfg, 0), cfg, 'eva').items()}
  kw = {'_use_new_zipfile_serialization': False} if legacy else {}
  path = str(tmp_path / 'evil.pth')
  torch.save({'model': sd, 'args': Payload(marker)}, path, **kw)
  with pytest.raises(CheckpointError) as e:
    common.TensorSource(path)
  msg = str(e.value)
  print(f'\n[error] {msg}')
  assert '_touch' in msg and 'refuses to unpickle code' in msg and 'argparse.Namespace' in msg
  assert not os.path.exists(marker)
  torch.save({'model': sd, 'state': TrainerState()}, path, **kw)
  with pytest.raises(CheckpointError, match=r'pickles \S*TrainerState.*refuses to unpickle code'):
    common.TensorSource(path)


def test_not_a_checkpoint_still_says_so(tmp_path):
  txt = tmp_path / 'notes.pth'
  txt.write_text('not a checkpoint\n')
  with pytest.raises(CheckpointError, match='neither a torch.save state dict nor a TorchScript'):
    common.TensorSource(str(txt))
