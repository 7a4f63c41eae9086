"""Teacher families (issue 13): EVA-CLIP towers, SigLIP and DINOv2, each against its reference.

References are built here at random init (no hub access), small (same code path as the released
sizes, reduced width/depth through the constructors' kwargs), their LayerNorm affines, biases and
layer scales perturbed so a swapped or dropped parameter shows, saved in each layout, loaded with
eva_jax.load_teacher and compared in fp32 with the reference's own forward:
- EVA-CLIP: timm eva_giant_patch14_clip_224 / eva02_large_patch14_clip_224 /
  eva02_enormous_patch14_clip_224 (num_classes = embed dim): head(forward_features(x))[:, 1:]
  (forward_features ends with the final norm) = EVA-SPEC's head(norm(tokens))[:, 1:];
- SigLIP: transformers SiglipVisionModel: last_hidden_state (post_layernorm applied), all tokens;
- DINOv2: transformers Dinov2Model / Dinov2WithRegistersModel: last_hidden_state[:, 1 + R:].
Run with -s to see the measured max abs differences.
"""
import json
import logging

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import eva_jax  # noqa: E402
from eva_jax.convert.common import CheckpointError  # noqa: E402

TOL = 1e-4


def _perturb(module, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      leaf = name.rsplit('.', 1)[-1]
      if p.ndim == 1 and ('norm' in name or 'ln' in name or 'layernorm' in name) and leaf == 'weight':
        p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
      elif leaf.endswith('bias'):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif leaf in ('lambda1', 'gamma_1', 'gamma_2'):
        p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
      elif leaf in ('register_tokens', 'cls_token'):
        p.copy_(torch.randn(p.shape, generator=g))
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
# EVA-CLIP
_TIMM = {   # reference timm model, small kwargs, eva_jax preset of the same shapes
    'eva01': ('eva_giant_patch14_clip_224', dict(mlp_ratio=4.0), 'eva01-clip-tiny'),
    'eva02': ('eva02_large_patch14_clip_224', {}, 'eva02-clip-tiny'),
    'eva02-post': ('eva02_enormous_patch14_clip_224', dict(mlp_ratio=4.0), 'eva02-clip-tiny-post'),
}


def _timm_eva_clip(style, heads=4, seed=0):
  import timm
  name, kw, _ = _TIMM[style]
  torch.manual_seed(seed)
  m = timm.create_model(name, pretrained=False, img_size=56, embed_dim=64, depth=2,
                        num_heads=heads, num_classes=48, **kw)
  return _perturb(m, seed=seed + 1)


def _eva_clip_ref(m, x):
  with torch.no_grad():
    return m.head(m.forward_features(_nchw(x)))[:, 1:].numpy()


_TEXT = {'text.token_embedding.weight': torch.zeros(10, 8), 'logit_scale': torch.ones(()),
         'text.transformer.resblocks.0.attn.in_proj_weight': torch.zeros(24, 8)}


def _official_names(sd, grid, heads):
  """timm names -> official EVA-CLIP names (inverse of timm's checkpoint_filter_fn renames),
  'visual.' prefix, the official RoPE buffers (EVA-02 towers), a text tower and logit_scale."""
  out = {}
  swiglu = any('mlp.fc1_g' in k for k in sd)
  qproj = any('attn.q_proj' in k for k in sd)
  for k, v in sd.items():
    k = k.replace('mlp.norm', 'mlp.ffn_ln').replace('attn.norm', 'attn.inner_attn_ln')
    if swiglu:
      k = k.replace('mlp.fc1_g', 'mlp.w1').replace('mlp.fc1_x', 'mlp.w2').replace('mlp.fc2', 'mlp.w3')
    if qproj:
      k = k.replace('attn.q_proj.bias', 'attn.q_bias').replace('attn.v_proj.bias', 'attn.v_bias')
    out['visual.' + k] = v
  if swiglu:   # official VisionRotaryEmbeddingFast(pt_seq_len=16): persistent freqs_cos/sin buffers
    from eva_jax.models.layers import rope_sincos
    sin, cos = rope_sincos((grid, grid), 64 // heads, 10000.0, 16)
    out['visual.rope.freqs_cos'] = torch.from_numpy(cos)
    out['visual.rope.freqs_sin'] = torch.from_numpy(sin)
  out.update(_TEXT)
  return out


@pytest.mark.parametrize('style', ['eva01', 'eva02', 'eva02-post'])
@pytest.mark.parametrize('layout', ['timm', 'open_clip', 'official'])
def test_eva_clip_tower_parity(tmp_path, style, layout, caplog):
  m = _timm_eva_clip(style)
  sd = m.state_dict()
  path = str(tmp_path / 'eva_clip.pt')
  if layout == 'timm':
    torch.save(sd, path)
  elif layout == 'open_clip':
    torch.save({'state_dict': {'module.visual.trunk.' + k: v for k, v in sd.items()} | _TEXT}, path)
  else:
    torch.save(_official_names(sd, 4, 4), path)
  arch = _TIMM[style][2]
  with caplog.at_level(logging.INFO):
    t = eva_jax.load_teacher(path, family='eva_clip', arch=arch)
  c = t.config
  assert c.family == 'eva_clip' and c.name == arch and c.out_dim == 48 and c.heads == 4
  assert c.post_norm == (style == 'eva02-post') and c.rope == (style == 'eva02')
  if layout != 'timm':
    assert 'outside the vision tower' in caplog.text
  if layout == 'official' and style == 'eva02':
    assert 'heads=4 from' in caplog.text and 'rope.freqs_cos' in caplog.text
  x = _images(2, 56, seed=3)
  d = _report(f'EVA-CLIP {style} ({_TIMM[style][0]}), {layout} layout', t(x), _eva_clip_ref(m, x))
  assert d < TOL


def test_open_clip_config_names_the_trunk(tmp_path, caplog):
  """open_clip EVA02-L-14 layout + open_clip_config.json: the timm trunk's name gives the facts."""
  m = _timm_eva_clip('eva02', heads=16, seed=4)    # EVA02-L's 16 heads (head dim 4 at width 64)
  path = tmp_path / 'open_clip_pytorch_model.bin'
  torch.save({'visual.trunk.' + k: v for k, v in m.state_dict().items()} | _TEXT, path)
  with open(tmp_path / 'open_clip_config.json', 'w') as f:
    json.dump({'model_cfg': {'embed_dim': 48, 'vision_cfg': {
        'image_size': 56, 'timm_model_name': 'eva02_large_patch14_clip_224', 'timm_pool': 'token',
        'timm_proj': None}}}, f)
  with caplog.at_level(logging.INFO):
    t = eva_jax.load_teacher(str(path), family='eva_clip')
  assert 'heads=16 from open_clip_config.json timm_model_name=eva02_large_patch14_clip_224' \
      in caplog.text
  x = _images(2, 56, seed=5)
  assert _report('open_clip EVA02 + open_clip_config.json', t(x), _eva_clip_ref(m, x)) < TOL
  with pytest.raises(CheckpointError, match='heads'):
    eva_jax.load_teacher(str(path), family='eva_clip', heads=4)


def test_eva_clip_facts_are_never_guessed(tmp_path):
  m = _timm_eva_clip('eva02-post')
  path = str(tmp_path / 'bare.pt')
  torch.save(m.state_dict(), path)
  with pytest.raises(CheckpointError) as e:
    eva_jax.load_teacher(path, family='eva_clip')
  msg = str(e.value)
  print(f'\n[error] {msg}')
  assert 'config.teacher.arch' in msg and 'heads' in msg and 'post_norm' in msg
  assert 'eva02-clip-E/14' in msg
  # The wrong architecture is refused naming the mismatching shapes.
  with pytest.raises(CheckpointError, match='is not a eva02-clip-tiny tower'):
    eva_jax.load_teacher(path, family='eva_clip', arch='eva02-clip-tiny')
  # Explicit facts instead of a name; a wrong post_norm is measurably off.
  x = _images(2, 56, seed=6)
  ref = _eva_clip_ref(m, x)
  facts = dict(rope=False, post_norm=True)
  ok = eva_jax.load_teacher(path, family='eva_clip', heads=4, facts=facts)
  assert _report('EVA-CLIP post-norm, explicit facts', ok(x), ref) < TOL
  wrong = eva_jax.load_teacher(path, family='eva_clip', heads=4, facts=dict(facts, post_norm=False))
  assert float(np.abs(np.asarray(wrong(x)) - ref).max()) > 3 * TOL   # measured 5.7e-4
  # A CLIP family checkpoint given as eva_clip says which family it is.
  with pytest.raises(CheckpointError, match="family='clip'"):
    eva_jax.load_teacher(str(_clip_file(tmp_path)), family='eva_clip', arch='eva01-clip-tiny')


def _clip_file(tmp_path):
  from open_clip.transformer import QuickGELU, VisionTransformer
  vis = VisionTransformer(image_size=56, patch_size=14, width=64, layers=1, heads=4, mlp_ratio=4.0,
                          output_dim=32, act_layer=QuickGELU)
  p = tmp_path / 'clip_visual.pt'
  torch.save({'visual.' + k: v for k, v in vis.state_dict().items()}, p)
  return p


# -------------------------------------------------------------------------------------------------
# SigLIP (transformers)
def _siglip(seed=0, with_text=False, act='gelu_pytorch_tanh'):
  import transformers as tr
  torch.manual_seed(seed)
  vc = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            patch_size=14, image_size=56, hidden_act=act)
  if with_text:
    m = tr.SiglipModel(tr.SiglipConfig(vision_config=vc, text_config=dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)))
  else:
    m = tr.SiglipVisionModel(tr.SiglipVisionConfig(**vc))
  return _perturb(m, seed=seed + 1)


def _siglip_ref(m, x):
  vm = m.vision_model if hasattr(m, 'vision_model') else m
  with torch.no_grad():
    return vm(pixel_values=_nchw(x), interpolate_pos_encoding=True).last_hidden_state.numpy()


@pytest.mark.parametrize('with_text', [False, True])
def test_siglip_parity(tmp_path, with_text, caplog):
  m = _siglip(with_text=with_text)
  m.save_pretrained(tmp_path)
  with caplog.at_level(logging.INFO):
    t = eva_jax.load_teacher(str(tmp_path), family='siglip')
  c = t.config
  assert (c.family, c.class_token, c.act, c.heads, c.out_dim, c.ln_eps) == \
      ('siglip', False, 'gelu_tanh', 4, 64, 1e-6)
  assert 'MAP head' in caplog.text
  assert 'act=gelu_tanh from config.json hidden_act' in caplog.text
  x = _images(2, 56, seed=1)
  d = _report(f'SigLIP {"SiglipModel" if with_text else "SiglipVisionModel"}', t(x),
              _siglip_ref(m, x))
  assert d < TOL
  if not with_text:   # another resolution: pos-embed resized bicubically as transformers does
    x = _images(1, 84, seed=2)
    assert _report('SigLIP at 84px (pos-embed interpolation)', t(x), _siglip_ref(m, x)) < TOL


def test_siglip_without_config_json_needs_act_and_heads(tmp_path):
  import shutil
  m = _siglip(seed=3)
  m.save_pretrained(tmp_path / 'hf')
  (tmp_path / 'bare').mkdir()
  shutil.copy(tmp_path / 'hf' / 'model.safetensors', tmp_path / 'bare' / 'model.safetensors')
  with pytest.raises(CheckpointError) as e:
    eva_jax.load_teacher(str(tmp_path / 'bare'), family='siglip')
  msg = str(e.value)
  assert 'config.teacher.act' in msg and 'config.teacher.heads' in msg and 'siglip-tiny' in msg
  x = _images(2, 56, seed=4)
  ok = eva_jax.load_teacher(str(tmp_path / 'bare'), family='siglip', arch='siglip-tiny')
  assert _report('SigLIP weights only + arch=siglip-tiny', ok(x), _siglip_ref(m, x)) < TOL
  wrong = eva_jax.load_teacher(str(tmp_path / 'bare'), family='siglip', act='gelu', heads=4)
  assert float(np.abs(np.asarray(wrong(x)) - _siglip_ref(m, x)).max()) > TOL
  with pytest.raises(CheckpointError, match="not a transformers dinov2 vision tower(?s:.*)family='siglip'"):
    eva_jax.load_teacher(str(tmp_path / 'hf'), family='dinov2')


def test_siglip2_naflex_is_refused_naming_what_to_use(tmp_path):
  """SigLIP2 NaFlex (transformers Siglip2VisionModel: Linear patch embedding over flattened patches,
  position embedding resized per image) is not read: refused with one line naming the fixed-
  resolution SigLIP2 checkpoints (SiglipVisionModel), with and without its config.json."""
  import shutil
  import transformers as tr
  m = tr.Siglip2VisionModel(tr.Siglip2VisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
      num_patches=16, patch_size=14))
  m.save_pretrained(tmp_path / 'hf')
  msg = r"SigLIP2 NaFlex(?s:.*)fixed-resolution SigLIP2(?s:.*)SiglipVisionModel"
  with pytest.raises(CheckpointError, match=r"model_type='siglip2_vision_model'(?s:.*)" + msg):
    eva_jax.load_teacher(str(tmp_path / 'hf'), family='siglip')
  (tmp_path / 'bare').mkdir()
  shutil.copy(tmp_path / 'hf' / 'model.safetensors', tmp_path / 'bare' / 'model.safetensors')
  with pytest.raises(CheckpointError, match=r'is a Linear \(32, 588\)(?s:.*)' + msg):
    eva_jax.load_teacher(str(tmp_path / 'bare'), family='siglip', arch='siglip-tiny')


# -------------------------------------------------------------------------------------------------
# DINOv2 (transformers)
def _dinov2(registers=0, swiglu=False, seed=0):
  import transformers as tr
  torch.manual_seed(seed)
  kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, patch_size=14,
            image_size=56, use_swiglu_ffn=swiglu)
  if registers:
    m = tr.Dinov2WithRegistersModel(tr.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
  else:
    m = tr.Dinov2Model(tr.Dinov2Config(**kw))
  return _perturb(m, seed=seed + 1)


def _dinov2_ref(m, x, registers):
  with torch.no_grad():
    return m(pixel_values=_nchw(x)).last_hidden_state[:, 1 + registers:].numpy()


@pytest.mark.parametrize('registers,swiglu', [(0, False), (4, False), (0, True)])
def test_dinov2_parity(tmp_path, registers, swiglu, caplog):
  m = _dinov2(registers, swiglu)
  m.save_pretrained(tmp_path)
  with caplog.at_level(logging.INFO):
    t = eva_jax.load_teacher(str(tmp_path), family='dinov2')
  c = t.config
  assert (c.family, c.registers, c.swiglu, c.layer_scale, c.out_dim) == \
      ('dinov2', registers, swiglu, True, 64)
  assert 'mask_token' in caplog.text
  case = f'DINOv2 registers={registers} swiglu={swiglu}'
  for size, seed in ((56, 1), (84, 2), (42, 3)):   # native grid, larger and smaller (resized)
    x = _images(2, size, seed=seed)
    assert _report(f'{case} at {size}px', t(x), _dinov2_ref(m, x, registers)) < TOL
