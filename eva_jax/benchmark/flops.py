r"""Analytic FLOP counts of the benchmarked steps (MFU numerator).

FLOP count (EVA-SPEC "Compute per image"; a multiply-add is 2 FLOPs; T tokens incl. cls, d width,
f MLP hidden, L layers):
  forward per layer      8·T·d² + 4·T·d·f + 4·T²·d      (SwiGLU: 6·T·d·f instead of 4·T·d·f)
  patch embedding        2·N·(p²·3)·d                     (N = T - 1 patches)
  heads                  student lm_head 2·N·d·out; teacher projection 2·N·d·out (CLIP proj,
                         EVA-CLIP head; none for SigLIP / DINOv2)
  step per image         3 x student forward (forward + backward) + 1 x teacher forward (any
                         family: its own T with cls/registers, at the size config.teacher.grid
                         feeds it); MFU counts the teacher.
  executed               the pretraining step runs the last block of each tower and the heads on
                         the K masked-token slots only (training/pretrain.py masked_token_bound):
                         `masked_tokens=K` counts that (q/k/v projections on T tokens, attention
                         K x T, output projection, MLP and heads on K); eva-benchmark's MFU and
                         matmul fraction use it, `model_tflops_per_step` is every token.
Remat recomputation, LayerNorms, softmax, GELU and the optimizer are not counted (MFU convention).
EVA-01 g/14 + CLIP-L/14 at 224: blocks only 1.7626 TFLOP/image (the spec's 1.76), with patch
embedding and heads (x3 for the student) 1.7663. EVA-02 L/14 + EVA-CLIP g/14: blocks only
0.4851 + 0.5336 = 1.0187 (the spec's 0.486 + 0.534 = 1.02). `tflops_per_step` = per-image x global batch;
MFU divides the achieved TFLOP/s per device by the dense bf16 peak of the device kind
(machine.PEAK_TFLOPS; null on CPU/unknown), also for fp32 runs.
"""
from __future__ import annotations


def tokens(cfg, image_size: int | None = None) -> int:
  """Tokens of one image: patches + cls + registers (DINOv2)."""
  n = ((image_size or cfg.image_size) // cfg.patch_size) ** 2
  return n + (1 if cfg.get('class_token', True) else 0) + int(cfg.get('registers', 0))


def forward_flops(cfg, head_dim_out: int = 0, with_embed: bool = True,
                  image_size: int | None = None, last_tokens: int | None = None) -> float:
  """Forward FLOPs per image of one tower (see module docstring) at `image_size` (default: the
  config's). last_tokens: the last block and the head run on that many tokens only (pretraining's
  masked-token path, models/mim.py masked_first): its q/k/v projections still see every token,
  its attention K queries x T keys, its output projection and MLP K tokens."""
  t, d, f, depth = tokens(cfg, image_size), cfg.width, cfg.mlp_dim, cfg.depth
  mlp_per_token = (6 if cfg.get('swiglu', False) else 4) * d * f
  total = depth * (8 * t * d * d + t * mlp_per_token + 4 * t * t * d)
  n = ((image_size or cfg.image_size) // cfg.patch_size) ** 2
  heads_on = n
  if last_tokens is not None:
    k = int(last_tokens)
    total -= (2 * (t - k) * d * d + (t - k) * mlp_per_token + 4 * (t - k) * t * d)
    heads_on = k
  if with_embed:
    total += 2 * n * cfg.patch_size ** 2 * cfg.get('in_chans', 3) * d
    if head_dim_out:
      total += 2 * heads_on * d * head_dim_out
  return float(total)


def teacher_forward_flops(teacher_cfg, image_size: int | None = None,
                          with_embed: bool = True, last_tokens: int | None = None) -> float:
  """Forward FLOPs per image of a frozen teacher of any family: its blocks (cls and registers
  included) and, with `with_embed`, the patch embedding and its projection where it has one
  (CLIP proj, EVA-CLIP head; SigLIP / DINOv2 targets are the normed tokens, nothing to add).
  last_tokens: as forward_flops."""
  has_proj = bool(teacher_cfg.out_dim) and teacher_cfg.get('proj', True)
  return forward_flops(teacher_cfg, teacher_cfg.out_dim if has_proj else 0, with_embed,
                       image_size, last_tokens)


def step_flops_per_image(student_cfg, teacher_cfg, with_embed: bool = True,
                         teacher_image_size: int | None = None,
                         masked_tokens: int | None = None) -> dict[str, float]:
  """FLOPs per image of one pretraining step: 3x student forward (with its lm_head to the
  teacher's dim) + 1x teacher forward (at `teacher_image_size`: what config.teacher.grid feeds
  it; default the student's image size).

  masked_tokens: None = the model's FLOPs with every token through every block (the spec's
  count, EVA-SPEC "Compute per image"); K = what the step executes, whose last blocks and heads
  run on K tokens (training/pretrain.py masked_token_bound; the teacher's too when its patch
  grid is the student's)."""
  out = teacher_cfg.out_dim
  student = 3.0 * forward_flops(student_cfg, out, with_embed, last_tokens=masked_tokens)
  t_size = teacher_image_size or student_cfg.image_size
  same_grid = (t_size // teacher_cfg.patch_size
               == student_cfg.image_size // student_cfg.patch_size)
  teacher = teacher_forward_flops(teacher_cfg, t_size, with_embed,
                                  masked_tokens if same_grid else None)
  return {'student_train': student, 'teacher_forward': teacher, 'total': student + teacher,
          'teacher_share': teacher / (student + teacher)}


def reference_flops_check() -> dict[str, float]:
  """EVA-01 g/14 + CLIP-L/14 at 224: the spec's 1.76 TFLOP per image; EVA-02-L + EVA-CLIP-g:
  the spec's 1.02 (0.486 student training + 0.534 teacher forward)."""
  from eva_jax.models import config as model_config
  s, t = model_config.encoder_config('g/14'), model_config.teacher_config('clip-L/14')
  blocks = step_flops_per_image(s, t, with_embed=False)['total'] / 1e12
  full = step_flops_per_image(s, t, with_embed=True)['total'] / 1e12
  s2, t2 = model_config.encoder_config('eva02-L/14'), model_config.teacher_config('eva01-clip-g/14')
  e2 = step_flops_per_image(s2, t2, with_embed=False)
  return {'g14_l14_blocks_tflop': blocks, 'g14_l14_tflop': full, 'spec_tflop': 1.76,
          'rel_err': abs(full - 1.76) / 1.76,
          'eva02_l14_blocks_tflop': e2['total'] / 1e12,
          'eva02_l14_student_tflop': e2['student_train'] / 1e12,
          'eva02_l14_teacher_tflop': e2['teacher_forward'] / 1e12, 'eva02_spec_tflop': 1.02}


def vitdet_forward_flops(scfg, det) -> float:
  """Backbone forward FLOPs per image (module docstring formula per block with the attention term
  4*T*T_attn*d: T_attn = T for global blocks, window^2 over the padded grid for windowed ones;
  patch embedding included, the pyramid not)."""
  g = det.image_size // scfg.patch_size
  t, d, f = g * g, scfg.width, scfg.mlp_dim
  ws = det.window_size
  tp = (-(-g // ws) * ws) ** 2
  mlp = (6 if scfg.swiglu else 4) * d * f
  n_glb = len(set(int(i) % scfg.depth for i in det.global_blocks))
  per_glb = 8 * t * d * d + t * mlp + 4 * t * t * d
  per_win = 8 * tp * d * d + tp * mlp + 4 * tp * ws * ws * d
  embed = 2 * t * scfg.patch_size ** 2 * scfg.in_chans * d
  return float(embed + n_glb * per_glb + (scfg.depth - n_glb) * per_win)


# EVA-CLIP contrastive step (issue 15)
def _blocks_flops(t: int, d: int, f: int, depth: int, swiglu: bool) -> float:
  mlp = 6 * t * d * f if swiglu else 4 * t * d * f
  return float(depth * (8 * t * d * d + mlp + 4 * t * t * d))


def clip_step_flops_per_pair(clip_cfg, *, image_size: int | None = None,
                             patch_dropout: float | None = None, text_length: int | None = None,
                             global_batch: int = 0) -> dict[str, float]:
  """FLOPs per image-text pair of one EVA-CLIP training step (both towers trained: 3x forward).

  clip_cfg: eva_jax.models.clip config. image_size: default clip_cfg.vision.image_size.
  patch_dropout: fraction of patch tokens dropped before the blocks (FLIP; default the config's):
    the blocks see prefix + max(1, int(N (1 - rate))) tokens, the patch embedding all N.
  text_length: tokens per caption (default the context length, 77: the text tower runs on the
    padded sequence). Causal attention is counted in full (4 T^2 d): the XLA attention computes
    the whole T x T product and masks it.
  global_batch: > 0 adds the logits of the loss (each pair scored against all B in both
    directions, 2 x 2 B E per pair forward, x3); 0 leaves them out (tiny at B << width x depth).
  Returns {'vision_train', 'text_train', 'loss_train', 'total'} in FLOPs (formula: module docstring,
  EVA-SPEC "Compute per image"); remat recomputation not counted.
  """
  v, t, e = clip_cfg.vision, clip_cfg.text, clip_cfg.embed_dim
  size = image_size or v.image_size
  n = (size // v.patch_size) ** 2
  rate = clip_cfg.patch_dropout if patch_dropout is None else patch_dropout
  kept = max(1, int(n * (1.0 - rate))) if rate > 0 else n
  prefix = (1 if v.get('class_token', True) else 0) + int(v.get('registers', 0))
  vis = _blocks_flops(prefix + kept, v.width, v.mlp_dim, v.depth, v.get('swiglu', False))
  vis += 2 * n * v.patch_size ** 2 * v.get('in_chans', 3) * v.width + 2 * v.width * e
  tl = text_length or t.context_length
  txt = _blocks_flops(tl, t.width, t.mlp_dim, t.depth, False) + 2 * t.width * e
  loss = 2.0 * 2 * global_batch * e
  out = {'vision_train': 3.0 * vis, 'text_train': 3.0 * txt, 'loss_train': 3.0 * loss}
  out['total'] = sum(out.values())
  return out


# Video fine-tuning step (issue 16)
def video_step_flops_per_clip(encoder_cfg, num_frames: int, tubelet: int,
                              num_classes: int) -> float:
  """FLOPs of one video fine-tuning step per clip: 3 x forward over T = 1 + (frames/t)*N tokens
  (joint space-time attention: the 4·T²·d term over all of them), the patch embedding (t·p²·3·d
  per token, the same as per-frame 2D) and the head (2·d·classes). g/14 x 16 x 224: T = 4,097."""
  n = (encoder_cfg.image_size // encoder_cfg.patch_size) ** 2
  t, d, f = 1 + num_frames // tubelet * n, encoder_cfg.width, encoder_cfg.mlp_dim
  mlp = 6 * t * d * f if encoder_cfg.get('swiglu', False) else 4 * t * d * f
  fwd = encoder_cfg.depth * (8 * t * d * d + mlp + 4 * t * t * d)
  fwd += 2 * num_frames * n * encoder_cfg.patch_size ** 2 * 3 * d + 2 * d * num_classes
  return 3.0 * fwd
