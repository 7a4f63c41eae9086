"""EVA-CLIP-8B / -18B vision towers as teachers (issue 13), and EVA-02's stop_grad_conv1.

Neither timm nor open_clip builds these towers, so the reference is a minimal PyTorch module written
here after the official code (baaivision/EVA, EVA-CLIP-18B/shinji/eva_clip/eva_vit_model.py
`EVAVisionTransformer` + `Block` + `Attention` + `Mlp`, model.py `RMSnorm`, built as model.py
`_build_vision_tower` does for model_configs/EVA-CLIP-8B.json and EVA-CLIP-18B.json: qkv_bias
false, no RoPE, no sub-LN, GELU MLP of ratio 5, RMSnorm eps 1e-6, postnorm for 18B), with the
official parameter names. Its state dict, saved as the official whole-CLIP file (`visual.*` plus a
text tower), is loaded with eva_jax.load_teacher and compared in fp32 with the reference's
head(norm(tokens))[:, 1:] (EVA-SPEC "EVA-02 teacher"). Run with -s for the measured differences.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
nn = torch.nn

import eva_jax  # noqa: E402
from eva_jax.convert.common import CheckpointError  # noqa: E402
from eva_jax.models import config as model_config  # noqa: E402
from eva_jax.models import vit  # noqa: E402

TOL = 1e-4


# ---- the official tower, reduced to what EVA-CLIP-8B / -18B use -----------------------------------
class RMSnorm(nn.Module):   # model.py RMSnorm (T5LayerNorm)
  def __init__(self, hidden_size, eps=1e-6):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(hidden_size))
    self.variance_epsilon = eps

  def forward(self, hidden_states):
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states


class Attention(nn.Module):   # qkv_bias=False, subln=False, rope=None: the non-xattn branch
  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=False)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, _ = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):   # subln=False: ffn_ln is Identity
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, heads, mlp_ratio, postnorm):
    super().__init__()
    self.norm1, self.attn = RMSnorm(dim), Attention(dim, heads)
    self.norm2, self.mlp = RMSnorm(dim), Mlp(dim, int(dim * mlp_ratio))
    self.postnorm = postnorm

  def forward(self, x):
    if self.postnorm:
      x = x + self.norm1(self.attn(x))
      return x + self.norm2(self.mlp(x))
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class EVAVisionTransformer(nn.Module):
  def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, num_classes, postnorm,
               mlp_ratio=5.0):
    super().__init__()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
    n = (img_size // patch_size) ** 2
    self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(0.5 * torch.randn(1, n + 1, embed_dim))
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, postnorm)
                                 for _ in range(depth)])
    self.norm = RMSnorm(embed_dim)   # use_mean_pooling=False: norm, no fc_norm
    self.head = nn.Linear(embed_dim, num_classes, bias=False)   # bias=qkv_bias

  def forward_features(self, x):   # return_all_features=True: the tokens before the norm
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
    for blk in self.blocks:
      x = blk(x)
    return x

  def targets(self, x):   # EVA-SPEC "EVA-02 teacher": head(norm(tokens))[:, 1:]
    return self.head(self.norm(self.forward_features(x)))[:, 1:]


def _official_tower(postnorm, seed=0):
  torch.manual_seed(seed)
  m = EVAVisionTransformer(56, 14, 64, 2, 4, 48, postnorm)
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in m.named_parameters():
      if p.ndim == 1 and 'norm' in name:    # RMSnorm weights away from 1: a dropped one shows
        p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
      elif name.endswith('bias'):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
  return m.eval()


_TEXT = {'text.token_embedding.weight': torch.zeros(10, 8), 'logit_scale': torch.ones(()),
         'text.transformer.resblocks.0.attn.in_proj_weight': torch.zeros(24, 8)}


def _save_official(m, path):
  """The official whole-CLIP file (EVA_CLIP_8B_psz14_s9B.pt): visual.* + text tower + logit_scale."""
  torch.save({'visual.' + k: v for k, v in m.state_dict().items()} | _TEXT, path)
  return str(path)


def _images(n, size, seed=0):
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _diff(case, ours, m, x):
  with torch.no_grad():
    ref = m.targets(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
  ours = np.asarray(ours)
  assert ours.shape == ref.shape and ours.dtype == np.float32, (ours.shape, ref.shape)
  d = float(np.abs(ours - ref).max())
  print(f'\n[parity] {case}: max abs diff {d:.3e} (target scale {np.abs(ref).max():.2f})')
  return d


@pytest.mark.parametrize('size,postnorm', [('8b', False), ('18b', True)])
def test_eva_clip_8b_18b_tower_parity(tmp_path, size, postnorm, caplog):
  m = _official_tower(postnorm, seed=7 if postnorm else 0)
  path = _save_official(m, tmp_path / f'EVA_CLIP_{size}.pt')
  arch = f'eva-clip-{size}-tiny'
  with caplog.at_level(logging.INFO):
    t = eva_jax.load_teacher(path, family='eva_clip', arch=arch)
  c = t.config
  assert (c.name, c.norm, c.attn_bias, c.proj_bias, c.post_norm, c.rope) == \
      (arch, 'rmsnorm', 'none', False, postnorm, False)
  assert (c.heads, c.mlp_dim, c.out_dim) == (4, 320, 48)
  assert 'RMSNorm' in caplog.text and 'outside the vision tower' in caplog.text
  params = t.model.blocks.layers
  assert not hasattr(params.norm1, 'bias') and params.attn.q_bias is None
  assert t.model.proj_bias is None
  x = _images(2, 56, seed=3)
  assert _diff(f'EVA-CLIP-{size} (official eva_vit_model.py block, RMSnorm)', t(x), m, x) < TOL


def test_eva_clip_8b_facts_without_arch_and_refusals(tmp_path):
  m = _official_tower(False, seed=11)
  path = _save_official(m, tmp_path / 'eva8b.pt')
  # No arch: the shapes give RMSNorm / no biases, the facts the file does not hold are refused ...
  with pytest.raises(CheckpointError, match=r'config.teacher.arch.*EVA-CLIP-8B / -18B: heads 32'):
    eva_jax.load_teacher(path, family='eva_clip')
  # ... or given explicitly, and then the tower is named after its architecture.
  t = eva_jax.load_teacher(path, family='eva_clip', heads=4,
                           facts={'rope': False, 'post_norm': False})
  assert t.config.name == 'eva-clip-8b-tiny' and t.config.norm == 'rmsnorm'
  x = _images(1, 56, seed=4)
  assert _diff('EVA-CLIP-8B, facts given explicitly', t(x), m, x) < TOL
  # An arch of another norm / bias kind is refused field by field.
  with pytest.raises(CheckpointError, match=r"norm: file rmsnorm vs eva02-clip-tiny-post layernorm"
                     r".*attn_bias: file none vs .* qv.*proj_bias: file False vs .* True"):
    eva_jax.load_teacher(path, family='eva_clip', arch='eva02-clip-tiny-post')
  # A file whose norms are half LayerNorm, half RMSNorm is no EVA-CLIP tower.
  sd = {'visual.' + k: v for k, v in m.state_dict().items()}
  sd['visual.blocks.0.norm1.bias'] = torch.zeros(64)
  torch.save(sd, tmp_path / 'mixed.pt')
  with pytest.raises(CheckpointError, match='some norms have biases'):
    eva_jax.load_teacher(str(tmp_path / 'mixed.pt'), family='eva_clip', arch='eva-clip-8b-tiny')


def test_full_size_presets_match_the_official_configs():
  """model_configs/EVA-CLIP-8B.json / EVA-CLIP-18B.json: width, layers, head_width 128, mlp_ratio 5,
  embed_dim; parameter counts as the README's EVA_8B_psz14 (7.5B) / EVA_18B_psz14 (17.5B)."""
  for name, (w, depth, emb, post, params) in {
      'eva-clip-8b/14': (4096, 32, 1280, False, 7.53e9),
      'eva-clip-18b/14': (5120, 48, 1536, True, 17.63e9)}.items():
    c = model_config.teacher_config(name)
    assert (c.width, c.depth, c.heads, c.mlp_dim, c.out_dim, c.post_norm, c.norm, c.attn_bias,
            c.proj_bias, c.rope, c.patch_size) == \
        (w, depth, w // 128, w * 5, emb, post, 'rmsnorm', 'none', False, False, 14)
    assert abs(vit.param_count(vit.abstract(c)) - params) < 0.01e9


# ---- EVA-02 pretraining's stop_grad_conv1 --------------------------------------------------------
def test_stop_grad_conv1_scales_the_patch_embedding_gradient_only():
  """Official EVA-02 pretraining (asuka/modeling_pretrain.py forward_features, --stop_grad_conv1):
  x = x.detach() * 0.9 + x * 0.1 after the patch embedding. The forward is the same tokens, the
  gradient reaching the patch kernel and bias is 0.1x the one without the flag, every other
  parameter's gradient is unchanged."""
  x = _images(2, 28, seed=5)
  mask = np.zeros((2, 4), bool)
  mask[:, 1] = True
  target = jnp.asarray(np.random.default_rng(6).standard_normal((2, 5, 64)), jnp.float32)
  out = {}
  c = model_config.encoder_config('eva02-tiny')
  c.image_size = 28
  _, params = nnx.split(vit.create(c, seed=0), nnx.Param)   # one init: the same weights for both
  for flag in (False, True):
    c.stop_grad_conv1 = flag
    graphdef = nnx.split(vit.abstract(c), nnx.Param)[0]

    def loss(p, graphdef=graphdef):
      tokens = nnx.merge(graphdef, p)(x, mask)
      return jnp.sum(jnp.square(tokens - target)), tokens

    grads, tokens = jax.jit(jax.grad(loss, has_aux=True))(params)
    out[flag] = (tokens, grads)
  np.testing.assert_array_equal(out[True][0], out[False][0])     # forward bit for bit
  g0, g1 = (nnx.to_pure_dict(out[f][1]) for f in (False, True))
  for k in ('patch_kernel', 'patch_bias'):
    assert np.abs(g0[k]).max() > 0
    np.testing.assert_allclose(g1[k], 0.1 * g0[k], rtol=1e-5, atol=1e-6 * np.abs(g0[k]).max())
  for k in ('pos_embed', 'cls_token', 'mask_token'):
    np.testing.assert_array_equal(g1[k], g0[k])
  # Off unless asked for; on in the EVA-02 pretraining recipes, as in every official command.
  assert model_config.encoder_config('eva02-B/14').stop_grad_conv1 is False
  from eva_jax import configs
  from eva_jax.training import pretrain
  for recipe in ('eva02_b14_pretrain', 'eva02_l14_pretrain'):
    assert pretrain.student_config(configs.get(recipe)).stop_grad_conv1 is True
  assert pretrain.student_config(configs.get('eva01_l14_pretrain')).stop_grad_conv1 is False
