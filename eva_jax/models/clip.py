"""EVA-CLIP: a two-tower image-text model in Flax NNX (EVA-SPEC "EVA-CLIP"; arXiv 2303.15389).

Image tower: the project's VisionTransformer (EVA-01 / EVA-02 block, no [MASK] token) then pooling
and a linear `head` (with bias) to the joint embedding, as open_clip's EVA models (a timm `Eva`
trunk built with num_classes=embed_dim, global_pool='token') and the official EVA-CLIP
`eva_vit_model.EVAVisionTransformer` compute it:
  pool 'token': head(norm(tokens)[:, 0])                     (EVA-CLIP default, timm 'token')
  pool 'avg':   head(fc_norm(mean(tokens[:, prefix:])))      (use_mean_pooling; norm = identity)
Optional FLIP patch dropout (arXiv 2212.00794; EVA-CLIP trains with 0.5): in training a random
subset of patch tokens enters the blocks, prefix tokens always kept, RoPE rows gathered with them.

Text tower: the CLIP text transformer (OpenAI CLIP / open_clip `TextTransformer`): token
embedding + positional embedding, pre-LN blocks with causal self-attention, `ln_final`, the
features of the EOT token (the largest token id in each row: open_clip pool_type='argmax'), then
`text_projection` (no bias).

Logits: `logit_scale` (init log(1/0.07), used as exp(min(s, log 100)): CLIP's clamp at 100) and an
optional `logit_bias` (SigLIP: init scale log(10), bias -10; arXiv 2303.15343).

All parameters carry logical axis names (layers.param), so parallel.state_shardings shards them
with the student's rules; compute dtype per tower from its config (precision.DTYPES); remat and
scan through layers.Blocks. Features are returned in float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from eva_jax.models import config as config_lib
from eva_jax.models import vit
from eva_jax.models.layers import Blocks, Dense, LayerNorm, create_module, param
from eva_jax.parallel import constrain_batch
from eva_jax.training.precision import DTYPES

POOLS = ('token', 'avg')

# Text towers: name -> (width, depth, heads, act). open_clip model_configs (EVA01-g-14.json,
# EVA02-B-16.json, EVA02-L-14.json: no quick_gelu, so nn.GELU) and OpenAI CLIP (QuickGELU).
_TEXT = {
    'text-tiny': (32, 2, 4, 'gelu'),
    'openai-B': (512, 12, 8, 'quick_gelu'),
    'openai-L': (768, 12, 12, 'quick_gelu'),
    'eva-text-B': (512, 12, 8, 'gelu'),      # EVA02-CLIP-B/16
    'eva-text-L': (768, 12, 12, 'gelu'),     # EVA01-CLIP-g/14, EVA02-CLIP-L/14
}

# EVA-CLIP models: name -> (vision tower, text tower, embed dim). The vision towers are the
# EVA-CLIP towers of models/config.py (official EVA-CLIP model_configs, timm *_clip_224 trunks).
_CLIP = {
    'eva-clip-tiny': ('eva01-clip-tiny', 'text-tiny', 32),
    'eva02-clip-tiny': ('eva02-clip-tiny', 'text-tiny', 32),
    'eva01-clip-g/14': ('eva01-clip-g/14', 'eva-text-L', 1024),
    'eva02-clip-B/16': ('eva02-clip-B/16', 'eva-text-B', 512),
    'eva02-clip-L/14': ('eva02-clip-L/14', 'eva-text-L', 768),
}
CLIP_NAMES = tuple(_CLIP)


def text_config(name: str = 'text-tiny', **overrides) -> ml_collections.ConfigDict:
  """The ConfigDict of a CLIP text tower (fields read by layers.Block plus vocab/context).

  Raises ValueError for an unknown name or field."""
  if name not in _TEXT:
    raise ValueError(f'Unknown text tower {name!r}. Known: {", ".join(_TEXT)}.')
  width, depth, heads, act = _TEXT[name]
  cfg = ml_collections.ConfigDict(dict(
      name=name, width=width, depth=depth, heads=heads, mlp_dim=4 * width, act=act,
      vocab_size=49408, context_length=77, ln_eps=1e-5,
      # layers.Block fields: CLIP text blocks have q/k/v biases, a plain MLP and causal attention.
      attn_bias='qkv', swiglu=False, sub_ln=False, rope=False, causal=True,
      dtype='float32', attention='xla', remat='none', scan_unroll=1))
  for k, v in overrides.items():
    if k not in cfg:
      raise ValueError(f'text.{k} is not a text tower field. Known: {", ".join(sorted(cfg))}.')
    cfg[k] = v
  validate_text(cfg)
  return cfg


def validate_text(cfg) -> None:
  for f in ('width', 'depth', 'heads', 'mlp_dim', 'vocab_size', 'context_length'):
    if not isinstance(cfg[f], int) or cfg[f] < 1:
      raise ValueError(f'text.{f} must be a positive integer, got {cfg[f]!r}.')
  if cfg.width % cfg.heads:
    raise ValueError(f'text.width={cfg.width} is not divisible by text.heads={cfg.heads}.')
  if cfg.act not in ('gelu', 'quick_gelu'):
    raise ValueError(f"text.act must be 'gelu' or 'quick_gelu', got {cfg.act!r}.")
  if cfg.dtype not in DTYPES:
    raise ValueError(f'text.dtype must be one of {", ".join(DTYPES)}, got {cfg.dtype!r}.')


def vision_tower_config(name: str) -> ml_collections.ConfigDict:
  """A VisionTransformer config for an EVA-CLIP image tower: the named EVA-CLIP tower of
  models/config.py (or an encoder name: 'tiny', 'g/14', 'eva02-B/14', ...) without [MASK] token,
  teacher projection or ln_post (the CLIP head is ClipModel's)."""
  if name in config_lib.ENCODER_NAMES:
    cfg = config_lib.encoder_config(name)
  else:
    cfg = config_lib.teacher_config(name)
    cfg.out_dim, cfg.proj, cfg.proj_bias, cfg.ln_post = 0, False, False, False
  cfg.mask_token = False
  cfg.final_norm = True
  return cfg


def clip_config(name: str = 'eva-clip-tiny', *, dtype: str = 'float32', remat: str = 'none',
                patch_dropout: float = 0.0, logit_bias: bool = False, pool: str = 'token',
                image_size: int | None = None) -> ml_collections.ConfigDict:
  """The ConfigDict of a named EVA-CLIP model: {embed_dim, vision, text, pool, patch_dropout,
  logit_scale_init, logit_bias, logit_bias_init}. `dtype` and `remat` are set on both towers.

  logit_bias=True gives SigLIP's init (scale log 10, bias -10), else CLIP's (log(1/0.07), none).
  pool='avg' turns the vision `norm` into `fc_norm` after mean pooling (EVA-CLIP
  use_mean_pooling). Raises ValueError for unknown names / bad values."""
  if name not in _CLIP:
    raise ValueError(f'Unknown CLIP model {name!r}. Known: {", ".join(_CLIP)}.')
  vname, tname, embed = _CLIP[name]
  v = vision_tower_config(vname)
  t = text_config(tname)
  for c in (v, t):
    c.dtype, c.remat = dtype, remat
  if image_size:
    v.image_size = int(image_size)
  cfg = ml_collections.ConfigDict(dict(
      name=name, embed_dim=embed, vision=v, text=t, pool=pool, patch_dropout=float(patch_dropout),
      logit_scale_init=math.log(10.0) if logit_bias else math.log(1 / 0.07),
      logit_bias=bool(logit_bias), logit_bias_init=-10.0))
  validate(cfg)
  return cfg


def validate(cfg) -> None:
  """Raises ValueError naming the bad field of a CLIP config."""
  if cfg.pool not in POOLS:
    raise ValueError(f'clip.pool must be one of {POOLS}, got {cfg.pool!r}.')
  if cfg.pool == 'token' and not cfg.vision.class_token:
    raise ValueError("clip.pool='token' needs a class token (vision.class_token=True); use 'avg'.")
  if not 0.0 <= cfg.patch_dropout < 1.0:
    raise ValueError(f'clip.patch_dropout must be in [0, 1), got {cfg.patch_dropout}.')
  if not isinstance(cfg.embed_dim, int) or cfg.embed_dim < 1:
    raise ValueError(f'clip.embed_dim must be a positive integer, got {cfg.embed_dim!r}.')
  if cfg.vision.get('mask_token', False):
    raise ValueError('clip.vision.mask_token must be False (the CLIP image tower has no [MASK]).')
  config_lib.validate(cfg.vision)
  validate_text(cfg.text)


class TextTransformer(nnx.Module):
  """CLIP text tower. Call with int tokens [B, L] (L <= context_length); returns the projected
  EOT features, float32 [B, embed_dim]. Parameter names follow OpenAI/open_clip (token_embedding,
  positional_embedding, blocks ~ transformer.resblocks, ln_final, text_projection)."""

  def __init__(self, cfg: ml_collections.ConfigDict, embed_dim: int, *, rngs: nnx.Rngs):
    validate_text(cfg)
    self.cfg = cfg = ml_collections.FrozenConfigDict(cfg)
    d = cfg.width
    self.dtype = DTYPES[cfg.dtype]
    normal = jax.nn.initializers.normal
    # open_clip TextTransformer.init_parameters: token 0.02, positions 0.01, attention in-proj
    # width^-0.5, out-proj and c_proj width^-0.5 (2 depth)^-0.5, c_fc (2 width)^-0.5,
    # text_projection width^-0.5.
    self.token_embedding = param(rngs, normal(0.02), (cfg.vocab_size, d), ('vocab', 'embed'))
    self.positional_embedding = param(rngs, normal(0.01), (cfg.context_length, d), (None, 'embed'))
    self.blocks = Blocks(cfg, init=normal(d ** -0.5), rngs=rngs)
    proj_std = d ** -0.5 * (2 * cfg.depth) ** -0.5
    layers = self.blocks.layers
    for w, std in ((layers.attn.proj, proj_std), (layers.mlp.fc1.kernel, (2 * d) ** -0.5),
                   (layers.mlp.fc2.kernel, proj_std)):
      w[...] = w[...] * (std / d ** -0.5)
    self.ln_final = LayerNorm(d, cfg.ln_eps, rngs=rngs)
    self.text_projection = param(rngs, normal(d ** -0.5), (d, embed_dim), ('embed', 'out'))

  def __call__(self, tokens):
    cfg = self.cfg
    if tokens.ndim != 2:
      raise ValueError(f'text tokens must be int [batch, length], got shape {tuple(tokens.shape)}.')
    n = tokens.shape[1]
    if n > cfg.context_length:
      raise ValueError(f'text length {n} exceeds the context length {cfg.context_length}; '
                       'tokenize with context_length=%d.' % cfg.context_length)
    dt = self.dtype
    x = self.token_embedding[...].astype(dt)[tokens]
    x = constrain_batch(x + self.positional_embedding[...][:n].astype(dt))
    x = self.blocks(x, None, 0)
    x = self.ln_final(x)
    # EOT pooling: the EOT token has the largest id of CLIP's vocabulary (open_clip 'argmax').
    eot = jnp.argmax(tokens, axis=-1)
    x = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    return (x @ self.text_projection[...].astype(dt)).astype(jnp.float32)


class ClipModel(nnx.Module):
  """EVA-CLIP two-tower model (module docstring). Attributes: visual (VisionTransformer),
  visual_fc_norm (pool 'avg' only), visual_head (Dense width -> embed_dim, bias), text
  (TextTransformer), logit_scale [] and logit_bias [] (or None)."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    validate(cfg)
    self.cfg = cfg = ml_collections.FrozenConfigDict(cfg)
    v = ml_collections.ConfigDict(cfg.vision.to_dict())
    if cfg.pool == 'avg':
      v.final_norm = False   # timm Eva(global_pool='avg'): norm -> identity, fc_norm after pooling
    self.visual = vit.VisionTransformer(v, rngs=rngs)
    d = v.width
    self.visual_fc_norm = LayerNorm(d, v.ln_eps, rngs=rngs) if cfg.pool == 'avg' else None
    # timm Eva head init: trunc_normal(std=.02) (official EVA-CLIP likewise), bias zero.
    self.visual_head = Dense(d, cfg.embed_dim, ('embed', 'out'),
                             init=jax.nn.initializers.truncated_normal(0.02), bias=True, rngs=rngs)
    self.text = TextTransformer(cfg.text, cfg.embed_dim, rngs=rngs)
    const = lambda c: (lambda key, shape, dtype: jnp.full(shape, c, dtype))  # noqa: E731
    self.logit_scale = param(rngs, const(cfg.logit_scale_init), (), ())
    self.logit_bias = param(rngs, const(cfg.logit_bias_init), (), ()) if cfg.logit_bias else None

  def encode_image(self, images, *, patch_dropout_key=None, dropout_key=None, normalize=False):
    """Image features float32 [B, embed_dim] from NHWC normalized images.

    patch_dropout_key: PRNG key enabling FLIP patch dropout at cfg.patch_dropout (training only).
    dropout_key: PRNG key enabling drop path (vision.drop_path). normalize: L2-normalize."""
    keep = None
    if patch_dropout_key is not None and self.cfg.patch_dropout > 0:
      n = (images.shape[1] // self.cfg.vision.patch_size) * (images.shape[2] //
                                                            self.cfg.vision.patch_size)
      keep = vit.patch_dropout_indices(patch_dropout_key, images.shape[0], n,
                                       self.cfg.patch_dropout)
    x = self.visual(images, dropout_key=dropout_key, keep_indices=keep)
    if self.cfg.pool == 'token':
      x = x[:, 0]
    else:
      x = self.visual_fc_norm(x[:, self.visual.num_prefix:].mean(axis=1))
    x = self.visual_head(x).astype(jnp.float32)
    return l2_normalize(x) if normalize else x

  def encode_text(self, tokens, *, normalize=False):
    """Text features float32 [B, embed_dim] from int tokens [B, L]."""
    x = self.text(tokens)
    return l2_normalize(x) if normalize else x

  def logit_params(self):
    """(scale, bias): exp(logit_scale) clamped at 100 (CLIP / EVA-CLIP clamp the parameter at
    log 100; here the clamp acts in use, with no gradient beyond it), and the bias or None."""
    scale = jnp.exp(jnp.minimum(self.logit_scale[...], math.log(100.0)))
    return scale, (self.logit_bias[...] if self.logit_bias is not None else None)

  def __call__(self, images, tokens, *, patch_dropout_key=None, dropout_key=None):
    """(image features, text features) L2-normalized float32 [B, E], logit scale, logit bias."""
    img = self.encode_image(images, patch_dropout_key=patch_dropout_key, dropout_key=dropout_key,
                            normalize=True)
    txt = self.encode_text(tokens, normalize=True)
    scale, bias = self.logit_params()
    return img, txt, scale, bias


def l2_normalize(x, eps: float = 1e-12):
  """x / max(||x||, eps) along the last axis (torch F.normalize), in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def create(cfg: ml_collections.ConfigDict, seed: int = 0) -> ClipModel:
  """A randomly initialized ClipModel (one compiled init)."""
  return create_module(lambda: ClipModel(cfg, rngs=nnx.Rngs(params=seed)))


def abstract(cfg: ml_collections.ConfigDict) -> ClipModel:
  """The model with ShapeDtypeStruct leaves (nothing allocated): sharding plans, converters."""
  return nnx.eval_shape(lambda: ClipModel(cfg, rngs=nnx.Rngs(params=0)))
