"""config.image_size of any shape: parsing, the config rule, and the transforms against timm's."""
import numpy as np
import pytest
from PIL import Image

from eva_jax.data import config as data_config
from eva_jax.data import transforms
from eva_jax.training import checks

import support


def test_image_hw_forms_and_errors():
  assert data_config.image_hw(224) == (224, 224)
  assert data_config.image_hw('224x336') == (224, 336) == data_config.image_hw(' 224 X 336 ')
  assert data_config.image_hw((28, 42)) == (28, 42) == data_config.image_hw([28, 42])
  assert data_config.image_hw(np.int64(56)) == (56, 56) and data_config.image_hw('56') == (56, 56)
  assert data_config.format_hw((28, 42)) == '28x42' and data_config.format_hw((56, 56)) == '56'
  for bad in ('224x', 'x336', '224*336', (28, 42, 3), (28.0, 42), 22.4, True, None):
    with pytest.raises(ValueError, match=r"config.image_size=.* is not an image size: give an "
                                         r"int .*'HxW' on the command line"):
      data_config.image_hw(bad)
  with pytest.raises(ValueError, match=r'config.image_size=\(0, 42\): height and width must be'):
    data_config.image_hw((0, 42))


def test_config_rule_per_program_and_patch_multiples():
  ft = support.recipe('finetune_demo')
  ft.image_size = '28x42'               # the command-line form is accepted by the field's type
  checks.check_config(ft)
  ft.image_size = (28, 42)
  checks.check_config(ft)
  ft.image_size = '28x'
  with pytest.raises(ValueError, match=r"config.image_size='28x' is not an image size"):
    checks.check_config(ft)
  pre = support.recipe('pretrain_demo')
  pre.image_size = '112x168'
  with pytest.raises(ValueError, match=r"config.image_size='112x168' \(112 high, 168 wide\) is not "
                                       r'square: pretraining runs at square sizes only'):
    checks.check_config(pre)
  probe = support.recipe('linear_probe_demo')
  probe.image_size = 0                  # the encoder's own
  checks.check_config(probe)
  assert checks.image_grid('28x42', 14) == (2, 3) and checks.image_grid(224, 16) == (14, 14)
  with pytest.raises(ValueError, match=r"config.image_size='28x40': every side must be a multiple "
                                       r'of the patch size 14; width 40 \(nearest: 28 or 42\)'):
    checks.image_grid('28x40', 14)


def test_a_size_off_the_patch_grid_is_named_as_the_user_set_it():
  """Every training program refuses config.image_size=100 for patch 14 before building (as
  trainer.run checks: the config rules, then the program's validate), naming config.image_size
  and the nearest sizes (pretraining and EVA-CLIP used to name the resolved model.image_size)."""
  from eva_jax.training import clip, finetune, pretrain, video
  for program, recipe in ((pretrain.PretrainProgram, 'pretrain_demo'),
                          (finetune.FinetuneProgram, 'finetune_demo'),
                          (clip.ClipProgram, 'clip_demo'), (video.VideoFinetuneProgram, 'video_demo')):
    cfg = support.recipe(recipe)
    cfg.image_size = 100
    with pytest.raises(ValueError, match=r'config.image_size=100.* multiple of the patch size 14.*'
                                         r'98 or 112'):
      checks.check_run(cfg)
      program(cfg).validate()


@pytest.mark.parametrize('size,crop_pct', [((28, 42), 0.875), ((42, 28), 1.0), ((56, 56), 0.9)])
def test_eval_crop_matches_timm(demo_dir, size, crop_pct):
  import timm.data
  import torchvision.transforms as tv
  tf = timm.data.create_transform(input_size=(3,) + size, is_training=False, crop_pct=crop_pct,
                                  interpolation='bicubic')
  geometry = tv.Compose([t for t in tf.transforms
                         if type(t).__name__ in ('ResizeKeepRatio', 'Resize', 'CenterCrop')])
  assert len(geometry.transforms) == 2
  for name in ('chelsea', 'rocket'):       # a landscape and a portrait photo
    img = Image.open(f'{demo_dir}/{name}/000.jpg').convert('RGB')
    ours = np.asarray(transforms.resize_center_crop(img, size, crop_pct))
    ref = np.asarray(geometry(img))
    assert ours.shape == size + (3,)
    np.testing.assert_array_equal(ours, ref)


def test_train_transforms_emit_the_size_and_grid(demo_dir):
  cfg = support.recipe('finetune_demo').data
  img = Image.open(f'{demo_dir}/coffee/000.jpg').convert('RGB')
  element = {'image': img, 'label': 2, 'skipped': 0, 'valid': True}
  out = transforms.ClassifyTransform(cfg, '28x42', seed=0, train=True)(5, element)
  assert out['image'].shape == (28, 42, 3) and out['image'].dtype == np.uint8
  blank = transforms.ClassifyTransform(cfg, (28, 42), seed=0, train=False)(
      0, {**element, 'image': None})
  assert blank['image'].shape == (28, 42, 3)
  pre = support.recipe('pretrain_demo').data
  p = transforms.PretrainTransform(pre, (28, 42), 14, seed=0, train=True)(3, element)
  assert p['image'].shape == (28, 42, 3) and p['mask'].shape == (6,)
  # Same draw, same crop: the square path is the (S, S) path.
  a = transforms.ClassifyTransform(cfg, 56, seed=1, train=True)(7, element)['image']
  b = transforms.ClassifyTransform(cfg, (56, 56), seed=1, train=True)(7, element)['image']
  np.testing.assert_array_equal(a, b)
