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


def test_small_batch_warns(caplog, monkeypatch):
  monkeypatch.setattr(contrastive, '_warned', set())   # once per size and process: start afresh
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
  """CLIP (with bias) and SigLIP losses of features sharded on 8 fake CPU devices (meshes
  data 2 x fsdp 2 x tensor 2 and data 8) equal the single-device ones, and so do the gradients of
  features, scale and bias (tests/contrastive_worker.py; its `model` mode, run by hand, does the
  same through a sharded EVA-CLIP model)."""
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'contrastive_worker.py')],
                       env=ENV8, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  for tag in ('2x2x2', '8x1x1'):
    for k in ('clip_loss', 'siglip_loss', 'grad'):
      assert r[f'{tag}_{k}'] < 1e-5, (tag, k, r)
  assert min(r['loss_values']) > 0


def test_model_parameters_shard_like_the_student():
  """Every ClipModel parameter has logical axis names; the student's rules shard its big weights
  over fsdp / tensor (abstract: nothing allocated)."""
  from flax import nnx
  from jax.sharding import AbstractMesh, PartitionSpec as P
  from eva_jax import parallel
  from eva_jax.models import clip
  state = nnx.state(clip.abstract(clip.clip_config('eva01-clip-g/14')), nnx.Param)
  names = {'/'.join(map(str, p)): v.get_metadata().get('out_sharding')
           for p, v in nnx.to_flat_state(state)}
  assert all(n is not None for n in names.values()), [k for k, n in names.items() if n is None]
  assert names['visual/blocks/layers/attn/qkv'] == ('layers', 'embed', 'qkv', 'heads', 'kv')
  assert names['text/blocks/layers/mlp/fc1/kernel'] == ('layers', 'embed', 'mlp')
  assert names['text/token_embedding'] == ('vocab', 'embed')
  mesh = AbstractMesh((2, 4, 2), parallel.MESH_AXES)
  for name, shape, want in (
      ('visual/blocks/layers/attn/qkv', (40, 1408, 3, 16, 88), P(None, 'fsdp', None, 'tensor', None)),
      ('text/blocks/layers/mlp/fc1/kernel', (12, 768, 3072), P(None, 'fsdp', 'tensor')),
      ('text/token_embedding', (49408, 768), P(None, 'fsdp')),
      ('visual_head/kernel', (1408, 1024), P('fsdp', None))):
    assert parallel.spec_for(shape, names[name], mesh) == want, name
