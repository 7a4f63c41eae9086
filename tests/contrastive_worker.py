"""Runs with 8 fake CPU devices (XLA_FLAGS set by the caller before jax loads):

  python tests/contrastive_worker.py

Compares the CLIP and SigLIP losses and their gradients on device meshes against one device, for
features alone and through a tiny EVA-CLIP model whose parameters are sharded by the project's
rules. Prints one JSON line of max abs differences; tests/training/test_contrastive_loss.py
asserts on them.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from eva_jax import parallel
from eva_jax.models import clip
from eva_jax.training import contrastive

B, E = 16, 8


def _max_diff(a, b):
  return float(max(jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def feature_parity(out):
  rng = np.random.default_rng(0)
  img = rng.normal(size=(B, E)).astype(np.float32)
  txt = rng.normal(size=(B, E)).astype(np.float32)
  img /= np.linalg.norm(img, axis=-1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
  scale, bias = np.float32(7.3), np.float32(-3.1)
  fns = {
      'clip': lambda i, t, s, b, mesh: contrastive.clip_loss(i, t, s, mesh=mesh),
      'siglip': lambda i, t, s, b, mesh: contrastive.siglip_loss(i, t, s, b, mesh=mesh),
  }
  for name, fn in fns.items():
    ref = jax.jit(jax.value_and_grad(lambda *a: fn(*a, mesh=None), argnums=(0, 1, 2, 3)))(
        img, txt, scale, bias)
    for shape in ((2, 4, 1), (1, 2, 4)):
      mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, shape)))
      feat = NamedSharding(mesh, P(parallel.BATCH_AXES, None))
      i, t = jax.device_put(img, feat), jax.device_put(txt, feat)
      got = jax.jit(jax.value_and_grad(lambda *a: fn(*a, mesh=mesh), argnums=(0, 1, 2, 3)))(
          i, t, scale, bias)
      key = f'{name}_{"x".join(map(str, shape))}'
      out[key + '_loss'] = abs(float(got[0]) - float(ref[0]))
      out[key + '_grad'] = _max_diff(got[1], ref[1])
  out['loss_values'] = {n: float(jax.jit(lambda i, t: f(i, t, scale, bias, None))(img, txt))
                        for n, f in fns.items()}


def model_parity(out):
  cfg = clip.clip_config('eva02-clip-tiny', image_size=28)
  rng = np.random.default_rng(1)
  images = rng.normal(size=(8, 28, 28, 3)).astype(np.float32)
  tokens = rng.integers(1, 1000, size=(8, 16)).astype(np.int32)

  def loss_fn(model, images, tokens, mesh):
    img, txt, scale, _ = model(images, tokens)
    return contrastive.clip_loss(img, txt, scale, mesh=mesh)

  model = clip.create(cfg)
  graphdef, state = nnx.split(model)
  ref_loss, ref_grads = jax.jit(lambda s, x, y: jax.value_and_grad(
      lambda s: loss_fn(nnx.merge(graphdef, s), x, y, None))(s))(state, images, tokens)

  mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
  shardings = parallel.state_shardings(nnx.state(clip.abstract(cfg)), mesh)
  sstate = jax.device_put(state, shardings)
  batch = parallel.batch_sharding(mesh, 4)
  x = jax.device_put(images, batch)
  y = jax.device_put(tokens, parallel.batch_sharding(mesh, 2))
  with jax.set_mesh(mesh):
    loss, grads = jax.jit(lambda s, x, y: jax.value_and_grad(
        lambda s: loss_fn(nnx.merge(graphdef, s), x, y, mesh))(s))(sstate, x, y)
  out['model_loss'] = abs(float(loss) - float(ref_loss))
  out['model_grad'] = _max_diff(grads, ref_grads)
  out['model_grad_scale'] = float(max(jnp.max(jnp.abs(g)) for g in jax.tree.leaves(ref_grads)))
  qkv = sstate['visual']['blocks']['layers']['attn']['qkv']
  out['qkv_spec'] = str(qkv.get_value().sharding.spec)


if __name__ == '__main__':
  assert jax.device_count() == 8, jax.devices()
  result = {}
  feature_parity(result)
  model_parity(result)
  print(json.dumps(result))
