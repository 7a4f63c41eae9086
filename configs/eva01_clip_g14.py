"""EVA01-CLIP-g/14: the EVA-01 g/14 MIM encoder as the image tower of a CLIP with OpenAI CLIP-L's
text tower (EVA-SPEC "EVA-CLIP"; paper: 78.5 zero-shot IN-1k top-1 after LAION-400M, batch 41K).

Sources per field:
- model eva01-clip-g/14: image tower = EVA-01 g/14 (width 1408, depth 40, 16 heads, MLP 6144,
  patch 14, no RoPE), text tower = OpenAI CLIP-L text (width 768, 12 layers, 12 heads, context 77,
  vocab 49408), embed dim 1024: EVA-SPEC "EVA-CLIP" and "EVA-02 teacher"; open_clip EVA01-g-14.json.
- lr 5e-4, visual 4e-4 / text 4e-5, wd 0.05 (both towers), layer decay visual 0.85 / text 0.75,
  grad clip 5.0, warmup 2000, LAMB, fp16, patch dropout 0.5, grad checkpointing, seed 4096:
  EVA-SPEC "EVA-CLIP" recipe = baaivision/EVA EVA-CLIP/README.md EVA01-CLIP-g+ script
  (--lr=5e-4 --visual-lr=4e-4 --text-lr=4e-5 --wd=0.05 --visual-ld=0.85 --text-ld=0.75
  --grad-clip-norm=5.0 --warmup 2000 --force-patch-dropout=0.5 --optimizer=lamb --seed 4096).
- batch 1024 per GPU (EVA-SPEC; --batch-size=1024) x 40 nodes x 8 GPUs = 40,960 (the paper's "41K").
- samples seen 11B (EVA01_CLIP_g_14_psz14_s11B: "s11B"): total_steps = 11e9 / 40,960.
- data: LAION-400M webdataset shards (paper); set config.data.source.
- init.image: EVA01_g_psz14.pt (EVA-CLIP README "Pre-training" table; lm_head, mask_token, head
  skipped as --skip-list); init.text: openai/clip-vit-large-patch14 (README:
  PRETRAINED_TEXT). Deviation: the official --skip-list also leaves text_projection and
  logit_scale at init; here the text projection is loaded when its shape fits (768 -> 768 does
  not fit embed 1024, so for g/14 it stays new, as officially). The text activation is GELU
  (open_clip EVA01-g-14.json has no quick_gelu) while OpenAI's file records QuickGELU: the load
  is refused naming both (facts are never overridden silently); set --config.text.act=quick_gelu
  to keep OpenAI's activation, or pass a GELU text tower.

  eva-clip --config=eva01_clip_g14 --workdir=gs://bucket/eva01_clip_g14 \
      --config.init.image=/path/EVA01_g_psz14.pt --config.init.text=/path/clip-vit-large-patch14 \
      --config.data.source='webdataset:/data/laion400m/{00000..41407}.tar'
"""
from eva_jax.defaults import eva_clip_recipe


def get_config():
  c = eva_clip_recipe('eva01-clip-g/14', batch_size=40_960, samples=11e9, lr=5e-4,
                      visual_lr=4e-4, text_lr=4e-5, visual_ld=0.85, text_ld=0.75,
                      patch_dropout=0.5)
  return c
