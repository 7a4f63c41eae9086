"""forward_intermediates and any-H x W inputs against timm's `Eva` (the exported model).

Random weights with non-trivial affines go through eva_torch.to_torch_state_dict into timm
(strict); timm is built with dynamic_img_size=True, the kwargs eva_jax.export records, and our
model uses pos_interp='bicubic_aa' (timm's run-time resample_abs_pos_embed antialiases).
Sizes are the issue's 224 -> 224x336 / 448x448 scaled down: model 56 (4x4 grid, patch 14) run at
56x84 (non-square, 4x6) and 112x112 (8x8). Run with -s for the measured errors.
"""
import functools

import numpy as np
import pytest

torch = pytest.importorskip('torch')
tev = pytest.importorskip('timm.models.eva')

from flax import nnx  # noqa: E402

from eva_jax.convert import common, eva_torch  # noqa: E402
from eva_jax.models import encoder_config  # noqa: E402

TOL = 1e-4
IMAGE = 56


def _cfg(family):
  cfg = encoder_config('eva02-tiny' if family == 'eva02' else 'tiny')
  cfg.image_size = IMAGE
  if family == 'eva02':   # swiglu + sub-LN + RoPE on EVA-02's 16x16 reference grid
    cfg.swiglu, cfg.sub_ln, cfg.rope, cfg.rope_ref_grid = True, True, True, 16
  else:
    cfg.swiglu, cfg.sub_ln, cfg.rope, cfg.rope_ref_grid = False, False, False, 0
  cfg.depth = 3
  cfg.pos_interp = 'bicubic_aa'
  return cfg


def random_params(cfg, seed=0):
  """Random params with non-trivial LayerNorm affines and biases."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, shape in sorted(common.model_params_abstract(cfg).items()):
    if k.endswith('scale'):
      v = 1.0 + 0.2 * rng.standard_normal(shape)
    elif k.endswith('bias'):
      v = 0.1 * rng.standard_normal(shape)
    elif k == 'patch_kernel':
      v = 0.04 * rng.standard_normal(shape)
    else:
      v = (0.5 if k in ('cls_token', 'mask_token', 'pos_embed') else 0.08) * rng.standard_normal(shape)
    out[k] = v.astype(np.float32)
  return out


@functools.lru_cache(maxsize=None)
def _pair(family):
  cfg = _cfg(family)
  p = random_params(cfg)
  ours = common.model_from_params(cfg, common.model_params_abstract(cfg), p.__getitem__)
  tm = tev.Eva(**eva_torch.timm_kwargs(cfg, dynamic_img_size=True))
  tm.load_state_dict({k: torch.tensor(v) for k, v in
                      eva_torch.to_torch_state_dict(p, cfg, 'timm').items()}, strict=True)
  return ours, tm.eval()


def _images(h, w, n=2):
  return np.random.default_rng(h * 1000 + w).standard_normal((n, h, w, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _report(what, ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  diff = float(np.abs(ours - ref).max())
  print(f'\n[{what}] max|ours - timm| = {diff:.3e}', end='')
  assert diff < TOL, (what, diff)


_feats = nnx.jit(lambda m, x: m.forward_intermediates(x, [0, -1], norm=True,
                                                      return_prefix_tokens=True),
                 static_argnums=())
_fwd = nnx.jit(lambda m, x: m(x))


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('family', ['eva01', 'eva02'])
@pytest.mark.parametrize('hw', [(56, 84), (112, 112)])
def test_any_size_matches_timm_dynamic_img_size(family, hw):
  ours, tm = _pair(family)
  x = _images(*hw)
  with torch.no_grad():
    ref = tm.forward_features(_nchw(x)).numpy()
  n = (hw[0] // 14) * (hw[1] // 14)
  assert ref.shape == (2, 1 + n, 64)
  _report(f'{family} tokens @{hw[0]}x{hw[1]} (model {IMAGE})', _fwd(ours, x), ref)


@pytest.mark.parametrize('family', ['eva01', 'eva02'])
def test_forward_intermediates_match_timm(family):
  """indices [0, -1], norm, prefix split, NHWC maps at a non-square size; then int n and NLC."""
  ours, tm = _pair(family)
  x = _images(56, 84)
  with torch.no_grad():
    ref_x, ref = tm.forward_intermediates(_nchw(x), indices=[0, -1], norm=True,
                                         return_prefix_tokens=True, output_fmt='NCHW')
    ref_nlc = tm.forward_intermediates(_nchw(x), indices=2, output_fmt='NLC',
                                       intermediates_only=True)
  got_x, got = _feats(ours, x)
  _report(f'{family} final tokens', got_x, ref_x.numpy())
  assert len(got) == len(ref) == 2
  for i, ((gp, gc), (rp, rc)) in enumerate(zip(got, ref)):
    assert gp.shape == (2, 4, 6, 64)
    _report(f'{family} block {[0, 2][i]} NHWC', gp, rp.numpy().transpose(0, 2, 3, 1))
    _report(f'{family} block {[0, 2][i]} prefix', gc, rc.numpy())
  got_nlc = nnx.jit(lambda m, x: m.forward_intermediates(x, 2, output_fmt='NLC',
                                                         intermediates_only=True))(ours, x)
  for i, (g, r) in enumerate(zip(got_nlc, ref_nlc)):
    _report(f'{family} last-2 NLC #{i}', g, r.numpy())
  # The block features are really different blocks (not one repeated).
  assert float(np.abs(np.asarray(got_nlc[0]) - np.asarray(got_nlc[1])).max()) > 0.1


def test_intermediates_bad_input():
  ours, _ = _pair('eva01')
  x = _images(56, 56, 1)
  with pytest.raises(ValueError, match=r'block index 3 is out of range.*valid: 0\.\.2 or -3\.\.-1'):
    ours.forward_intermediates(x, [0, 3])
  with pytest.raises(ValueError, match=r'indices=4 \(last n blocks\) must be in 1\.\.3'):
    ours.forward_intermediates(x, 4)
  with pytest.raises(ValueError, match="output_fmt must be 'NHWC' or 'NLC', got 'NCHW'"):
    ours.forward_intermediates(x, output_fmt='NCHW')
  with pytest.raises(ValueError, match=r'Image size 56x50 is not a multiple of the patch size 14: '
                     r'resize or pad to multiples of 14 \(height 56 or 70, width 42 or 56\)'):
    ours.forward_intermediates(_images(56, 50, 1))
