"""Models: one ViT family (EVA-01/02 students, CLIP teachers) configured by ConfigDicts."""
from eva_jax.models.config import (ENCODER_NAMES, TEACHER_NAMES, encoder_config, teacher_config,
                                   validate)
from eva_jax.models.vit import VisionTransformer, abstract, create, param_count
