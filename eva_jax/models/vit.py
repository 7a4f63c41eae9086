"""One ViT for the whole family: EVA-01/EVA-02 students and the teacher towers, set by a ConfigDict.

Student (EVA):  patch embed -> [MASK] replace -> prepend cls -> + pos -> blocks -> norm.
Teacher towers (`targets()`: float32 [B, N, out_dim], prefix tokens dropped):
  CLIP (OpenAI/open_clip/HF):  patch embed (no bias) -> cls -> + pos -> ln_pre -> blocks
                               -> ln_post(patch tokens) @ proj
  EVA-CLIP (EVA-01/02 towers): EVA encoder -> norm -> head (proj with bias) on patch tokens
  SigLIP:                      no cls -> blocks -> post_layernorm (final norm), no projection
  DINOv2:                      cls [+ registers, no pos-embed] -> blocks with layer scale
                               -> layernorm (final norm), no projection
Teacher-only fields (read with cfg.get, so student configs and checkpoints are unchanged):
family, ln_post, proj, proj_bias, layer_scale, post_norm, registers, pos_interp, norm ('layernorm' |
'rmsnorm': EVA-CLIP-8B/-18B).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from eva_jax.models import config as config_lib
from eva_jax.models.layers import (Blocks, create_module, norm_layer, param, resize_grid,
                                   rope_sincos, trunc_normal, xavier_normal)
from eva_jax.training.precision import DTYPES  # the one dtype table


def _initializers(cfg):
  """(dense kernel init, token init) for the configured scheme."""
  if cfg.init == 'eva01':
    # Official EVA-01: trunc_normal_(std=.015) truncated at +-1 std on every weight and token.
    t = trunc_normal(cfg.init_std)
    return t, t
  if cfg.init == 'eva02':
    # EVA-02: xavier-normal kernels (fan_in = first axis, fan_out = the rest of the kernel).
    return _xavier_first_axis, trunc_normal(cfg.init_std)
  if cfg.init == 'clip':
    n = jax.nn.initializers.normal(0.02)
    return n, n
  raise ValueError(f"model.init must be 'eva01', 'eva02' or 'clip', got {cfg.init!r}.")


def _xavier_first_axis(key, shape, dtype):
  # Kernels here are [in, out...] except proj [heads, kv, embed].
  if len(shape) == 3:  # proj [heads, kv, embed]
    return xavier_normal((0, 1), (2,))(key, shape, dtype)
  if len(shape) == 4:  # qkv [embed, 3, heads, kv]: three separate D x D projections officially
    return xavier_normal((0,), (2, 3))(key, shape, dtype)
  return xavier_normal((0,), tuple(range(1, len(shape))))(key, shape, dtype)


def _xavier_uniform_patch(key, shape, dtype):
  # EVA-02 patch conv: xavier-uniform over (fan_in = p*p*C, fan_out = D).
  fan_in, fan_out = shape[0] * shape[1] * shape[2], shape[3]
  bound = float(np.sqrt(6.0 / (fan_in + fan_out)))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class VisionTransformer(nnx.Module):
  """EVA encoder or CLIP vision tower; see module docstring. Call with NHWC normalized images."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    config_lib.validate(cfg)
    self.cfg = cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: part of the graphdef
    d, p = cfg.width, cfg.patch_size
    kinit, tinit = _initializers(cfg)
    self.grid = (cfg.image_size // p, cfg.image_size // p)
    n = self.grid[0] * self.grid[1]
    self.num_registers = int(cfg.get('registers', 0))
    self.num_prefix = (1 if cfg.class_token else 0) + self.num_registers
    self.num_pos_prefix = 1 if cfg.class_token else 0   # registers have no position embedding
    self.pos_interp = cfg.get('pos_interp', 'bicubic')
    self.dtype = DTYPES[cfg.dtype]

    patch_init = kinit if cfg.init != 'eva02' else _xavier_uniform_patch
    self.patch_kernel = param(rngs, patch_init, (p, p, cfg.in_chans, d), (None, None, None, 'embed'))
    self.patch_bias = param(rngs, jax.nn.initializers.zeros, (d,), ('embed',)) \
        if cfg.patch_bias else None
    self.cls_token = param(rngs, tinit, (d,), ('embed',)) if cfg.class_token else None
    self.mask_token = param(rngs, tinit, (d,), ('embed',)) if cfg.mask_token else None
    self.pos_embed = param(rngs, tinit, (n + self.num_pos_prefix, d), (None, 'embed'))
    self.reg_tokens = param(rngs, tinit, (self.num_registers, d), (None, 'embed')) \
        if self.num_registers else None
    self.ln_pre = norm_layer(cfg, d, rngs=rngs) if cfg.ln_pre else None
    self.blocks = Blocks(cfg, init=kinit, rngs=rngs)
    layers = self.blocks.layers
    if cfg.init == 'eva01':
      # Rescale block l's (1-based) output projections by 1/sqrt(2l): the official fix_init_weight.
      s = 1.0 / np.sqrt(2.0 * np.arange(1, cfg.depth + 1))
      layers.attn.proj[...] = layers.attn.proj[...] * s[:, None, None, None]
      layers.mlp.fc2.kernel[...] = layers.mlp.fc2.kernel[...] * s[:, None, None]
    elif cfg.init == 'eva02' and cfg.sub_ln:
      # Official EVA-02 with sub-LN: MLP weights, attn.proj and the v projection are multiplied
      # by sqrt(log(2 * depth)) (no 1/sqrt(2l) rescale in EVA-02).
      g = float(np.sqrt(np.log(2.0 * cfg.depth)))
      layers.attn.proj[...] = layers.attn.proj[...] * g
      layers.attn.qkv[...] = layers.attn.qkv[...].at[:, :, 2].multiply(g)
      for name in ('fc1_g', 'fc1_x', 'fc2') if cfg.swiglu else ('fc1', 'fc2'):
        dense = getattr(layers.mlp, name)
        dense.kernel[...] = dense.kernel[...] * g
    self.norm = norm_layer(cfg, d, rngs=rngs) if cfg.final_norm else None
    out_dim = cfg.out_dim
    # Teacher heads. out_dim > 0 marks a teacher tower (out_dim = target dim); configs written
    # before the flags existed are CLIP towers: ln_post + projection without bias.
    self.ln_post = norm_layer(cfg, d, rngs=rngs) if out_dim and cfg.get('ln_post', True) else None
    has_proj = bool(out_dim and cfg.get('proj', True))
    self.proj = param(rngs, jax.nn.initializers.normal(d ** -0.5), (d, out_dim), ('embed', 'out')) \
        if has_proj else None
    self.proj_bias = param(rngs, jax.nn.initializers.zeros, (out_dim,), ('out',)) \
        if has_proj and cfg.get('proj_bias', False) else None

  # ---------------------------------------------------------------------------------------------
  def _check_images(self, images):
    cfg = self.cfg
    if images.ndim != 4 or images.shape[-1] != cfg.in_chans:
      raise ValueError(f'Expected NHWC images [batch, height, width, {cfg.in_chans}], got shape '
                       f'{tuple(images.shape)}. Channels-first input? Transpose with '
                       'x.transpose(0, 2, 3, 1).')
    h, w = images.shape[1:3]
    if h % cfg.patch_size or w % cfg.patch_size:
      p = cfg.patch_size
      near = lambda n: f'{max(p, n // p * p)} or {max(p, n // p * p) + p}'  # noqa: E731
      raise ValueError(f'Image size {h}x{w} is not a multiple of the patch size {p}: resize or pad '
                       f'to multiples of {p} (height {near(h)}, width {near(w)}).')
    return h // cfg.patch_size, w // cfg.patch_size

  def embed(self, images, mask=None):
    """Patch tokens (+[MASK]) -> cls -> pos-embed -> ln_pre. Returns ([B, 1+N, D], grid)."""
    gh, gw = self._check_images(images)
    p, dt = self.cfg.patch_size, self.dtype
    b = images.shape[0]
    x = images.astype(dt).reshape(b, gh, p, gw, p, self.cfg.in_chans)
    x = jnp.einsum('byhxwc,hwcd->byxd', x, self.patch_kernel[...].astype(dt))
    x = x.reshape(b, gh * gw, -1)
    if self.patch_bias is not None:
      x = x + self.patch_bias[...].astype(dt)
    if self.cfg.get('stop_grad_conv1', False):
      # Official EVA-02 pretraining (asuka/modeling_pretrain.py, --stop_grad_conv1 in every
      # pretraining script): x.detach() * 0.9 + x * 0.1, i.e. the patch embedding's gradient x0.1.
      # Written as x + (g - g) with g = 0.1 x under stop_gradient once, so the forward is x bit for
      # bit (0.9 x + 0.1 x is not always x in floating point) and the gradient 0.1 times x's.
      g = x * jnp.asarray(0.1, dt)
      x = jax.lax.stop_gradient(x) + (g - jax.lax.stop_gradient(g))
    if mask is not None:
      if self.mask_token is None:
        raise ValueError('This model has no mask token (model.mask_token=False); cannot apply a mask.')
      if mask.shape != (b, gh * gw):
        raise ValueError(f'mask must be [batch, {gh * gw}] for a {gh}x{gw} patch grid, '
                         f'got {tuple(mask.shape)}.')
      x = jnp.where(mask[..., None], self.mask_token[...].astype(dt), x)
    pos = self.pos_embed[...]
    npp = self.num_pos_prefix
    if npp:
      cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (b, 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    if (gh, gw) != self.grid:  # other resolution: bicubic-interpolate the patch part
      pos = jnp.concatenate([pos[:npp], resize_grid(pos[npp:], self.grid, (gh, gw),
                                                    self.pos_interp)], axis=0)
    x = x + pos.astype(dt)
    if self.reg_tokens is not None:   # DINOv2 registers: after cls, without position embedding
      reg = jnp.broadcast_to(self.reg_tokens[...].astype(dt), (b,) + self.reg_tokens.shape)
      x = jnp.concatenate([x[:, :npp], reg, x[:, npp:]], axis=1)
    if self.ln_pre is not None:
      x = self.ln_pre(x)
    return x, (gh, gw)

  def _rope(self, grid):
    if not self.cfg.rope:
      return None
    hd = self.cfg.width // self.cfg.heads
    sin, cos = rope_sincos(grid, hd, self.cfg.rope_theta, self.cfg.rope_ref_grid)
    return jnp.asarray(sin), jnp.asarray(cos)

  def __call__(self, images, mask=None, *, dropout_key=None, keep_indices=None, query_index=None):
    """Tokens [B, 1+N, D] after the final norm (student) or the last block (teacher).

    mask: optional bool [B, N], True = replace that patch by the [MASK] token.
    dropout_key: PRNG key enabling drop path (training); None = deterministic.
    keep_indices: optional int [B, K] patch indices (FLIP patch dropout, `patch_dropout_indices`):
      only those patch tokens (after pos-embed) enter the blocks, with their RoPE rows; prefix
      tokens are always kept. Output then [B, prefix + K, D].
    query_index: optional int [B, Q] indices of the tokens entering the blocks (prefix included):
      the LAST block computes only those tokens (their attention still reads every token), so the
      output is [B, Q, D], exactly those rows of the full output. EVA's loss reads only the masked
      tokens, which makes the last block's queries, MLP and the heads ~(1 - Q/T) cheaper.
    """
    x, grid = self.embed(images, mask)
    rope = self._rope(grid)
    if keep_indices is not None:
      x, rope = keep_patches(x, rope, keep_indices, self.num_prefix)
    rates = np.linspace(0.0, self.cfg.drop_path, self.cfg.depth) if dropout_key is not None else None
    if dropout_key is not None and self.cfg.drop_path == 0.0:
      dropout_key = None
    if query_index is None:
      x = self.blocks(x, rope, self.num_prefix, rates, dropout_key)
    else:   # every block but the last as one scan, then the last on the chosen tokens
      d = self.cfg.depth
      if d > 1:
        x = self.blocks.run(x, 0, d - 1, rope, self.num_prefix, rates, dropout_key)
      x = self.blocks.run(x, d - 1, d, rope, self.num_prefix, rates, dropout_key,
                          query_index=query_index)
    if self.norm is not None:
      x = self.norm(x)
    return x

  def patch_tokens(self, images, mask=None, *, dropout_key=None, patch_index=None):
    """The output's patch tokens [B, N, D] (prefix dropped), or with patch_index (int [B, K]
    patch indices) only those [B, K, D], the last block run on them alone (`__call__`'s
    query_index): what the MIM student's lm_head and the teacher's targets read."""
    if patch_index is None:
      return self(images, mask, dropout_key=dropout_key)[:, self.num_prefix:]
    return self(images, mask, dropout_key=dropout_key, query_index=patch_index + self.num_prefix)

  def forward_intermediates(self, images, indices=None, *, norm: bool = False,
                            output_fmt: str = 'NHWC', return_prefix_tokens: bool = False,
                            intermediates_only: bool = False):
    """Features of chosen blocks, as timm's `Eva.forward_intermediates` (deterministic).

    images: float [B, H, W, C] NHWC, H and W multiples of the patch size (any other size than
      the configured one: pos-embed resized by `model.pos_interp`, RoPE built for the grid).
    indices: None (every block), an int n (the last n blocks) or a sequence of block indices
      (negative ones count from the end); features come in block order, each block once.
    norm: apply the final `norm` to each feature (identity for a model without one, as in timm).
    output_fmt: 'NHWC' -> [B, gh, gw, D] patch-token maps (timm's 'NCHW' transposed; JAX is
      channels-last) or 'NLC' -> [B, gh*gw, D] tokens.
    return_prefix_tokens: each feature becomes (patch features, prefix tokens [B, P, D]) with the
      cls token (and registers) split off; without it they are dropped.
    intermediates_only: return only the list and stop after the last chosen block (timm's
      stop_early); otherwise returns (final tokens [B, P + N, D] after the final norm, list).
    Blocks run as scans between the chosen indices (Blocks.run), so features are not stacked
    for every block. Raises ValueError for an index out of range or an unknown output_fmt.
    Source: timm.models.eva.Eva.forward_intermediates (timm 1.0).
    """
    if output_fmt not in ('NHWC', 'NLC'):
      raise ValueError(f"output_fmt must be 'NHWC' or 'NLC', got {output_fmt!r}.")
    take = take_indices(self.cfg.depth, indices)
    x, grid = self.embed(images)
    rope = self._rope(grid)
    feats, start = [], 0
    for i in take:
      x = self.blocks.run(x, start, i + 1, rope, self.num_prefix)
      start = i + 1
      feats.append(self.norm(x) if norm and self.norm is not None else x)
    out = []
    for f in feats:
      prefix, patches = f[:, :self.num_prefix], f[:, self.num_prefix:]
      if output_fmt == 'NHWC':
        patches = patches.reshape(patches.shape[0], grid[0], grid[1], patches.shape[-1])
      out.append((patches, prefix) if return_prefix_tokens else patches)
    if intermediates_only:
      return out
    if start < self.cfg.depth:
      x = self.blocks.run(x, start, self.cfg.depth, rope, self.num_prefix)
    if self.norm is not None:
      x = self.norm(x)
    return x, out

  def targets(self, images, patch_index=None):
    """Teacher targets, float32 [B, N, out_dim]: the patch tokens (cls and registers dropped) after
    the tower's final norm (`norm` or CLIP's `ln_post`), then its projection where it has one
    (CLIP: no bias; EVA-CLIP `head`: with bias). See the module docstring per family.
    patch_index: optional int [B, K] patch indices: only those targets, [B, K, out_dim] (the last
    block runs on those tokens only: `__call__`'s query_index)."""
    if not self.cfg.out_dim:
      raise ValueError('targets() needs a teacher tower config (out_dim > 0); this is an encoder.')
    x = self.patch_tokens(images, patch_index=patch_index)
    if self.ln_post is not None:
      x = self.ln_post(x)
    if self.proj is not None:
      x = x @ self.proj[...].astype(x.dtype)
      if self.proj_bias is not None:
        x = x + self.proj_bias[...].astype(x.dtype)
    return x.astype(jnp.float32)


def patch_dropout_indices(key, batch: int, num_patches: int, rate: float):
  """FLIP patch dropout (arXiv 2212.00794): int32 [batch, K] random patch indices to keep, K =
  max(1, int(num_patches * (1 - rate))), a fresh uniform subset per example in random order (timm
  PatchDropoutWithIndices(ordered=False): argsort of noise, first K; EVA-CLIP's PatchDropout takes
  the top-K of noise, the same distribution). Raises ValueError for a rate outside [0, 1)."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'patch dropout rate must be in [0, 1), got {rate}.')
  keep = max(1, int(num_patches * (1.0 - rate)))
  noise = jax.random.uniform(key, (batch, num_patches))
  return jnp.argsort(noise, axis=-1)[:, :keep].astype(jnp.int32)


def keep_patches(x, rope, keep_indices, num_prefix: int):
  """Gathers the kept patch tokens of x [B, prefix + N, D] (prefix tokens always kept) and the
  matching RoPE rows ([N, hd] tables -> [B, K, hd], timm apply_keep_indices_nlc)."""
  idx = keep_indices.astype(jnp.int32)
  patches = jnp.take_along_axis(x[:, num_prefix:], idx[..., None], axis=1)
  x = jnp.concatenate([x[:, :num_prefix], patches], axis=1)
  if rope is not None:
    rope = tuple(t[idx] for t in rope)
  return x, rope


def take_indices(depth: int, indices=None) -> list[int]:
  """Sorted distinct block indices from None (all), an int n (the last n) or a sequence (negative
  = from the end), as timm's feature_take_indices. Raises ValueError naming the bad value and the
  valid range."""
  if indices is None:
    indices = depth
  if isinstance(indices, (int, np.integer)) and not isinstance(indices, bool):
    if not 0 < indices <= depth:
      raise ValueError(f'indices={indices} (last n blocks) must be in 1..{depth} for a '
                       f'{depth}-block model.')
    return list(range(depth - int(indices), depth))
  out = set()
  for i in indices:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -depth <= i < depth:
      raise ValueError(f'block index {i!r} is out of range for a {depth}-block model; valid: '
                       f'0..{depth - 1} or -{depth}..-1.')
    out.add(int(i) % depth)
  if not out:
    raise ValueError('indices is empty; pass None (every block), an int n (the last n blocks) or '
                     'block indices.')
  return sorted(out)


def create(cfg: ml_collections.ConfigDict, seed: int = 0) -> VisionTransformer:
  """Builds a randomly initialized model on the default device (one compiled init, not eager ops)."""
  return create_module(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(params=seed)))


def abstract(cfg: ml_collections.ConfigDict) -> VisionTransformer:
  """The model with ShapeDtypeStruct leaves: nothing allocated (summaries, sharding plans)."""
  return nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(params=0)))


def param_count(model_or_state) -> int:
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) \
      else model_or_state
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))
