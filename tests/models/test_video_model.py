"""The video model (eva_jax/models/video.py): trilinear pos-embed resize against torch, inflation
from an image encoder, the tubelet embedding, and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eva_jax.models import classifier as clf_lib, config as model_config, video

import clip_support


def _cfg(size=28):
  cfg = model_config.encoder_config('tiny')
  cfg.image_size = size
  return cfg


def _load(model, pure):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


@pytest.mark.parametrize('old,new', [((4, 2, 2), (8, 3, 3)), ((8, 4, 4), (4, 3, 5)),
                                     ((2, 3, 3), (3, 2, 4))])
def test_resize_pos_3d_matches_torch_trilinear(old, new):
  import torch
  x = np.random.default_rng(0).normal(size=(int(np.prod(old)), 6)).astype(np.float32)
  got = np.asarray(video.resize_pos_3d(jnp.asarray(x), old, new))
  grid = torch.from_numpy(x).reshape(1, *old, 6).permute(0, 4, 1, 2, 3)
  ref = torch.nn.functional.interpolate(grid, size=new, mode='trilinear', align_corners=False)
  ref = ref.permute(0, 2, 3, 4, 1).reshape(-1, 6).numpy()
  np.testing.assert_allclose(got, ref, atol=1e-5)


# The models below are built abstract (nnx.eval_shape) and filled from numpy: every parameter is
# set by the test, so the eager random init (op by op, ~14 s of CPU per model) is never needed.
@pytest.fixture(scope='module')
def image_classifier():
  model = nnx.eval_shape(lambda: clf_lib.Classifier(_cfg(), 5, rngs=nnx.Rngs(params=1)))
  # Random non-zero weights, head and biases (LayerNorm scales near 1), so equality below is not
  # equality of zeros.
  clip_support.fill_random(model, seed=1)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return model, params


def _video_model(params, num_frames, tubelet, size=28, image_size=28):
  cfg = _cfg(size)
  m = nnx.eval_shape(lambda: video.VideoClassifier(cfg, 5, num_frames=num_frames,
                                                   tubelet=tubelet, rngs=nnx.Rngs(params=0)))
  image_cfg = {**_cfg(image_size).to_dict()}
  enc, dropped = video.inflate_image_params(params['encoder'], image_cfg, patch_size=14,
                                            num_frames=num_frames, tubelet=tubelet,
                                            image_size=size)
  full = {'encoder': enc, 'fc_norm': params['fc_norm'], 'head': params['head']}
  _load(m, full)
  return m, dropped


def test_one_frame_video_model_is_the_image_classifier(image_classifier):
  model, params = image_classifier
  vid, _ = _video_model(params, 1, 1)
  frames = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
  np.testing.assert_allclose(np.asarray(vid(frames[:, None])), np.asarray(model(frames)),
                             atol=1e-5)


def test_inflation_static_clip_embeds_like_the_image(image_classifier):
  """Kernel repeated over t and divided by t, pos-embed repeated: every temporal position of a
  static clip gets the image encoder's embedding of the frame (patch tokens + pos)."""
  model, params = image_classifier
  frame = jax.random.normal(jax.random.key(2), (2, 28, 28, 3))
  img_tokens = np.asarray(model.encoder.embed(frame)[0])          # [B, 1+N, D]
  for t, tubelet in ((4, 1), (4, 2), (6, 3)):
    vid, _ = _video_model(params, t, tubelet)
    assert vid.encoder.patch_kernel.shape == (tubelet, 14, 14, 3, 64)
    tokens = np.asarray(vid.encoder.embed(jnp.repeat(frame[:, None], t, 1))[0])
    n = img_tokens.shape[1] - 1
    assert tokens.shape == (2, 1 + t // tubelet * n, 64)
    np.testing.assert_allclose(tokens[:, 0], img_tokens[:, 0], atol=1e-6)
    per_time = tokens[:, 1:].reshape(2, t // tubelet, n, 64)
    for s in range(t // tubelet):
      np.testing.assert_allclose(per_time[:, s], img_tokens[:, 1:], atol=1e-5)


def test_tubelet_embedding_is_a_conv3d(image_classifier):
  import torch
  _, params = image_classifier
  vid, _ = _video_model(params, 4, 2)
  rng = np.random.default_rng(3)
  kernel = rng.normal(size=(2, 14, 14, 3, 64)).astype(np.float32)
  vid.encoder.patch_kernel[...] = jnp.asarray(kernel)
  clip = rng.normal(size=(2, 4, 28, 28, 3)).astype(np.float32)
  tokens = np.asarray(vid.encoder.embed(jnp.asarray(clip))[0])[:, 1:]
  tokens = tokens - np.asarray(vid.encoder.pos_embed[...])[1:] \
      - np.asarray(vid.encoder.patch_bias[...])
  conv = torch.nn.functional.conv3d(torch.from_numpy(clip).permute(0, 4, 1, 2, 3),
                                    torch.from_numpy(kernel).permute(4, 3, 0, 1, 2), stride=(2, 14, 14))
  ref = conv.flatten(2).transpose(1, 2).numpy()                  # [B, T'*N, D], frame-major
  np.testing.assert_allclose(tokens, ref, rtol=1e-5, atol=5e-4)   # |x| ~ 50, 1176-term sums


def test_other_frames_and_size_resize_the_pos_embed(image_classifier):
  _, params = image_classifier
  vid, _ = _video_model(params, 4, 1)
  clip = jax.random.normal(jax.random.key(4), (1, 6, 42, 42, 3))
  resized, _ = _video_model(params, 6, 1, size=42)
  p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(vid, nnx.Param)))
  p['encoder'] = video.resize_video_params(p['encoder'], old_thw=(4, 2, 2), new_thw=(6, 3, 3))
  _load(resized, p)
  np.testing.assert_allclose(np.asarray(vid(clip)), np.asarray(resized(clip)), atol=1e-5)


def test_inflation_from_another_image_size(image_classifier):
  """A 28px image checkpoint into a 42px video model: repeated, then trilinear (bilinear in
  space, identity in time for repeated frames)."""
  _, params = image_classifier
  enc, dropped = video.inflate_image_params(params['encoder'], _cfg(28).to_dict(), patch_size=14,
                                            num_frames=2, tubelet=1, image_size=42)
  pos = np.asarray(params['encoder']['pos_embed'])
  frame = np.asarray(video.resize_pos_3d(jnp.asarray(pos[1:]), (1, 2, 2), (1, 3, 3)))
  np.testing.assert_allclose(enc['pos_embed'][1:], np.tile(frame, (2, 1)), atol=1e-6)
  assert dropped == []


def test_bad_input():
  with pytest.raises(ValueError, match=r'num_frames=6 is not divisible by the tubelet size 4'):
    video.VideoClassifier(_cfg(), 3, num_frames=6, tubelet=4, rngs=nnx.Rngs(params=0))
  model = clip_support.fill_random(nnx.eval_shape(   # a built model (random weights, no init)
      lambda: video.VideoClassifier(_cfg(), 3, num_frames=4, tubelet=2, rngs=nnx.Rngs(params=0))))
  with pytest.raises(ValueError, match=r'num_frames=5 is not divisible by the tubelet size 2'):
    model(jnp.zeros((1, 5, 28, 28, 3)))
  params = {'patch_kernel': np.zeros((16, 16, 3, 64), np.float32),
            'pos_embed': np.zeros((5, 64), np.float32), 'cls_token': np.zeros(64, np.float32)}
  with pytest.raises(ValueError, match=r'patch size 16 .* model.patch_size=14'):
    video.inflate_image_params(params, {'patch_size': 16, 'image_size': 32}, patch_size=14,
                               num_frames=4, tubelet=1, image_size=28)
  rope = _cfg()
  rope.rope = True
  with pytest.raises(ValueError, match='rope=False'):
    video.VideoClassifier(rope, 3, num_frames=4, rngs=nnx.Rngs(params=0))


def test_video_step_flops():
  """One frame is the image classifier's step (3 x forward + head); 16 frames of g/14 at 224
  attend over 4,097 tokens (the T² term over all of them, not per frame)."""
  from eva_jax import benchmark
  cfg = _cfg(224)
  one = benchmark.video_step_flops_per_clip(cfg, 1, 1, 10)
  assert one == 3 * (benchmark.forward_flops(cfg) + 2 * cfg.width * 10)
  g = model_config.encoder_config('g/14')
  g.image_size = 224
  t, d, f = 4097, g.width, g.mlp_dim
  blocks = 3 * g.depth * (8 * t * d * d + 4 * t * d * f + 4 * t * t * d)
  got = benchmark.video_step_flops_per_clip(g, 16, 1, 400)
  assert blocks < got < blocks * 1.001 and abs(got / 1e12 - 36.17) < 0.01
