"""Per-patch linear segmentation probe of the demo pretraining (demo photos pasted on demo photos).

  eva-seg-probe --config=seg_probe_demo --config.init_from=workdirs/demo
  eva-seg-probe --config=seg_probe_demo          # init_from '' = random-init config.model (baseline)

eva_jax/evaluation/seg_probe.py has the protocol; eva_jax/data/seg_demo.py the task.
"""
import ml_collections

from eva_jax.data.config import CLIP_MEAN, CLIP_STD, image_size_field
from eva_jax.models.config import model_section


def get_config():
  return ml_collections.ConfigDict(dict(
      init_from='',            # eva_jax workdir / checkpoint, timm or official EVA file; '' = random
      weights='auto',          # auto = the EMA when init_from has one, raw, ema
      model=model_section('tiny'),   # the random-init encoder when init_from is ''
      image_size=image_size_field(112),   # int, (h, w) or 'HxW'; 0 = the encoder's own
      seed=0,                  # the task's draws, the random init and the probe's shuffling
      batch_size=32,           # feature extraction
      mean=CLIP_MEAN, std=CLIP_STD,   # input normalization (what EVA students see)
      epochs=60, lr=1e-2, weight_decay=1e-4, probe_batch_size=16,
      task=ml_collections.ConfigDict(dict(
          train_images=256, test_images=64,
          shape='ellipse',     # ellipse | box: the pasted region
          area=(0.15, 0.45),   # (min, max) share of the image it covers
          cache_dir='',        # the demo set ('' = $EVA_JAX_CACHE/demo or ~/.cache/eva_jax/demo)
      )),
  ))
