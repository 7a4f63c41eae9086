"""CLIP teacher import (eva_jax.load_teacher) against the reference implementations.

Every reference model is built here at random init (no hub access), its LayerNorm affines and biases
perturbed so that a swapped or dropped parameter shows, saved in the format under test, loaded with
eva_jax.load_teacher, and compared with the reference's own forward:
- transformers CLIPVisionModelWithProjection / CLIPModel:
  visual_projection(post_layernorm(last_hidden_state[:, 1:]));
- open_clip CLIP (OpenAI layout, QuickGELU): visual with output_tokens=True returns
  (pooled, ln_post(x)[:, 1:]) -- ln_post applied, proj not -- so the target is tokens @ visual.proj.
Run with -s to see the measured max abs differences.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

import eva_jax  # noqa: E402
from eva_jax.convert.common import CheckpointError  # noqa: E402

import support

TOL = 1e-4


def _perturb(module, seed=0):
  """LayerNorm affine -> non-trivial values; every bias -> non-zero (so q/v/out swaps show)."""
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


def _images(n, size, seed=0):
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _report(case, ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (case, ours.shape, ref.shape)
  assert ours.dtype == np.float32
  diff = float(np.abs(ours - ref).max())
  print(f'\n[parity] {case}: max abs diff {diff:.3e} (target scale {np.abs(ref).max():.2f})')
  return diff


# -------------------------------------------------------------------------------------------------
# transformers
def _hf_vision_config(patch, image, **kw):
  from transformers import CLIPVisionConfig
  return CLIPVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=256, patch_size=patch, image_size=image,
                          projection_dim=48, hidden_act='quick_gelu', **kw)


def _hf_reference(vision_model, visual_projection, x):
  with torch.no_grad():
    out = vision_model(pixel_values=_nchw(x), interpolate_pos_encoding=True)
    t = visual_projection(vision_model.post_layernorm(out.last_hidden_state[:, 1:]))
  return t.numpy()


def _save_hf(model, path, fmt):
  """save_pretrained; transformers 5 always writes safetensors (safe_serialization is gone), so the
  legacy bin layout is written as transformers 4 did: torch.save(state_dict) -> pytorch_model.bin."""
  if fmt == 'bin':
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), os.path.join(path, 'pytorch_model.bin'))
  elif fmt == 'sharded':
    model.save_pretrained(path, max_shard_size='60KB')
    assert os.path.exists(os.path.join(path, 'model.safetensors.index.json'))
  else:
    model.save_pretrained(path)
    assert os.path.exists(os.path.join(path, 'model.safetensors'))


@pytest.mark.parametrize('patch,image,fmt', [(14, 56, 'safetensors'), (16, 64, 'safetensors'),
                                             (14, 56, 'bin'), (16, 64, 'sharded')])
def test_hf_vision_with_projection(tmp_path, patch, image, fmt):
  from transformers import CLIPVisionModelWithProjection
  torch.manual_seed(patch)
  ref = _perturb(CLIPVisionModelWithProjection(_hf_vision_config(patch, image)), seed=patch)
  _save_hf(ref, str(tmp_path), fmt)
  teacher = eva_jax.load_teacher(str(tmp_path))
  c = teacher.config
  assert (c.width, c.depth, c.heads, c.mlp_dim, c.patch_size, c.image_size, c.out_dim) == \
      (64, 2, 4, 256, patch, image, 48)
  assert c.act == 'quick_gelu' and c.ln_eps == 1e-5 and c.dtype == 'float32'
  x = _images(2, image)
  d = _report(f'HF CLIPVisionModelWithProjection p{patch} {fmt}', teacher(x),
              _hf_reference(ref.vision_model, ref.visual_projection, x))
  assert d < TOL
  if patch == 14 and fmt == 'safetensors':
    # Another resolution: pos-embed resized bicubically, as interpolate_pos_encoding=True does.
    x = _images(1, image + 2 * patch, seed=1)
    d = _report(f'HF p{patch} at {image + 2 * patch}px (pos-embed interpolation)', teacher(x),
                _hf_reference(ref.vision_model, ref.visual_projection, x))
    assert d < TOL


def test_hf_clip_model_ignores_text_tower(tmp_path, caplog):
  from transformers import CLIPConfig, CLIPModel
  torch.manual_seed(1)
  cfg = CLIPConfig(vision_config=_hf_vision_config(16, 64).to_dict(),
                   text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, vocab_size=100, max_position_embeddings=16,
                                    bos_token_id=0, eos_token_id=1, pad_token_id=1),
                   projection_dim=48)
  ref = _perturb(CLIPModel(cfg), seed=3)
  ref.save_pretrained(tmp_path)
  with caplog.at_level('INFO'):
    teacher = eva_jax.load_teacher(str(tmp_path))
  assert 'ignoring' in caplog.text and 'outside the vision tower' in caplog.text
  x = _images(2, 64)
  d = _report('HF CLIPModel p16 safetensors', teacher(x),
              _hf_reference(ref.vision_model, ref.visual_projection, x))
  assert d < TOL


# -------------------------------------------------------------------------------------------------
# OpenAI layout via open_clip
@pytest.fixture(scope='module')
def oc_model():
  from open_clip.model import CLIP
  torch.manual_seed(0)
  m = CLIP(embed_dim=48, quick_gelu=True,
           vision_cfg=dict(layers=2, width=256, head_width=64, mlp_ratio=4.0, patch_size=14,
                           image_size=56),
           text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))
  return _perturb(m, seed=5)


def _oc_reference(visual, x):
  visual.output_tokens = True
  try:
    with torch.no_grad():
      pooled, tokens = visual(_nchw(x))          # tokens = ln_post(x)[:, 1:], no projection yet
      return (tokens @ visual.proj).numpy()
  finally:
    visual.output_tokens = False


def _save_oc(kind, model, path):
  sd = model.state_dict()
  if kind == 'state_dict':   # + the scalar entries OpenAI's archives carry next to the weights
    torch.save(dict(sd, input_resolution=torch.tensor(56), context_length=torch.tensor(8),
                    vocab_size=torch.tensor(100)), path)
  elif kind == 'torchscript':
    torch.jit.save(torch.jit.script(model), path)
  elif kind == 'open_clip_wrapped':
    torch.save({'epoch': 3, 'name': 'x', 'state_dict': {'module.' + k: v for k, v in sd.items()}},
               path)
  elif kind == 'fp16_state_dict':   # OpenAI's released weights are fp16
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, path)
  else:
    raise ValueError(kind)


@pytest.mark.parametrize('kind', ['state_dict', 'torchscript', 'open_clip_wrapped',
                                  'fp16_state_dict'])
def test_openai_layout_from_open_clip(tmp_path, oc_model, kind):
  path = str(tmp_path / 'ViT-test.pt')
  _save_oc(kind, oc_model, path)
  # A TorchScript archive records its activation and heads; a state dict does not (issue 12 A).
  facts = {} if kind == 'torchscript' else dict(act='quick_gelu', heads=4)
  teacher = eva_jax.load_teacher(path, **facts)
  c = teacher.config
  assert (c.width, c.depth, c.heads, c.mlp_dim, c.patch_size, c.image_size, c.out_dim) == \
      (256, 2, 4, 1024, 14, 56, 48)
  visual = oc_model.visual
  if kind == 'fp16_state_dict':   # reference: the same fp16-rounded weights, computed in fp32
    import copy
    visual = copy.deepcopy(visual)
    with torch.no_grad():
      for p in visual.parameters():
        p.copy_(p.half().float())
  x = _images(2, 56, seed=2)
  d = _report(f'open_clip CLIP (OpenAI layout) {kind}', teacher(x), _oc_reference(visual, x))
  assert d < TOL


def test_bare_open_clip_tower_with_heads_override(tmp_path):
  """A bare VisionTransformer state dict (no 'visual.' prefix), head dim 16 (heads passed in)."""
  from open_clip.transformer import QuickGELU, VisionTransformer
  torch.manual_seed(2)
  vis = _perturb(VisionTransformer(image_size=64, patch_size=16, width=64, layers=2, heads=4,
                                   mlp_ratio=4.0, output_dim=32, act_layer=QuickGELU), seed=7)
  path = str(tmp_path / 'visual.pt')
  torch.save(vis.state_dict(), path)
  teacher = eva_jax.load_teacher(path, heads=4, act='quick_gelu')
  assert teacher.config.heads == 4 and teacher.config.out_dim == 32
  x = _images(2, 64, seed=3)
  d = _report('open_clip VisionTransformer (bare, heads=4 override)', teacher(x),
              _oc_reference(vis, x))
  assert d < TOL


def test_bf16_compute_is_close_and_returns_float32(tmp_path, oc_model):
  path = str(tmp_path / 'sd.pt')
  _save_oc('state_dict', oc_model, path)
  x = _images(2, 56, seed=4)
  ref = _oc_reference(oc_model.visual, x)
  t16 = eva_jax.load_teacher(path, dtype=jnp.bfloat16, act='quick_gelu', heads=4)
  assert t16.config.dtype == 'bfloat16'
  y = t16(x)
  assert y.dtype == jnp.float32
  rel = float(np.abs(np.asarray(y) - ref).max() / np.abs(ref).max())
  print(f'\n[parity] open_clip state_dict, bf16 compute: max abs diff / max |target| {rel:.3e}')
  assert rel < 5e-2


# -------------------------------------------------------------------------------------------------
# Bad checkpoints and inputs
def test_missing_path_and_non_checkpoints(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    eva_jax.load_teacher(str(tmp_path / 'nope.pt'))
  txt = tmp_path / 'notes.txt'
  txt.write_text('not a checkpoint\n')
  with pytest.raises(CheckpointError, match='neither a torch.save state dict nor a TorchScript'):
    eva_jax.load_teacher(str(txt))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(CheckpointError, match='directory without model.safetensors'):
    eva_jax.load_teacher(str(empty))


def test_timm_eva_is_rejected_with_key_lists(tmp_path):
  from timm.models.eva import Eva
  m = Eva(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4, num_classes=0)
  path = str(tmp_path / 'eva.pth')
  torch.save({'model': m.state_dict()}, path)
  with pytest.raises(CheckpointError) as e:
    eva_jax.load_teacher(path)
  msg = str(e.value)
  print(f'\n[error] timm Eva: {msg}')
  assert 'Not a CLIP vision tower' in msg and 'Missing keys' in msg and 'Unexpected keys' in msg
  assert 'visual.conv1.weight' in msg and 'patch_embed.proj.weight' in msg
  assert 'load_encoder' in msg


def test_clip_with_missing_and_extra_keys_lists_them(tmp_path, oc_model):
  sd = dict(oc_model.state_dict())
  del sd['visual.transformer.resblocks.1.mlp.c_proj.bias']
  sd['visual.transformer.resblocks.0.ls_1.gamma'] = torch.ones(256)   # layer scale: not supported
  path = str(tmp_path / 'broken.pt')
  torch.save(sd, path)
  with pytest.raises(CheckpointError) as e:
    eva_jax.load_teacher(path)
  msg = str(e.value)
  assert 'Missing keys (1): visual.transformer.resblocks.1.mlp.c_proj.bias' in msg
  assert 'Unexpected keys (1): visual.transformer.resblocks.0.ls_1.gamma' in msg
  # A tower without a projection (CLIPVisionModel): the targets need it.
  sd = {k: v for k, v in oc_model.state_dict().items() if k != 'visual.proj'}
  torch.save(sd, path)
  with pytest.raises(CheckpointError, match=r'Missing keys \(1\): visual\.proj'):
    eva_jax.load_teacher(path)


def test_bad_images_raise_value_error_naming_the_shape():
  teacher = eva_jax.load_teacher('clip-tiny')       # random init: a known teacher name
  assert teacher.config.name == 'clip-tiny'
  ok = teacher(np.zeros((1, 28, 28, 3), np.float32))
  assert ok.shape == (1, 4, 48) and ok.dtype == jnp.float32
  for shape in [(1, 3, 28, 28), (28, 28, 3), (1, 28, 28, 4), (1, 28, 30, 3)]:
    with pytest.raises(ValueError, match=str(shape).replace('(', r'\(').replace(')', r'\)')):
      teacher(np.zeros(shape, np.float32))
  with pytest.raises(ValueError, match='Channels-first'):
    teacher(np.zeros((1, 3, 28, 28), np.float32))
  with pytest.raises(ValueError, match='float images'):
    teacher(np.zeros((1, 28, 28, 3), np.uint8))
  # Also when called inside a user's jit: the error surfaces at trace time as a ValueError.
  with pytest.raises(ValueError, match=r'\(2, 3, 28, 28\)'):
    jax.jit(teacher)(jnp.zeros((2, 3, 28, 28)))
  # ... and the model's own check when used directly under jit.
  with pytest.raises(ValueError, match=r'\(2, 3, 28, 28\)'):
    jax.jit(teacher.model.targets)(jnp.zeros((2, 3, 28, 28)))
  with pytest.raises(FileNotFoundError, match='clip-L/14'):
    eva_jax.load_teacher('clip-XL/99')


def test_import_eva_jax_does_not_import_torch():
  code = ('import sys, eva_jax, eva_jax.api, eva_jax.convert.clip; '
          'assert callable(eva_jax.load_teacher); '
          "bad = [m for m in ('torch', 'transformers', 'open_clip', 'timm') if m in sys.modules]; "
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], check=True,
                 cwd=support.ROOT)
