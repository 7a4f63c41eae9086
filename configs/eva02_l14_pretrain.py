"""EVA-02 L/14 MIM pretraining, the official recipe with its EVA-CLIP g/14 teacher.

Sources (baaivision/EVA, EVA-02/asuka): README.md "Pre-train eva02_L_pt_in21k_p14 on IN-21K"
and run_eva_pretraining.py defaults. The same recipe as configs/eva02_b14_pretrain.py (see its
docstring for every field and the deviations left) with the L student
(eva02_large_patch14_xattn_fusedLN_NaiveSwiGLU_subln_RoPE_jaxinit = eva02-L/14), drop path 0.1,
batch 2048 (32 x 8 GPUs x 8 nodes), ZeRO stage 1 (optimizer state sharded: mesh.fsdp here).
Teacher EVA_CLIP_g_14_X (config.teacher.family='eva_clip', arch='eva01-clip-g/14', 1024-d).
The released eva02_L_pt_m38m_p14 used Merged-38M for 56 epochs instead of IN-21K for 150.
Step cost at 224: 0.486 TFLOP student training + 0.534 TFLOP teacher forward = 1.02 TFLOP/image.

  python -m eva_jax.pretrain --config=configs/eva02_l14_pretrain.py \
      --config.teacher.checkpoint=/path/to/eva_clip_psz14.pt --workdir=DIR
"""
import importlib.util
import os


def _b14():
  spec = importlib.util.spec_from_file_location(
      'eva02_b14_pretrain', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         'eva02_b14_pretrain.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def get_config(arg: str = 'fp16'):
  c = _b14().eva02_recipe('eva02-L/14', precision=arg or 'fp16', drop_path=0.1)
  c.mesh.data, c.mesh.fsdp = 1, -1      # ZeRO-1 officially; FSDP shards the optimizer state too
  return c
