"""Issue 12 kind C: token bookkeeping comes from the model, never hard-coded.

After pretraining with class_token=False every consumer (linear probe, k-NN, visualize, timm export,
fine-tuning and the classifier) must use all N patch tokens: a hard-coded `tokens[:, 1:]` drops one.
The run is the demo, tiny and short (56 px: a 4x4 grid, 16 tokens, no prefix).

Also kind L's record: that run's random-init teacher is announced on stderr and recorded.
"""
import contextlib
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import eva_jax
from eva_jax import configs
from eva_jax import checkpoint as ckpt_lib
from eva_jax.evaluation import linear_probe, visualize
from eva_jax.models.layers import resize_grid
from eva_jax.training import finetune, pretrain

import support

N = 16   # patch tokens of a 56 px image, patch 14


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, stderr of the run): pretrain_demo with class_token=False, 3 steps at 56 px."""
  workdir = tmp_path_factory.mktemp('no_cls')
  cfg = support.recipe('pretrain_demo')
  cfg.model.class_token = False
  cfg.image_size, cfg.batch_size, cfg.total_steps = 56, 8, 3
  cfg.optim.warmup_steps, cfg.checkpoint_every, cfg.eval_batches = 1, 3, 1
  cfg.data.mask.num_masking_patches, cfg.data.mask.min_num_patches = 6, 2
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    pretrain.train(cfg, str(workdir))
  return workdir, err.getvalue()


def _images(n=8, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 56, 56, 3)).astype(np.float32)


def test_encoder_has_no_prefix_and_all_patch_tokens(run):
  workdir, _ = run
  enc = eva_jax.load_encoder(workdir)
  assert enc.config.class_token is False and enc.model.num_prefix == 0
  assert enc(_images()).shape == (8, N, 64)


def test_probe_and_knn_pool_every_patch_token(run):
  workdir, _ = run
  data = support.recipe('linear_probe_demo').data
  encoder, _ = ckpt_lib.encoder_from_checkpoint(workdir)
  feats, labels = linear_probe.extract(encoder, data, image_size=56, batch_size=16, pool='mean',
                                       limit=16)
  # Reference: the same first 16 images through load_encoder, mean over ALL 16 patch tokens.
  from eva_jax.data import pipeline
  loader = pipeline.build_classification_loader(data, image_size=56, batch_size=16, seed=0,
                                                train=False)
  batch = next(loader)
  loader.close()
  tokens = np.asarray(eva_jax.load_encoder(workdir)(batch.arrays['image']))
  assert tokens.shape[1] == N
  np.testing.assert_allclose(feats[:16], tokens.mean(1), atol=1e-5)
  # What `tokens[:, 1:]` would have given is measurably different (so the check can fail).
  assert np.abs(feats[:16] - tokens[:, 1:].mean(1)).max() > 1e-3
  np.testing.assert_array_equal(labels[:16], batch.arrays['label'])
  with pytest.raises(ValueError, match="pool='token' needs a class token"):
    linear_probe.extract(encoder, data, image_size=56, batch_size=16, pool='token', limit=16)
  cfg = support.recipe('linear_probe_demo')
  cfg.init_from, cfg.image_size, cfg.epochs = str(workdir), 56, 3
  out = linear_probe.evaluate(cfg)
  assert out['train_images'] + out['test_images'] == 384 and out['num_classes'] == 8
  assert 0.0 <= out['knn_top1'] <= 1.0 and 0.0 <= out['probe_top1'] <= 1.0


def test_visualize_uses_every_patch_token(run):
  workdir, _ = run
  models = visualize.load_models(str(workdir))
  image = _images(1, seed=3)[0]
  mask = np.zeros(models.grid, bool)
  mask[:2] = True
  a = visualize.analyze(models, image, mask)
  assert a.student_features.shape == (N, 64) and a.predictions.shape == (N, 48)
  tokens = np.asarray(eva_jax.load_encoder(workdir)(image[None]))[0]
  np.testing.assert_allclose(a.student_features, tokens, atol=1e-5)
  assert np.isfinite(a.mean_masked_cos) and np.isfinite(a.mean_visible_cos)


def test_timm_export_without_class_token_matches(run, tmp_path):
  from timm.models.eva import Eva
  from eva_jax.convert import export
  workdir, _ = run
  out = tmp_path / 'no_cls.safetensors'
  export.export(str(workdir), 'timm', str(out))
  kwargs = json.loads((tmp_path / 'no_cls.safetensors.json').read_text())
  assert kwargs['class_token'] is False
  # timm's 'token' pool is x[:, 0], the first PATCH here: the export pools the mean instead.
  assert kwargs['global_pool'] == 'avg' and kwargs['use_fc_norm'] is False
  from safetensors.torch import load_file
  model = Eva(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}).eval()
  model.load_state_dict(load_file(str(out)), strict=True)
  assert model.num_prefix_tokens == 0
  x = _images(2, seed=5)
  ours = np.asarray(eva_jax.load_encoder(workdir)(x))
  with torch.no_grad():
    feats = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    pooled = model.forward_head(feats, pre_logits=True)
  np.testing.assert_allclose(feats.numpy(), ours, atol=1e-4)
  np.testing.assert_allclose(pooled.numpy(), ours.mean(1), atol=1e-4)


def test_classifier_and_finetune_use_every_patch_token(run, tmp_path):
  workdir, _ = run
  from eva_jax.models.classifier import Classifier
  ecfg = eva_jax.load_encoder(workdir).config.to_dict()
  import ml_collections
  ecfg = ml_collections.ConfigDict(ecfg)
  clf = Classifier(ecfg, 8, rngs=nnx.Rngs(params=0))
  x = jnp.asarray(_images(2, seed=7))
  tokens = clf.encoder(x)
  assert tokens.shape[1] == N
  np.testing.assert_allclose(np.asarray(clf.features(x)), np.asarray(clf.fc_norm(tokens.mean(1))),
                             atol=1e-6)
  with pytest.raises(ValueError, match="pool='token' needs a class token"):
    Classifier(ecfg, 8, pool='token', rngs=nnx.Rngs(params=0))

  # pretrained_into resizes the whole pos-embed as patches (no row kept aside as a prefix).
  pos = np.random.default_rng(0).normal(size=(N, 64)).astype(np.float32)
  abstract = {'encoder': {'pos_embed': jax.ShapeDtypeStruct((36, 64), jnp.float32)}}
  got, _ = finetune.pretrained_into(abstract, {'pos_embed': pos}, grid_from=(4, 4),
                                    grid_to=(6, 6), num_prefix=0)
  np.testing.assert_allclose(got['pos_embed'], np.asarray(resize_grid(jnp.asarray(pos), (4, 4),
                                                                      (6, 6))), atol=1e-6)

  # Fine-tuning from the run: the config must state class_token=False (else refused, naming it);
  # pool='token' is refused before building.
  cfg = support.recipe('finetune_demo')
  cfg.init_from, cfg.image_size, cfg.batch_size, cfg.total_steps = str(workdir), 56, 8, 2
  cfg.optim.warmup_steps, cfg.checkpoint_every, cfg.eval_batches = 1, 2, 1
  cfg.model.class_token = False
  cfg.pool = 'token'
  with pytest.raises(ValueError, match="config.pool='token' pools the class token, but "
                     'config.model.class_token is False'):
    finetune.train(cfg, str(tmp_path / 'token'))
  cfg.pool = 'mean'
  # The fine-tuning state imported from the run (no train step is compiled: the import is what
  # reads the prefix count): every patch row of the pos-embed, the norm as fc_norm.
  from eva_jax import parallel
  program = finetune.FinetuneProgram(cfg)
  program.validate()
  task = program.build(parallel.make_mesh(cfg.mesh))
  params = jax.device_get(program.init_state(task).params)
  pre, _, _ = ckpt_lib.restore_params(str(workdir))
  assert params['encoder']['pos_embed'].shape == (N, 64) and 'cls_token' not in params['encoder']
  np.testing.assert_array_equal(params['encoder']['pos_embed'], pre['encoder']['pos_embed'])
  np.testing.assert_array_equal(params['fc_norm']['scale'], pre['encoder']['norm']['scale'])
  model = task.model(params)
  np.testing.assert_allclose(np.asarray(model.features(x)),
                             np.asarray(model.fc_norm(model.encoder(x).mean(1))), atol=1e-6)


def test_random_teacher_is_announced_and_recorded(run):
  """Kind L: a random-init teacher prints a banner on stderr and is written down."""
  workdir, err = run
  banner = [l for l in err.splitlines() if l.startswith('!!')]
  assert len(banner) >= 5 and 'RANDOM-INIT TEACHER' in err and 'clip-tiny' in err
  assert 'config.teacher.allow_random_init=True' in err
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['resolved']['teacher_random_init'] is True
  assert saved['teacher']['allow_random_init'] is True and saved['teacher']['checkpoint'] == ''
  _, meta, _ = ckpt_lib.restore_params(str(workdir))
  assert meta['teacher_random_init'] is True
  assert os.path.isdir(workdir / 'checkpoints' / '3')


def test_resuming_with_another_teacher_or_student_is_refused(run):
  """Kind B on resume, through the trainer's resume checks (training/resume.py): the checkpoint's
  lm_head was sized for clip-tiny's 48-d targets and its student has no class token."""
  workdir, _ = run
  before = (workdir / 'config.json').read_text()

  def resume(**teacher):
    cfg = configs.get(str(workdir))      # the run's own config ...
    cfg.progress = False
    cfg.total_steps += 2
    cfg.teacher.update(teacher)          # ... with another teacher
    return cfg

  assert resume().model.class_token is False
  with pytest.raises(ValueError, match=r'Resume refused: teacher\.\w+ was .* in checkpoint'):
    pretrain.train(resume(name='clip-S/14'), str(workdir))   # patch 14 too, but 384-d targets
  cfg = resume()
  cfg.model.class_token = True
  with pytest.raises(ValueError, match=r'Resume refused: student\.class_token was False'):
    pretrain.train(cfg, str(workdir))
  assert (workdir / 'config.json').read_text() == before    # nothing overwritten

