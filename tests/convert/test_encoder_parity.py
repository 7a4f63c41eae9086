"""EVA encoder parity against timm's `Eva` (the reference implementation) and checkpoint conversion.

Random weights (non-trivial LayerNorm affines and biases) go through our exporter into timm with
strict=True; both models then see the same images. Run with -s to see the measured differences.
"""
import functools

import numpy as np
import pytest

torch = pytest.importorskip('torch')
tev = pytest.importorskip('timm.models.eva')

from flax import nnx  # noqa: E402

from eva_jax.convert import common, eva_torch  # noqa: E402
from eva_jax.convert.common import CheckpointError  # noqa: E402
from eva_jax.models import encoder_config  # noqa: E402

TOL = 1e-4
IMAGE = 56       # pos-embed grid 4x4 (patch 14)
OTHER = 84       # 6x6: pos-embed interpolation, RoPE on another grid

# case -> (swiglu, sub_ln, sub_ln_attn, rope)
CASES = {
    'eva01': (False, False, True, False),
    'swiglu': (True, False, True, False),          # timm GluMlp (packed fc1), official mlp.w12/w3
    'sub_ln': (False, True, True, False),          # timm scale_mlp + scale_attn_inner, q/k/v split
    'rope': (False, False, True, True),
    'eva02_all': (True, True, True, True),         # our eva02-* configs (EVA-CLIP style sub-LN)
    'eva02_mim': (True, True, False, True),        # official EVA-02 B/L MIM: ffn_ln only
}


def _cfg(case, image=IMAGE):
  swiglu, sub_ln, sub_ln_attn, rope = CASES[case]
  cfg = encoder_config('eva02-tiny' if swiglu else 'tiny')   # mlp 170 (SwiGLU) or 256
  cfg.image_size = image
  cfg.swiglu, cfg.sub_ln, cfg.sub_ln_attn, cfg.rope = swiglu, sub_ln, sub_ln_attn, rope
  cfg.rope_ref_grid = 16 if rope else 0      # EVA-02's reference grid (224/14): coordinates x4
  return cfg


def _facts(cfg):
  """What the weights cannot say (issue 12 A): given explicitly, as the fine-tuning config would."""
  return {k: cfg[k] for k in eva_torch.FACT_FIELDS}


def _random_params(cfg, seed=0):
  """Random params with non-trivial LayerNorm affines and biases (init zeros/ones would hide bugs)."""
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
def _params(case):
  return _random_params(_cfg(case))


def _ours(cfg, params):
  return common.model_from_params(cfg, common.model_params_abstract(cfg), params.__getitem__)


def _tensors(sd):
  return {k: torch.tensor(np.array(v)) for k, v in sd.items()}


def _timm(cfg, params, **kw):
  m = tev.Eva(**eva_torch.timm_kwargs(cfg, **kw))
  m.load_state_dict(_tensors(eva_torch.to_torch_state_dict(params, cfg, 'timm')), strict=True)
  return m.eval()


@functools.lru_cache(maxsize=None)
def _images(size, n=2):
  return np.random.default_rng(size).standard_normal((n, size, size, 3)).astype(np.float32)


_fwd = nnx.jit(lambda m, x, mask: m(x, mask))


@functools.lru_cache(maxsize=None)
def _our_tokens(case, size=IMAGE):
  return np.asarray(_fwd(_ours(_cfg(case), _params(case)), _images(size), None))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _report(what, diff):
  print(f'\n[{what}] max|ours - timm| = {diff:.3e}', end='')
  assert diff < TOL, (what, diff)


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('case', list(CASES))
def test_tokens_match_timm(case):
  cfg, p = _cfg(case), _params(case)
  tm = _timm(cfg, p)
  with torch.no_grad():
    ref = tm.forward_features(_nchw(_images(IMAGE))).numpy()
  ours = _our_tokens(case)
  assert ours.shape == ref.shape == (2, 1 + (IMAGE // 14) ** 2, cfg.width)
  _report(f'timm {case} @{IMAGE}', float(np.abs(ours - ref).max()))


@pytest.mark.parametrize('case', ['eva01', 'eva02_all'])
def test_other_resolution_matches_timm(case):
  """Model 56 (4x4 pos-embed) run at 84 (6x6): bicubic pos-embed upsampling, RoPE on 6x6.

  Reference: timm Eva built at 84 with the pos-embed resampled by timm's resample_abs_pos_embed
  with antialias=False, i.e. F.interpolate(bicubic, align_corners=False) as in the official
  EVA/BEiT fine-tuning code. timm's own default (dynamic_img_size / checkpoint_filter_fn) uses
  antialias=True, whose upsampling kernel is PIL's bicubic (a=-0.5, not -0.75): that difference
  is printed, not asserted.
  """
  from timm.layers import resample_abs_pos_embed
  cfg, p = _cfg(case), _params(case)
  x = _nchw(_images(OTHER))
  sd = _tensors(eva_torch.to_torch_state_dict(p, cfg, 'timm'))
  g, g2 = IMAGE // 14, OTHER // 14
  sd['pos_embed'] = resample_abs_pos_embed(sd['pos_embed'], (g2, g2), (g, g), 1, antialias=False)
  big = _cfg(case, OTHER)
  big.rope_ref_grid = cfg.rope_ref_grid
  tm = tev.Eva(**eva_torch.timm_kwargs(big))
  tm.load_state_dict(sd, strict=True)
  with torch.no_grad():
    ref = tm.eval().forward_features(x).numpy()
    dyn = _timm(cfg, p, dynamic_img_size=True).forward_features(x).numpy()
  ours = _our_tokens(case, OTHER)
  assert ours.shape == ref.shape == (2, 1 + g2 ** 2, cfg.width)
  print(f'\n[timm {case} @{OTHER}, dynamic_img_size (antialiased resample)] '
        f'max|ours - timm| = {float(np.abs(ours - dyn).max()):.3e} (expected, see docstring)', end='')
  _report(f'timm {case} @{OTHER} (model {IMAGE}, bicubic no antialias)',
          float(np.abs(ours - ref).max()))


@pytest.mark.parametrize('case', ['eva01', 'swiglu', 'eva02_all', 'eva02_mim'])
def test_official_layout_through_timm_checkpoint_filter(case):
  """Official names + mask_token + lm_head -> timm's checkpoint_filter_fn -> strict load."""
  cfg, p = _cfg(case), _params(case)
  rng = np.random.default_rng(1)
  heads = {'lm_head/kernel': rng.standard_normal((cfg.width, 32)).astype(np.float32),
           'lm_head/bias': rng.standard_normal(32).astype(np.float32)}
  sd = eva_torch.to_torch_state_dict({**p, **heads}, cfg, 'eva')
  assert 'mask_token' in sd and sd['lm_head.weight'].shape == (32, cfg.width)
  if cfg.sub_ln:
    assert 'blocks.0.attn.q_proj.weight' in sd and 'blocks.0.attn.q_bias' in sd
    assert 'blocks.0.mlp.ffn_ln.weight' in sd
    assert ('blocks.0.attn.inner_attn_ln.weight' in sd) == cfg.sub_ln_attn
  if cfg.swiglu:
    assert ('blocks.0.mlp.w1.weight' if cfg.sub_ln else 'blocks.0.mlp.w12.weight') in sd
  wrapped = {'model': _tensors(sd)}
  tm = tev.Eva(**eva_torch.timm_kwargs(cfg, global_pool='avg'))  # MIM `norm` becomes fc_norm
  tm.load_state_dict(tev.checkpoint_filter_fn(wrapped, tm), strict=True)
  tm.eval()
  with torch.no_grad():
    ref = tm.fc_norm(tm.forward_features(_nchw(_images(IMAGE)))).numpy()
  _report(f'official->timm filter {case}', float(np.abs(_our_tokens(case) - ref).max()))
  # ... and our importer reads the same file back, returning the head separately.
  cfg2, m2, extras = eva_torch.from_torch_state_dict(wrapped, facts=_facts(cfg))
  assert cfg2.sub_ln_attn == cfg.sub_ln_attn or not cfg.sub_ln
  assert sorted(extras) == ['lm_head.bias', 'lm_head.weight']
  back = eva_torch.extras_to_params(extras)
  for k in heads:
    np.testing.assert_array_equal(back[k], heads[k])
  p2 = common.model_params_numpy(m2)
  assert all(np.array_equal(p2[k], p[k]) for k in p) and set(p2) == set(p)


@pytest.mark.parametrize('case', ['eva01', 'eva02_all'])
def test_mask_token_path_matches_timm_with_manual_replacement(case):
  cfg, p = _cfg(case), _params(case)
  tm = _timm(cfg, p)
  n = (IMAGE // 14) ** 2
  mask = np.zeros((2, n), bool)
  mask[0, [1, 5, 6, 10]] = True
  mask[1, [0, 15]] = True
  ours = np.asarray(_fwd(_ours(cfg, p), _images(IMAGE), mask))
  with torch.no_grad():
    x = tm.patch_embed(_nchw(_images(IMAGE)))
    x = torch.where(torch.from_numpy(mask)[..., None], torch.tensor(p['mask_token']), x)
    x, rope = tm._pos_embed(x)
    x = tm.norm_pre(x)
    for blk in tm.blocks:
      x = blk(x, rope=rope)
    ref = tm.norm(x).numpy()
  assert np.abs(ours - _our_tokens(case)).max() > 0.1   # the mask really changed the tokens
  _report(f'mask path {case}', float(np.abs(ours - ref).max()))


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('layout', eva_torch.LAYOUTS)
def test_round_trip_is_bit_exact(case, layout):
  cfg, p = _cfg(case), _params(case)
  sd = eva_torch.to_torch_state_dict(p, cfg, layout)
  assert eva_torch.detect_layout(sd) == layout
  if layout == 'timm':
    assert set(sd) == set(tev.Eva(**eva_torch.timm_kwargs(cfg)).state_dict())
  for given in (None, cfg):
    if given is not None and layout == 'timm':   # timm backbones carry no [MASK] token
      given = _cfg(case)
      given.mask_token = False
    cfg2, m2, extras = eva_torch.from_torch_state_dict(
        sd, given, facts=_facts(cfg) if given is None else None)
    assert extras == {}
    p2 = common.model_params_numpy(m2)
    assert set(p2) == set(p) - ({'mask_token'} if layout == 'timm' else set())
    for k in p2:
      assert np.array_equal(p2[k], p[k]), k
    for f in ('width', 'depth', 'heads', 'mlp_dim', 'patch_size', 'image_size', 'swiglu', 'sub_ln',
              'rope', 'rope_ref_grid'):
      assert cfg2[f] == cfg[f], f
    sd2 = eva_torch.to_torch_state_dict(p2, cfg2, layout)
    assert set(sd2) == set(sd) and all(np.array_equal(sd2[k], sd[k]) for k in sd)


def test_files_wrappers_and_inferred_heads(tmp_path):
  """torch.save {'model': ...} with 'module.' prefixes and safetensors files, via TensorSource;
  official EVA-02 RoPE buffers are skipped and give the head dim (width 64 with 8 heads), theta
  and reference grid; a timm safetensors file's FILE.json (eva_jax.export) gives heads and RoPE."""
  import json
  from safetensors.numpy import save_file
  from eva_jax.models.layers import rope_sincos
  cfg = _cfg('eva02_mim')
  cfg.heads = 8
  p = _random_params(cfg)
  sd = eva_torch.to_torch_state_dict(p, cfg, 'eva')
  rope = rope_sincos((4, 4), 8, 1e4, 16)[1]   # the official buffer: cos table [N, head_dim]
  sd.update({'rope.freqs_cos': rope, 'rope.freqs_sin': rope,
             'blocks.0.attn.rope.freqs_cos': rope, 'blocks.0.attn.rope.freqs_sin': rope})
  path = tmp_path / 'eva02.pth'
  torch.save({'model': {'module.' + k: v for k, v in _tensors(sd).items()}, 'epoch': 3}, path)
  cfg2, m2, _ = eva_torch.from_torch_state_dict(common.TensorSource(path))
  assert cfg2.heads == 8 and cfg2.rope and cfg2.rope_ref_grid == 16 and not cfg2.sub_ln_attn
  p2 = common.model_params_numpy(m2)
  assert all(np.array_equal(p2[k], p[k]) for k in p)

  cfg = _cfg('eva01')
  st = tmp_path / 'model.safetensors'
  save_file(eva_torch.to_torch_state_dict(_params('eva01'), cfg, 'timm'), str(st))
  with open(str(st) + '.json', 'w') as f:
    json.dump(eva_torch.timm_kwargs(cfg), f)
  cfg3, m3, _ = eva_torch.from_torch_state_dict(common.TensorSource(tmp_path))
  assert cfg3.name == 'tiny' and not cfg3.mask_token and cfg3.heads == 4
  p3 = common.model_params_numpy(m3)
  assert all(np.array_equal(p3[k], _params('eva01')[k]) for k in p3)


def test_classifier_heads_round_trip_and_timm_classifier_keys():
  cfg = _cfg('eva01')
  cfg.mask_token, cfg.final_norm = False, False   # classifier encoder: fc_norm replaces norm
  p = {k: v for k, v in _params('eva01').items() if k not in ('mask_token', 'norm/scale', 'norm/bias')}
  rng = np.random.default_rng(2)
  heads = {'fc_norm/scale': rng.standard_normal(64).astype(np.float32),
           'fc_norm/bias': rng.standard_normal(64).astype(np.float32),
           'head/kernel': rng.standard_normal((64, 10)).astype(np.float32),
           'head/bias': rng.standard_normal(10).astype(np.float32)}
  sd = eva_torch.to_torch_state_dict({**{'encoder/' + k: v for k, v in p.items()},
                                      **heads}, cfg, 'timm')
  tm = tev.Eva(**eva_torch.timm_kwargs(cfg, num_classes=10, global_pool='avg'))
  tm.load_state_dict(_tensors(sd), strict=True)
  cfg2, m2, extras = eva_torch.from_torch_state_dict(sd, facts=_facts(cfg))
  assert not cfg2.final_norm and not cfg2.mask_token
  assert sorted(extras) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
  back = eva_torch.extras_to_params(extras)
  assert all(np.array_equal(back[k], heads[k]) for k in heads)


# ------------------------------------------------------------------------------------------------
def test_clear_errors():
  # A CLIP state dict (HF CLIPVisionModel names).
  clip = {'vision_model.embeddings.patch_embedding.weight': np.zeros((64, 3, 14, 14), np.float32),
          'vision_model.embeddings.class_embedding': np.zeros(64, np.float32),
          'vision_model.pre_layrnorm.weight': np.zeros(64, np.float32)}
  with pytest.raises(CheckpointError, match='CLIP'):
    eva_torch.from_torch_state_dict(clip)
  with pytest.raises(CheckpointError, match='CLIP'):
    eva_torch.from_torch_state_dict({'visual.conv1.weight': np.zeros((64, 3, 14, 14))})

  cfg, p = _cfg('eva01'), _params('eva01')
  sd = eva_torch.to_torch_state_dict(p, cfg, 'eva')
  deeper = _cfg('eva01')
  deeper.depth = 3
  with pytest.raises(CheckpointError, match=r'Missing keys \(\d+\): blocks\.2\.'):
    eva_torch.from_torch_state_dict(sd, deeper)
  wider = _cfg('eva01')
  wider.width, wider.mlp_dim = 128, 512
  with pytest.raises(CheckpointError, match=r'(?s)blocks\.0\.attn\.proj\.bias: checkpoint \(64,\) vs '
                     r'model \(128,\).*looks like: width 64, depth 2'):
    eva_torch.from_torch_state_dict(sd, wider)
  with pytest.raises(CheckpointError, match=r'Missing keys \(1\): mask_token'):   # timm backbone
    eva_torch.from_torch_state_dict(eva_torch.to_torch_state_dict(p, cfg, 'timm'), cfg)
  with pytest.raises(CheckpointError, match=r'(?s)swiglu=True.*does not match.*looks like:.*swiglu=False'):
    eva_torch.from_torch_state_dict(sd, _cfg('swiglu'))
  bad = dict(sd)
  bad['blocks.0.attn.relative_position_bias_table'] = np.zeros((10, 4), np.float32)
  del bad['blocks.1.norm2.bias']
  with pytest.raises(CheckpointError) as e:
    eva_torch.from_torch_state_dict(bad)
  assert 'Missing keys (1): blocks.1.norm2.bias' in str(e.value)
  assert 'Unexpected keys (1): blocks.0.attn.relative_position_bias_table' in str(e.value)
  with pytest.raises(ValueError, match='lm_head'):
    eva_torch.to_torch_state_dict({**p, 'lm_head/kernel': np.zeros((64, 8)),
                                   'lm_head/bias': np.zeros(8)}, cfg, 'timm')
  with pytest.raises(CheckpointError, match='Missing keys'):
    eva_torch.to_torch_state_dict({k: v for k, v in p.items() if k != 'pos_embed'}, cfg)
