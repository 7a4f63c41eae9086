"""Named encoder and teacher architectures as ml_collections ConfigDicts.

One ConfigDict describes a whole transformer family member (timm eva.py style): EVA-01 is the
default, EVA-02 is EVA-01 plus three switches (`swiglu`, `sub_ln`, `rope`). The same fields also
describe the CLIP teacher tower (see `teacher_config`).
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from eva_jax import ranges

# name -> (width, depth, heads, mlp_dim, patch)
_EVA01 = {
    'tiny': (64, 2, 4, 256, 14),          # tests and demos: compiles in seconds on a CPU
    'S/14': (384, 12, 6, 1536, 14),
    'B/16': (768, 12, 12, 3072, 16),
    'B/14': (768, 12, 12, 3072, 14),
    'L/14': (1024, 24, 16, 4096, 14),
    'g/14': (1408, 40, 16, 6144, 14),     # the paper's EVA: 1,011,143,296 backbone params
}

# EVA-02 sizes (timm eva02_*_patch14): SwiGLU hidden = int(width * 4 * 2/3), sub-LN, 2D RoPE.
_EVA02 = {
    'eva02-tiny': (64, 2, 4, int(64 * 4 * 2 / 3), 14),
    'eva02-Ti/14': (192, 12, 3, int(192 * 4 * 2 / 3), 14),
    'eva02-S/14': (384, 12, 6, int(384 * 4 * 2 / 3), 14),
    'eva02-B/14': (768, 12, 12, int(768 * 4 * 2 / 3), 14),
    'eva02-L/14': (1024, 24, 16, int(1024 * 4 * 2 / 3), 14),
}

# CLIP vision towers usable as teachers: name -> (width, depth, heads, mlp_dim, patch, out_dim)
_CLIP = {
    'clip-tiny': (64, 2, 4, 256, 14, 48),
    'clip-S/14': (384, 6, 6, 1536, 14, 384),
    'clip-B/16': (768, 12, 12, 3072, 16, 512),
    'clip-B/32': (768, 12, 12, 3072, 32, 512),
    'clip-L/14': (1024, 24, 16, 4096, 14, 768),   # the paper's teacher (OpenAI ViT-L/14 @224)
}

ENCODER_NAMES = tuple(_EVA01) + tuple(_EVA02)
TEACHER_NAMES = tuple(_CLIP)


def _base(width, depth, heads, mlp_dim, patch) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='custom',
      width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, patch_size=patch,
      image_size=224,            # pos-embed size; other resolutions interpolate
      in_chans=3,
      patch_bias=True,           # CLIP's patch conv has no bias
      out_dim=0,                 # >0: CLIP ln_post + projection to out_dim (teacher targets)
      # Attention biases: 'qv' (EVA/BEiT: q and v bias, no k bias), 'qkv' (CLIP), 'none'.
      attn_bias='qv',
      act='gelu',                # 'gelu' (exact erf), 'quick_gelu' (CLIP), ignored with swiglu
      ln_eps=1e-6,
      ln_pre=False,              # CLIP's LayerNorm before the blocks
      class_token=True,
      mask_token=True,           # learned [MASK] embedding for MIM
      final_norm=True,           # `norm` after the blocks (pretraining) ...
      # EVA-02 switches
      swiglu=False,
      sub_ln=False,
      # With sub_ln: also a LayerNorm on the attention output before the projection (timm
      # scale_attn_inner, EVA-CLIP `inner_attn_ln`). The EVA-02 MIM release has only the MLP one.
      sub_ln_attn=True,
      rope=False,
      rope_theta=10000.0,
      rope_ref_grid=0,           # grid the RoPE frequencies are defined on (timm ref_feat_shape); 0 = own grid
      # init
      init='eva01',              # 'eva01': trunc normal +-1 std, std 0.015, sqrt(2l) rescale; 'eva02': xavier
      init_std=0.015,
      # execution
      drop_path=0.0,             # max rate, linear over depth
      dtype='float32',           # compute dtype; LayerNorm and softmax always run in float32
      attention='xla',           # jax.nn.dot_product_attention implementation: 'xla' | 'cudnn' | 'auto'
      remat='none',              # per-block remat policy name (see eva_jax.models.layers.REMAT_POLICIES)
      scan_unroll=1,             # blocks run under lax.scan; unroll=depth gives a fully unrolled graph
  ))


def encoder_config(name: str) -> ml_collections.ConfigDict:
  """Returns the ConfigDict of a named student encoder (EVA-01 or EVA-02)."""
  if name in _EVA01:
    cfg = _base(*_EVA01[name])
  elif name in _EVA02:
    cfg = _base(*_EVA02[name])
    cfg.swiglu = cfg.rope = True
    # Official EVA-02 MIM (and timm eva02_*_patch14): B/L use sub-LN as the MLP's ffn_ln only (no
    # attention LN, which is the EVA-CLIP variant); Ti/S have no sub-LN at all.
    cfg.sub_ln = name not in ('eva02-tiny', 'eva02-Ti/14', 'eva02-S/14')
    cfg.sub_ln_attn = False
    cfg.init = 'eva02'
    cfg.rope_ref_grid = 16
  else:
    raise ValueError(f'Unknown encoder name {name!r} (config.model.name). Known: '
                     f'{", ".join(ENCODER_NAMES)}; change single fields with '
                     '--config.model.<field>=... on top of a known name.')
  cfg.name = name
  return cfg


def teacher_config(name: str) -> ml_collections.ConfigDict:
  """Returns the ConfigDict of a named CLIP vision tower (the frozen teacher)."""
  if name not in _CLIP:
    raise ValueError(f'Unknown teacher name {name!r}. Known: {", ".join(TEACHER_NAMES)}.')
  width, depth, heads, mlp_dim, patch, out_dim = _CLIP[name]
  cfg = _base(width, depth, heads, mlp_dim, patch)
  cfg.name = name
  cfg.attn_bias = 'qkv'
  cfg.act = 'quick_gelu'
  cfg.ln_eps = 1e-5
  cfg.ln_pre = True
  cfg.mask_token = False
  cfg.final_norm = False     # CLIP's ln_post applies to the patch tokens that become targets
  cfg.patch_bias = False
  cfg.out_dim = out_dim
  cfg.init = 'clip'
  return cfg


# Encoder fields the run decides, not the architecture: config.model may not set them.
RUN_OWNED = {'image_size': 'config.image_size', 'dtype': 'config.precision'}


def model_section(name: str = 'tiny', **overrides) -> ml_collections.ConfigDict:
  """`config.model`: an architecture name plus the user's explicit overrides, nothing else.

  Every other encoder field is a typed placeholder (None until set), so any of them can be set from
  the command line (`--config.model.drop_path=0.2`) while the named architecture stays the source
  of the rest: `--config.model.name=eva02-B/14` on any recipe gives EVA-02 B/14. Resolve with
  `resolve_encoder`. Raises ValueError for an unknown name or field.
  """
  template = encoder_config(name)
  unknown = sorted(set(overrides) - set(template))
  if unknown:
    raise ValueError(f'config.model.{unknown[0]} is not an encoder field. Known: '
                     f'{", ".join(sorted(k for k in template if k != "name"))}.')
  section = ml_collections.ConfigDict({'name': name})
  for k, v in template.items():
    if k != 'name':
      section[k] = config_dict.placeholder(type(v))
  for k, v in overrides.items():
    if v is not None:
      section[k] = v
  return section


def model_overrides(section) -> dict:
  """The fields of a `config.model` section that are set (name included), as a plain dict."""
  return {k: v for k, v in section.items() if v is not None}


def resolve_encoder(section, *, image_size: int, dtype: str) -> ml_collections.ConfigDict:
  """The full encoder ConfigDict: the named architecture, then the overrides set in `section`,
  then the fields the run owns (image size, compute dtype). Raises ValueError naming the field
  for an unknown name or field, a run-owned field set in config.model, or an invalid result."""
  name = section.get('name') or 'tiny'
  enc = encoder_config(name)
  for k, v in section.items():
    if k == 'name' or v is None:
      continue
    if k in RUN_OWNED:
      raise ValueError(f'config.model.{k} is set by the run, not the architecture: use '
                       f'--{RUN_OWNED[k]}=... instead (and leave config.model.{k} unset).')
    if k not in enc:
      raise ValueError(f'config.model.{k} is not an encoder field. Known: '
                       f'{", ".join(sorted(f for f in enc if f != "name"))}.')
    enc[k] = v
  enc.image_size = int(image_size)
  enc.dtype = dtype
  validate(enc)
  return enc


# The range of every numeric encoder field (eva_jax/ranges.py); tests/test_robust_config.py checks
# that each numeric field of every named architecture has one, so a new field cannot slip through.
MODEL_RULES = {
    'width': ranges.count(1), 'depth': ranges.count(1), 'heads': ranges.count(1),
    'mlp_dim': ranges.count(1), 'patch_size': ranges.count(1), 'image_size': ranges.count(1),
    'in_chans': ranges.count(1),
    'out_dim': ranges.count(0, why='0 = no CLIP projection'),
    'ln_eps': ranges.Range(0.0, 1.0, lo_open=True, hi_open=True),
    'rope_theta': ranges.positive(),
    'rope_ref_grid': ranges.count(0, why='0 = the own grid'),
    'init_std': ranges.Range(0.0, 1.0, lo_open=True),
    'drop_path': ranges.fraction(hi_open=True, why='1 would drop every block'),
    'scan_unroll': ranges.count(1),
}


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the bad field before anything is built or compiled."""
  for f, rule in MODEL_RULES.items():
    if f in cfg:
      rule.check(f'model.{f}', cfg[f])
  if cfg.width % cfg.heads:
    raise ValueError(f'model.width={cfg.width} is not divisible by model.heads={cfg.heads}.')
  if cfg.image_size % cfg.patch_size:
    raise ValueError(f'model.image_size={cfg.image_size} is not a multiple of '
                     f'model.patch_size={cfg.patch_size}.')
  if cfg.attn_bias not in ('qv', 'qkv', 'none'):
    raise ValueError(f"model.attn_bias must be 'qv', 'qkv' or 'none', got {cfg.attn_bias!r}.")
  if cfg.act not in ('gelu', 'quick_gelu'):
    raise ValueError(f"model.act must be 'gelu' or 'quick_gelu', got {cfg.act!r}.")
  if cfg.dtype not in ('float32', 'bfloat16', 'float16'):
    raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}.")
  if cfg.rope and (cfg.width // cfg.heads) % 4:
    raise ValueError('model.rope needs a head dim divisible by 4 '
                     f'(got {cfg.width // cfg.heads}).')
