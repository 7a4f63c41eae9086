"""EVA02-CLIP-B/16 (EVA02_CLIP_B_psz16_s8B): EVA-02-B with its patch embedding resampled 14 -> 16 as
the image tower, OpenAI CLIP-B/16's text tower (EVA-SPEC "EVA-CLIP").

Sources per field (baaivision/EVA EVA-CLIP/README.md, "Pre-train EVA02_CLIP_B_psz16_s8B on
Merged-2B with 8 nodes"):
- model eva02-clip-B/16: EVA-02 B (width 768, depth 12, SwiGLU, sub-LN, RoPE), patch 16; text
  width 512, 12 layers, 8 heads; embed 512 (open_clip EVA02-B-16.json).
- --batch-size=2048 per GPU x 8 nodes x 8 GPUs = 131,072 ("b131k" in the run name).
- --epochs=200 x --train-num-samples 40000000 = 8B samples ("s8B"): total_steps = 8e9 / 131,072.
- --lr=5e-4 --visual-lr=2e-4 --text-lr=2e-5 --wd=0.05 (visual, text) --visual-ld=0.75
  --text-ld=0.75 --grad-clip-norm=5.0 --warmup 2000 --optimizer=lamb --force-patch-dropout=0
  --grad-checkpointing --seed 4096; fp16 (README table "training precision").
- init.image: an EVA-02-B/14 MIM checkpoint (eva_jax workdir, official EVA02_B_psz14.pt or
  timm file): the image-tower loader resamples the patch kernel 14 -> 16 (bicubic, as
  interpolate_patch_14to16.py; config.init.patch_resample='pinv' for FlexiViT's) and re-grids the
  pos-embed 16x16 -> 14x14, logged; the official EVA02_B_psz14to16.pt loads as is. init.text:
  openai/clip-vit-base-patch16.
- data: Merged-2B (LAION-2B 1.6B + COYO-700M 0.4B) webdataset shards, a mixture; set config.data.

  eva-clip --config=eva02_clip_b16 --workdir=gs://bucket/eva02_clip_b16 \
      --config.init.image=/path/EVA02_B_psz14.pt --config.init.text=/path/clip-vit-base-patch16
"""
from eva_jax.defaults import eva_clip_recipe


def get_config():
  return eva_clip_recipe('eva02-clip-B/16', batch_size=131_072, samples=8e9, lr=5e-4,
                         visual_lr=2e-4, text_lr=2e-5, visual_ld=0.75, text_ld=0.75,
                         patch_dropout=0.0)
