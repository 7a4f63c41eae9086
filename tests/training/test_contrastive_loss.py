"""Contrastive losses (eva_jax.training.contrastive) against open_clip.loss and across meshes."""
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from eva_jax.training import contrastive
from support import ENV8, ROOT


def _features(b=12, e=16, seed=0):
  rng = np.random.default_rng(seed)
  img, txt = rng.normal(size=(2, b, e)).astype(np.float32)
  return (img / np.linalg.norm(img, axis=-1, keepdims=True),
          txt / np.linalg.norm(txt, axis=-1, keepdims=True))


@pytest.mark.parametrize('kind', ['clip', 'clip_bias', 'siglip'])
def test_loss_and_grads_equal_open_clip(kind):
  torch = pytest.importorskip('torch')
  from open_clip import loss as oc_loss
  img, txt = _features()
  scale, bias = np.float32(11.0), np.float32(-4.0)
  ti, tt = (torch.tensor(x, requires_grad=True) for x in (img, txt))
  ts, tb = (torch.tensor(x, requires_grad=True) for x in (scale, bias))
  if kind == 'siglip':
    ref = oc_loss.SigLipLoss()(ti, tt, ts, tb)
    fn = contrastive.siglip_loss
  else:
    ref = oc_loss.ClipLoss()(ti, tt, ts, tb if kind == 'clip_bias' else None)
    fn = (contrastive.clip_loss if kind == 'clip_bias'
          else lambda i, t, s, b: contrastive.clip_loss(i, t, s))
  ref.backward()
  loss, grads = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(img, txt, scale, bias)
  assert abs(float(loss) - ref.item()) < 1e-5, (float(loss), ref.item())
  for g, t in zip(grads[:3], (ti, tt, ts)):
    np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), atol=1e-5)
  if kind != 'clip':
    assert abs(float(grads[3]) - tb.grad.item()) < 1e-5


def test_small_batch_warns(caplog):
  img, txt = _features(b=6)
  with caplog.at_level(logging.WARNING):
    contrastive.clip_loss(img, txt, 10.0)
  assert any('global batch of 6 pairs' in r.getMessage() for r in caplog.records)
  caplog.clear()
  img, txt = _features(b=contrastive.MIN_MEANINGFUL_BATCH)
  with caplog.at_level(logging.WARNING):
    contrastive.clip_loss(img, txt, 10.0)
  assert not any('too small' in r.getMessage() for r in caplog.records)


def test_eight_device_mesh_equals_one_device():
  """Loss and gradients on 8 fake CPU devices (meshes 2x4x1, 1x2x4 and a sharded tiny EVA-CLIP
  model on 2x2x2) equal the single-device ones (tests/contrastive_worker.py)."""
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'contrastive_worker.py')],
                       env=ENV8, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  for k, v in r.items():
    if k.endswith(('_loss', '_grad')) and not k.startswith('model'):
      assert v < 1e-5, (k, v)
  assert r['model_loss'] < 1e-5, r
  # Model gradients reach ~15 in size: compare relative to the largest (float32 summation order).
  assert r['model_grad'] < 1e-5 * max(1.0, r['model_grad_scale']), r
  assert 'fsdp' in r['qkv_spec'] and 'tensor' in r['qkv_spec'], r['qkv_spec']
  assert r['loss_values']['clip'] > 0 and r['loss_values']['siglip'] > 0
