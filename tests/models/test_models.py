"""Model-level checks that need no reference implementation: sizes, init, dtypes, masking, layouts.

Parity against timm / transformers / open_clip lives in test_encoder_parity.py and test_teacher.py.
"""
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eva_jax.models import abstract, create, encoder_config, teacher_config, vit
from eva_jax.models.layers import resize_grid


def _params(model):
  from eva_jax.convert.common import model_params_numpy
  return model_params_numpy(model)


def test_g14_backbone_param_count_matches_paper():
  out = subprocess.run([sys.executable, '-m', 'eva_jax.models.summary', 'g/14'],
                       capture_output=True, text=True, check=True).stdout
  assert out.strip().splitlines()[-1] == 'params: 1,011,143,296'


def test_summary_is_abstract_and_counts_l14():
  m = abstract(encoder_config('L/14'))
  leaves = jax.tree.leaves(nnx.state(m, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  # 24 blocks x (4d^2 + 2*d*f + biases/LN) + embeddings, d=1024, f=4096
  d, f, L = 1024, 4096, 24
  per_block = 3 * d * d + 2 * d + d * d + d + 2 * d * f + f + d + 4 * d
  embed = 14 * 14 * 3 * d + d + 2 * d + 257 * d + 2 * d  # patch (+bias), cls+mask, pos, norm
  assert vit.param_count(m) == L * per_block + embed


def test_eva01_init_truncation_and_depth_rescale():
  cfg = encoder_config('tiny')
  cfg.depth = 4
  p = _params(create(cfg, seed=3))
  std = cfg.init_std
  qkv = p['blocks/layers/attn/qkv']
  # trunc normal at +-1 std: nothing beyond std, empirical std of the truncated law = 0.5377 std
  assert np.abs(qkv).max() <= std + 1e-7
  assert abs(qkv.std() / std - 0.5377) < 0.02
  assert np.abs(p['pos_embed']).max() <= std + 1e-7
  proj = p['blocks/layers/attn/proj']
  fc2 = p['blocks/layers/mlp/fc2/kernel']
  for l in range(cfg.depth):  # block l+1 divided by sqrt(2(l+1))
    bound = std / math.sqrt(2 * (l + 1))
    assert np.abs(proj[l]).max() <= bound + 1e-7
    assert np.abs(fc2[l]).max() <= bound + 1e-7
    assert np.abs(proj[l]).max() > 0.9 * bound  # really rescaled, not zeroed
  assert np.all(p['blocks/layers/attn/q_bias'] == 0) and np.all(p['norm/scale'] == 1)
  assert 'blocks/layers/attn/k_bias' not in p   # EVA: no k bias


def test_every_parameter_has_logical_axes():
  for cfg in (encoder_config('eva02-tiny'), teacher_config('clip-tiny')):
    state = nnx.state(abstract(cfg), nnx.Param)
    for path, v in nnx.to_flat_state(state):
      names = v.get_metadata()['out_sharding']
      assert len(names) == v.get_value().ndim, (path, names)
      if path[0] == 'blocks':
        assert names[0] == 'layers'
      assert any(n in ('embed', 'mlp', 'heads', 'out') for n in names), (path, names)


def test_mask_token_replaces_masked_patches():
  cfg = encoder_config('tiny')
  cfg.image_size = 56
  m = create(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 56, 56, 3))
  mask = jnp.zeros((2, 16), bool).at[0, 3].set(True).at[1, 7].set(True)
  emb, _ = m.embed(x, mask)
  emb0, _ = m.embed(x)
  pos = m.pos_embed[...]
  np.testing.assert_allclose(emb[0, 1 + 3], m.mask_token[...] + pos[1 + 3], atol=1e-6)
  np.testing.assert_allclose(emb[1, 1 + 7], m.mask_token[...] + pos[1 + 7], atol=1e-6)
  unmasked = ~np.asarray(jnp.concatenate([jnp.zeros((2, 1), bool), mask], 1))
  np.testing.assert_array_equal(np.asarray(emb)[unmasked], np.asarray(emb0)[unmasked])


def test_bf16_compute_tracks_fp32_and_keeps_layernorm_fp32():
  cfg = encoder_config('tiny')
  m32 = create(cfg, seed=1)
  cfg16 = encoder_config('tiny')
  cfg16.dtype = 'bfloat16'
  m16 = create(cfg16, seed=1)
  x = jax.random.normal(jax.random.key(1), (2, 56, 56, 3))
  y32, y16 = m32(x), m16(x)
  assert y16.dtype == jnp.bfloat16
  # Output of the final LayerNorm: O(1) values; bf16 has ~3 significant digits.
  assert float(jnp.abs(y32 - y16.astype(jnp.float32)).max()) < 0.1
  assert float(jnp.abs(y32 - y16.astype(jnp.float32)).mean()) < 0.01


def test_drop_path_only_in_training_and_scan_unroll_remat_agree():
  cfg = encoder_config('tiny')
  cfg.drop_path = 0.5
  m = create(cfg)
  x = jax.random.normal(jax.random.key(2), (4, 28, 28, 3))
  fwd = nnx.jit(lambda mm, key=None: mm(x, dropout_key=key))
  base = fwd(m)
  np.testing.assert_array_equal(base, fwd(m))
  train = fwd(m, jax.random.key(0))
  assert float(jnp.abs(train - base).max()) > 1e-3
  for field, value in (('scan_unroll', cfg.depth), ('remat', 'full'), ('remat', 'dots')):
    c = encoder_config('tiny')
    c.drop_path = 0.5
    c[field] = value
    other = create(c)
    np.testing.assert_allclose(fwd(other), base, atol=1e-5)
    grad = nnx.jit(nnx.grad(lambda mm: jnp.sum(mm(x) ** 2)))
    g1 = nnx.to_flat_state(grad(other))
    g0 = nnx.to_flat_state(grad(m))
    for (p1, v1), (p0, v0) in zip(g1, g0):
      np.testing.assert_allclose(v1.get_value(), v0.get_value(), atol=1e-4, err_msg=str(p1))


def test_pos_embed_resize_matches_torch_bicubic():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  grid = rng.normal(size=(16 * 16, 8)).astype(np.float32)
  ours = np.asarray(resize_grid(jnp.asarray(grid), (16, 16), (24, 24)))
  t = torch.from_numpy(grid).reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(t, size=(24, 24), mode='bicubic', align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(24 * 24, 8).numpy()
  assert np.abs(ours - ref).max() < 1e-5
  # Other resolutions run end to end through the encoder.
  m = create(encoder_config('tiny'))
  assert m(jnp.zeros((1, 84, 84, 3))).shape == (1, 37, 64)


@pytest.mark.parametrize('shape,msg', [((2, 3, 56, 56), 'NHWC'), ((2, 56, 56, 4), 'NHWC'),
                                       ((2, 50, 56, 3), 'multiple of the patch size'),
                                       ((56, 56, 3), 'NHWC')])
def test_bad_images_raise_clear_errors(shape, msg):
  m = abstract(encoder_config('tiny'))
  with pytest.raises(ValueError, match=msg):
    m.embed(jnp.zeros(shape))


def test_unknown_names_and_bad_fields():
  with pytest.raises(ValueError, match='Unknown encoder name'):
    encoder_config('H/14')
  with pytest.raises(ValueError, match='Unknown teacher name'):
    teacher_config('clip-H/99')
  cfg = encoder_config('tiny')
  cfg.heads = 3
  with pytest.raises(ValueError, match='not divisible by model.heads'):
    abstract(cfg)


@pytest.mark.parametrize('causal', [False, True])
def test_odd_length_padding_for_cudnn_changes_nothing(causal):
  # The padding cuDNN needs (layers.attend pad_to_even: one masked key, its query row dropped) is
  # run here through XLA: values and gradients equal unpadded attention for 17 tokens.
  from eva_jax.models.layers import attend
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 17, 3, 8)) for i in range(3))

  def f(pad, q, k, v):
    o = attend(q, k, v, scale=8 ** -0.5, causal=causal, implementation='xla', pad_to_even=pad)
    return jnp.sum(o * jnp.arange(o.size, dtype=o.dtype).reshape(o.shape) / o.size), o

  (l0, o0), g0 = jax.value_and_grad(f, argnums=(1, 2, 3), has_aux=True)(False, q, k, v)
  (l1, o1), g1 = jax.value_and_grad(f, argnums=(1, 2, 3), has_aux=True)(True, q, k, v)
  assert o1.shape == (2, 17, 3, 8)
  np.testing.assert_allclose(o1, o0, atol=1e-6)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_init_program_matches_a_default_compile_and_nests():
  """layers.jit_init (LLVM O0 on CPU, for start-up time) draws the same parameters as a default
  jax.jit up to float rounding, and still works inside jax.eval_shape (where jax refuses
  compiler options), as the abstract builds use it."""
  from eva_jax.models import layers
  cfg = encoder_config('tiny')
  cfg.image_size = 56

  def make(key):
    return nnx.to_pure_dict(nnx.state(vit.VisionTransformer(cfg, rngs=nnx.Rngs(params=key)),
                                      nnx.Param))
  ours = jax.tree.leaves(layers.jit_init(make)(jax.random.key(3)))
  ref = jax.tree.leaves(jax.jit(make)(jax.random.key(3)))
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6 * float(np.abs(np.asarray(b)).max()))
  assert any(float(np.std(np.asarray(a))) > 0 for a in ours)   # real draws, not zeros
  shapes = jax.tree.leaves(jax.eval_shape(lambda: layers.jit_init(make)(jax.random.key(3))))
  assert [s.shape for s in shapes] == [a.shape for a in ours]
  assert 'threefry' in layers.jit_init(make).lower(jax.random.key(3)).as_text()   # AOT API kept
  # create() goes through the same program: equal to the jitted constructor.
  model = create(cfg, seed=3)
  got = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  for a, b in zip(got, ours):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
