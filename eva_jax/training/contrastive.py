"""Contrastive image-text losses over the global batch on the device mesh.

- `clip_loss`: CLIP's symmetric InfoNCE (arXiv 2103.00020) with open_clip's
  `--gather-with-grad --local-loss` semantics (open_clip.loss.ClipLoss; EVA-CLIP trains so): each
  device all-gathers the image and text features of the whole batch *with gradient*, scores only
  its own rows against all columns, labels offset by its rank, and the per-device losses are
  averaged. That average is exactly the global-batch loss, and its gradient the single-device one.
- `siglip_loss`: the sigmoid loss (SigLIP, arXiv 2303.15343) chunked over devices as big_vision's
  `siglip` trainer does: each device scores its images against its own texts, then passes text
  features round a ring (`ppermute`) D-1 times, scoring the negatives of each chunk; no device
  ever holds the full B x B logits. Normalization as open_clip.loss.SigLipLoss: sum over the local
  images' pairs / local batch, averaged over devices (= total / global batch).

Both take L2-normalized float32 features [B, E] sharded over the batch axes ('data', 'fsdp') and
run under `jax.shard_map` over those axes (other mesh axes see replicated copies). Without a mesh,
or with one batch shard, they compute the same numbers on one device.
"""
from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from eva_jax.parallel import BATCH_AXES

# Below this global batch the contrastive loss says little: InfoNCE can show at most log(B) nats
# of image-text information (van den Oord et al. 2018; Poole et al. 2019), log(64) = 4.2, and each
# image sees only B-1 negatives. CLIP-style runs use thousands (EVA-CLIP: 41K-131K; SigLIP
# saturates around 32K); a few dozen is only useful for smoke tests and demos, hence a warning,
# not an error.
MIN_MEANINGFUL_BATCH = 64
_warned: set = set()


def check_batch(global_batch: int, what: str = 'contrastive loss') -> None:
  """Logs a warning (once per size) when the global batch is too small for the loss to mean much
  (< MIN_MEANINGFUL_BATCH); with 1 pair the CLIP loss is identically 0."""
  if global_batch >= MIN_MEANINGFUL_BATCH or global_batch in _warned:
    return
  _warned.add(global_batch)
  extra = (' With one pair the CLIP loss is identically 0 and trains nothing.'
           if global_batch < 2 else '')
  logging.warning(
      '%s over a global batch of %d pairs: too small to mean much (each image has %d negatives; '
      'InfoNCE measures at most log(B) = %.2f nats). EVA-CLIP used 41K; use >= %d (more devices '
      'or a larger per-device batch) except for smoke tests.%s', what, global_batch,
      max(global_batch - 1, 0), math.log(max(global_batch, 1)), MIN_MEANINGFUL_BATCH, extra)


def _batch_shards(mesh: Mesh | None) -> int:
  if mesh is None:
    return 1
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def _cross_entropy(logits, labels):
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def _clip_local(img, txt, all_img, all_txt, scale, bias, offset):
  """Symmetric InfoNCE of the local rows against all columns (open_clip ClipLoss local_loss)."""
  logits_i = scale * img @ all_txt.T
  logits_t = scale * txt @ all_img.T
  if bias is not None:
    logits_i, logits_t = logits_i + bias, logits_t + bias
  labels = jnp.arange(img.shape[0]) + offset
  return 0.5 * (_cross_entropy(logits_i, labels) + _cross_entropy(logits_t, labels))


def _sigmoid_chunk(img, txt, scale, bias, positive: bool):
  """-sum log sigmoid(z * logits) / n for one block of pairs; z = +1 on the diagonal iff positive."""
  logits = scale * img @ txt.T + bias
  n = img.shape[0]
  z = (2.0 * jnp.eye(n, dtype=logits.dtype) - 1.0) if positive else -jnp.ones_like(logits)
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / n


def _sharded(fn, mesh: Mesh, with_bias: bool):
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  feat = P(axes, None)
  in_specs = (feat, feat, P()) + ((P(),) if with_bias else ())
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(), axis_names=set(axes)), axes


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *,
              mesh: Mesh | None = None):
  """CLIP InfoNCE over the global batch; float32 scalar.

  image_features, text_features: float [B, E], L2-normalized, row i of each a positive pair,
    sharded (or shardable) over the mesh batch axes; B divisible by data x fsdp.
  logit_scale: the multiplier itself (exp of the parameter, clamped), scalar.
  logit_bias: optional scalar added to every logit (open_clip ClipLoss accepts one).
  mesh: the device mesh; None = one device. Equals open_clip ClipLoss(local_loss=True,
    gather_with_grad=True) averaged over ranks (what DDP's gradient averaging optimizes), which is
    the world_size=1 loss on the whole batch.
  """
  b = image_features.shape[0]
  check_batch(b, 'CLIP loss')
  img, txt = image_features.astype(jnp.float32), text_features.astype(jnp.float32)
  scale = jnp.asarray(logit_scale, jnp.float32)
  bias = None if logit_bias is None else jnp.asarray(logit_bias, jnp.float32)
  if _batch_shards(mesh) == 1:
    return _clip_local(img, txt, img, txt, scale, bias, 0)
  _check_divisible(b, mesh)

  def local(img, txt, scale, *rest):
    all_img = jax.lax.all_gather(img, axes, tiled=True)   # with gradient (gather-with-grad)
    all_txt = jax.lax.all_gather(txt, axes, tiled=True)
    offset = jax.lax.axis_index(axes) * img.shape[0]
    loss = _clip_local(img, txt, all_img, all_txt, scale, rest[0] if rest else None, offset)
    return jax.lax.pmean(loss, axes)

  fn, axes = _sharded(local, mesh, bias is not None)
  return fn(img, txt, scale, *(() if bias is None else (bias,)))


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *,
                mesh: Mesh | None = None):
  """SigLIP sigmoid loss over the global batch, chunked over the devices (big_vision); float32.

  Same arguments as clip_loss; logit_bias is required (SigLIP's learned bias, init -10).
  Equals open_clip SigLipLoss(world_size=1) on the whole batch: -sum_ij log sigmoid(z_ij (s x_i.y_j
  + b)) / B with z = 1 on matching pairs, -1 elsewhere.
  """
  b = image_features.shape[0]
  check_batch(b, 'SigLIP loss')
  img, txt = image_features.astype(jnp.float32), text_features.astype(jnp.float32)
  scale = jnp.asarray(logit_scale, jnp.float32)
  bias = jnp.asarray(logit_bias, jnp.float32)
  n_shards = _batch_shards(mesh)
  if n_shards == 1:
    return _sigmoid_chunk(img, txt, scale, bias, True)
  _check_divisible(b, mesh)
  ring = [(j, (j + 1) % n_shards) for j in range(n_shards)]

  def local(img, txt, scale, bias):
    loss = _sigmoid_chunk(img, txt, scale, bias, True)

    def step(_, carry):
      chunk, acc = carry
      chunk = jax.lax.ppermute(chunk, axes, ring)   # the next device's texts: negatives only
      return chunk, acc + _sigmoid_chunk(img, chunk, scale, bias, False)

    _, loss = jax.lax.fori_loop(0, n_shards - 1, step, (txt, loss))
    return jax.lax.pmean(loss, axes)

  fn, axes = _sharded(local, mesh, True)
  return fn(img, txt, scale, bias)


def _check_divisible(b: int, mesh: Mesh) -> None:
  n = _batch_shards(mesh)
  if b % n:
    raise ValueError(f'contrastive loss: batch {b} is not divisible by the mesh batch shards '
                     f'(data x fsdp = {n}); use a multiple of {n}.')
