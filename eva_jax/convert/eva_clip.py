"""Import an EVA-CLIP vision tower (EVA-02's teacher) into eva_jax's VisionTransformer.

An EVA-CLIP vision tower is an EVA encoder (EVA-01 or EVA-02 style) with its final `norm` on all
tokens and a linear `head` (with bias) to the CLIP embedding. EVA-02's MIM target
(EVA-SPEC "EVA-02 teacher") is `head(norm(tokens))[:, 1:]`, which is what
`VisionTransformer.targets()` computes for these towers (norm is per token, so dropping cls first
gives the same numbers).

Layouts (detected from the key names; the state dict may be wrapped as {'state_dict': ...},
{'model': ...}, {'module': ...}, with 'module.' prefixes):
- official EVA-CLIP (baaivision/EVA, EVA-CLIP/rei `eva_vit_model.EVAVisionTransformer`), a whole
  CLIP: `visual.{patch_embed.proj, cls_token, pos_embed, blocks.{i}.*, norm, head}` with EVA block
  names (`attn.qkv` + `q_bias`/`v_bias`, or EVA-02's `attn.{q,k,v}_proj` + `q_bias`/`v_bias`,
  `attn.inner_attn_ln`, `mlp.{w1,w2,w3,ffn_ln}`), `visual.rope.freqs_{cos,sin}` for EVA-02 towers,
  text tower under `text.*` plus `logit_scale`: EVA01-CLIP-g/14 (EVA_CLIP_g_14_X), EVA02-CLIP-B/16,
  -L/14, -E/14 (post-norm), EVA-CLIP-8B / -8B-448 / -18B (`EVA_CLIP_8B_psz14_s9B.pt`,
  `EVA_CLIP_18B_psz14_s6B.fp16.pt`; EVA-CLIP-18B/shinji: RMSNorm with `weight` only, fused
  `attn.qkv` without q/v bias, GELU `mlp.fc1/fc2`, `head` without bias, 18B post-norm);
- open_clip's EVA models (EVA01-g-14, EVA02-B-16, EVA02-L-14, EVA02-E-14; a timm trunk):
  `visual.trunk.*` with timm names, `visual.trunk.head` = the projection;
- timm `eva_giant_patch14_clip_224`, `eva02_{base_patch16,large_patch14,enormous_patch14}_clip_224`
  built with num_classes = the CLIP embedding dim (timm names at the top level, `head.*`).
Everything outside the vision tower (text tower, logit_scale) is counted, ignored and logged.

The shapes give width, depth, MLP width and kind (GELU / SwiGLU, sub-LN), patch, grid, q/k/v
biases, the head's bias and the output dim. The norm kind comes from the key layout: norms with
`weight` and no `bias` are the official RMSnorm (EVA-CLIP-8B/-18B `use_rms_norm`, the only
bias-free norm of the EVA-CLIP code); a file mixing both is refused. Not in the shapes, never guessed (issue 12 kind A): the head count,
RoPE (on/off, theta, reference grid), residual post-norm (EVA02-CLIP-E) and the LayerNorm eps.
Each comes from, in this order:
  1. what the file records: the official RoPE buffer `visual.rope.freqs_cos` (head dim, RoPE on,
     theta and reference grid, verified against the table they imply); an `open_clip_config.json`
     next to the weights naming the timm trunk (`vision_cfg.timm_model_name`: the timm model
     definition fixes every fact, table `TIMM_TRUNKS`); the timm kwargs json eva_jax.export writes;
  2. a named architecture, config.teacher.arch (`eva01-clip-g/14`, `eva02-clip-L/14`, ...: the
     shapes are checked against it, its facts used), and explicit values (config.teacher.heads,
     facts=); all must agree with the record;
  3. otherwise the import is refused naming config.teacher.arch / config.teacher.heads.
The eps alone falls back to 1e-6 (every timm Eva and official EVA-CLIP model), logged.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Iterator, Mapping

import ml_collections

from eva_jax.convert import common, eva_torch
from eva_jax.convert.common import CheckpointError
from eva_jax.models import config as config_lib

__all__ = ['load_eva_clip_vision', 'TIMM_TRUNKS', 'FACTS']

FACTS = ('heads', 'rope', 'rope_theta', 'rope_ref_grid', 'post_norm', 'ln_eps')

_ROPE16 = dict(rope=True, rope_theta=10000.0, rope_ref_grid=16)
_NO_ROPE = dict(rope=False)
# timm model definitions (timm/models/eva.py) of the trunks open_clip's EVA configs name: the name
# fixes the facts the weights do not hold (as a transformers config.json would).
TIMM_TRUNKS = {
    'eva_giant_patch14_224': dict(heads=16, post_norm=False, **_NO_ROPE),
    'eva_giant_patch14_clip_224': dict(heads=16, post_norm=False, **_NO_ROPE),
    'eva_giant_patch14_336': dict(heads=16, post_norm=False, **_NO_ROPE),
    'eva02_base_patch16_clip_224': dict(heads=12, post_norm=False, **_ROPE16),
    'eva02_large_patch14_clip_224': dict(heads=16, post_norm=False, **_ROPE16),
    'eva02_large_patch14_clip_336': dict(heads=16, post_norm=False, **_ROPE16),
    'eva02_enormous_patch14_clip_224': dict(heads=16, post_norm=True, **_NO_ROPE),
}
_LAYOUTS = (('visual.trunk.', 'open_clip'), ('visual.', 'official EVA-CLIP'), ('', 'timm'))
_HEAD = ('head.weight', 'head.bias')
_NORM_BIAS = re.compile(r'(^|\.)(norm|norm1|norm2|attn\.norm|mlp\.norm)\.bias$')


class _TowerSource(common.TensorSource):
  """The vision tower's keys of a TensorSource, prefix stripped (a TensorSource itself, so shapes
  are read without loading and eva_torch finds the file's records)."""

  def __init__(self, src: common.TensorSource, prefix: str):  # pylint: disable=super-init-not-called
    self._parent = src
    self.path, self._files, self.script_modules = src.path, src._files, {}
    self._map = {k[len(prefix):]: k for k in src if k.startswith(prefix)}

  def __getitem__(self, key):
    return self._parent[self._map[key]]

  def shape(self, key):
    return self._parent.shape(self._map[key])

  def __contains__(self, key):
    return key in self._map

  def __iter__(self) -> Iterator[str]:
    return iter(self._map)

  def __len__(self):
    return len(self._map)


def detect_layout(keys) -> tuple[str, str]:
  """(prefix, layout name) of an EVA-CLIP tower checkpoint; CheckpointError when it is none."""
  keys = set(keys)
  for prefix, name in _LAYOUTS:
    if prefix + 'patch_embed.proj.weight' in keys and prefix + 'head.weight' in keys:
      return prefix, name
  for prefix, name in _LAYOUTS:
    if prefix + 'patch_embed.proj.weight' in keys:
      raise CheckpointError(
          f'An EVA encoder ({name} layout) without the CLIP projection: missing key '
          f'{prefix}head.weight. EVA-CLIP targets are head(norm(tokens)); an EVA MIM or '
          'fine-tuned encoder is no EVA-CLIP tower (load encoders with eva_jax.load_encoder).')
  sample = ', '.join(sorted(keys)[:12])
  hint = ''
  if any(k.startswith(('vision_model.', 'visual.conv1.', 'conv1.', 'visual.transformer.'))
         for k in keys):
    hint = ('\nIt looks like an OpenAI / open_clip / transformers CLIP tower: use '
            "config.teacher.family='clip'.")
  raise CheckpointError(
      'Not an EVA-CLIP vision tower: missing keys visual.patch_embed.proj.weight + visual.head.weight '
      '(official EVA-CLIP), visual.trunk.patch_embed.proj.weight + visual.trunk.head.weight '
      '(open_clip EVA) or patch_embed.proj.weight + head.weight (timm *_clip_224).\n'
      f'Keys ({len(keys)}): {sample}' + (' ...' if len(keys) > 12 else '') + hint)


def _open_clip_trunk(path: str) -> tuple[str, str] | None:
  """(timm trunk name, file) from an open_clip_config.json next to the weights, or None."""
  f = common.beside(path, 'open_clip_config.json')
  c = common.read_json_record(f)
  if c is None:
    return None
  c = c.get('model_cfg', c) if isinstance(c, dict) else {}
  name = (c.get('vision_cfg') or {}).get('timm_model_name') if isinstance(c, dict) else None
  if not name:
    raise CheckpointError(f'{f} names no vision_cfg.timm_model_name; an open_clip EVA model names '
                          'its timm trunk there. Fix or remove it.')
  return name, f


def _arch_facts(arch: str, sizes: dict, what: str) -> dict:
  """Facts of the named architecture config.teacher.arch, after checking the file has its shapes."""
  try:
    ref = config_lib.teacher_config(arch)
  except ValueError as e:
    raise ValueError(f'config.teacher.arch: {e}') from None
  if ref.family != 'eva_clip':
    raise ValueError(f'config.teacher.arch={arch!r} is a {ref.family!r} tower, not eva_clip; '
                     f'EVA-CLIP architectures: {", ".join(config_lib.teacher_names("eva_clip"))}.')
  bad = [f'{k}: file {sizes[k]} vs {arch} {ref[k]}' for k in sizes if ref[k] != sizes[k]]
  if bad:
    raise CheckpointError(f'{what} is not a {arch} tower: ' + '; '.join(bad)
                          + '. Set config.teacher.arch to the checkpoint\'s architecture.')
  return {k: ref[k] for k in FACTS}


def _resolve(recorded: dict, arch: dict, given: dict, arch_name: str, what: str) -> dict:
  """FACTS -> (value, source); a disagreement between any two sources raises CheckpointError."""
  out = {}
  missing = []
  for f in FACTS:
    if f in ('rope_theta', 'rope_ref_grid') and not (out.get('rope') or (True,))[0]:
      out[f] = (1e4 if f == 'rope_theta' else 0, 'unused without RoPE')
      continue
    cands = []
    if f in recorded:
      cands.append(recorded[f])
    if f in arch:
      cands.append((arch[f], f'config.teacher.arch={arch_name!r}'))
    if given.get(f) is not None:
      cands.append((given[f], f'config.teacher.{f}' if f == 'heads' else f'the explicit {f}'))
    if not cands:
      if f == 'ln_eps':
        out[f] = (1e-6, 'not recorded in the file: 1e-6, the eps of every timm Eva and official '
                  'EVA-CLIP tower')
        continue
      missing.append(f)
      continue
    v0, s0 = cands[0]
    for v, s in cands[1:]:
      if v != v0 and not (isinstance(v, float) and abs(v - v0) <= 1e-9 * abs(v)):
        raise CheckpointError(f'{what}: {s} says {f}={v!r} but {s0} says {v0!r}. Fix the config '
                              '(or the file).')
    out[f] = (v0, s0 if len(cands) == 1 else f'{s0} (agrees with {", ".join(s for _, s in cands[1:])})')
  if 'rope' in missing:   # theta / reference grid are asked for only once RoPE is known to be on
    missing = [m for m in missing if m not in ('rope_theta', 'rope_ref_grid')]
  if missing:
    names = ', '.join(config_lib.teacher_names('eva_clip'))
    raise CheckpointError(
        f'{what} does not record {", ".join(missing)}; eva_jax will not guess '
        f'{"them" if len(missing) > 1 else "it"}. Set config.teacher.arch (load_teacher(arch=...)) '
        f'to the tower\'s architecture, one of: {names}; or give the facts explicitly '
        '(config.teacher.heads / load_teacher(heads=..., facts={'
        + ', '.join(f"'{m}': ..." for m in missing if m != 'heads') + '})). '
        'EVA01-CLIP-g/14: heads 16, no RoPE, no post-norm; EVA02-CLIP-B/16 / -L/14: heads 12 / 16, '
        'RoPE theta 10000 on a 16x16 reference grid; EVA02-CLIP-E/14: heads 16, no RoPE, post-norm; '
        'EVA-CLIP-8B / -18B: heads 32 / 40 (head width 128), no RoPE, post-norm only in 18B. '
        'Or keep the record next to the weights: an open_clip_config.json naming the timm trunk.')
  return out


def load_eva_clip_vision(path: str | os.PathLike, *, dtype: str = 'float32',
                         heads: int | None = None, arch: str | None = None,
                         facts: Mapping | None = None, weights: str = 'auto'):
  """The EVA-CLIP vision tower at `path` as a VisionTransformer (family 'eva_clip').

  arch:  a named EVA-CLIP architecture (config.teacher.arch; models/config.py TEACHER_NAMES) whose
         shapes the file must have and whose facts (heads, RoPE, post-norm, eps) are used.
  heads, facts: explicit facts (FACTS); '' / 0 / None mean "not given".
  Raises FileNotFoundError, CheckpointError (not an EVA-CLIP tower, bad keys, facts neither
  recorded nor given, or sources that disagree) or ValueError (bad arch / facts values).
  """
  path = os.fspath(path)
  given = dict(facts or {})
  unknown = sorted(set(given) - set(FACTS))
  if unknown:
    raise ValueError(f'facts has unknown fields {unknown}; known: {FACTS}.')
  if heads:
    given['heads'] = int(heads)
  given = {k: v for k, v in given.items() if v is not None and v != ''}
  what = f'EVA-CLIP checkpoint {path!r}'
  raw = common.TensorSource(path, weights)
  prefix, layout = detect_layout(raw.keys())
  src = _TowerSource(raw, prefix)
  others = len(raw) - len(src)
  keys = list(src)
  rope_keys = [k for k in keys if eva_torch._is_rope_buffer(k)]
  canon = eva_torch._canonical_names(k for k in keys if k not in _HEAD and k not in rope_keys)
  shapes = {n: src.shape(o) for n, o in canon.items()}
  what = f'{what} ({layout} layout)'
  norm = _norm_kind(shapes, what)
  try:
    shape_cfg = eva_torch._shape_config(shapes)
    fused = 'blocks.0.attn.qkv.weight' in shapes
    packed = bool(shape_cfg.swiglu) and 'blocks.0.mlp.fc1.weight' in shapes
    expected = eva_torch.timm_shapes(shape_cfg, fused=fused, packed=packed, mask_token=True)
    if norm == 'rmsnorm':   # the official RMSnorm has a weight only
      expected = {k: v for k, v in expected.items() if not _NORM_BIAS.search(k)}
    common.check_keys(expected, shapes, what + ', names shown as timm names')
  except CheckpointError as e:
    raise CheckpointError(f'{what}: {e}') from None
  head_w = src.shape('head.weight')
  if len(head_w) != 2 or head_w[1] != shape_cfg.width:
    raise CheckpointError(f'{what}: head.weight {head_w} must be the projection '
                          f'[out, {shape_cfg.width}].')
  out_dim = head_w[0]
  # Official EVAVisionTransformer: head = nn.Linear(width, embed_dim, bias=qkv_bias).
  proj_bias = 'head.bias' in src
  if proj_bias and src.shape('head.bias') != (out_dim,):
    raise CheckpointError(f'{what}: head.bias {src.shape("head.bias")} must be [{out_dim}].')
  sizes = dict(width=shape_cfg.width, depth=shape_cfg.depth, mlp_dim=shape_cfg.mlp_dim,
               patch_size=shape_cfg.patch_size, out_dim=out_dim, swiglu=shape_cfg.swiglu,
               sub_ln=shape_cfg.sub_ln, norm=norm, attn_bias=shape_cfg.attn_bias,
               proj_bias=proj_bias)

  recorded = dict(eva_torch._recorded_facts(src, eva_torch._Source(src), rope_keys, shape_cfg,
                                            None, what))
  trunk = _open_clip_trunk(path)
  if trunk is not None:
    name, f = trunk
    if name not in TIMM_TRUNKS:
      raise CheckpointError(f'{what}: {f} names the timm trunk {name!r}, which is not an EVA-CLIP '
                            f'tower eva_jax knows ({", ".join(TIMM_TRUNKS)}).')
    for k, v in TIMM_TRUNKS[name].items():
      src_name = f'{os.path.basename(f)} timm_model_name={name}'
      if k in recorded and recorded[k][0] != v:
        raise CheckpointError(f'{what}: {src_name} means {k}={v!r} but {recorded[k][1]} says '
                              f'{recorded[k][0]!r}.')
      recorded.setdefault(k, (v, src_name))
  arch_facts = _arch_facts(arch, sizes, what) if arch else {}
  resolved = _resolve(recorded, arch_facts, given, arch or '', what)
  enc_facts = {k: v for k, (v, _) in resolved.items() if k != 'post_norm'}
  try:
    enc = eva_torch.infer_config(shapes, enc_facts)
  except ValueError as e:
    raise CheckpointError(f'{what}: invalid architecture: {e}') from e
  cfg = ml_collections.ConfigDict(enc.to_dict())
  config_lib._teacher_fields(cfg, 'eva_clip')
  cfg.update(dict(proj_bias=proj_bias, out_dim=int(out_dim),
                  post_norm=bool(resolved['post_norm'][0]), dtype=dtype, mask_token=False,
                  final_norm=True, norm=norm))
  if norm == 'rmsnorm':
    logging.info('%s: RMSNorm (norm weights without biases: the official RMSnorm of '
                 'EVA-CLIP-8B/-18B).', what)
  if not enc.final_norm:
    raise CheckpointError(f'{what}: no final norm (norm.weight); EVA-CLIP targets are '
                          'head(norm(tokens)).')
  cfg.name = arch or _known_name(cfg)
  config_lib.validate(cfg)
  for f in FACTS:
    v, s = resolved[f]
    if s != 'unused without RoPE':
      logging.log(logging.WARNING if s.startswith('not recorded') else logging.INFO,
                  '%s: %s=%s from %s.', what, f, v, s)
  unused = [k for k in keys if k.startswith(('mask_token', 'lm_head.', 'fc_norm.'))]
  if others or unused:
    logging.info('%s: ignoring %d keys outside the vision tower (text tower, logit_scale, ...)%s.',
                 what, others, f' and {unused} (not part of the targets)' if unused else '')
  src_np = eva_torch._Source(src)
  loaders = eva_torch._from_timm(src_np, canon, cfg, fused, packed)
  loaders['proj'] = lambda: src_np['head.weight'].T
  if proj_bias:
    loaders['proj_bias'] = lambda: src_np['head.bias']
  shapes_ours = common.model_params_abstract(cfg)
  missing = sorted(set(shapes_ours) - set(loaders))
  if missing:
    raise CheckpointError(f'{what}: no conversion for parameters {missing}.')
  model = common.model_from_params(cfg, shapes_ours, lambda k: loaders[k](), what)
  logging.info('Loaded EVA-CLIP teacher %s from %s (%s layout; %d tower tensors, %d other keys '
               'ignored).', cfg.name, path, layout, len(src), others)
  return model


def _norm_kind(shapes: dict, what: str) -> str:
  """'layernorm' when every norm weight has its bias, 'rmsnorm' when none has (the official
  RMSnorm); CheckpointError for a mix."""
  weights = [k[:-len('weight')] for k in shapes
             if _NORM_BIAS.search(k[:-len('weight')] + 'bias') and k.endswith('.weight')]
  with_bias = [k for k in weights if k + 'bias' in shapes]
  if len(with_bias) == len(weights):
    return 'layernorm'
  if not with_bias:
    return 'rmsnorm'
  lone = sorted(k + 'weight' for k in weights if k + 'bias' not in shapes)
  raise CheckpointError(f'{what}: some norms have biases (LayerNorm) and some not ({len(lone)}, '
                        f'e.g. {", ".join(lone[:3])}: RMSNorm); an EVA-CLIP tower has one kind.')


def _known_name(cfg) -> str:
  fields = ('width', 'depth', 'heads', 'mlp_dim', 'patch_size', 'out_dim', 'swiglu', 'rope',
            'post_norm', 'norm', 'attn_bias', 'proj_bias')
  for name in config_lib.teacher_names('eva_clip'):
    ref = config_lib.teacher_config(name)
    if all(ref[f] == cfg[f] for f in fields):
      return name
  return 'eva-clip-custom'
