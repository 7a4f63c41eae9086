"""Architecture facts are never guessed from weights (issue 12, kind A), CLIP teachers.

An open_clip tower built with quick_gelu=False (exact GELU) and head width 16 is saved the ways
users have it; the activation and head count either come from what the file records, from an
explicit act=/heads= (config.teacher.act / config.teacher.heads), or the import is refused naming
those fields. Targets are compared with open_clip's own forward (fp32)."""
import json
import logging
import shutil

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import eva_jax  # noqa: E402
from eva_jax.convert.common import CheckpointError  # noqa: E402

TOL = 1e-4


def _perturb(module, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.LayerNorm):
        m.weight.copy_(1.0 + 0.5 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    for name, p in module.named_parameters():
      if name.endswith('bias') and 'norm' not in name and 'ln_' not in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
  return module.eval()


@pytest.fixture(scope='module')
def gelu_clip():
  """open_clip CLIP with quick_gelu=False (nn.GELU), width 64, head_width 16 -> 4 heads."""
  from open_clip.model import CLIP
  torch.manual_seed(0)
  m = CLIP(embed_dim=48, quick_gelu=False,
           vision_cfg=dict(layers=2, width=64, head_width=16, mlp_ratio=4.0, patch_size=16,
                           image_size=64),
           text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))
  assert isinstance(m.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
  return _perturb(m, seed=4)


def _x(seed=0):
  return np.random.default_rng(seed).standard_normal((2, 64, 64, 3)).astype(np.float32)


def _ref(visual, x):
  visual.output_tokens = True
  try:
    with torch.no_grad():
      _, tokens = visual(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
      return (tokens @ visual.proj).numpy()
  finally:
    visual.output_tokens = False


def _diff(case, teacher, ref_model, x):
  ref = _ref(ref_model.visual, x)
  d = float(np.abs(np.asarray(teacher(x)) - ref).max())
  print(f'\n[facts] {case}: max abs diff {d:.3e} (target scale {np.abs(ref).max():.2f})')
  return d


def test_bare_state_dict_requires_act_and_heads(tmp_path, gelu_clip, caplog):
  path = str(tmp_path / 'open_clip_gelu.pt')
  torch.save(gelu_clip.state_dict(), path)
  with pytest.raises(CheckpointError) as e:
    eva_jax.load_teacher(path)
  msg = str(e.value)
  print(f'\n[error] {msg}')
  assert 'config.teacher.act' in msg and 'quick_gelu, gelu' in msg
  assert 'config.teacher.heads' in msg and 'will not guess' in msg
  with pytest.raises(CheckpointError, match='config.teacher.act') as e:
    eva_jax.load_teacher(path, heads=4)
  assert 'config.teacher.heads' not in str(e.value)
  with pytest.raises(CheckpointError, match='config.teacher.heads'):
    eva_jax.load_teacher(path, act='gelu')
  # '' and 0 are the config fields' "not given".
  with pytest.raises(CheckpointError, match='config.teacher.act'):
    eva_jax.load_teacher(path, act='', heads=0)
  with pytest.raises(ValueError, match="config.teacher.act must be 'quick_gelu' or 'gelu'"):
    eva_jax.load_teacher(path, act='relu', heads=4)

  with caplog.at_level(logging.INFO):
    right = eva_jax.load_teacher(path, act='gelu', heads=4)
  assert 'act=gelu from config.teacher.act' in caplog.text
  assert 'heads=4 from config.teacher.heads' in caplog.text
  assert 'ln_eps=1e-05 from not recorded' in caplog.text
  x = _x()
  assert _diff('bare state dict, act=gelu heads=4', right, gelu_clip, x) < TOL
  # The old silent guess (QuickGELU, width // 64 = 1 head) and each half of it are measurably off.
  wrong_act = _diff('bare state dict, act=quick_gelu (wrong)',
                    eva_jax.load_teacher(path, act='quick_gelu', heads=4), gelu_clip, x)
  wrong_heads = _diff('bare state dict, heads=1 (wrong: width // 64)',
                      eva_jax.load_teacher(path, act='gelu', heads=1), gelu_clip, x)
  assert wrong_act > 1e-3 and wrong_heads > 1e-2


def test_open_clip_config_json_is_read(tmp_path, gelu_clip, caplog):
  path = str(tmp_path / 'open_clip_pytorch_model.bin')
  torch.save(gelu_clip.state_dict(), path)
  cfg = {'model_cfg': {'embed_dim': 48, 'vision_cfg': {'image_size': 64, 'layers': 2, 'width': 64,
                                                        'head_width': 16, 'patch_size': 16}},
         'preprocess_cfg': {}}
  with open(tmp_path / 'open_clip_config.json', 'w') as f:
    json.dump(cfg, f)
  with caplog.at_level(logging.INFO):
    t = eva_jax.load_teacher(path)
  assert t.config.act == 'gelu' and t.config.heads == 4
  assert "act=gelu from open_clip_config.json quick_gelu=False (open_clip's default)" in caplog.text
  assert 'heads=4 from open_clip_config.json vision_cfg.width // head_width (64 // 16)' in caplog.text
  assert _diff('state dict + open_clip_config.json', t, gelu_clip, _x(1)) < TOL
  with pytest.raises(CheckpointError, match=r"config.teacher.act='quick_gelu' contradicts "
                     r'open_clip_config.json quick_gelu=False'):
    eva_jax.load_teacher(path, act='quick_gelu')
  eva_jax.load_teacher(path, act='gelu', heads=4)   # agreeing explicit values are fine


def test_torchscript_records_act_and_heads(tmp_path, gelu_clip, caplog):
  import warnings
  path = str(tmp_path / 'scripted.pt')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')   # torch.jit is deprecated upstream, still how OpenAI ships
    torch.jit.save(torch.jit.script(gelu_clip), path)
  with caplog.at_level(logging.INFO):
    t = eva_jax.load_teacher(path)
  assert t.config.act == 'gelu' and t.config.heads == 4
  assert 'act=gelu from the TorchScript archive (module class GELU)' in caplog.text
  assert 'heads=4 from the TorchScript archive (MultiheadAttention.num_heads)' in caplog.text
  assert _diff('scripted archive', t, gelu_clip, _x(2)) < TOL
  with pytest.raises(CheckpointError, match='config.teacher.heads=2 contradicts the TorchScript'):
    eva_jax.load_teacher(path, heads=2)


def test_hf_weights_without_config_json_are_refused(tmp_path, caplog):
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
  torch.manual_seed(1)
  cfg = CLIPVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, patch_size=16, image_size=64, projection_dim=48,
                         hidden_act='gelu')
  ref = _perturb(CLIPVisionModelWithProjection(cfg), seed=2)
  full = tmp_path / 'hf'
  ref.save_pretrained(full)
  bare = tmp_path / 'weights_only'
  bare.mkdir()
  shutil.copy(full / 'model.safetensors', bare / 'model.safetensors')
  with pytest.raises(CheckpointError, match=r'(?s)transformers layout.*config.teacher.act.*'
                     'config.teacher.heads'):
    eva_jax.load_teacher(str(bare))
  with caplog.at_level(logging.INFO):
    t = eva_jax.load_teacher(str(full))
  assert 'act=gelu from config.json hidden_act' in caplog.text
  assert 'heads=4 from config.json num_attention_heads' in caplog.text
  x = _x(3)
  with torch.no_grad():
    out = ref.vision_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    r = ref.visual_projection(ref.vision_model.post_layernorm(out.last_hidden_state[:, 1:])).numpy()
  d = float(np.abs(np.asarray(t(x)) - r).max())
  print(f'\n[facts] HF config.json hidden_act=gelu: max abs diff {d:.3e}')
  assert d < TOL
  t2 = eva_jax.load_teacher(str(bare), act='gelu', heads=4)
  assert float(np.abs(np.asarray(t2(x)) - r).max()) < TOL
  # A config.json that is not JSON is an error, not a silent fallback to guesses.
  (full / 'config.json').write_text('{broken')
  with pytest.raises(CheckpointError, match='config.json is not readable JSON'):
    eva_jax.load_teacher(str(full))
