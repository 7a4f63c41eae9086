"""Image classifier on an EVA encoder (ImageNet fine-tuning, ../shared/EVA-SPEC.md).

mean-pool of the patch tokens -> fc_norm (LayerNorm) -> linear head, head initialized with
trunc-normal(0.02) x 0.001; the pretraining `norm` is dropped (identity), the mask token too.
`pool='token'` uses the cls token instead (linear-probe protocols).
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from eva_jax.models.layers import Dense, LayerNorm, trunc_normal
from eva_jax.models.vit import VisionTransformer


def finetune_encoder_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The encoder part of a classifier: no [MASK] token, no final norm (fc_norm replaces it)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.mask_token = False
  cfg.final_norm = False
  return cfg


class Classifier(nnx.Module):

  def __init__(self, encoder_cfg: ml_collections.ConfigDict, num_classes: int, *,
               pool: str = 'mean', head_init_scale: float = 0.001, rngs: nnx.Rngs):
    if pool not in ('mean', 'token'):
      raise ValueError(f"pool must be 'mean' or 'token', got {pool!r}.")
    if num_classes <= 0:
      raise ValueError(f'num_classes must be positive, got {num_classes}.')
    if pool == 'token' and not encoder_cfg.class_token:
      # x[:, 0] would silently pool the first patch token instead.
      raise ValueError("pool='token' needs a class token, but the encoder has class_token=False; "
                       "use pool='mean'.")
    self.pool = pool
    self.encoder = VisionTransformer(finetune_encoder_config(encoder_cfg), rngs=rngs)
    d = encoder_cfg.width
    self.fc_norm = LayerNorm(d, encoder_cfg.ln_eps, rngs=rngs)
    scaled = lambda key, shape, dtype: trunc_normal(0.02, 2.0)(key, shape, dtype) * head_init_scale
    self.head = Dense(d, num_classes, ('embed', 'out'), init=scaled, bias=True, rngs=rngs)

  def features(self, images, *, dropout_key=None):
    x = self.encoder(images, dropout_key=dropout_key)
    n = self.encoder.num_prefix
    x = x[:, n:].mean(1) if self.pool == 'mean' else x[:, 0]
    return self.fc_norm(x)

  def __call__(self, images, *, dropout_key=None):
    """Logits [B, num_classes] in float32."""
    return self.head(self.features(images, dropout_key=dropout_key)).astype(jnp.float32)
