"""eva_jax.parallel: mesh sizes, logical-axis PartitionSpecs and the shardings they give on 8 devices.

The device checks run in one subprocess with 8 fake CPU devices: XLA_FLAGS only takes effect
before jax initializes its backend, which an xdist worker may already have done.
"""
import os
import subprocess
import sys

import pytest

from eva_jax import parallel

import support

ROOT = support.ROOT


def _mesh(data, fsdp, tensor):
  return {'data': data, 'fsdp': fsdp, 'tensor': tensor}


def test_resolve_mesh_shape():
  assert parallel.resolve_mesh_shape(_mesh(-1, 1, 1), 8) == (8, 1, 1)
  assert parallel.resolve_mesh_shape(_mesh(-1, 2, 2), 8) == (2, 2, 2)
  assert parallel.resolve_mesh_shape(_mesh(2, -1, 1), 8) == (2, 4, 1)
  assert parallel.resolve_mesh_shape(_mesh(1, 2, 4), 8) == (1, 2, 4)
  with pytest.raises(ValueError, match='At most one'):
    parallel.resolve_mesh_shape(_mesh(-1, -1, 1), 8)
  with pytest.raises(ValueError, match='positive or -1'):
    parallel.resolve_mesh_shape(_mesh(-1, 0, 1), 8)
  with pytest.raises(ValueError, match='positive or -1'):
    parallel.resolve_mesh_shape(_mesh(-2, 1, 1), 8)
  with pytest.raises(ValueError, match='do not divide'):
    parallel.resolve_mesh_shape(_mesh(-1, 3, 1), 8)
  with pytest.raises(ValueError, match='uses 4 devices but 8 are available'):
    parallel.resolve_mesh_shape(_mesh(2, 2, 1), 8)


# Runs with 8 CPU devices; every check is an assert, the last line prints OK.
DEVICE_CHECKS = r'''
import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from eva_jax import parallel
from eva_jax.models import config as model_config
from eva_jax.models import vit

assert jax.device_count() == 8, jax.devices()
mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
spec = lambda shape, names, m=mesh, **kw: parallel.spec_for(shape, names, m, **kw)

# (embed, mlp) weight: ZeRO-3 over fsdp, Megatron over tensor.
assert spec((64, 256), ('embed', 'mlp')) == P('fsdp', 'tensor')
assert spec((256, 64), ('mlp', 'embed')) == P('tensor', 'fsdp')
# A dimension the mesh axis does not divide stays replicated; the others still shard.
assert spec((63, 256), ('embed', 'mlp')) == P(None, 'tensor')
assert spec((2, 3, 16), ('layers', 'heads', 'kv')) == P(None, None, None)
# A mesh axis is used at most once per array: the second 'embed' dimension stays whole.
assert spec((64, 64), ('embed', 'embed')) == P('fsdp', None)
assert spec((8, 64), ('batch', 'embed')) == P(('data', 'fsdp'), None)
# Replicated logical names, unnamed arrays, and rules passed in.
assert spec((2, 64, 3, 4, 16), ('layers', 'embed', 'qkv', 'heads', 'kv')) == \
    P(None, 'fsdp', None, 'tensor', None)
assert spec((5, 7), None) == P(None, None)
assert spec((64, 256), ('embed', 'mlp'), rules=(('embed', None), ('mlp', 'tensor'))) == \
    P(None, 'tensor')
# Batch over data x fsdp needs a multiple of 4 rows.
assert spec((6, 64), ('batch', None)) == P(None, None)

# Size-1 mesh axes are dropped: (data 4, fsdp 2, tensor 1) shards nothing over tensor.
mesh_dp = parallel.make_mesh({'data': -1, 'fsdp': 2, 'tensor': 1})
assert dict(mesh_dp.shape) == {'data': 4, 'fsdp': 2, 'tensor': 1}
assert spec((64, 256), ('embed', 'mlp'), mesh_dp) == P('fsdp', None)
assert spec((8, 64), ('batch', 'embed'), mesh_dp) == P(('data', 'fsdp'), None)
try:
  parallel.make_mesh({'data': 3, 'fsdp': 1, 'tensor': 1})
  raise AssertionError('a 3-device mesh on 8 devices was accepted')
except ValueError as e:
  assert 'uses 3 devices' in str(e), e

# The tiny encoder's parameters, by their own logical names.
abstract = nnx.state(vit.abstract(model_config.encoder_config('tiny')), nnx.Param)
shardings = nnx.to_pure_dict(parallel.state_shardings(abstract, mesh))
shapes = nnx.to_pure_dict(abstract)
flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
want = {
    "['blocks']['layers']['attn']['qkv']": P(None, 'fsdp', None, 'tensor', None),
    "['blocks']['layers']['attn']['proj']": P(None, 'tensor', None, 'fsdp'),
    "['blocks']['layers']['mlp']['fc1']['kernel']": P(None, 'fsdp', 'tensor'),
    "['blocks']['layers']['mlp']['fc2']['kernel']": P(None, 'tensor', 'fsdp'),
    "['blocks']['layers']['mlp']['fc1']['bias']": P(None, 'tensor'),
    "['blocks']['layers']['norm1']['scale']": P(None, 'fsdp'),
    "['pos_embed']": P(None, 'fsdp'),
    "['cls_token']": P('fsdp'),
    "['patch_kernel']": P(None, None, None, 'fsdp'),
}
for k, s in want.items():
  assert flat[k].spec == s, (k, flat[k].spec, s)
for path, sh in jax.tree_util.tree_leaves_with_path(shardings):
  axes = [a for d in sh.spec for a in ((d,) if isinstance(d, str) else (d or ()))]
  assert len(axes) == len(set(axes)), (path, sh.spec)
shard_shapes = jax.tree.map(lambda sh, x: sh.shard_shape(x.shape), shardings, shapes)
assert shard_shapes['blocks']['layers']['mlp']['fc1']['kernel'] == (2, 32, 128)
rep = nnx.to_pure_dict(parallel.state_shardings(abstract, mesh, replicate=True))
assert all(s.spec == P() for s in jax.tree.leaves(rep))

# Real placement: an (embed, mlp) weight puts a distinct [32, 128] block on each (fsdp, tensor)
# pair and repeats it over data.
w = np.arange(64 * 256, dtype=np.float32).reshape(64, 256)
x = jax.device_put(w, jax.sharding.NamedSharding(mesh, spec((64, 256), ('embed', 'mlp'))))
blocks = {(s.index[0].start, s.index[1].start) for s in x.addressable_shards}
assert blocks == {(0, 0), (0, 128), (32, 0), (32, 128)}, blocks
assert all(s.data.shape == (32, 128) for s in x.addressable_shards)
for s in x.addressable_shards:
  np.testing.assert_array_equal(np.asarray(s.data), w[s.index])

# Batches split over data x fsdp: 4 row blocks of 2, each on the 2 tensor devices.
bs = parallel.batch_sharding(mesh, 4)
assert bs.spec == P(('data', 'fsdp'), None, None, None)
b = jax.device_put(np.zeros((8, 4, 4, 3), np.float32), bs)
rows = sorted(s.index[0].start for s in b.addressable_shards)
assert rows == [0, 0, 2, 2, 4, 4, 6, 6], rows
parallel.check_batch(8, mesh)
try:
  parallel.check_batch(6, mesh)
  raise AssertionError('batch 6 on data*fsdp=4 was accepted')
except ValueError as e:
  assert 'multiple of 4' in str(e), e
print('OK')
'''


def test_specs_and_shardings_on_8_devices():
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8',
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
  out = subprocess.run([sys.executable, '-c', DEVICE_CHECKS], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip().endswith('OK'), out.stdout + out.stderr
