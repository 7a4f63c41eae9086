"""Issue 12 kind E: the exported weights are the ones that produced the metrics.

A fine-tuning run with ema_decay > 0 evaluates its EMA weights; export, load_encoder, the linear
probe and init_from must read those by default (weights='auto'), say so, and offer the raw ones.
"""
import json

import jax
import numpy as np
import pytest

import eva_jax
from eva_jax import checkpoint as ckpt_lib
from eva_jax import parallel
from eva_jax.convert import common, export
from eva_jax.training import finetune

import support


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory):
  """4 fine-tuning steps at 56 px with a fast EMA (0.5): raw and EMA weights clearly differ."""
  workdir = tmp_path_factory.mktemp('ema_run')
  cfg = support.recipe('finetune_demo', image_size=56, batch_size=8, total_steps=4,
                       checkpoint_every=4, eval_batches=1, ema_decay=0.5)
  cfg.data.source = 'demo'
  cfg.data.randaug = ''
  cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 1
  last = finetune.train(cfg, str(workdir))
  return workdir, cfg, last


def _logits(cfg, params, x):
  task, _ = finetune.build(cfg, parallel.make_mesh(cfg.mesh), 8)
  return np.asarray(jax.jit(lambda p, im: task.model(p)(im))(params, x))


def test_export_defaults_to_the_evaluated_ema_weights(ema_run, tmp_path, caplog):
  torch = pytest.importorskip('torch')
  from safetensors.torch import load_file
  from timm.models.eva import Eva
  workdir, cfg, last = ema_run
  assert 'eval_top1' in last
  ema, _, _ = ckpt_lib.restore_params(workdir, weights='ema')
  raw, _, _ = ckpt_lib.restore_params(workdir, weights='raw')
  x = np.random.default_rng(1).normal(size=(2, 56, 56, 3)).astype(np.float32)
  evaluated, raw_logits = _logits(cfg, ema, x), _logits(cfg, raw, x)

  with caplog.at_level('WARNING'):
    summary = export.export(str(workdir), 'timm', str(tmp_path / 'auto.safetensors'))
  assert summary['weights'] == 'ema'
  assert any('EMA weights' in r.getMessage() for r in caplog.records)
  raw_summary = export.export(str(workdir), 'timm', str(tmp_path / 'raw.safetensors'),
                              weights='raw')
  assert raw_summary['weights'] == 'raw'
  kwargs = json.load(open(tmp_path / 'auto.safetensors.json'))
  out = {}
  for name in ('auto', 'raw'):
    model = Eva(**kwargs).eval()
    model.load_state_dict(load_file(tmp_path / f'{name}.safetensors'), strict=True)
    with torch.no_grad():
      out[name] = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  d_auto = float(np.abs(out['auto'] - evaluated).max())
  d_raw_vs_eval = float(np.abs(out['raw'] - evaluated).max())
  d_raw = float(np.abs(out['raw'] - raw_logits).max())
  print(f'timm logits vs the evaluated (EMA) model: default export {d_auto:.2e}, '
        f'--weights=raw {d_raw_vs_eval:.2e} (raw export vs raw model {d_raw:.2e})')
  assert d_auto < 1e-4 and d_raw < 1e-4
  assert d_raw_vs_eval > 1e-3   # the two choices really are different weights


def test_load_encoder_probe_and_init_from_read_the_ema_by_default(ema_run, tmp_path):
  workdir, cfg, _ = ema_run
  ema, _, _ = ckpt_lib.restore_params(workdir, weights='model_ema')   # official spelling too
  raw, _, _ = ckpt_lib.restore_params(workdir, weights='model')
  flat_ema, flat_raw = common.flatten(ema['encoder']), common.flatten(raw['encoder'])
  assert max(float(np.abs(flat_ema[k] - flat_raw[k]).max()) for k in flat_ema) > 1e-4

  enc = eva_jax.load_encoder(workdir)
  assert enc.weights == 'ema' and 'EMA weights' in enc.meta['source']
  assert eva_jax.load_encoder(workdir, weights='raw').weights == 'raw'
  got = common.flatten(nnx_pure(enc.model))
  assert all(np.array_equal(np.asarray(got[k]), np.asarray(flat_ema[k])) for k in got)

  with pytest.raises(ValueError, match='weights=.*unknown'):
    ckpt_lib.read_encoder(workdir, weights='best')

  # init_from of a fine-tuning run with EMA: the EMA encoder, named in the printed message.
  ft = support.recipe('finetune_demo', image_size=56, batch_size=8, total_steps=2,
                      init_from=str(workdir))
  ft.optim.warmup_steps = 1
  program = finetune.FinetuneProgram(ft)
  program.validate()
  task = program.build(parallel.make_mesh(ft.mesh))
  state = program.init_state(task)
  enc_params = common.flatten(jax.device_get(state.params['encoder']))
  assert all(np.array_equal(np.asarray(enc_params[k]), np.asarray(flat_ema[k]))
             for k in enc_params)

  # A pretraining-style run without EMA: 'ema' is refused naming the fix, 'auto' gives raw.
  with pytest.raises(ValueError, match="no EMA weights.*weights='raw'"):
    from eva_jax.training import pretrain
    pre = support.recipe('pretrain_demo', image_size=56)
    t, s, te = pretrain.build(pre, parallel.make_mesh(pre.mesh))
    ck = ckpt_lib.Checkpointer(str(tmp_path / 'pre'))
    ck.save(0, t.init(0), {}, {'kind': 'eva_pretrain', 'student': s.to_dict()}, force=True)
    ck.close()
    assert ckpt_lib.read_encoder(tmp_path / 'pre').weights == 'raw'
    ckpt_lib.read_encoder(tmp_path / 'pre', weights='ema')


def nnx_pure(model):
  from flax import nnx
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_linear_probe_reports_the_weights_it_probed(ema_run):
  from eva_jax.evaluation import linear_probe
  workdir, _, _ = ema_run
  cfg = support.recipe('linear_probe_demo', init_from=str(workdir), epochs=1, image_size=56)
  out = linear_probe.evaluate(cfg)
  assert out['weights'] == 'ema'
  cfg.weights = 'raw'
  assert linear_probe.evaluate(cfg)['weights'] == 'raw'


def test_finetune_resume_with_another_class_count_is_refused(ema_run):
  """Issue 12 H for fine-tuning (this module has the fine-tuning run): the class count is part of
  the checked metadata; the refusal names it and leaves config.json as it was."""
  workdir, cfg, _ = ema_run
  before = (workdir / 'config.json').read_bytes()
  other = cfg.copy_and_resolve_references()
  other.total_steps, other.num_classes = 8, 9   # a head for 9 classes (the source has 8)
  with pytest.raises(ValueError, match=r'Resume refused: num_classes was 8 in checkpoint step 4 .* '
                     r'is 9 in this run'):
    finetune.train(other, str(workdir))
  assert (workdir / 'config.json').read_bytes() == before


def test_export_refuses_a_file_named_for_another_format_and_a_video_run(tmp_path, monkeypatch):
  """An --out named for another format, checked before anything is read (a .pth holding
  safetensors bytes failed only at load, as 'truncated'); a video run points to --format=video."""
  for fmt, out in (('timm', 'm.pth'), ('eva', 'm.safetensors'), ('video', 'm.safetensors')):
    with pytest.raises(ValueError, match=f'--format={fmt} writes a'):
      export.export('ignored', fmt, str(tmp_path / out))
  fake = ckpt_lib.EncoderWeights(params={}, extra={}, config={},
                                 meta={'kind': 'eva_video_finetune', 'student': {}},
                                 source='video run', step=3, weights='raw')
  monkeypatch.setattr(ckpt_lib, 'read_encoder', lambda path, weights='auto': fake)
  with pytest.raises(ValueError, match='video fine-tuning checkpoint: export it with --format=video'):
    export.export('ignored', 'timm', str(tmp_path / 'm.safetensors'))
  assert not list(tmp_path.iterdir())   # nothing written
