"""Demo EVA-CLIP: tiny towers trained contrastively on the captioned demo photos (8 photos, 36
training crops each, one short caption per crop); zero-shot top-1 on the 12 held-out crops per
photo and image<->text recall on their captions. A few minutes on 2 CPU cores.

  eva-clip --config=clip_demo --workdir=workdirs/clip_demo \
      --config.init.image=workdirs/demo      # the image tower from the demo MIM run (eva-pretrain
                                             # --config=pretrain_demo); '' = random init
"""
from eva_jax.defaults import clip_defaults


def get_config():
  c = clip_defaults(model='eva-clip-tiny')   # vision = the demo MIM student's 'tiny' architecture
  c.image_size = 112                         # as pretrain_demo: 8x8 patches of 14
  c.total_steps = 300
  c.batch_size = 32                          # below contrastive.MIN_MEANINGFUL_BATCH: a warning
  c.log_every = 25
  c.checkpoint_every = 150
  c.eval_every = 150
  c.optim.name = 'lamb'
  c.optim.lr = 2e-3
  c.optim.min_lr = 0.0
  c.optim.warmup_steps = 30
  c.optim.towers.visual.lr = 2e-3
  c.optim.towers.visual.layer_decay = 0.85
  c.optim.towers.text.lr = 2e-3              # the text tower starts random here: no 10x lower lr
  c.optim.towers.text.layer_decay = 1.0
  c.model.patch_dropout = 0.0
  c.data.source = 'demo:train'
  c.data.workers = 0
  c.eval.zero_shot = 'demo:val'
  c.eval.retrieval = 'demo:val'
  return c
