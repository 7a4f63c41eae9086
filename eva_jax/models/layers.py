"""Transformer building blocks shared by the EVA student and the CLIP teacher.

Conventions
- Parameters are float32 (master weights); each module casts them to the compute `dtype` at use.
  LayerNorm statistics and the attention softmax always run in float32.
- Every parameter carries logical axis names (`out_sharding` metadata); `eva_jax.parallel` maps them to
  mesh axes with one rule table. Names: embed, mlp, heads, kv (head dim), qkv (the q/k/v index),
  patch (flattened patch pixels), out (head output), layers (stacked block index).
- Kernels are stored in the layout the einsum wants: qkv [embed, 3, heads, kv], proj [heads, kv,
  embed], so tensor parallelism over heads needs no reshapes. Converters map PyTorch layouts.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eva_jax.parallel import constrain_batch  # the sharding rules live in one place

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]

# Remat (activation checkpointing) policies by name, applied per transformer block.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def jit_init(fn: Callable, **jit_kwargs):
  """jax.jit(fn, **jit_kwargs) for a program that only creates parameters (random draws, zeros).

  On XLA:CPU it is compiled at LLVM O0. Such a program runs once per run, in milliseconds, but at
  the default O2 its threefry and erfinv code took 5.3 s to compile per tiny model on a 2-core
  CPU: a demo pretraining run compiled two of them against 8.9 s for its train step. At O0 each
  compiled in 1.7 s. The draws differ from an O2 build only by float rounding
  (contracted multiply-adds, ~1e-7) and are the same on every run with the same jaxlib. Other
  platforms (that of `out_shardings` when given, else the default backend) keep their default
  options. The result has the jitted function's `lower` and `trace`.
  """
  plain = jax.jit(fn, **jit_kwargs)
  if _platform(jit_kwargs.get('out_shardings')) != 'cpu':
    return plain
  fast = jax.jit(fn, compiler_options={'xla_backend_optimization_level': 0}, **jit_kwargs)

  @functools.wraps(fn)
  def init(*args, **kwargs):
    # jax takes compiler options on a top-level jit only; while staged into another program (a
    # jax.eval_shape of the whole build, a jit, a lowering) the plain jit is inlined there.
    return (plain if _staged() else fast)(*args, **kwargs)
  init.lower, init.trace = plain.lower, plain.trace
  return init


def _platform(out_shardings) -> str:
  """The platform a program with these output shardings runs on (default backend if none)."""
  for s in jax.tree.leaves(out_shardings,
                           is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)):
    if isinstance(s, jax.sharding.Sharding):
      return next(iter(s.device_set)).platform
  return jax.default_backend()


def _staged() -> bool:
  """True while being staged into an outer program (jit, eval_shape, scan, lowering): a constant
  made there is a Tracer. (jax has no public query for this.)"""
  return isinstance(jnp.zeros(()), jax.core.Tracer)


def create_module(ctor: Callable[[], nnx.Module]) -> nnx.Module:
  """`ctor()` (which builds an nnx.Module from its own seeded nnx.Rngs) run as one compiled
  program (`jit_init`) on the default device, instead of eager op-by-op initialization."""
  graphdef, _ = nnx.split(nnx.eval_shape(ctor))
  return nnx.merge(graphdef, jit_init(lambda: nnx.state(ctor()))())


def param(rngs: nnx.Rngs, init: Initializer, shape, axes) -> nnx.Param:
  """A float32 parameter annotated with logical axis names (sharded later, never eagerly)."""
  assert len(axes) == len(shape), (shape, axes)
  return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32),
                   out_sharding=tuple(axes), eager_sharding=False)


def trunc_normal(std: float, bound_in_std: float = 1.0) -> Initializer:
  """Truncated normal with the std of the *untruncated* normal (torch's trunc_normal_ semantics).

  EVA-01 truncates at +-1 std (official `trunc_normal_(std=.015)` with a=-std, b=std).
  """
  return jax.nn.initializers.truncated_normal(std, lower=-bound_in_std, upper=bound_in_std)


def xavier_normal(fan_in_axes, fan_out_axes) -> Initializer:
  """Xavier normal for kernels whose in/out features are spread over several axes."""
  def init(key, shape, dtype):
    fan_in = math.prod(shape[a] for a in fan_in_axes)
    fan_out = math.prod(shape[a] for a in fan_out_axes)
    std = math.sqrt(2.0 / (fan_in + fan_out))
    return std * jax.random.normal(key, shape, dtype)
  return init


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 whatever the compute dtype (numerics of fp16/bf16 training)."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, axis_name: str = 'embed'):
    self.eps = eps
    self.scale = param(rngs, ones, (dim,), (axis_name,))
    self.bias = param(rngs, zeros, (dim,), (axis_name,))

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(dtype)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32: x * rsqrt(mean(x^2) + eps) * scale; no mean, no bias.

  EVA-CLIP-8B / -18B vision towers (baaivision/EVA EVA-CLIP-18B/shinji/eva_clip/model.py `RMSnorm`,
  adapted from T5LayerNorm; `use_rms_norm` in their model configs). Parameter: `scale` [dim]
  (torch `weight`).
  """

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, axis_name: str = 'embed'):
    self.eps = eps
    self.scale = param(rngs, ones, (dim,), (axis_name,))

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(dtype)


NORMS = {'layernorm': LayerNorm, 'rmsnorm': RMSNorm}


def norm_layer(cfg, dim: int, *, rngs: nnx.Rngs, axis_name: str = 'embed'):
  """The tower's norm (`cfg.norm`, 'layernorm' when absent: every student and every tower but
  EVA-CLIP-8B/-18B) of width `dim` with eps `cfg.ln_eps`."""
  return NORMS[cfg.get('norm', 'layernorm')](dim, cfg.ln_eps, rngs=rngs, axis_name=axis_name)


class Dense(nnx.Module):
  """x @ kernel (+ bias) with kernel [in, out]; bias optional."""

  def __init__(self, din: int, dout: int, axes: tuple[str, str], *, init: Initializer,
               bias: bool, rngs: nnx.Rngs):
    self.kernel = param(rngs, init, (din, dout), axes)
    self.bias = param(rngs, zeros, (dout,), axes[1:]) if bias else None

  def __call__(self, x):
    y = x @ self.kernel[...].astype(x.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    return y


def rope_sincos(grid: tuple[int, int], head_dim: int, theta: float, ref_grid: int = 0):
  """2D axial RoPE tables [N, head_dim] (sin, cos) for patch tokens, as timm's RotaryEmbeddingCat.

  Per axis head_dim/4 frequencies theta^(-i/(head_dim/4)); y frequencies first, then x; each
  repeated twice for the interleaved pairs rotation. With `ref_grid`, coordinates are rescaled to the
  reference grid (EVA-02's scheme for fine-tuning at another resolution).
  """
  h, w = grid
  nb = head_dim // 4
  bands = 1.0 / theta ** (np.arange(nb, dtype=np.float64) / nb)
  ty = np.arange(h, dtype=np.float64)
  tx = np.arange(w, dtype=np.float64)
  if ref_grid:
    ty, tx = ty / h * ref_grid, tx / w * ref_grid
  yy, xx = np.meshgrid(ty, tx, indexing='ij')
  pos = np.stack([yy, xx], -1)[..., None] * bands        # [h, w, 2, nb]
  pos = pos.reshape(h * w, 2 * nb).astype(np.float32)
  pos = np.repeat(pos, 2, axis=-1)                         # interleaved pairs layout
  return np.sin(pos), np.cos(pos)


def apply_rope(x, sin, cos):
  """Rotates interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); x [B, N, H, D].

  sin/cos: [N, D] shared by the batch, or [B, N, D] per example (the tables of the patch tokens
  FLIP patch dropout kept, as timm's apply_keep_indices_nlc gathers them)."""
  x32 = x.astype(jnp.float32)
  rot = jnp.stack([-x32[..., 1::2], x32[..., ::2]], -1).reshape(x.shape)
  if sin.ndim == 2:
    sin, cos = sin[None], cos[None]
  sin, cos = sin[:, :, None, :], cos[:, :, None, :]
  return (x32 * cos + rot * sin).astype(x.dtype)


def attend(q, k, v, *, scale: float, causal: bool = False, implementation=None,
           pad_to_even: bool | None = None):
  """jax.nn.dot_product_attention on q [B, Tq, H, D] and k, v [B, Tk, H, D], returning
  [B, Tq, H, D] (Tq < Tk: the pretraining step's last block, queries on the masked tokens only).

  cuDNN's fused attention trains only on even sequence lengths (jax 0.10.2 raises
  NotImplementedError "Unsupported sequence length Q 257, KV 257": every EVA recipe at 224 is
  16x16 + cls). With pad_to_even (default: implementation == 'cudnn') an odd Tq or Tk gets one
  zero token, each on its own: a padded key is masked out (key_value_seq_lengths = Tk) and a
  padded query row is sliced off, so values and gradients equal the unpadded ones."""
  tq, tk = q.shape[1], k.shape[1]
  if pad_to_even is None:
    pad_to_even = implementation == 'cudnn'
  q_lengths = kv_lengths = None
  if pad_to_even and (tq % 2 or tk % 2):
    pad = ((0, 0), (0, 1), (0, 0), (0, 0))
    if tq % 2:
      q = jnp.pad(q, pad)
    if tk % 2:
      k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    q_lengths = jnp.full((q.shape[0],), tq, jnp.int32)
    kv_lengths = jnp.full((q.shape[0],), tk, jnp.int32)
  o = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                   query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths,
                                   implementation=implementation)
  return o[:, :tq]


class Attention(nnx.Module):
  """Multi-head self-attention with EVA's bias options, optional sub-LN and RoPE on patch tokens."""

  def __init__(self, cfg, *, init: Initializer, rngs: nnx.Rngs):
    d, h = cfg.width, cfg.heads
    hd = d // h
    self.heads, self.head_dim = h, hd
    self.attention = cfg.attention
    # CLIP text tower: causal self-attention (token t attends to tokens <= t).
    self.causal = bool(cfg.get('causal', False))
    self.qkv = param(rngs, init, (d, 3, h, hd), ('embed', 'qkv', 'heads', 'kv'))
    # EVA/BEiT: q and v biases, no k bias (a k bias only shifts each query's logits by a constant).
    self.q_bias = param(rngs, zeros, (h, hd), ('heads', 'kv')) if cfg.attn_bias != 'none' else None
    self.k_bias = param(rngs, zeros, (h, hd), ('heads', 'kv')) if cfg.attn_bias == 'qkv' else None
    self.v_bias = param(rngs, zeros, (h, hd), ('heads', 'kv')) if cfg.attn_bias != 'none' else None
    # EVA-02 sub-LN: LayerNorm on the attention output before the projection.
    self.norm = norm_layer(cfg, d, rngs=rngs) \
        if cfg.sub_ln and cfg.get('sub_ln_attn', True) else None
    self.proj = param(rngs, init, (h, hd, d), ('heads', 'kv', 'embed'))
    self.proj_bias = param(rngs, zeros, (d,), ('embed',))

  def __call__(self, x, rope=None, num_prefix: int = 1, query_index=None):
    """x [B, T, D] -> [B, T, D]; with query_index (int [B, K] token indices) only those tokens'
    queries are attended (keys and values from all T tokens), giving [B, K, D]."""
    dt = x.dtype
    # Three projections from the one (d, 3, h, hd) parameter rather than one fused einsum and a
    # split: the split's gradient is three zero-padded copies of the fused output that XLA then adds,
    # and the fused output's (3, b, t, ...) layout costs transposes both ways. Measured on
    # configs/bench_cpu.py (2 CPU cores, alternating runs in two sessions of differing VM speed):
    # 0.66 vs 0.73-0.77 and 0.77-0.78 vs 0.80-0.86 s/step; same FLOPs, same params.
    w = self.qkv[...].astype(dt)
    q, k, v = (jnp.einsum('btd,dhk->bthk', x, w[:, i]) for i in range(3))
    if self.q_bias is not None:
      q = q + self.q_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    if self.k_bias is not None:
      k = k + self.k_bias[...].astype(dt)
    if rope is not None:
      sin, cos = rope
      q = jnp.concatenate([q[:, :num_prefix], apply_rope(q[:, num_prefix:], sin, cos)], axis=1)
      k = jnp.concatenate([k[:, :num_prefix], apply_rope(k[:, num_prefix:], sin, cos)], axis=1)
    if query_index is not None:   # after RoPE, so each kept query keeps its own rotation
      q = jnp.take_along_axis(q, query_index[:, :, None, None], axis=1)
    # Logits and softmax run in float32 inside dot_product_attention for bf16/fp16 inputs.
    impl = None if self.attention == 'auto' else self.attention
    if dt == jnp.float16 and jax.default_backend() == 'cpu':
      # XLA:CPU has no f16 x f16 -> f32 dot; upcast there (CPU fp16 runs are for tests only).
      q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    o = attend(q, k, v, scale=self.head_dim ** -0.5, causal=self.causal,
               implementation=impl).astype(dt)
    if self.norm is not None:
      b, t = o.shape[:2]
      o = self.norm(o.reshape(b, t, -1)).reshape(o.shape)
    return jnp.einsum('bthk,hkd->btd', o, self.proj[...].astype(dt)) + self.proj_bias[...].astype(dt)


class Mlp(nnx.Module):
  """GELU / QuickGELU MLP, or EVA-02's SwiGLU (fc1_g, fc1_x, optional sub-LN `norm`, fc2)."""

  def __init__(self, cfg, *, init: Initializer, rngs: nnx.Rngs):
    d, f = cfg.width, cfg.mlp_dim
    self.swiglu, self.act = cfg.swiglu, cfg.act
    if cfg.swiglu:
      self.fc1_g = Dense(d, f, ('embed', 'mlp'), init=init, bias=True, rngs=rngs)
      self.fc1_x = Dense(d, f, ('embed', 'mlp'), init=init, bias=True, rngs=rngs)
    else:
      self.fc1 = Dense(d, f, ('embed', 'mlp'), init=init, bias=True, rngs=rngs)
    self.norm = norm_layer(cfg, f, rngs=rngs, axis_name='mlp') if cfg.sub_ln else None
    self.fc2 = Dense(f, d, ('mlp', 'embed'), init=init, bias=True, rngs=rngs)

  def __call__(self, x):
    if self.swiglu:
      h = jax.nn.silu(self.fc1_g(x)) * self.fc1_x(x)
    elif self.act == 'quick_gelu':
      h = self.fc1(x)
      h = h * jax.nn.sigmoid(1.702 * h)
    elif self.act == 'gelu_tanh':   # SigLIP's gelu_pytorch_tanh
      h = jax.nn.gelu(self.fc1(x), approximate=True)
    else:
      h = jax.nn.gelu(self.fc1(x), approximate=False)
    if self.norm is not None:
      h = self.norm(h)
    return self.fc2(h)


def drop_path(x, rate, key):
  """Per-example stochastic depth on a residual branch; `rate` may be a traced scalar."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class Block(nnx.Module):
  """Pre-norm transformer block: x + dp(attn(norm1(x))); x + dp(mlp(norm2(x))).

  Teacher-tower options (cfg.get, off for every student): `layer_scale` multiplies each branch by
  a learned per-channel scale (DINOv2 `layer_scale{1,2}.lambda1`, timm `gamma_{1,2}`);
  `post_norm` normalizes the branch output instead of its input (EVA-CLIP E/14, timm
  EvaBlockPostNorm): x + dp(norm1(attn(x))); x + dp(norm2(mlp(x))); `norm` 'rmsnorm' makes every
  norm an RMSNorm (EVA-CLIP-8B/-18B).
  """

  def __init__(self, cfg, *, init: Initializer, rngs: nnx.Rngs):
    self.norm1 = norm_layer(cfg, cfg.width, rngs=rngs)
    self.attn = Attention(cfg, init=init, rngs=rngs)
    self.norm2 = norm_layer(cfg, cfg.width, rngs=rngs)
    self.mlp = Mlp(cfg, init=init, rngs=rngs)
    self.post_norm = bool(cfg.get('post_norm', False))
    if cfg.get('layer_scale', False):
      self.ls1 = param(rngs, ones, (cfg.width,), ('embed',))
      self.ls2 = param(rngs, ones, (cfg.width,), ('embed',))
    else:
      self.ls1 = self.ls2 = None

  def __call__(self, x, rope=None, num_prefix=1, dp_rate=None, dp_key=None, window=None,
               query_index=None):
    """window: None (global attention) or a `Window` (ViTDet: attention inside each window of
    the patch grid; `x` then holds patch tokens only, and `rope` is the window's table).
    query_index: optional int [B, K] token indices: the block outputs only those tokens
    ([B, K, D]; their attention still reads every token), exactly the rows of the full output."""
    x = constrain_batch(x)
    if window is not None:
      if self.post_norm or query_index is not None:
        raise ValueError('Window attention is implemented for pre-norm blocks on every token only.')
      a = window.unpartition(self.attn(window.partition(self.norm1(x)), rope, 0))
    elif self.post_norm:
      a = self.norm1(self.attn(x, rope, num_prefix, query_index))
    else:
      a = self.attn(self.norm1(x), rope, num_prefix, query_index)
    if query_index is not None:
      x = jnp.take_along_axis(x, query_index[:, :, None], axis=1)
    if self.ls1 is not None:
      a = a * self.ls1[...].astype(a.dtype)
    if dp_key is not None:
      a = drop_path(a, dp_rate, jax.random.fold_in(dp_key, 0))
    x = x + a
    m = self.norm2(self.mlp(x)) if self.post_norm else self.mlp(self.norm2(x))
    if self.ls2 is not None:
      m = m * self.ls2[...].astype(m.dtype)
    if dp_key is not None:
      m = drop_path(m, dp_rate, jax.random.fold_in(dp_key, 1))
    return constrain_batch(x + m)


class Blocks(nnx.Module):
  """`depth` blocks with stacked parameters (leading 'layers' axis), run by `jax.lax.scan`.

  Stacked parameters keep compile time flat in depth (g/14 has 40 blocks); `scan_unroll=depth`
  recovers a fully unrolled graph. Remat is applied per block by policy name.
  """

  def __init__(self, cfg, *, init: Initializer, rngs: nnx.Rngs):
    self.depth = cfg.depth
    self.remat = cfg.remat
    self.unroll = cfg.scan_unroll
    if cfg.remat not in REMAT_POLICIES:
      raise ValueError(f'model.remat={cfg.remat!r} unknown; choose one of {list(REMAT_POLICIES)}.')

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make(rngs):
      return Block(cfg, init=init, rngs=rngs)

    self.layers = make(rngs)

  def __call__(self, x, rope=None, num_prefix=1, dp_rates=None, dp_key=None):
    return self.run(x, 0, self.depth, rope, num_prefix, dp_rates, dp_key)

  def run(self, x, start: int, stop: int, rope=None, num_prefix=1, dp_rates=None, dp_key=None,
          window=None, global_mask=None, rope_global=None, query_index=None):
    """Blocks start..stop-1 (static ints) under one scan over that slice of the stacked params.

    Callers that need per-block outputs (forward_intermediates) or per-block attention kinds
    (ViTDet's window / global blocks) split the depth into runs: each run is one scan, so the
    compiled graph grows with the number of runs, not with depth, and no [depth, B, N, D] stack of
    every block's output is kept. dp_rates / dp_key cover the whole depth (indexed here).
    window + global_mask (bool [depth], static): ViTDet's mixed blocks in ONE scan, each layer
    choosing by lax.cond between global attention (with `rope_global`) and window attention (with
    `rope`). The loop body holds both kinds, only one runs per layer, and XLA reuses one set of
    temporaries for all layers: separate scans per run of one kind did not share them (L/14 at
    1022, bf16, remat full, batch 1: 29.5 GiB of temporaries with 8 scans vs 8.5 GiB for one
    all-global scan on XLA:CPU; docs/memory_plan.md).
    query_index: int [B, K] token indices for a run of ONE block (no scan: its output has K
    tokens): see Block. Raises ValueError for an empty or out-of-range run, or query_index on a
    longer run or with window attention.
    """
    if not 0 <= start < stop <= self.depth:
      raise ValueError(f'Block run {start}..{stop - 1} is outside 0..{self.depth - 1}.')
    if query_index is not None and (stop - start != 1 or window is not None):
      raise ValueError(f'query_index needs a run of one global-attention block, got blocks '
                       f'{start}..{stop - 1}{" with window attention" if window else ""}.')
    graphdef, state = nnx.split(self.layers)
    if (start, stop) != (0, self.depth):
      state = jax.tree.map(lambda a: a[start:stop], state)

    def body(x, xs):
      layer_state, rate, key, is_global = xs
      block = nnx.merge(graphdef, layer_state)
      if is_global is None:
        return block(x, rope, num_prefix, rate, key, window, query_index), None
      return jax.lax.cond(is_global,
                          lambda x: block(x, rope_global, num_prefix, rate, key, None),
                          lambda x: block(x, rope, num_prefix, rate, key, window), x), None

    policy = REMAT_POLICIES[self.remat]
    if self.remat != 'none':
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    if dp_key is not None:
      keys = jax.random.split(dp_key, self.depth)[start:stop]
      rates = jnp.asarray(dp_rates, jnp.float32)[start:stop]
    else:
      keys = rates = None
    flags = None if global_mask is None else jnp.asarray(np.asarray(global_mask, bool)[start:stop])
    if query_index is not None:
      first = lambda a: None if a is None else a[0]  # noqa: E731
      return body(x, (jax.tree.map(first, state), first(rates), first(keys), None))[0]
    x, _ = jax.lax.scan(body, x, (state, rates, keys, flags), unroll=min(self.unroll, stop - start))
    return x


class Window:
  """ViTDet window partition of a [B, H*W, D] patch-token grid into [B*nW, ws*ws, D] and back
  (detectron2 ViTDet `window_partition` / `window_unpartition`, EVA-01/EVA-02 det backbones).

  The window must tile the grid (a ValueError names the valid sizes) unless `pad=True`: then, as
  in ViTDet, the grid is zero-padded at the bottom/right to a multiple of the window after norm1,
  the padded tokens take part in attention unmasked, and are cropped afterwards.
  """

  def __init__(self, grid: tuple[int, int], size: int, pad: bool = False):
    h, w = grid
    if size < 1:
      raise ValueError(f'window size must be >= 1, got {size}.')
    if not pad and (h % size or w % size):
      ok = sorted(set(d for d in range(1, max(h, w) + 1) if h % d == 0 and w % d == 0))
      raise ValueError(f'window size {size} does not tile the {h}x{w} patch grid; choose one of '
                       f'{ok} (common divisors), another image size, or pad=True (ViTDet '
                       'zero-pads the grid).')
    self.grid, self.size = (h, w), size
    self.padded = (-(-h // size) * size, -(-w // size) * size)

  def partition(self, x):
    (h, w), (hp, wp), s = self.grid, self.padded, self.size
    b, d = x.shape[0], x.shape[-1]
    x = x.reshape(b, h, w, d)
    if (hp, wp) != (h, w):
      x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    x = x.reshape(b, hp // s, s, wp // s, s, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, s * s, d)

  def unpartition(self, x):
    (h, w), (hp, wp), s = self.grid, self.padded, self.size
    d = x.shape[-1]
    x = x.reshape(-1, hp // s, wp // s, s, s, d).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, hp, wp, d)[:, :h, :w]
    return x.reshape(-1, h * w, d)


@functools.lru_cache(maxsize=None)
def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's bicubic interpolation (A=-0.75, align_corners=False)."""
  a = -0.75

  def cubic(t):
    t = abs(t)
    if t <= 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
      return (((t - 5) * t + 8) * t - 4) * a
    return 0.0

  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5
    f = math.floor(src)
    t = src - f
    for j, w in zip(range(f - 1, f + 3), (cubic(t + 1), cubic(t), cubic(1 - t), cubic(2 - t))):
      m[i, min(max(j, 0), n_in - 1)] += w
  return m.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _bicubic_aa_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's antialiased bicubic (F.interpolate(mode='bicubic',
  antialias=True, align_corners=False)): PIL's filter (A=-0.5), support widened by the scale when
  downsampling, taps outside the input dropped and the weights renormalized (ATen's
  _compute_indices_weights_aa)."""
  a = -0.5

  def cubic(t):
    t = abs(t)
    if t < 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
      return (((t - 5) * t + 8) * t - 4) * a
    return 0.0

  scale = n_in / n_out
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    center = scale * (i + 0.5)
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), n_in)
    w = np.array([cubic((j - center + 0.5) * invscale) for j in range(xmin, xmax)])
    m[i, xmin:xmax] = w / w.sum()
  return m.astype(np.float32)


INTERPOLATIONS = ('bicubic', 'bicubic_aa')


def resize_grid(x, old: tuple[int, int], new: tuple[int, int], mode: str = 'bicubic'):
  """Bicubic resize of a [.., old_h*old_w, C] token grid: torch F.interpolate(mode='bicubic',
  align_corners=False), without antialias (mode 'bicubic': how the official EVA/BEiT fine-tuning
  code and transformers' CLIP/SigLIP/DINOv2 resize pos-embeds) or with it ('bicubic_aa': timm's
  resample_abs_pos_embed default and transformers' DINOv2-with-registers)."""
  if tuple(old) == tuple(new):
    return x
  if mode not in INTERPOLATIONS:
    raise ValueError(f'pos-embed interpolation must be one of {INTERPOLATIONS}, got {mode!r}.')
  matrix = _bicubic_matrix if mode == 'bicubic' else _bicubic_aa_matrix
  lead = x.shape[:-2]
  g = x.reshape(*lead, old[0], old[1], x.shape[-1])
  my = jnp.asarray(matrix(old[0], new[0]))
  mx = jnp.asarray(matrix(old[1], new[1]))
  g = jnp.einsum('yh,...hwc->...ywc', my, g.astype(jnp.float32))
  g = jnp.einsum('xw,...ywc->...yxc', mx, g)
  return g.reshape(*lead, new[0] * new[1], x.shape[-1]).astype(x.dtype)
