"""Fine-tuning, linear probe and eva-visualize at a non-square size (28x42, patch 14), and
eva-visualize with SigLIP (no cls) and DINOv2 (registers) teachers."""
import json

import numpy as np
import pytest
from flax import nnx

from eva_jax import checkpoint as ckpt_lib
from eva_jax import parallel
from eva_jax.data.config import CLIP_MEAN, CLIP_STD
from eva_jax.data.transforms import resize_center_crop
from eva_jax.evaluation import linear_probe, visualize
from eva_jax.models import teacher as teacher_lib
from eva_jax.training import finetune, pretrain

import support


@pytest.fixture(scope='module')
def run56(tmp_path_factory):
  """A step-0 pretraining checkpoint of the demo student at 56 px (clip-tiny teacher)."""
  workdir = tmp_path_factory.mktemp('run56')
  cfg = support.recipe('pretrain_demo', image_size=56)
  cfg.data.mask.min_num_patches = 2
  task, scfg, tcfg = pretrain.build(cfg, parallel.make_mesh(cfg.mesh))
  ck = ckpt_lib.Checkpointer(str(workdir))
  ck.save(0, task.init(cfg.seed), {}, {'kind': 'eva_pretrain', 'student': scfg.to_dict(),
                                       'teacher': tcfg.to_dict()}, force=True)
  ck.close()
  (workdir / 'config.json').write_text(json.dumps(cfg.to_dict()))
  return workdir


def _photo(demo_dir, size):
  from PIL import Image
  rgb = np.asarray(resize_center_crop(Image.open(f'{demo_dir}/chelsea/000.jpg').convert('RGB'),
                                      size))
  return ((rgb / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)).astype(np.float32)


def test_finetune_at_28x42_keeps_the_checkpoints_pos_embed(tmp_path, run56, demo_split):
  cfg = support.recipe('finetune_demo', image_size='28x42', init_from=str(run56), total_steps=2,
                       batch_size=8, checkpoint_every=2, log_every=1, eval_batches=1)
  cfg.optim.warmup_steps = 1
  cfg.data.source = f'folder:{demo_split}/train'
  cfg.eval_source = f'folder:{demo_split}/val'
  program = finetune.FinetuneProgram(cfg)
  program.validate()
  batch = next(program.loader(train=True))
  assert batch['image'].shape == (8, 28, 42, 3)
  out = finetune.train(cfg, str(tmp_path))
  assert out['eval_count'] == 8 and np.isfinite(out['eval_loss'])
  resolved = json.loads((tmp_path / 'config.json').read_text())['resolved']
  # The native pos-embed stays the checkpoint's 4x4 grid; the forward interpolates it to 2x3.
  assert resolved['image_size'] == '28x42' and resolved['encoder']['image_size'] == 56
  params, meta, _ = ckpt_lib.restore_params(str(tmp_path))
  assert params['encoder']['pos_embed'].shape == (17, 64) and meta['student']['image_size'] == 56
  # A resume takes the native size from its own checkpoint, not from init_from (left out here):
  # it used to build a 28x42 pos-embed and refuse its own checkpoint.
  cfg.init_from, cfg.total_steps = '', 3
  assert finetune.train(cfg, str(tmp_path))['step'] == 3
  assert json.loads((tmp_path / 'config.json').read_text())['init_from'] == str(run56)
  bad = support.recipe('finetune_demo', image_size='28x40')
  with pytest.raises(ValueError, match=r"config.image_size='28x40': every side must be a multiple "
                                       r'of the patch size 14; width 40 \(nearest: 28 or 42\)'):
    finetune.FinetuneProgram(bad).validate()


def test_linear_probe_features_at_28x42(run56, demo_dir):
  encoder, _ = ckpt_lib.encoder_from_checkpoint(str(run56))
  data = support.recipe('linear_probe_demo').data
  data.source = f'folder:{demo_dir}'
  feats, labels = linear_probe.extract(encoder, data, image_size='28x42', batch_size=8,
                                       pool='mean', limit=8)
  assert feats.shape[1] == 64 and len(feats) == len(labels) >= 8
  # The ordered pass starts with the first file of the first class folder.
  from PIL import Image
  rgb = np.asarray(resize_center_crop(Image.open(f'{demo_dir}/astronaut/000.jpg').convert('RGB'),
                                      (28, 42)))
  x = ((rgb / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)).astype(np.float32)
  ref = np.asarray(encoder(x[None]))[0, 1:].mean(0)     # 6 patch tokens of the 2x3 grid
  np.testing.assert_allclose(feats[0], ref, atol=1e-5)
  cfg = support.recipe('linear_probe_demo', init_from=str(run56), image_size='28x41')
  with pytest.raises(ValueError, match=r"config.image_size='28x41'.*width 41 \(nearest: 28 or 42\)"):
    linear_probe.evaluate(cfg)


def test_visualize_at_28x42(run56, demo_dir):
  models = visualize.load_models(str(run56), image_size='28x42')
  assert models.image_size == (28, 42) and models.grid == (2, 3)
  x = _photo(demo_dir, (28, 42))
  rgb, x2 = visualize.load_image(f'{demo_dir}/chelsea/000.jpg', models.image_size)
  np.testing.assert_allclose(x, x2, atol=1e-6)
  mask = np.zeros((2, 3), bool)
  mask[0, 1:] = True
  a = visualize.analyze(models, x, mask)
  assert a.cos.shape == (2, 3) and a.teacher_targets.shape == (6, 48)
  tokens, targets = nnx.jit(lambda m, t, im: (m.encoder(im), t.targets(im)))(
      models.mim, models.teacher, x[None])
  np.testing.assert_allclose(a.student_features, np.asarray(tokens)[0, 1:], atol=1e-5)
  # CLIP on CLIP-normalized input: no re-normalization, the 2x3 grid as it is.
  np.testing.assert_allclose(a.teacher_targets, np.asarray(targets)[0], atol=1e-5)
  with pytest.raises(ValueError, match=r"--image_size='28x40'.*width 40 \(nearest: 28 or 42\)"):
    visualize.load_models(str(run56), image_size='28x40')


@pytest.mark.parametrize('family,name', [('siglip', 'siglip-tiny'), ('dinov2', 'dinov2-tiny-reg')])
def test_visualize_teacher_families(family, name, demo_dir):
  cfg = support.recipe('pretrain_demo', image_size=56)
  cfg.teacher.family, cfg.teacher.name = family, name
  cfg.data.mask.min_num_patches = 2
  models = visualize.random_models(cfg)
  x = _photo(demo_dir, 56)
  mask = visualize.draw_mask(models.grid, models.mask, seed=0)
  a = visualize.analyze(models, x, mask)
  # Independent: the teacher fed through the trainer's own plan (training.pretrain.teacher_input);
  # the old CLIP-only path (targets of the CLIP-normalized input) alongside, in one compile.
  plan = pretrain.teacher_input(cfg, pretrain.student_config(cfg), pretrain.teacher_config(cfg))
  ref, naive = nnx.jit(lambda t, im: (teacher_lib.targets(t, im, plan), t.targets(im)))(
      models.teacher, x[None])
  ref, naive = np.asarray(ref)[0], np.asarray(naive)[0]
  assert a.teacher_targets.shape == (16, 64) == ref.shape   # no cls / registers in the targets
  np.testing.assert_allclose(a.teacher_targets, ref, atol=1e-5)
  assert np.abs(naive - ref).max() > 1e-2    # the family's normalization matters
  assert np.isfinite(a.mean_masked_cos)
