"""The dense evaluation: synthetic segmentation task, mIoU, the per-patch linear probe, eva-seg-probe."""
import json

import numpy as np
import pytest

from eva_jax.data import seg_demo
from eva_jax.evaluation import seg_probe
from eva_jax.models import config as model_config, vit

import support


def _reference_miou(pred, labels, num_classes, ignore_index=255):
  """torchmetrics JaccardIndex / mmseg formula written with torch, class by class."""
  import torch
  p, t = torch.as_tensor(pred).reshape(-1), torch.as_tensor(labels).reshape(-1)
  keep = t != ignore_index
  p, t = p[keep], t[keep]
  ious = []
  for c in range(num_classes):
    inter = ((p == c) & (t == c)).sum().item()
    union = ((p == c) | (t == c)).sum().item()
    if union:
      ious.append(inter / union)
  return float(np.mean(ious)), ious


def test_miou_against_a_reference_and_known_masks():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, (3, 17, 23))
  labels[0, :4] = 255                                   # ignored pixels
  pred = np.where(rng.random(labels.shape) < 0.6, labels % 255, rng.integers(0, 6, labels.shape))
  pred[pred == 5] = 4
  conf = seg_probe.confusion_matrix(pred, labels, 6)
  assert conf.sum() == (labels != 255).sum()
  ref, ref_ious = _reference_miou(pred, labels, 6)
  assert seg_probe.mean_iou(conf) == pytest.approx(ref, abs=1e-12)
  ours = seg_probe.iou_per_class(conf)
  assert np.isnan(ours[5])                             # in neither labels nor predictions
  np.testing.assert_allclose(ours[:5], ref_ious, atol=1e-12)
  # Known masks: two 4x4 half-planes, prediction shifted by one column.
  t = np.zeros((4, 4), int)
  t[:, 2:] = 1
  p = np.zeros((4, 4), int)
  p[:, 1:] = 1
  iou = seg_probe.iou_per_class(seg_probe.confusion_matrix(p, t, 2))
  np.testing.assert_allclose(iou, [4 / 8, 8 / 12])    # class 0: 4 of 8; class 1: 8 of 12
  with pytest.raises(ValueError, match=r'label 7 is outside \[0, 2\)'):
    seg_probe.confusion_matrix(p, np.full_like(t, 7), 2)


def test_task_is_deterministic_exact_and_split(demo_dir):
  a, la = seg_demo.composite(3, image_size=(28, 42), seed=5, split='train')
  b, lb = seg_demo.composite(3, image_size=(28, 42), seed=5, split='train')
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert a.shape == (28, 42, 3) and a.dtype == np.uint8 and la.shape == (28, 42)
  c, _ = seg_demo.composite(3, image_size=(28, 42), seed=5, split='test')
  assert not np.array_equal(a, c)
  x, y = seg_demo.make_split(12, image_size=56, seed=0, shape='ellipse')
  names = seg_demo.class_names()
  assert len(names) == 8 and y.max() < 8
  for img, lab in zip(x, y):
    classes, counts = np.unique(lab, return_counts=True)
    assert len(classes) == 2                            # a background and a pasted photo
    assert 0.05 < counts.min() / lab.size <= 0.5        # the shape's share (area 0.15-0.45)
  # The pasted region is exactly the labelled one: within it, pixels come from the front crop.
  rng_box = seg_demo.shape_mask((20, 30), np.random.default_rng(1), 'box', (0.2, 0.2))
  rows, cols = np.nonzero(rng_box)
  assert rng_box.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
  # Train and test composites read disjoint demo crops.
  files = dict(seg_demo.sources())[names[0]]
  cut = int(round(seg_demo.TRAIN_SHARE * len(files)))
  train_files = set(files[:cut])
  assert not train_files & set(files[cut:]) and len(train_files) == 36


def test_probe_learns_above_chance_on_random_features():
  ecfg = model_config.resolve_encoder(model_config.model_section('tiny'), image_size=56,
                                      dtype='float32')
  encoder = vit.create(ecfg, 0)
  tx, ty = seg_demo.make_split(32, image_size=56, seed=0, split='train')
  vx, vy = seg_demo.make_split(16, image_size=56, seed=0, split='test')
  tf = seg_probe.patch_features(encoder, tx, batch_size=16)
  vf = seg_probe.patch_features(encoder, vx, batch_size=16)
  assert tf.shape == (32, 4, 4, 64)
  # Patch features are the encoder's tokens without the cls token, on the grid.
  from eva_jax.data.config import CLIP_MEAN, CLIP_STD
  x0 = (tx[:2] / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
  np.testing.assert_allclose(tf[:2].reshape(2, 16, 64),
                             np.asarray(encoder(x0.astype(np.float32)))[:, 1:], atol=1e-5)
  params = seg_probe.fit(tf, ty, num_classes=8, epochs=20, lr=3e-2, batch_size=16)
  conf = seg_probe.confusion_matrix(seg_probe.predict(params, vf, 56), vy, 8)
  majority = int(np.bincount(ty.reshape(-1), minlength=8).argmax())
  floor = seg_probe.mean_iou(seg_probe.confusion_matrix(np.full_like(vy, majority), vy, 8))
  miou = seg_probe.mean_iou(conf)
  print(f'tiny probe: mIoU {miou:.3f}, majority floor {floor:.3f}')
  assert miou > floor + 0.1


def test_seg_probe_command_end_to_end_non_square(tmp_path):
  proc = support.run_cli('seg_probe', '--config=seg_probe_demo', '--config.image_size=28x42',
                         '--config.task.train_images=8', '--config.task.test_images=4',
                         '--config.epochs=1', f'--workdir={tmp_path}')
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['image_size'] == '28x42' and out['grid'] == '2x3' and out['test_images'] == 4
  assert out['encoder'] == 'random-init tiny (seed 0)' and 0.0 <= out['miou'] <= 1.0
  assert json.loads((tmp_path / 'seg_probe.json').read_text()) == out
  cfg = support.recipe('seg_probe_demo')
  cfg.image_size = '28x40'
  with pytest.raises(ValueError, match=r"config.image_size='28x40': every side must be a multiple "
                                       r'of the patch size 14; width 40 \(nearest: 28 or 42\)'):
    seg_probe.evaluate(cfg)
