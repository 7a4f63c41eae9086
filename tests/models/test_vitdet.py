"""ViTDet backbone (window / global blocks, simple feature pyramid) and the detection export.

The reference is a small PyTorch module written here with the official EVA detection backbone's
key names and forward (baaivision/EVA EVA-0{1,2}/det/detectron2/modeling/backbone/vit.py: ViT,
Block, Attention, SwiGLU, VisionRotaryEmbeddingFast, window_partition / window_unpartition,
get_abs_pos, SimpleFeaturePyramid). The export (eva_jax.convert.detection, prefix
'backbone.net.') loads into it with strict=True. Model pretrained at 56 (4x4 grid, patch 14),
detection input 112 (8x8): window 4 tiles it; window 3 needs ViTDet's padding.
"""
import functools
import math

import numpy as np
import pytest

torch = pytest.importorskip('torch')
nn = torch.nn
F = torch.nn.functional

from flax import nnx  # noqa: E402

from eva_jax.convert import common, detection  # noqa: E402
from eva_jax.models import encoder_config, vitdet  # noqa: E402
from test_intermediates import random_params  # noqa: E402  (tests/models on sys.path)

TOL = 1e-4
DET = 112
GLOBAL = (1, 3)


def _cfg(family):
  cfg = encoder_config('eva02-tiny' if family == 'eva02' else 'tiny')
  cfg.image_size, cfg.depth = 56, 4
  if family == 'eva02':   # official EVA-02 B/L det block: SwiGLU + ffn_ln, no inner_attn_ln
    cfg.swiglu, cfg.sub_ln, cfg.sub_ln_attn, cfg.rope, cfg.rope_ref_grid = True, True, False, True, 16
  return cfg


# ------------------------------------------------------------------------------------------------
# the official detection ViT, reduced to what the EVA backbones use
def window_partition(x, ws):
  b, h, w, c = x.shape
  ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
  if ph or pw:
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
  hp, wp = h + ph, w + pw
  x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).contiguous()
  return x.view(-1, ws, ws, c), (hp, wp)


def window_unpartition(x, ws, pad_hw, hw):
  (hp, wp), (h, w) = pad_hw, hw
  b = x.shape[0] // (hp * wp // ws // ws)
  x = x.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).contiguous()
  return x.view(b, hp, wp, -1)[:, :h, :w].contiguous()


def rotate_half(x):
  x = x.unflatten(-1, (-1, 2))
  x1, x2 = x.unbind(-1)
  return torch.stack((-x2, x1), -1).flatten(-2)


class VisionRotaryEmbeddingFast(nn.Module):
  def __init__(self, dim, pt_seq_len=16, ft_seq_len=None, theta=10000):
    super().__init__()
    freqs = 1. / (theta ** (torch.arange(0, dim, 2)[:(dim // 2)].float() / dim))
    t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
    freqs = torch.einsum('..., f -> ... f', t, freqs).repeat_interleave(2, -1)
    n = freqs.shape[0]
    freqs = torch.cat([freqs[:, None, :].expand(n, n, -1), freqs[None, :, :].expand(n, n, -1)], -1)
    self.register_buffer('freqs_cos', freqs.cos().view(-1, freqs.shape[-1]))
    self.register_buffer('freqs_sin', freqs.sin().view(-1, freqs.shape[-1]))

  def forward(self, t):
    return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


class Attention(nn.Module):
  def __init__(self, dim, heads, rope, eva02):
    super().__init__()
    self.heads, self.eva02, self.rope = heads, eva02, rope
    if eva02:
      self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
    else:
      self.qkv = nn.Linear(dim, 3 * dim, bias=False)
    self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, h, w, c = x.shape
    x = x.view(b, -1, c)
    if self.eva02:
      q = F.linear(x, self.q_proj.weight, self.q_bias)
      k = F.linear(x, self.k_proj.weight)
      v = F.linear(x, self.v_proj.weight, self.v_bias)
    else:
      bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
      q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, -1)
    q, k, v = (t.reshape(b, h * w, self.heads, -1).transpose(1, 2) for t in (q, k, v))
    if self.rope is not None:
      q, k = self.rope(q), self.rope(k)
    attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    x = (attn @ v).transpose(1, 2).reshape(b, h, w, c)
    return self.proj(x)


class SwiGLU(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
    self.ffn_ln = nn.LayerNorm(hidden, eps=1e-6)
    self.w3 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, heads, hidden, window_size, rope, eva02):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads, rope, eva02)
    self.mlp = SwiGLU(dim, hidden) if eva02 else Mlp(dim, hidden)
    self.window_size = window_size

  def forward(self, x):
    shortcut, x = x, self.norm1(x)
    if self.window_size > 0:
      h, w = x.shape[1:3]
      x, pad_hw = window_partition(x, self.window_size)
    x = self.attn(x)
    if self.window_size > 0:
      x = window_unpartition(x, self.window_size, pad_hw, (h, w))
    x = shortcut + x
    return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
  def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, window_size,
               window_block_indexes, pretrain_img_size, pretrain_use_cls_token, rope=False,
               pt_hw_seq_len=16, **unused):
    super().__init__()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
    n = (pretrain_img_size // patch_size) ** 2 + int(pretrain_use_cls_token)
    self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))
    self.cls = pretrain_use_cls_token
    hd2 = embed_dim // num_heads // 2
    if rope:
      self.rope_win = VisionRotaryEmbeddingFast(hd2, pt_hw_seq_len, window_size)
      self.rope_glb = VisionRotaryEmbeddingFast(hd2, pt_hw_seq_len, img_size // patch_size)
    self.blocks = nn.ModuleList([
        Block(embed_dim, num_heads, int(embed_dim * mlp_ratio),
              window_size if i in window_block_indexes else 0,
              (self.rope_win if i in window_block_indexes else self.rope_glb) if rope else None,
              eva02=rope) for i in range(depth)])

  def forward(self, x):
    x = self.patch_embed.proj(x).permute(0, 2, 3, 1)
    pos = self.pos_embed[:, 1:] if self.cls else self.pos_embed
    s = int(math.sqrt(pos.shape[1]))
    h, w = x.shape[1:3]
    pos = F.interpolate(pos.reshape(1, s, s, -1).permute(0, 3, 1, 2), size=(h, w), mode='bicubic',
                        align_corners=False).permute(0, 2, 3, 1)
    x = x + pos
    for blk in self.blocks:
      x = blk(x)
    return x


class LN2d(nn.Module):   # detectron2.layers.LayerNorm (channels-first)
  def __init__(self, c):
    super().__init__()
    self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

  def forward(self, x):
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return self.weight[:, None, None] * (x - u) / torch.sqrt(s + 1e-6) + self.bias[:, None, None]


def torch_pyramid(dim, out, scales):
  """detectron2 SimpleFeaturePyramid stages (Conv2d(norm=LN, bias=False))."""
  stages = []
  for s in scales:
    if s == 4.0:
      layers, d = [nn.ConvTranspose2d(dim, dim // 2, 2, 2), LN2d(dim // 2), nn.GELU(),
                   nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)], dim // 4
    elif s == 2.0:
      layers, d = [nn.ConvTranspose2d(dim, dim // 2, 2, 2)], dim // 2
    elif s == 1.0:
      layers, d = [], dim
    else:
      layers, d = [nn.MaxPool2d(2, 2)], dim
    layers += [nn.Conv2d(d, out, 1, bias=False), LN2d(out), nn.Conv2d(out, out, 3, padding=1,
                                                                      bias=False), LN2d(out)]
    stages.append(nn.Sequential(*layers))
  return stages


# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _ours(family):
  cfg = _cfg(family)
  det = vitdet.vitdet_config(image_size=DET, window_size=4, global_blocks=GLOBAL, fpn_dim=32)
  ours, unused = vitdet.from_pretrained(cfg, det, common.unflatten(random_params(cfg)))
  assert unused == ['mask_token', 'norm/bias', 'norm/scale']
  return cfg, ours


def _reference(cfg, size, window, global_blocks=GLOBAL):
  """The exported weights loaded (strict) into the official-named torch ViT."""
  sd, kw, dropped = detection.export_state_dict(random_params(cfg), cfg, image_size=size,
                                                window_size=window, global_blocks=global_blocks)
  assert dropped == ['cls_token', 'mask_token', 'norm.bias', 'norm.weight']
  assert kw['pretrain_img_size'] == 56 and kw['img_size'] == size
  ref = ViT(**kw).eval()
  ref.load_state_dict({k[len(detection.PREFIX):]: torch.tensor(v) for k, v in sd.items()},
                      strict=True)
  return ref, kw


def _images(h, w, n=2):
  return np.random.default_rng(h + w).standard_normal((n, h, w, 3)).astype(np.float32)


_features = nnx.jit(lambda m, x: m.features(x))


def _torch(ref, x):
  with torch.no_grad():
    return ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def _report(what, ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  diff = float(np.abs(ours - ref).max())
  print(f'\n[{what}] max|ours - official det ViT| = {diff:.3e}', end='')
  assert diff < TOL, (what, diff)


@pytest.mark.parametrize('family', ['eva02', 'eva01'])
def test_export_loads_into_official_det_vit_and_features_match(family):
  cfg, ours = _ours(family)
  ref, kw = _reference(cfg, DET, 4)
  assert kw['window_block_indexes'] == [0, 2] and kw['window_size'] == 4
  x = _images(DET, DET)
  want = _torch(ref, x)
  got = _features(ours, x)
  assert got.shape == (2, 8, 8, 64)
  _report(f'{family} window 4 @{DET}', got, want)
  # The windows matter: the same weights with every block global give other features.
  every, _ = _reference(cfg, DET, 4, global_blocks=tuple(range(4)))
  assert float(np.abs(_torch(every, x) - want).max()) > 1e-2


def test_padded_windows_match_official_padding():
  """Window 4 on a 6x6 grid (84x84): ViTDet zero-pads to 8x8 after norm1 (window_pad=True)."""
  cfg, ours = _ours('eva02')
  ref, _ = _reference(cfg, 84, 4)
  x = _images(84, 84, 1)
  with pytest.raises(ValueError, match=r'window size 4 does not tile the 6x6 patch grid; choose '
                     r'one of \[1, 2, 3, 6\].*pad=True'):
    ours.features(x)
  ours.window_pad = True
  try:
    _report('eva02 window 4 padded @84', _features(ours, x), _torch(ref, x))
  finally:
    ours.window_pad = False


def test_pyramid_matches_detectron2_simple_feature_pyramid():
  cfg, ours = _ours('eva02')
  x = _images(DET, DET)
  feats = _features(ours, x)
  got = nnx.jit(lambda m, f: m.fpn(f))(ours, feats)
  assert {k: v.shape[1:3] for k, v in got.items()} == {
      'p2': (32, 32), 'p3': (16, 16), 'p4': (8, 8), 'p5': (4, 4), 'p6': (2, 2)}
  rng = np.random.default_rng(3)
  stages = torch_pyramid(64, 32, (4.0, 2.0, 1.0, 0.5))
  # Our (random) pyramid weights -> torch layouts, with non-trivial LN affines.
  for stage_t, stage_j in zip(stages, ours.fpn.stages):
    mods_j = list(stage_j['pre']) + [stage_j['lateral'], stage_j['output']]
    convs_t = [m for m in stage_t if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d))]
    lns_t = [m for m in stage_t if isinstance(m, LN2d)]
    for m in mods_j:
      if isinstance(m, vitdet.Deconv2x2):
        t = convs_t.pop(0)
        t.weight.data = torch.tensor(np.asarray(m.kernel[...]).transpose(2, 3, 0, 1))
        t.bias.data = torch.tensor(np.asarray(m.bias[...]))
      if isinstance(m, vitdet.ConvNorm):
        t = convs_t.pop(0)
        t.weight.data = torch.tensor(np.asarray(m.kernel[...]).transpose(3, 2, 0, 1))
        m = m.norm
      if not isinstance(m, vitdet.Deconv2x2):   # a LayerNorm (alone or after a conv)
        s, b = rng.normal(1, .2, m.scale.shape), rng.normal(0, .1, m.bias.shape)
        m.scale[...], m.bias[...] = s.astype(np.float32), b.astype(np.float32)
        ln = lns_t.pop(0)
        ln.weight.data, ln.bias.data = torch.tensor(s).float(), torch.tensor(b).float()
  got = nnx.jit(lambda m, f: m.fpn(f))(ours, feats)
  xt = torch.from_numpy(np.array(feats).transpose(0, 3, 1, 2))
  with torch.no_grad():
    for name, stage in zip(('p2', 'p3', 'p4', 'p5'), stages):
      _report(f'pyramid {name}', got[name], stage(xt).numpy().transpose(0, 2, 3, 1))
    p6 = F.max_pool2d(stages[-1](xt), kernel_size=1, stride=2).numpy().transpose(0, 2, 3, 1)
  _report('pyramid p6 (LastLevelMaxPool)', got['p6'], p6)


def test_non_square_input_and_bad_input():
  cfg, ours = _ours('eva02')
  got = _features(ours, _images(112, 56, 1))
  assert got.shape == (1, 8, 4, 64) and np.isfinite(np.asarray(got)).all()
  with pytest.raises(ValueError, match=r'global_blocks=\(1, 4\).*block index 4 is out of range '
                     r'for a 4-block model; valid: 0\.\.3 or -4\.\.-1'):
    vitdet.ViTDetBackbone(cfg, vitdet.vitdet_config(global_blocks=(1, 4)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'Image size 112x100 is not a multiple of the patch size 14'):
    ours.features(_images(112, 100, 1))
  bad = _cfg('eva02')
  bad.sub_ln_attn = True
  with pytest.raises(ValueError, match=r'EVA-02 det needs .*sub_ln_attn False.*sub_ln_attn=True'):
    detection.export_state_dict(random_params(bad), bad, image_size=DET, window_size=4,
                                global_blocks=GLOBAL)
  with pytest.raises(ValueError, match=r'global_blocks=\(9,\).*valid: 0\.\.3'):
    detection.export_state_dict(random_params(cfg), cfg, image_size=DET, window_size=4,
                                global_blocks=(9,))
