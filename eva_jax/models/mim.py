"""EVA's masked image modeling: the student encoder, its regression head and the cosine loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from eva_jax.models.layers import Dense, trunc_normal
from eva_jax.models.vit import VisionTransformer


class MIM(nnx.Module):
  """Student encoder + `lm_head` (width -> teacher dim, with bias), applied to patch tokens."""

  def __init__(self, encoder_cfg: ml_collections.ConfigDict, teacher_dim: int, *, rngs: nnx.Rngs):
    self.encoder = VisionTransformer(encoder_cfg, rngs=rngs)
    self.lm_head = Dense(encoder_cfg.width, teacher_dim, ('embed', 'out'),
                         init=trunc_normal(encoder_cfg.init_std), bias=True, rngs=rngs)

  def __call__(self, images, mask, *, dropout_key=None, patch_index=None):
    """Predictions [B, N, teacher_dim] (float32) for every patch; the loss keeps the masked ones.
    patch_index: optional int [B, K] patches to predict (`masked_first`): [B, K, teacher_dim], the
    same rows, with the last block, final norm and lm_head run on those tokens only."""
    x = self.encoder.patch_tokens(images, mask, dropout_key=dropout_key, patch_index=patch_index)
    return self.lm_head(x).astype(jnp.float32)


def masked_first(mask, k: int):
  """int32 [B, k]: each row's masked patch indices (ascending), then its unmasked ones to fill k.

  mask: bool [B, N]. With at most k masked patches per row (the block-mask generator never masks
  more than its count: data/masking.py), these k patches hold every token the loss reads, so
  running the last blocks and the heads on them alone is exact. Not part of the official code,
  which runs every token to the end and then gathers x[bool_masked_pos]; same values, fewer FLOPs.
  """
  return jnp.argsort(jnp.logical_not(mask), axis=1, stable=True)[:, :k].astype(jnp.int32)


def masked_slots(mask, k: int | None):
  """(patch_index, loss weights) of the masked-token path: `masked_first(mask, k)` and the mask
  at those slots (bool [B, k]); k None = every token: (None, mask)."""
  if k is None:
    return None, mask
  idx = masked_first(mask, k)
  return idx, jnp.take_along_axis(mask, idx, axis=1)


def cosine_loss(pred, target, mask):
  """-mean over all masked tokens of the batch of cos(pred, target): token-weighted, float32.

  Matches the official `-nn.CosineSimilarity(dim=-1)(outputs.float(), labels.float()).mean()` over
  `x[bool_masked_pos]` (eps 1e-8 on the product of the norms). The masked count varies per image,
  so fixed-shape code weights by the mask instead of gathering. Returns (loss, number of tokens).
  """
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  dot = jnp.sum(pred * target, -1)
  norms = jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1)
  cos = dot / jnp.maximum(norms, 1e-8)
  w = mask.astype(jnp.float32)
  n = jnp.sum(w)
  return -jnp.sum(cos * w) / jnp.maximum(n, 1.0), n


def teacher_targets(teacher: VisionTransformer, images):
  """Frozen-teacher targets inside the train step: no gradient ever flows into the teacher."""
  return jax.lax.stop_gradient(teacher.targets(jax.lax.stop_gradient(images)))
