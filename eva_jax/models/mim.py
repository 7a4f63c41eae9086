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

  def __call__(self, images, mask, *, dropout_key=None):
    """Predictions [B, N, teacher_dim] (float32) for every patch; the loss keeps the masked ones."""
    x = self.encoder(images, mask, dropout_key=dropout_key)[:, self.encoder.num_prefix:]
    return self.lm_head(x).astype(jnp.float32)


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
