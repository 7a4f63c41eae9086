"""Architecture facts are never guessed from weights (issue 12, kind A), EVA encoders.

timm Eva and official EVA-02 files record their shapes but not the head count, RoPE or the
LayerNorm eps. The importer reads them from the timm kwargs json (eva_jax.export's FILE.json) or
the official RoPE buffer, else takes them explicitly, else refuses naming them. Parity is checked
against timm's Eva forward (the reference implementation)."""
import json
import logging

import numpy as np
import pytest

torch = pytest.importorskip('torch')
tev = pytest.importorskip('timm.models.eva')

from flax import nnx  # noqa: E402

from eva_jax.convert import common, eva_torch  # noqa: E402
from eva_jax.convert.common import CheckpointError  # noqa: E402
from eva_jax.models import encoder_config  # noqa: E402
from eva_jax.models.layers import rope_sincos  # noqa: E402

TOL = 1e-4


def _eva02_cfg(heads=8):
  """EVA-02 style (SwiGLU, sub-LN, RoPE on a 16 reference grid), width 64, head dim 64 / heads."""
  cfg = encoder_config('eva02-tiny')
  cfg.image_size = 56
  cfg.heads = heads
  cfg.sub_ln_attn = False
  cfg.rope, cfg.rope_ref_grid = True, 16
  return cfg


def _params(cfg, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for k, shape in sorted(common.model_params_abstract(cfg).items()):
    scale = 0.2 if k.endswith(('scale', 'bias')) else 0.5 if k.endswith(('token', 'embed')) else 0.1
    out[k] = ((1.0 if k.endswith('scale') else 0.0) + scale * rng.standard_normal(shape)
              ).astype(np.float32)
  return out


def _timm_tokens(cfg, params, x):
  m = tev.Eva(**eva_torch.timm_kwargs(cfg))
  m.load_state_dict({k: torch.from_numpy(v) for k, v in
                     eva_torch.to_torch_state_dict(params, cfg, 'timm').items()}, strict=True)
  with torch.no_grad():
    return m.eval().forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _ours(model, x):
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, x))


def _x():
  return np.random.default_rng(0).standard_normal((2, 56, 56, 3)).astype(np.float32)


def test_timm_file_without_record_is_refused_then_explicit_or_json(tmp_path, caplog):
  from safetensors.numpy import save_file
  cfg = _eva02_cfg()
  p = _params(cfg)
  st = tmp_path / 'eva02.safetensors'
  save_file(eva_torch.to_torch_state_dict(p, cfg, 'timm'), str(st))
  with pytest.raises(CheckpointError) as e:
    eva_torch.from_torch_state_dict(common.TensorSource(st))
  msg = str(e.value)
  print(f'\n[error] {msg}')
  assert 'does not record heads, rope' in msg and "facts={'heads': ..., 'rope': ...}" in msg
  assert 'will not guess' in msg and 'B (768): 12' in msg
  with pytest.raises(CheckpointError, match=r'does not record rope;'):
    eva_torch.from_torch_state_dict(common.TensorSource(st), heads=8)
  with pytest.raises(CheckpointError, match=r'does not record rope_theta, rope_ref_grid'):
    eva_torch.from_torch_state_dict(common.TensorSource(st), facts={'heads': 8, 'rope': True})
  with pytest.raises(ValueError, match=r"facts has unknown fields \['head'\]"):
    eva_torch.from_torch_state_dict(common.TensorSource(st), facts={'head': 8})

  x = _x()
  ref = _timm_tokens(cfg, p, x)
  facts = {k: cfg[k] for k in eva_torch.FACT_FIELDS}
  with caplog.at_level(logging.INFO):
    cfg2, m, _ = eva_torch.from_torch_state_dict(common.TensorSource(st), facts=facts)
  assert 'heads=8 from the explicit heads' in caplog.text
  assert 'ln_eps=1e-06 from the explicit ln_eps' in caplog.text
  d = float(np.abs(_ours(m, x) - ref).max())
  print(f'\n[facts] timm safetensors, explicit facts: max|ours - timm| {d:.3e}')
  assert d < TOL
  # The old guesses (heads from the width table: 4 for width 64; no RoPE without a buffer) are off.
  for wrong in ({'heads': 4}, {'rope': False}, {'rope_ref_grid': 0}):
    _, mw, _ = eva_torch.from_torch_state_dict(common.TensorSource(st), facts={**facts, **wrong})
    dw = float(np.abs(_ours(mw, x) - ref).max())
    print(f'[facts] timm safetensors with {wrong} (wrong): max|ours - timm| {dw:.3e}')
    assert dw > 1e-2

  # eva_jax.export's FILE.json records them: no explicit values needed; a contradiction refused.
  with open(str(st) + '.json', 'w') as f:
    json.dump(eva_torch.timm_kwargs(cfg), f)
  caplog.clear()
  with caplog.at_level(logging.INFO):
    cfg3, m3, _ = eva_torch.from_torch_state_dict(common.TensorSource(st))
  assert (cfg3.heads, cfg3.rope, cfg3.rope_ref_grid, cfg3.ln_eps) == (8, True, 16, 1e-6)
  assert 'heads=8 from eva02.safetensors.json num_heads' in caplog.text
  assert 'rope_ref_grid=16 from eva02.safetensors.json ref_feat_shape' in caplog.text
  assert float(np.abs(_ours(m3, x) - ref).max()) < TOL
  with pytest.raises(CheckpointError, match=r'heads=4 \(from the run.s model config, or facts=\) '
                     r'contradicts eva02.safetensors.json num_heads, which says 8. Choose the model'):
    eva_torch.from_torch_state_dict(common.TensorSource(st), heads=4)
  bad = eva_torch.timm_kwargs(cfg)
  bad['depth'] = 12
  with open(str(st) + '.json', 'w') as f:
    json.dump(bad, f)
  with pytest.raises(CheckpointError, match='says depth=12 but the weights have 2'):
    eva_torch.from_torch_state_dict(common.TensorSource(st))


def test_official_rope_buffer_records_heads_and_rope(tmp_path, caplog):
  cfg = _eva02_cfg()
  p = _params(cfg, seed=1)
  sd = eva_torch.to_torch_state_dict(p, cfg, 'eva')
  sin, cos = rope_sincos((4, 4), 8, 1e4, 16)    # = the official VisionRotaryEmbeddingFast buffers
  sd.update({'rope.freqs_cos': cos, 'rope.freqs_sin': sin})
  path = tmp_path / 'eva02_official.pt'
  torch.save({'model': {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}}, path)
  with caplog.at_level(logging.INFO):
    cfg2, m, _ = eva_torch.from_torch_state_dict(common.TensorSource(path))
  assert (cfg2.heads, cfg2.rope, cfg2.rope_theta, cfg2.rope_ref_grid) == (8, True, 1e4, 16)
  assert "heads=8 from the checkpoint's rope.freqs_cos (head dim 8)" in caplog.text
  assert 'ln_eps=1e-06 from not recorded in the file' in caplog.text
  x = _x()
  d = float(np.abs(_ours(m, x) - _timm_tokens(cfg, p, x)).max())
  print(f'\n[facts] official EVA-02 layout + RoPE buffer: max|ours - timm| {d:.3e}')
  assert d < TOL
  with pytest.raises(CheckpointError, match=r"rope_ref_grid=0 \(from .*\) contradicts the "
                     r"checkpoint's rope.freqs_cos \(verified\), which says 16"):
    eva_torch.from_torch_state_dict(common.TensorSource(path), facts={'rope_ref_grid': 0})
  wrong = _eva02_cfg(heads=4)      # an explicit cfg is checked against the record too
  with pytest.raises(CheckpointError, match=r"cfg.heads=4 contradicts the checkpoint's "
                     r'rope.freqs_cos \(head dim 8\), which says 8'):
    eva_torch.from_torch_state_dict(common.TensorSource(path), wrong)
  _, m2, _ = eva_torch.from_torch_state_dict(common.TensorSource(path), cfg)
  assert float(np.abs(_ours(m2, x) - _ours(m, x)).max()) == 0.0
  # A buffer that is no RoPE table we can reproduce is refused, not half-read.
  sd['rope.freqs_cos'] = np.zeros_like(cos)
  torch.save({'model': {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}}, path)
  with pytest.raises(CheckpointError, match='is no 2D axial RoPE table'):
    eva_torch.from_torch_state_dict(common.TensorSource(path))


def test_wrong_file_reports_keys_before_facts():
  cfg = _eva02_cfg()
  sd = eva_torch.to_torch_state_dict(_params(cfg), cfg, 'timm')
  del sd['blocks.1.norm2.bias']
  with pytest.raises(CheckpointError, match=r'Missing keys \(1\): blocks\.1\.norm2\.bias'):
    eva_torch.from_torch_state_dict(sd)
