"""EVA02-CLIP-L/14 (EVA02_CLIP_L_psz14_s4B): EVA-02-L as the image tower, OpenAI CLIP-L/14's text
tower (EVA-SPEC "EVA-CLIP").

Sources per field (baaivision/EVA EVA-CLIP/README.md, "Pre-train EVA02_CLIP_L_psz14_s4B on
Merged-2B with 16 nodes"):
- model eva02-clip-L/14: EVA-02 L (width 1024, depth 24, SwiGLU, sub-LN, RoPE), patch 14; text
  width 768, 12 layers, 12 heads; embed 768 (open_clip EVA02-L-14.json).
- --batch-size=1024 per GPU x 16 nodes x 8 GPUs = 131,072 ("b131k" in the run name).
- --epochs=100 x --train-num-samples 40000000 = 4B samples ("s4B"): total_steps = 4e9 / 131,072.
- --lr=5e-4 --visual-lr=4e-4 --text-lr=4e-5 --wd=0.05 (visual, text) --visual-ld=0.85
  --text-ld=0.75 --grad-clip-norm=5.0 --warmup 2000 --optimizer=lamb --force-patch-dropout=0
  --grad-checkpointing --seed 4096; fp16 (README table "training precision").
- init.image: EVA02_L_psz14.pt (EVA-02-L MIM); init.text: openai/clip-vit-large-patch14.
- data: Merged-2B webdataset shards; set config.data.

  eva-clip --config=eva02_clip_l14 --workdir=gs://bucket/eva02_clip_l14 \
      --config.init.image=/path/EVA02_L_psz14.pt --config.init.text=/path/clip-vit-large-patch14
"""
from eva_jax.defaults import eva_clip_recipe


def get_config():
  return eva_clip_recipe('eva02-clip-L/14', batch_size=131_072, samples=4e9, lr=5e-4,
                         visual_lr=4e-4, text_lr=4e-5, visual_ld=0.85, text_ld=0.75,
                         patch_dropout=0.0)
