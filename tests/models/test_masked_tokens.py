"""The pretraining step's masked-token path: the last block and the heads run on the masked tokens
only (`query_index` / `patch_index`). It must give exactly the rows, losses and gradients of the
full computation, for every tower kind the step can hold."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eva_jax.data.masking import BlockMaskGenerator, max_masked
from eva_jax.models import abstract, create, encoder_config, teacher_config
from eva_jax.models import mim as mim_lib
from eva_jax.models import teacher as teacher_lib


def _images(b=3, size=56, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, size, size, 3))


def _masks(b, grid, k, seed=0):
  gen = BlockMaskGenerator((grid, grid), k, min_num_patches=2)
  rng = np.random.default_rng(seed)
  m = np.stack([gen(rng).reshape(-1) for _ in range(b)])
  m[0] = False                      # a row with nothing masked: padding only
  m[1] = False
  m[1, -k:] = True                  # a row with exactly k masked
  assert m.sum(1).max() <= k
  return jnp.asarray(m)


def test_masked_first_puts_each_rows_masked_patches_first():
  mask = jnp.asarray([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], bool)
  idx = np.asarray(mim_lib.masked_first(mask, 3))
  np.testing.assert_array_equal(idx, [[1, 3, 4], [0, 5, 1], [0, 1, 2]])
  assert idx.dtype == np.int32


@pytest.mark.parametrize('name', ['tiny', 'eva02-tiny'])   # EVA-01 (cls, abs pos) / EVA-02 (RoPE)
def test_student_rows_loss_and_gradients_equal_the_full_path(name):
  cfg = encoder_config(name)
  cfg.image_size, cfg.drop_path = 56, 0.2    # depth 2: a scan of one block + the last
  model = mim_lib.MIM(cfg, 24, rngs=nnx.Rngs(params=jax.random.key(1)))
  images, k = _images(), 7
  mask = _masks(3, 4, k)
  idx = mim_lib.masked_first(mask, k)
  target = jax.random.normal(jax.random.key(2), (3, 16, 24))
  key = jax.random.key(5)          # drop path on: the same per-example draws on both paths

  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def run(params):
    m = nnx.merge(graphdef, params)
    full = m(images, mask, dropout_key=key)
    part = m(images, mask, dropout_key=key, patch_index=idx)

    def loss(p, subset):
      m = nnx.merge(graphdef, p)
      if subset:
        w = jnp.take_along_axis(mask, idx, 1)
        return mim_lib.cosine_loss(m(images, mask, dropout_key=key, patch_index=idx),
                                   jnp.take_along_axis(target, idx[..., None], 1), w)[0]
      return mim_lib.cosine_loss(m(images, mask, dropout_key=key), target, mask)[0]

    return full, part, [jax.value_and_grad(loss)(params, s) for s in (False, True)]

  full, part, ((l_full, g_full), (l_part, g_part)) = run(params)
  assert part.shape == (3, k, 24)
  np.testing.assert_allclose(part, jnp.take_along_axis(full, idx[..., None], 1), atol=2e-6)
  assert abs(float(l_full)) > 1e-5 and abs(float(l_full - l_part)) < 1e-7
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_part)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4)
  # The last block's MLP really gets a gradient (the masked tokens reach the loss through it).
  assert float(jnp.abs(g_part['encoder']['blocks']['layers']['mlp']['fc2']['kernel'][-1]).max()) > 0


@pytest.mark.parametrize('name', ['eva02-clip-tiny-post', 'dinov2-tiny-reg', 'siglip-tiny'])
def test_teacher_targets_of_chosen_patches_equal_the_full_map(name):
  """The teacher kinds beyond CLIP (next test): RoPE + post-norm blocks (EVA02-CLIP-E),
  registers (DINOv2), no cls token (SigLIP)."""
  tcfg = teacher_config(name)
  if tcfg.family in ('clip', 'eva_clip'):
    tcfg.image_size = 56
  teacher = create(tcfg, seed=3)
  size = tcfg.image_size
  grid = size // tcfg.patch_size
  plan = teacher_lib.plan(tcfg, student_patch=tcfg.patch_size, image_size=size)
  images = _images(size=size)
  mask = _masks(3, grid, grid * grid // 3)
  idx = mim_lib.masked_first(mask, grid * grid // 3)
  graphdef, params = nnx.split(teacher)
  both = jax.jit(lambda p: [teacher_lib.targets(nnx.merge(graphdef, p), images, plan, i)
                            for i in (None, idx)])
  full, part = both(params)
  np.testing.assert_allclose(part, jnp.take_along_axis(full, idx[..., None], 1), atol=2e-5)


def test_clip_teacher_targets_same_grid_and_resized():
  """CLIP on the student's grid (last block on the chosen tokens), and on a coarser grid whose
  targets are resized to the student's (rule 'resize_targets': gathered after the resize)."""
  tcfg = teacher_config('clip-tiny')     # patch 14: 4x4 at 56 px
  tcfg.image_size = 56
  graphdef, params = nnx.split(create(tcfg, seed=3))
  images = _images()
  for student_patch, rule, k in ((14, 'same', 5), (7, 'resize_targets', 20)):
    plan = teacher_lib.plan(tcfg, student_patch=student_patch, image_size=56, rule=rule)
    grid = 56 // student_patch
    idx = mim_lib.masked_first(_masks(3, grid, k), k)
    full, part = jax.jit(lambda p: [teacher_lib.targets(nnx.merge(graphdef, p), images, plan, i)
                                    for i in (None, idx)])(params)
    assert full.shape[1] == grid * grid
    np.testing.assert_allclose(part, jnp.take_along_axis(full, idx[..., None], 1), atol=2e-5)


@pytest.mark.parametrize('tq,tk', [(3, 7), (4, 7), (3, 8), (5, 5)])
def test_padded_attention_with_fewer_queries_than_keys(tq, tk):
  """The padding cuDNN needs (odd lengths padded to even, each on its own) gives the unpadded
  result when queries are a subset of the keys: the last block on the masked tokens."""
  from eva_jax.models.layers import attend
  q = jax.random.normal(jax.random.key(0), (2, tq, 2, 8))
  k, v = jax.random.normal(jax.random.key(1), (2, 2, tk, 2, 8))
  want = attend(q, k, v, scale=0.35, pad_to_even=False)
  np.testing.assert_allclose(attend(q, k, v, scale=0.35, pad_to_even=True), want, atol=1e-6)
  # and the same as attending from every position, then keeping the first tq rows
  qk = jnp.concatenate([q, jax.random.normal(jax.random.key(2), (2, tk - tq, 2, 8))], 1) \
      if tk > tq else q
  np.testing.assert_allclose(attend(qk, k, v, scale=0.35)[:, :tq], want, atol=1e-6)


def test_query_index_needs_a_single_global_block():
  model = abstract(encoder_config('tiny'))     # the check comes before any computation
  x = jnp.zeros((1, 17, model.cfg.width))
  with pytest.raises(ValueError, match='run of one global-attention block'):
    model.blocks.run(x, 0, 2, query_index=jnp.zeros((1, 3), jnp.int32))


@pytest.mark.parametrize('grid,mask_cfg', [
    ((16, 16), dict(num_masking_patches=105, min_num_patches=16, max_aspect=None)),
    ((8, 8), dict(num_masking_patches=0, ratio=0.4, min_num_patches=4, max_aspect=None)),
    ((6, 9), dict(num_masking_patches=0, ratio=0.5, min_num_patches=2, max_aspect=None)),
    ((4, 4), dict(num_masking_patches=0, ratio=0.9, min_num_patches=1, max_aspect=None)),
])
def test_no_drawn_mask_exceeds_max_masked(grid, mask_cfg):
  """The bound the step sizes its masked-token path by holds for every mask the generator draws."""
  k = max_masked(grid, mask_cfg)
  gen = BlockMaskGenerator.from_config(grid, mask_cfg)
  rng = np.random.default_rng(0)
  counts = np.array([gen(rng).sum() for _ in range(500)])
  assert counts.max() <= k and counts.max() >= 0.8 * k
  assert k == (mask_cfg['num_masking_patches'] or round(mask_cfg['ratio'] * grid[0] * grid[1]))
