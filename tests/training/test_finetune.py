"""From pretraining to results: fine-tuning, linear probe / k-NN, export to PyTorch and back."""
import json
import os

import jax
import numpy as np
import pytest

import eva_jax
from eva_jax import checkpoint as ckpt_lib
from eva_jax import parallel
from eva_jax.convert import common, export
from eva_jax.evaluation import linear_probe
from eva_jax.models.config import model_section
from eva_jax.training import finetune, pretrain

import support

def load_config(name):
  return support.recipe(name)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory, demo_split):
  workdir = tmp_path_factory.mktemp('pretrain')
  cfg = load_config('pretrain_demo')
  cfg.data.source = f'folder:{demo_split}/train'
  cfg.eval_batches = 1
  pretrain.train(cfg, str(workdir))
  return workdir


@pytest.fixture(scope='module')
def random_init(tmp_path_factory):
  """A step-0 checkpoint of the same architecture: the 'no pretraining' baseline."""
  workdir = tmp_path_factory.mktemp('random')
  cfg = load_config('pretrain_demo')
  task, scfg, tcfg = pretrain.build(cfg, parallel.make_mesh(cfg.mesh))
  ck = ckpt_lib.Checkpointer(str(workdir))
  ck.save(0, task.init(cfg.seed), {}, {'kind': 'eva_pretrain', 'student': scfg.to_dict(),
                                       'teacher': tcfg.to_dict()}, force=True)
  ck.close()
  return workdir


def _finetune(tmp_path, init_from, demo_split, **overrides):
  cfg = load_config('finetune_demo')
  cfg.init_from = str(init_from)
  cfg.data.source = f'folder:{demo_split}/train'
  cfg.eval_source = f'folder:{demo_split}/val'
  for k, v in overrides.items():
    cfg[k] = v
  return finetune.train(cfg, str(tmp_path)), cfg


def test_finetune_from_pretraining_and_from_random_init(tmp_path, pretrained, random_init, demo_split):
  pre, _ = _finetune(tmp_path / 'pre', pretrained, demo_split)
  rnd, _ = _finetune(tmp_path / 'rnd', random_init, demo_split)
  print(f"fine-tune top-1 on held-out demo crops: from pretraining {pre['eval_top1']:.4f}, "
        f"from random init {rnd['eval_top1']:.4f}")
  assert pre['eval_count'] == rnd['eval_count'] == 96
  # Measured, not asserted as an ordering: with the demo's RANDOM-init teacher the MIM targets are
  # random features, and fine-tuning from them does not beat random init on 8 photo classes (the
  # issue note has the figures); what must hold is that both runs learn the held-out task.
  assert pre['eval_top1'] > 0.8 and rnd['eval_top1'] > 0.8
  cfg_json = json.load(open(tmp_path / 'pre' / 'config.json'))
  assert cfg_json['resolved']['num_classes'] == 8 and cfg_json['num_classes'] == 0
  records = [json.loads(l) for l in open(tmp_path / 'pre' / 'metrics.jsonl')]
  assert {'eval_top1', 'eval_top5'} <= set(records[-1])


def test_linear_probe_and_knn(pretrained, random_init, demo_split):
  scores = {}
  for name, path in (('pretrained', pretrained), ('random', random_init)):
    cfg = load_config('linear_probe_demo')
    cfg.init_from = str(path)
    cfg.data.source = f'folder:{demo_split}/train'
    cfg.eval_source = f'folder:{demo_split}/val'
    scores[name] = linear_probe.evaluate(cfg)
  print('linear probe / k-NN on held-out demo crops:', {k: (v['probe_top1'], v['knn_top1'])
                                                         for k, v in scores.items()})
  assert scores['pretrained']['test_images'] == 96 and scores['pretrained']['train_images'] == 288
  assert scores['pretrained']['knn_top1'] > scores['random']['knn_top1']
  assert scores['pretrained']['probe_top1'] >= 0.5   # 8 classes: chance is 0.125


def test_knn_against_brute_force():
  rng = np.random.default_rng(0)
  tr, te = rng.normal(size=(50, 4)), rng.normal(size=(10, 4))
  ytr, yte = rng.integers(0, 3, 50), rng.integers(0, 3, 10)
  a = tr / np.linalg.norm(tr, axis=1, keepdims=True)
  b = te / np.linalg.norm(te, axis=1, keepdims=True)
  pred = []
  for row in b @ a.T:
    top = np.argsort(-row)[:5]
    votes = np.zeros(3)
    for j in top:
      votes[ytr[j]] += np.exp(row[j] / 0.1)
    pred.append(votes.argmax())
  assert linear_probe.knn_top1(tr, ytr, te, yte, k=5, temperature=0.1) == np.mean(np.array(pred) == yte)


def test_knn_and_probe_predict_among_the_split_classes():
  """An evaluation split with a subset of the classes (data/sources.py split_labels) is scored
  among them: k-NN against brute force, the probe never worse than over the full head and right
  where a class outside the split attracts every test point."""
  rng = np.random.default_rng(1)
  centers = np.eye(4)[:3] * 3.0
  ytr = np.repeat(np.arange(3), 30)
  tr = centers[ytr] + rng.normal(scale=0.5, size=(90, 4))
  yte = np.repeat([0, 1], 10)
  # Test points sit between their class and class 2, nearer class 2: over the full head most are
  # called 2, which the split does not hold.
  te = 0.35 * centers[yte] + 0.65 * centers[2] + rng.normal(scale=0.2, size=(20, 4))
  a = tr / np.linalg.norm(tr, axis=1, keepdims=True)
  b = te / np.linalg.norm(te, axis=1, keepdims=True)
  pred = []
  for row in b @ a.T:
    votes = np.zeros(3)
    for j in np.argsort(-row)[:45]:
      votes[ytr[j]] += np.exp(row[j] / 0.1)
    votes[2] = -np.inf
    pred.append(votes.argmax())
  knn = linear_probe.knn_top1(tr, ytr, te, yte, k=45, temperature=0.1, classes=[0, 1])
  assert knn == np.mean(np.array(pred) == yte)
  full = linear_probe.knn_top1(tr, ytr, te, yte, k=45, temperature=0.1)
  assert full < 0.5 < knn, (full, knn)
  kw = dict(num_classes=3, epochs=30, lr=1e-2, batch_size=30, seed=0)
  probe_full = linear_probe.linear_probe_top1(tr, ytr, te, yte, **kw)
  probe_split = linear_probe.linear_probe_top1(tr, ytr, te, yte, classes=[0, 1], **kw)
  print(f"k-NN {full} -> {knn}, probe {probe_full} -> {probe_split}")
  assert probe_full < 0.5 < probe_split, (probe_full, probe_split)


def test_export_timm_and_official_layouts_match_load_encoder(tmp_path, pretrained, demo_split):
  torch = pytest.importorskip('torch')
  from safetensors.torch import load_file
  from timm.models.eva import Eva, checkpoint_filter_fn
  from eva_jax.data import pipeline as data_lib
  cfg = load_config('pretrain_demo')
  cfg.data.source = f'folder:{demo_split}/val'
  batch = next(data_lib.build_pretrain_loader(cfg.data, image_size=112, patch_size=14,
                                             batch_size=8, seed=0, train=False))
  photos = batch.arrays['image']                    # real photos, CLIP-normalized NHWC
  ours = np.asarray(eva_jax.load_encoder(pretrained)(photos))
  x = torch.from_numpy(photos).permute(0, 3, 1, 2)

  export.export(str(pretrained), 'timm', str(tmp_path / 'm.safetensors'))
  kwargs = json.load(open(tmp_path / 'm.safetensors.json'))
  model = Eva(**kwargs).eval()
  model.load_state_dict(load_file(tmp_path / 'm.safetensors'), strict=True)
  with torch.no_grad():
    timm_tokens = model.forward_features(x).numpy()
  d_timm = float(np.abs(timm_tokens - ours).max())
  # load_encoder reads the exported timm file back (the one checkpoint resolver).
  back = np.asarray(eva_jax.load_encoder(tmp_path / 'm.safetensors')(photos))
  assert float(np.abs(back - ours).max()) < 1e-5

  export.export(str(pretrained), 'eva', str(tmp_path / 'm.pth'))
  sd = torch.load(tmp_path / 'm.pth')['model']
  assert {'mask_token', 'lm_head.weight', 'lm_head.bias', 'norm.weight'} <= set(sd)
  kw = dict(kwargs, global_pool='avg', use_fc_norm=True, use_post_transformer_norm=False)
  backbone = Eva(**kw).eval()
  backbone.load_state_dict(checkpoint_filter_fn(sd, backbone), strict=True)  # norm -> fc_norm
  with torch.no_grad():
    filtered = backbone.fc_norm(backbone.forward_features(x)).numpy()
  d_eva = float(np.abs(filtered - ours).max())
  print(f'export parity on real photos: timm {d_timm:.2e}, official layout via '
        f'checkpoint_filter_fn {d_eva:.2e}')
  assert d_timm < 1e-4 and d_eva < 1e-4


def test_finetuned_export_keeps_head_and_matches_logits(tmp_path, pretrained, demo_split, capsys):
  torch = pytest.importorskip('torch')
  from safetensors.torch import load_file
  from timm.models.eva import Eva
  last, cfg = _finetune(tmp_path / 'ft', pretrained, demo_split, total_steps=20)
  export.export(str(tmp_path / 'ft'), 'timm', str(tmp_path / 'ft.safetensors'))
  kwargs = json.load(open(tmp_path / 'ft.safetensors.json'))
  assert kwargs['num_classes'] == 8 and kwargs['global_pool'] == 'avg'
  model = Eva(**kwargs).eval()
  model.load_state_dict(load_file(tmp_path / 'ft.safetensors'), strict=True)
  params, meta, _ = ckpt_lib.restore_params(tmp_path / 'ft')
  task, _ = finetune.build(cfg, parallel.make_mesh(cfg.mesh), 8)
  x = np.random.default_rng(1).normal(size=(2, 112, 112, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(lambda p, im: task.model(p)(im))(params, x))
  with torch.no_grad():
    ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert np.abs(ours - ref).max() < 1e-4
  export.export(str(tmp_path / 'ft'), 'eva', str(tmp_path / 'ft.pth'))
  assert {'fc_norm.weight', 'head.weight', 'head.bias'} <= set(torch.load(tmp_path / 'ft.pth')['model'])
  # Fine-tuning again from the fine-tuned run (workdir or its timm file) keeps its fc_norm, and its
  # head while the class count is the same (official run_class_finetuning.py, timm); a head for
  # another class count is dropped and named (IN-21K -> IN-1K).
  want = ckpt_lib.read_encoder(str(tmp_path / 'ft')).extra
  for init_from, num_classes in ((tmp_path / 'ft', 0), (tmp_path / 'ft.safetensors', 0),
                                 (tmp_path / 'ft', 10)):
    cfg2 = cfg.copy_and_resolve_references()
    cfg2.init_from, cfg2.num_classes = str(init_from), num_classes
    program = finetune.FinetuneProgram(cfg2)
    program.validate()
    task2 = program.build(parallel.make_mesh(cfg2.mesh))
    got = jax.device_get(program.init_state(task2).params)
    line = capsys.readouterr().out
    np.testing.assert_allclose(got['fc_norm']['scale'], want['fc_norm']['scale'], atol=1e-7)
    assert np.abs(np.asarray(want['fc_norm']['scale']) - 1).max() > 1e-4   # trained, not init
    if num_classes:
      assert got['head']['kernel'].shape == (64, 10)
      assert 'head (8 classes; this run has 10)' in line and 'fc_norm from the checkpoint' in line
    else:
      np.testing.assert_allclose(got['head']['kernel'], want['head']['kernel'], atol=1e-7)
      assert 'fc_norm, head from the checkpoint' in line
  # Evaluation only (config.eval_only, the official --eval): the run's own final scores again.
  from eva_jax.training import trainer
  cfg3 = cfg.copy_and_resolve_references()
  cfg3.init_from, cfg3.eval_only = str(tmp_path / 'ft'), True
  rec = trainer.run(finetune.FinetuneProgram(cfg3), str(tmp_path / 'eval'))
  assert rec['eval_count'] == last['eval_count'] == 96 and rec['eval_top1'] == last['eval_top1']
  np.testing.assert_allclose(rec['eval_loss'], last['eval_loss'], rtol=1e-6)
  assert os.listdir(tmp_path / 'eval') == ['eval.json']   # nothing trained or saved
  assert json.load(open(tmp_path / 'eval' / 'eval.json'))['eval_top5'] == last['eval_top5']
  assert 'step 20' in json.load(open(tmp_path / 'eval' / 'eval.json'))['init_from']
  cfg3.init_from = ''
  with pytest.raises(ValueError, match='config.eval_only=True evaluates config.init_from'):
    trainer.run(finetune.FinetuneProgram(cfg3), str(tmp_path / 'eval2'))
  # A head that is not the checkpoint's (pretraining, or another class count) would score noise.
  cfg3.init_from, cfg3.num_classes = str(tmp_path / 'ft'), 10
  with pytest.raises(ValueError, match=r'holds no fc_norm and head for this run \(fc_norm taken\)'):
    trainer.run(finetune.FinetuneProgram(cfg3), str(tmp_path / 'eval3'))
  assert not (tmp_path / 'eval3').exists()


def test_import_official_checkpoint_round_trip_is_bit_exact(tmp_path, pretrained):
  pytest.importorskip('torch')
  export.export(str(pretrained), 'eva', str(tmp_path / 'm.pth'))
  weights = ckpt_lib.read_encoder(str(tmp_path / 'm.pth'))
  imported, cfg = weights.params, weights.config
  original, _, _ = ckpt_lib.restore_params(pretrained)
  a, b = common.flatten(imported), common.flatten(original['encoder'])
  assert set(a) == set(b)
  assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
  assert cfg['width'] == 64 and cfg['depth'] == 2


def test_init_from_errors(tmp_path, pretrained, demo_split):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    _finetune(tmp_path / 'a' / 'runs' / 'x', tmp_path / 'nope', demo_split)
  with pytest.raises(ValueError, match='model.width'):
    _finetune(tmp_path / 'b', pretrained, demo_split, model=model_section('S/14'))
  bad = tmp_path / 'notes.txt'
  bad.write_text('not a checkpoint')
  with pytest.raises(ValueError, match='Unsupported operand'):   # the unpickler's own finding
    _finetune(tmp_path / 'c', bad, demo_split)
  # Refused after the workdir was made: the run leaves none behind (nothing was in it), nor
  # the parent folders it made for it; a workdir that was there stays, without a checkpoints/.
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'c').exists()
  # An evaluation split that is not there is named by its own field.
  cfg = load_config('finetune_demo')
  cfg.eval_source = 'folder:/no/such/val'
  with pytest.raises(FileNotFoundError, match=r"^config.eval_source='folder:/no/such/val': Image "
                     'folder /no/such/val does not exist'):
    finetune.FinetuneProgram(cfg).eval_sources()
  (tmp_path / 'd').mkdir()
  with pytest.raises(ValueError, match='Unsupported operand'):
    _finetune(tmp_path / 'd', bad, demo_split)
  assert (tmp_path / 'd').is_dir() and not any((tmp_path / 'd').iterdir())
