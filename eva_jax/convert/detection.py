"""EVA encoder -> the official EVA detection backbones' state dicts (detectron2 ViTDet names).

The EVA-01 and EVA-02 detection code (baaivision/EVA EVA-0{1,2}/det, detectron2
modeling/backbone/vit.py `ViT` inside `SimpleFeaturePyramid`, so model keys are
`backbone.net.<name>`):
- both: `patch_embed.proj.{weight,bias}`, `pos_embed` [1, 1+N, D] at the pretraining grid with the
  cls row (pretrain_use_cls_token=True; the backbone drops it and resizes the rest bicubically),
  `blocks.{i}.norm1/norm2.{weight,bias}`, `blocks.{i}.attn.proj.{weight,bias}`, `attn.{q,v}_bias`;
- EVA-01 (beit_like_qkv_bias=True): fused `attn.qkv.weight`, GELU MLP `mlp.fc1/fc2`;
- EVA-02 (SwiGLU with sub-LN, RoPE): `attn.{q,k,v}_proj.weight`, `mlp.w1/w2/ffn_ln/w3`, and the RoPE
  buffers `rope_win.freqs_{cos,sin}` [ws*ws, head_dim], `rope_glb.freqs_{cos,sin}` [g*g, head_dim]
  plus each block's shared copy `blocks.{i}.attn.rope.freqs_*` (derived; written for the
  configured size so a strict load works, recomputed by the module anyway).
Not written: cls_token / mask_token / the final norm / lm_head (the det backbone has none), the
pyramid (trained from scratch in detectron2), EVA-01's relative-position tables (build it with
use_rel_pos=False to keep the pretrained function; see docs/detection.md).
"""
from __future__ import annotations

import numpy as np

from eva_jax.convert import eva_torch

PREFIX = 'backbone.net.'


def family(cfg) -> str:
  """'eva01' or 'eva02' detection backbone for an encoder config; ValueError naming the fields
  when the official det ViTs cannot hold it (EVA-02's det Block is SwiGLU + sub-LN + RoPE, without
  the attention sub-LN; EVA-01's is GELU + fused qkv, no RoPE)."""
  if cfg.attn_bias != 'qv' or cfg.ln_eps != 1e-6 or not cfg.patch_bias:
    raise ValueError(f'the official det ViTs have q/v biases and LayerNorm eps 1e-6; this encoder '
                     f'has attn_bias={cfg.attn_bias!r}, ln_eps={cfg.ln_eps}.')
  if cfg.swiglu and cfg.sub_ln and cfg.rope and not cfg.get('sub_ln_attn', True):
    if not cfg.rope_ref_grid:
      raise ValueError('EVA-02 det RoPE rescales coordinates to pt_hw_seq_len; this encoder has '
                       'rope_ref_grid=0 (set the grid its RoPE was pretrained on, 16 for 224/14).')
    return 'eva02'
  if not (cfg.swiglu or cfg.sub_ln or cfg.rope):
    return 'eva01'
  raise ValueError(
      'no official EVA detection backbone has this block: EVA-02 det needs swiglu, sub_ln and rope '
      'True and sub_ln_attn False (official EVA-02 B/L MIM), EVA-01 det needs all four False; got '
      f'swiglu={cfg.swiglu}, sub_ln={cfg.sub_ln}, sub_ln_attn={cfg.get("sub_ln_attn", True)}, '
      f'rope={cfg.rope}.')


def net_kwargs(cfg, *, image_size: int, window_size: int, global_blocks) -> dict:
  """`model.backbone.net.*` of the detectron2 LazyConfig (EVA-0x det `ViT(...)` arguments)."""
  fam = family(cfg)
  glb = sorted(int(i) % cfg.depth for i in global_blocks)
  kw = dict(img_size=image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
            num_heads=cfg.heads, mlp_ratio=eva_torch._mlp_ratio(cfg.width, cfg.mlp_dim),
            qkv_bias=True, window_size=window_size,
            window_block_indexes=[i for i in range(cfg.depth) if i not in glb],
            use_abs_pos=True, pretrain_img_size=cfg.image_size,
            pretrain_use_cls_token=bool(cfg.class_token), residual_block_indexes=[])
  if fam == 'eva02':
    kw.update(rope=True, pt_hw_seq_len=int(cfg.rope_ref_grid), intp_freq=True)
  else:
    kw.update(beit_like_qkv_bias=True, beit_like_gamma=False, use_rel_pos=False)
  return kw


def to_detectron2_state_dict(params_flat, cfg, *, image_size: int, window_size: int,
                             prefix: str = PREFIX) -> tuple[dict, list[str], dict]:
  """(state dict of numpy arrays with official EVA det names under `prefix`, names dropped,
  EVA-02 RoPE tables {'rope_win' | 'rope_glb': (sin, cos)}; empty for EVA-01).

  params_flat: our encoder (or MIM / classifier) flat params. image_size / window_size: the
  detection input size and window (they size the EVA-02 RoPE buffers). Raises ValueError for an
  encoder no official det backbone holds (see `family`)."""
  from eva_jax.models.layers import rope_sincos
  fam = family(cfg)
  enc, _ = eva_torch._split_params(params_flat)
  sd = eva_torch.to_torch_state_dict(enc, cfg, 'eva')
  drop = ('cls_token', 'mask_token', 'norm.weight', 'norm.bias')
  out = {prefix + k: v for k, v in sd.items() if k not in drop}
  dropped = sorted(k for k in sd if k in drop)
  if fam == 'eva02':
    hd = cfg.width // cfg.heads
    g = image_size // cfg.patch_size
    tables = {}
    for name, grid in (('rope_win', (window_size, window_size)), ('rope_glb', (g, g))):
      sin, cos = rope_sincos(grid, hd, cfg.rope_theta, cfg.rope_ref_grid)
      tables[name] = (sin, cos)
      out[f'{prefix}{name}.freqs_cos'], out[f'{prefix}{name}.freqs_sin'] = cos, sin
    return out, dropped, tables
  return out, dropped, {}


def blocks_rope_buffers(tables: dict, depth: int, global_blocks, prefix: str = PREFIX) -> dict:
  """The per-block copies of the shared RoPE buffers (`blocks.{i}.attn.rope.freqs_*`)."""
  glb = {int(i) % depth for i in global_blocks}
  out = {}
  for i in range(depth):
    sin, cos = tables['rope_glb' if i in glb else 'rope_win']
    out[f'{prefix}blocks.{i}.attn.rope.freqs_cos'] = cos
    out[f'{prefix}blocks.{i}.attn.rope.freqs_sin'] = sin
  return out


def export_state_dict(params_flat, cfg, *, image_size: int, window_size: int, global_blocks,
                      prefix: str = PREFIX) -> tuple[dict[str, np.ndarray], dict, list[str]]:
  """(state dict, net kwargs, dropped names): everything eva_jax.convert.export writes for
  --format=detectron2. Raises ValueError for a global block index out of range (naming the valid
  range) or an image size that is not a multiple of the patch size."""
  from eva_jax.models.vit import take_indices
  if image_size % cfg.patch_size:
    lo = max(cfg.patch_size, image_size // cfg.patch_size * cfg.patch_size)
    raise ValueError(f'detection image size {image_size} is not a multiple of the patch size '
                     f'{cfg.patch_size}; use {lo} or {lo + cfg.patch_size}.')
  try:
    take_indices(cfg.depth, list(global_blocks))
  except ValueError as e:
    raise ValueError(f'global_blocks={tuple(global_blocks)}: {e}') from None
  sd, dropped, tables = to_detectron2_state_dict(params_flat, cfg, image_size=image_size,
                                                 window_size=window_size, prefix=prefix)
  if tables:
    sd.update(blocks_rope_buffers(tables, cfg.depth, global_blocks, prefix))
  kw = net_kwargs(cfg, image_size=image_size, window_size=window_size, global_blocks=global_blocks)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}, kw, dropped
