"""EVA input pipeline: sources, decoding, augmentation, BEiT masks and grain loaders.

Importing this package loads grain, numpy and PIL only (no torch, no TensorFlow); TFDS is imported
when a tfds: source is opened.
"""
from eva_jax.data.config import default_data_config, merged30m_mixture
from eva_jax.data.masking import BlockMaskGenerator, eval_mask
from eva_jax.data.pipeline import (Batch, LoaderIterator, build_classification_loader,
                                   build_pretrain_loader, source_num_classes)
from eva_jax.data.sources import open_source

__all__ = [
    'Batch', 'BlockMaskGenerator', 'LoaderIterator', 'build_classification_loader',
    'build_pretrain_loader', 'default_data_config', 'eval_mask', 'merged30m_mixture',
    'open_source', 'source_num_classes',
]
