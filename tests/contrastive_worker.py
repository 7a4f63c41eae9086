"""Runs with 8 fake CPU devices (XLA_FLAGS set by the caller before jax loads):

  python tests/contrastive_worker.py          # features: what the test runs (cheap compiles)
  python tests/contrastive_worker.py model    # a whole sharded model step (~3x the CPU time)

Default: the CLIP and SigLIP losses (bias included) of random normalized features sharded over a
data=2 x fsdp=2 x tensor=2 mesh (4 batch shards, a 4-step SigLIP ring) and data=8 (an 8-step
ring), values and gradients (features, scale, bias) vs one device.

`model`: a tiny EVA-CLIP model (SigLIP logit bias on) whose parameters are sharded by the project's rules on
a data=2 x fsdp=2 x tensor=2 mesh; loss = CLIP InfoNCE + SigLIP sigmoid loss over the global batch
(gathered features, ppermute ring over the 4 batch shards). Compares both loss values and the
gradients of every parameter with the same step on one device. Prints one JSON line;
tests/training/test_contrastive_loss.py asserts on it. One compile per side keeps it cheap.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import clip_support
from eva_jax import parallel
from eva_jax.models import clip
from eva_jax.training import contrastive


def _max_diff(a, b):
  return float(max(jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def features():
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(2, 16, 8)).astype(np.float32)
  img /= np.linalg.norm(img, axis=-1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
  scale, bias = np.float32(7.3), np.float32(-3.1)

  def losses(i, t, s, b, mesh):
    c = contrastive.clip_loss(i, t, s, b, mesh=mesh)
    g = contrastive.siglip_loss(i, t, s, b, mesh=mesh)
    return c + g, (c, g)

  grad = jax.value_and_grad(losses, argnums=(0, 1, 2, 3), has_aux=True)
  (_, ref), ref_g = jax.jit(lambda *a: grad(*a, None))(img, txt, scale, bias)
  out = {'loss_values': [float(v) for v in ref]}
  for shape in ((2, 2, 2), (8, 1, 1)):
    mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, shape)))
    sh = parallel.batch_sharding(mesh, 2)
    (_, got), g = jax.jit(lambda *a: grad(*a, mesh))(jax.device_put(img, sh),
                                                     jax.device_put(txt, sh), scale, bias)
    tag = 'x'.join(map(str, shape))
    out[f'{tag}_clip_loss'] = abs(float(got[0]) - float(ref[0]))
    out[f'{tag}_siglip_loss'] = abs(float(got[1]) - float(ref[1]))
    out[f'{tag}_grad'] = _max_diff(g, ref_g)
  print(json.dumps(out))


def model():
  cfg = clip.clip_config('eva-clip-tiny', image_size=28, logit_bias=True)
  rng = np.random.default_rng(1)
  images = rng.normal(size=(8, 28, 28, 3)).astype(np.float32)
  tokens = rng.integers(1, 1000, size=(8, 16)).astype(np.int32)
  model = clip_support.random_clip(cfg, 1)
  graphdef, state = nnx.split(model)

  def losses(state, images, tokens, mesh):
    img, txt, scale, bias = nnx.merge(graphdef, state)(images, tokens)
    c = contrastive.clip_loss(img, txt, scale, mesh=mesh)
    s = contrastive.siglip_loss(img, txt, scale, bias, mesh=mesh)
    return c + s, (c, s)

  grad = jax.value_and_grad(losses, has_aux=True)
  (_, (ref_c, ref_s)), ref_g = jax.jit(lambda s, x, y: grad(s, x, y, None))(state, images, tokens)

  mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
  sstate = jax.device_put(state, parallel.state_shardings(nnx.state(clip.abstract(cfg)), mesh))
  x = jax.device_put(images, parallel.batch_sharding(mesh, 4))
  y = jax.device_put(tokens, parallel.batch_sharding(mesh, 2))
  with jax.set_mesh(mesh):
    (_, (c, s)), g = jax.jit(lambda s, x, y: grad(s, x, y, mesh))(sstate, x, y)
  qkv = sstate['visual']['blocks']['layers']['attn']['qkv'].get_value()
  print(json.dumps({
      'clip_loss': abs(float(c) - float(ref_c)), 'siglip_loss': abs(float(s) - float(ref_s)),
      'grad': _max_diff(g, ref_g),
      'grad_scale': float(max(jnp.max(jnp.abs(v)) for v in jax.tree.leaves(ref_g))),
      'logit_grads': [float(g['logit_scale'].get_value()), float(g['logit_bias'].get_value())],
      'loss_values': [float(ref_c), float(ref_s)], 'qkv_spec': str(qkv.sharding.spec)}))


if __name__ == '__main__':
  assert jax.device_count() == 8, jax.devices()
  model() if sys.argv[1:] == ['model'] else features()
