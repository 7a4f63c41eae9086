"""Named encoder and teacher architectures as ml_collections ConfigDicts.

One ConfigDict describes a whole transformer family member (timm eva.py style): EVA-01 is the
default, EVA-02 is EVA-01 plus three switches (`swiglu`, `sub_ln`, `rope`). The same fields plus a
few teacher-only ones describe the frozen teacher towers of every family (CLIP, EVA-CLIP, SigLIP,
DINOv2; see `teacher_config`).
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

# Teacher towers by family. Targets (vit.VisionTransformer.targets): the patch tokens after the
# tower's final norm, then its projection where it has one. Sources per family in docs/teachers.md.
FAMILIES = ('clip', 'eva_clip', 'siglip', 'dinov2')

# CLIP vision towers usable as teachers: name -> (width, depth, heads, mlp_dim, patch, out_dim)
_CLIP = {
    'clip-tiny': (64, 2, 4, 256, 14, 48),
    'clip-S/14': (384, 6, 6, 1536, 14, 384),
    'clip-B/16': (768, 12, 12, 3072, 16, 512),
    'clip-B/32': (768, 12, 12, 3072, 32, 512),
    'clip-L/14': (1024, 24, 16, 4096, 14, 768),   # the paper's teacher (OpenAI ViT-L/14 @224)
}

# EVA-CLIP vision towers: name -> (width, depth, heads, mlp_dim, patch, out_dim, style), style
# 'eva01' (GELU MLP, fused qkv with q/v bias), 'eva02' (SwiGLU, sub-LN incl. the attention LN,
# 2D RoPE on a 16x16 reference grid, separate q/k/v) or 'eva02-post' (EVA-01 block with residual
# post-norm: EVA02-CLIP-E). Official EVA-CLIP configs (baaivision/EVA EVA-CLIP model_configs) and
# timm eva_giant_patch14_clip_224 / eva02_{base_patch16,large_patch14,enormous_patch14}_clip_224.
# 'rms' / 'rms-post': EVA-CLIP-8B / -18B (EVA-CLIP-18B/shinji/eva_clip/model_configs/EVA-CLIP-8B.json,
# EVA-CLIP-18B.json; eva_vit_model.py): RMSNorm everywhere (use_rms_norm), no q/v bias and no head
# bias (qkv_bias false; the head's bias follows qkv_bias), GELU MLP of ratio 5, head width 128,
# no RoPE; 18B with residual post-norm. The 448 px EVA-CLIP-8B-plus has the 8B architecture.
_EVA_CLIP = {
    'eva01-clip-tiny': (64, 2, 4, 256, 14, 48, 'eva01'),
    'eva02-clip-tiny': (64, 2, 4, int(64 * 4 * 2 / 3), 14, 48, 'eva02'),
    'eva02-clip-tiny-post': (64, 2, 4, 256, 14, 48, 'eva02-post'),
    # EVA01-CLIP-g/14 (EVA_CLIP_g_14_X, EVA-02's teacher): head width 88, MLP 6144, head 1408 -> 1024
    'eva01-clip-g/14': (1408, 40, 16, 6144, 14, 1024, 'eva01'),
    'eva02-clip-B/16': (768, 12, 12, int(768 * 4 * 2 / 3), 16, 512, 'eva02'),
    'eva02-clip-L/14': (1024, 24, 16, int(1024 * 4 * 2 / 3), 14, 768, 'eva02'),
    'eva02-clip-E/14': (1792, 64, 16, 15360, 14, 1024, 'eva02-post'),
    'eva-clip-8b-tiny': (64, 2, 4, 320, 14, 48, 'rms'),
    'eva-clip-18b-tiny': (64, 2, 4, 320, 14, 48, 'rms-post'),
    'eva-clip-8b/14': (4096, 32, 32, 20480, 14, 1280, 'rms'),
    'eva-clip-18b/14': (5120, 48, 40, 25600, 14, 1536, 'rms-post'),
}

# SigLIP / SigLIP2 (fixed resolution) vision towers: name -> (width, depth, heads, mlp, patch, image).
# transformers SiglipVisionConfig sizes; targets = post_layernorm(tokens), no projection (the MAP
# head pools one vector per image and takes no part in per-patch targets).
_SIGLIP = {
    'siglip-tiny': (64, 2, 4, 256, 14, 56),
    'siglip-B/16': (768, 12, 12, 3072, 16, 224),
    'siglip-L/16': (1024, 24, 16, 4096, 16, 256),
    'siglip-So400m/14': (1152, 27, 16, 4304, 14, 224),
}

# DINOv2 backbones: name -> (width, depth, heads, mlp, patch, registers, swiglu); image 518 (37x37,
# the released models' pos-embed), layer scale, LayerNorm eps 1e-6, exact GELU (g: SwiGLU).
_DINOV2 = {
    'dinov2-tiny': (64, 2, 4, 256, 14, 0, False),
    'dinov2-tiny-reg': (64, 2, 4, 256, 14, 4, False),
    'dinov2-S/14': (384, 12, 6, 1536, 14, 0, False),
    'dinov2-B/14': (768, 12, 12, 3072, 14, 0, False),
    'dinov2-L/14': (1024, 24, 16, 4096, 14, 0, False),
    'dinov2-g/14': (1536, 40, 24, 4096, 14, 0, True),
    'dinov2-S/14-reg': (384, 12, 6, 1536, 14, 4, False),
    'dinov2-B/14-reg': (768, 12, 12, 3072, 14, 4, False),
    'dinov2-L/14-reg': (1024, 24, 16, 4096, 14, 4, False),
    'dinov2-g/14-reg': (1536, 40, 24, 4096, 14, 4, True),
}

TEACHER_NAMES = tuple(_CLIP) + tuple(_EVA_CLIP) + tuple(_SIGLIP) + tuple(_DINOV2)
ENCODER_NAMES = tuple(_EVA01) + tuple(_EVA02)


def teacher_family(name: str) -> str:
  """The family of a teacher preset name; ValueError for an unknown name."""
  for family, table in (('clip', _CLIP), ('eva_clip', _EVA_CLIP), ('siglip', _SIGLIP),
                        ('dinov2', _DINOV2)):
    if name in table:
      return family
  raise ValueError(f'Unknown teacher name {name!r} (config.teacher.name / config.teacher.arch). '
                   f'Known: {", ".join(TEACHER_NAMES)}.')


def teacher_names(family: str) -> tuple[str, ...]:
  if family not in FAMILIES:
    raise ValueError(f'config.teacher.family must be one of {", ".join(FAMILIES)}; got {family!r}.')
  return tuple(n for n in TEACHER_NAMES if teacher_family(n) == family)


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
      # Official EVA-02 pretraining's --stop_grad_conv1: the patch embedding's gradient is scaled
      # by 0.1 (forward unchanged); EVA-02 pretraining configs turn it on.
      stop_grad_conv1=False,
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


def _teacher_fields(cfg, family: str) -> None:
  """The teacher-only fields (vit.py reads them with cfg.get; students never carry them)."""
  cfg.family = family
  cfg.mask_token = False
  cfg.ln_post = False        # CLIP's LayerNorm on the patch tokens before the projection
  cfg.proj = True            # a projection to out_dim (else out_dim = width, the tokens themselves)
  cfg.proj_bias = False      # EVA-CLIP's `head` has a bias, CLIP's `proj` none
  cfg.layer_scale = False    # DINOv2
  cfg.post_norm = False      # EVA02-CLIP-E: residual post-norm blocks
  cfg.registers = 0          # DINOv2 with registers
  cfg.pos_interp = 'bicubic'  # pos-embed resize at other grids: 'bicubic' | 'bicubic_aa'
  cfg.norm = 'layernorm'     # every norm of the tower: 'layernorm' | 'rmsnorm' (EVA-CLIP-8B/-18B)


def teacher_config(name: str) -> ml_collections.ConfigDict:
  """Returns the ConfigDict of a named teacher tower (see TEACHER_NAMES and FAMILIES)."""
  family = teacher_family(name)
  if family == 'clip':
    width, depth, heads, mlp_dim, patch, out_dim = _CLIP[name]
    cfg = _base(width, depth, heads, mlp_dim, patch)
    _teacher_fields(cfg, family)
    cfg.attn_bias = 'qkv'
    cfg.act = 'quick_gelu'
    cfg.ln_eps = 1e-5
    cfg.ln_pre = True
    cfg.final_norm = False     # CLIP's ln_post applies to the patch tokens that become targets
    cfg.ln_post = True
    cfg.patch_bias = False
    cfg.out_dim = out_dim
    cfg.init = 'clip'
  elif family == 'eva_clip':
    width, depth, heads, mlp_dim, patch, out_dim, style = _EVA_CLIP[name]
    cfg = _base(width, depth, heads, mlp_dim, patch)
    _teacher_fields(cfg, family)
    cfg.proj_bias = True       # timm Eva / official EVA-CLIP `head`: Linear with bias
    cfg.out_dim = out_dim
    if style == 'eva02':
      cfg.swiglu = cfg.sub_ln = cfg.sub_ln_attn = cfg.rope = True
      cfg.rope_ref_grid = 16
      cfg.init = 'eva02'
    cfg.post_norm = style in ('eva02-post', 'rms-post')
    if style.startswith('rms'):
      cfg.norm, cfg.attn_bias, cfg.proj_bias = 'rmsnorm', 'none', False
  elif family == 'siglip':
    width, depth, heads, mlp_dim, patch, image = _SIGLIP[name]
    cfg = _base(width, depth, heads, mlp_dim, patch)
    _teacher_fields(cfg, family)
    cfg.image_size = image
    cfg.class_token = False
    cfg.attn_bias = 'qkv'
    cfg.act = 'gelu_tanh'
    cfg.out_dim, cfg.proj = width, False
    cfg.init = 'clip'
  else:
    width, depth, heads, mlp_dim, patch, registers, swiglu = _DINOV2[name]
    cfg = _base(width, depth, heads, mlp_dim, patch)
    _teacher_fields(cfg, family)
    cfg.image_size = 518 if name not in ('dinov2-tiny', 'dinov2-tiny-reg') else 56
    cfg.attn_bias = 'qkv'
    cfg.swiglu = swiglu
    cfg.layer_scale = True
    cfg.registers = registers
    cfg.pos_interp = 'bicubic_aa' if registers else 'bicubic'   # as transformers does
    cfg.out_dim, cfg.proj = width, False
    cfg.init = 'clip'
  cfg.name = name
  validate(cfg)
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
  set_run_image_size(enc, image_size)
  enc.dtype = dtype
  validate(enc)
  return enc


def set_run_image_size(enc: ml_collections.ConfigDict, image_size: int) -> None:
  """enc.image_size = image_size, the run's config.image_size. Raises ValueError naming
  config.image_size (what the user set, not the resolved model.image_size) and the nearest valid
  sizes when it is no multiple of enc.patch_size."""
  enc.image_size = int(image_size)
  p = int(enc.patch_size)
  if p > 0 and enc.image_size % p:
    near = sorted({max(p, enc.image_size // p * p), (enc.image_size // p + 1) * p})
    raise ValueError(f'{RUN_OWNED["image_size"]}={image_size} is not a multiple of the patch size '
                     f'{p} (model {enc.get("name")!r}); nearest: {" or ".join(map(str, near))}.')


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
    'registers': ranges.count(0, why='DINOv2 register tokens; 0 = none'),
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
  if cfg.act not in ('gelu', 'quick_gelu', 'gelu_tanh'):
    raise ValueError(f"model.act must be 'gelu', 'quick_gelu' or 'gelu_tanh', got {cfg.act!r}.")
  if cfg.get('norm', 'layernorm') not in ('layernorm', 'rmsnorm'):
    raise ValueError(f"model.norm must be 'layernorm' or 'rmsnorm', got {cfg.norm!r}.")
  if cfg.get('pos_interp', 'bicubic') not in ('bicubic', 'bicubic_aa'):
    raise ValueError("model.pos_interp must be 'bicubic' or 'bicubic_aa', got "
                     f'{cfg.pos_interp!r}.')
  if int(cfg.get('registers', 0)) < 0:
    raise ValueError(f'model.registers must be >= 0, got {cfg.registers}.')
  if cfg.get('family', '') and cfg.family not in FAMILIES:
    raise ValueError(f'teacher family must be one of {", ".join(FAMILIES)}, got {cfg.family!r}.')
  if cfg.dtype not in ('float32', 'bfloat16', 'float16'):
    raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}.")
  if cfg.rope and (cfg.width // cfg.heads) % 4:
    raise ValueError('model.rope needs a head dim divisible by 4 '
                     f'(got {cfg.width // cfg.heads}).')
