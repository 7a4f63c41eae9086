"""EVA-02 B/14 MIM pretraining, the official recipe with its EVA-CLIP g/14 teacher.

Sources (baaivision/EVA, EVA-02/asuka): README.md "Pre-train eva02_B_pt_in21k_p14 on IN-21K"
(the command line) and run_eva_pretraining.py (the defaults it does not override):
- student eva02_base_patch14_xattn_fusedLN_NaiveSwiGLU_subln_RoPE_jaxinit = eva02-B/14 here
  (SwiGLU, sub-LN, 2D RoPE, xavier init), drop path 0.0, input 224, patch 14;
- teacher --teacher_type evaclip --clip_model EVA_CLIP_g_14_X (eva_clip_psz14.pt): the EVA-01-CLIP
  g/14 vision tower (eva_clip/model_configs/EVA_CLIP_g_14_X.json: 40 layers, width 1408, head width
  88, MLP ratio 4.3637, patch 14, embed dim 1024): config.teacher.family='eva_clip',
  arch='eva01-clip-g/14'; targets head(norm(tokens))[:, 1:], 1024-d (EVA-SPEC "EVA-02 teacher");
- IN-21K (14,197,122 images), 150 epochs, batch 2048 (64 x 8 GPUs x 4 nodes), warmup 1 epoch;
- AdamW lr 1.5e-3, betas (0.9, 0.98), eps 1e-6, weight decay 0.05, cosine to min_lr 1e-5, clip 3.0;
- 105 masked patches (224*224/14/14 * 0.4), min block 16; RandomResizedCrop (0.2, 1) bicubic,
  ratio (3/4, 4/3), flip; no color jitter, no mixup; CLIP mean/std for student and teacher;
- --stop_grad_conv1 (in every EVA-02 pretraining command; asuka/modeling_pretrain.py:
  x.detach() * 0.9 + x * 0.1 after the patch embedding): config.model.stop_grad_conv1=True, the
  patch embedding's gradient scaled by 0.1, forward unchanged;
- DeepSpeed fp16 (no --bf16 in the command); ':bf16' for bf16.
Deviations left: the warmup starts at 0 (official warmup_lr 1e-6); seed 0 instead of 88.

  python -m eva_jax.pretrain --config=configs/eva02_b14_pretrain.py \
      --config.teacher.checkpoint=/path/to/eva_clip_psz14.pt --workdir=DIR
"""
from eva_jax.data.config import MERGED30M_SIZES
from eva_jax.defaults import merged30m_pretrain

IN21K_IMAGES = MERGED30M_SIZES['imagenet21k']


def eva02_recipe(model: str, *, precision: str, drop_path: float, epochs: int = 150):
  """The EVA-02 MIM recipe on IN-21K (see the module docstring) for an EVA-02 student."""
  c = merged30m_pretrain(model, 'eva01-clip-g/14', precision=precision, batch_size=2048,
                         lr=1.5e-3, epochs=epochs, warmup_epochs=1, images=IN21K_IMAGES)
  c.teacher.family = 'eva_clip'
  c.teacher.arch = 'eva01-clip-g/14'   # EVA_CLIP_g_14_X: the file's missing facts come from here
  c.model.drop_path = drop_path
  c.model.stop_grad_conv1 = True       # --stop_grad_conv1 (see the module docstring)
  c.optim.min_lr = 1e-5
  c.data.mixture = ()
  c.data.source = 'arrayrecord:~/data/merged30m/imagenet21k/*.array_record'
  return c


def get_config(arg: str = 'fp16'):
  return eva02_recipe('eva02-B/14', precision=arg or 'fp16', drop_path=0.0)
