r"""The EVA pretraining step in PyTorch (timm `Eva` student + HF CLIP teacher), for speed comparison.

  python experiments/torch_reference.py --preset=bench_cpu                 # same step as configs/bench_cpu.py
  python experiments/torch_reference.py --preset=l14 --modes=eager,compile  # L/14 + CLIP-L/14 @224, GPU

Step (what eva_jax.training.pretrain builds):
- teacher: `CLIPVisionModelWithProjection` (quick_gelu), under torch.no_grad:
  targets = visual_projection(post_layernorm(last_hidden_state[:, 1:]));
- student: timm `Eva` (qkv_bias = EVA's q/v biases, final `norm` over all tokens, drop path); timm has
  no [MASK] path, so: patch_embed -> masked positions replaced by a learned mask token ->
  _pos_embed (cls + pos) -> blocks -> norm -> Linear lm_head on the patch tokens;
- loss: negative cosine similarity averaged over the masked tokens of the batch (mask-weighted,
  which is the official gather-then-mean without data-dependent shapes);
- backward, global-norm clipping 3.0, `torch.optim.AdamW` (betas 0.9/0.98, eps 1e-6, wd 0.05 on
  >= 2-D weights except pos_embed/cls_token, as EVA).
Modes: `eager` and `compile` (torch.compile of student forward + loss with the teacher forward;
the optimizer step stays eager unless --compile_optimizer). On CUDA: bf16 autocast (--precision)
and SDPA attention (timm's fused attention and HF attn_implementation='sdpa').
Prints one JSON line: {"mode": {"step_s": median, "images_per_s": ..., "compile_s": ...}, ...}.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

PRESETS = {
    # student (width, depth, heads, mlp), teacher (width, depth, heads, mlp, proj), image, patch, batch
    'bench_cpu': dict(student=(384, 6, 6, 1536), teacher=(384, 6, 6, 1536, 384), image=112, patch=14,
                      batch=16, precision='fp32', mask=26, drop_path=0.1),
    'l14': dict(student=(1024, 24, 16, 4096), teacher=(1024, 24, 16, 4096, 768), image=224, patch=14,
                batch=64, precision='bf16', mask=105, drop_path=0.1),
    'g14': dict(student=(1408, 40, 16, 6144), teacher=(1024, 24, 16, 4096, 768), image=224, patch=14,
                batch=32, precision='bf16', mask=105, drop_path=0.1),
    'tiny': dict(student=(64, 2, 4, 256), teacher=(64, 2, 4, 256, 48), image=56, patch=14, batch=4,
                 precision='fp32', mask=6, drop_path=0.0),
}


class Student(torch.nn.Module):
  """timm Eva + mask token + lm_head (EVA-01 MIM)."""

  def __init__(self, width, depth, heads, mlp, image, patch, out_dim, drop_path):
    super().__init__()
    from timm.models.eva import Eva
    self.eva = Eva(img_size=image, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                   mlp_ratio=mlp / width, qkv_bias=True, num_classes=0, global_pool='token',
                   use_fc_norm=False, drop_path_rate=drop_path)
    self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, width))
    torch.nn.init.trunc_normal_(self.mask_token, std=0.015, a=-0.015, b=0.015)
    self.lm_head = torch.nn.Linear(width, out_dim)

  def forward(self, images, mask):
    e = self.eva
    x = e.patch_embed(images)                                     # [B, N, D]
    x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
    x, rope = e._pos_embed(x)
    x = e.norm_pre(x)
    for blk in e.blocks:
      x = blk(x, rope=rope)
    x = e.norm(x)
    return self.lm_head(x[:, e.num_prefix_tokens:])


def make_teacher(width, depth, heads, mlp, proj, image, patch):
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
  cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
                         num_attention_heads=heads, image_size=image, patch_size=patch,
                         projection_dim=proj, hidden_act='quick_gelu', layer_norm_eps=1e-5)
  try:
    model = CLIPVisionModelWithProjection._from_config(cfg, attn_implementation='sdpa')
  except (TypeError, ValueError):
    model = CLIPVisionModelWithProjection(cfg)
  return model.eval().requires_grad_(False)


def teacher_targets(teacher, images):
  vm = teacher.vision_model
  h = vm(pixel_values=images).last_hidden_state[:, 1:]
  return teacher.visual_projection(vm.post_layernorm(h))


def cosine_loss(pred, target, mask):
  cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)
  w = mask.float()
  return -(cos * w).sum() / w.sum().clamp_min(1.0)


def param_groups(model, wd):
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if p.ndim < 2 or name.endswith('pos_embed') or name.endswith('cls_token'):
      no_decay.append(p)
    else:
      decay.append(p)
  return [{'params': decay, 'weight_decay': wd}, {'params': no_decay, 'weight_decay': 0.0}]


def block_masks(n_img, grid, num_masked, min_patches, seed=0):
  """BEiT block masks from the eva_jax generator if importable, else random cells."""
  import numpy as np
  rng = np.random.default_rng(seed)
  try:
    sys.path.insert(0, __file__.rsplit('/experiments/', 1)[0])
    from eva_jax.data.masking import BlockMaskGenerator
    gen = BlockMaskGenerator((grid, grid), num_masked, min_patches)
    return np.stack([gen(rng).reshape(-1) for _ in range(n_img)])
  except Exception:  # pylint: disable=broad-except
    m = np.zeros((n_img, grid * grid), bool)
    for i in range(n_img):
      m[i, rng.choice(grid * grid, num_masked, replace=False)] = True
    return m


def sync(device):
  if device.type == 'cuda':
    torch.cuda.synchronize()


def make_step(mode, p, args, device):
  """(step, teardown): one training step of `mode` (loss returned, not synchronized), and the
  function that frees its models."""
  torch.manual_seed(0)
  sw, sd, sh, sm = p['student']
  tw, td, th, tm, tp = p['teacher']
  student = Student(sw, sd, sh, sm, p['image'], p['patch'], tp, p['drop_path']).to(device).train()
  teacher = make_teacher(tw, td, th, tm, tp, p['image'], p['patch']).to(device)
  opt = torch.optim.AdamW(param_groups(student, 0.05), lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
                          fused=(device.type == 'cuda') or None)
  amp = (torch.autocast(device.type, dtype=torch.bfloat16) if p['precision'] == 'bf16'
         else contextlib.nullcontext())
  b, grid = p['batch'], p['image'] // p['patch']
  images = torch.randn(b, 3, p['image'], p['image'], device=device)
  mask = torch.from_numpy(block_masks(b, grid, p['mask'], 4 if grid < 16 else 16)).to(device)

  def fwd_loss(images, mask):
    with amp:
      with torch.no_grad():
        targets = teacher_targets(teacher, images)
      pred = student(images, mask)
    return cosine_loss(pred, targets, mask)

  def opt_step():
    opt.step()

  if mode == 'compile':
    fwd_loss = torch.compile(fwd_loss)
    if args.compile_optimizer:
      opt_step = torch.compile(opt_step)

  def step():
    loss = fwd_loss(images, mask)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
    opt_step()
    opt.zero_grad(set_to_none=True)
    return loss

  def teardown():
    nonlocal student, teacher, opt
    del student, teacher, opt
    if device.type == 'cuda':
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()

  return step, teardown


def matmul_block(p, device):
  """(fn, FLOPs): one student block's weight matmuls (q, k, v, attention output, MLP in and out)
  on batch x tokens rows, fp32: the shapes of eva_jax.benchmark.matmul_block."""
  sw, _, _, sm = p['student']
  rows = p['batch'] * ((p['image'] // p['patch']) ** 2 + 1)
  g = torch.Generator().manual_seed(0)
  x = torch.randn(rows, sw, generator=g).to(device)
  w = [torch.randn(sw, sw, generator=g).to(device) for _ in range(4)]
  w1, w2 = torch.randn(sw, sm, generator=g).to(device), torch.randn(sm, sw, generator=g).to(device)

  def block():
    return [x @ wi for wi in w], (x @ w1) @ w2

  return block, 2.0 * rows * sw * (4 * sw + 2 * sm)


def serve(step, device, matmul=None) -> None:
  """Per line read from stdin, one timed step ('step') or matmul block ('matmul'), its seconds
  printed (experiments/paired_ratio.py alternates this with eva_jax's, each process idle while
  the other runs)."""
  print('ready', flush=True)
  for line in sys.stdin:
    run = matmul if line.strip() == 'matmul' else step
    t0 = time.perf_counter()
    run()
    sync(device)
    print(time.perf_counter() - t0, flush=True)


def run_mode(mode, p, args, device):
  step, teardown = make_step(mode, p, args, device)
  t0 = time.perf_counter()
  loss = step()            # first step: torch.compile traces and compiles here
  sync(device)
  first_s = time.perf_counter() - t0
  for _ in range(max(args.warmup - 1, 0)):
    step()
  sync(device)
  times, cpu = [], []
  for _ in range(args.steps):
    c0, t0 = time.process_time(), time.perf_counter()
    loss = step()
    sync(device)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  out = {'step_s': statistics.median(times), 'step_s_min': min(times),
         'step_cpu_s': statistics.median(cpu),
         'images_per_s': p['batch'] / statistics.median(times), 'first_step_s': first_s,
         'loss': float(loss)}
  if device.type == 'cuda':
    out['peak_bytes'] = int(torch.cuda.max_memory_allocated())
  teardown()
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--preset', default='bench_cpu', choices=sorted(PRESETS))
  ap.add_argument('--batch', type=int, default=0, help='0 = the preset batch')
  ap.add_argument('--precision', default='', choices=['', 'fp32', 'bf16'])
  ap.add_argument('--modes', default='eager,compile')
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument('--device', default='auto')
  ap.add_argument('--threads', type=int, default=0, help='torch intra-op threads (0 = default)')
  ap.add_argument('--compile_optimizer', action='store_true')
  ap.add_argument('--serve', action='store_true',
                  help='build the first of --modes, warm it up, then time one step per stdin line')
  args = ap.parse_args()
  p = dict(PRESETS[args.preset])
  if args.batch:
    p['batch'] = args.batch
  if args.precision:
    p['precision'] = args.precision
  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto'
                        else args.device)
  if device.type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  result = {'preset': args.preset, 'batch': p['batch'], 'precision': p['precision'],
            'device': str(device), 'torch': torch.__version__, 'threads': torch.get_num_threads()}
  if device.type == 'cuda':
    result['device_name'] = torch.cuda.get_device_name()
  if args.serve:
    step, _ = make_step(args.modes.split(',')[0], p, args, device)
    for _ in range(max(args.warmup, 1)):
      step()
    serve(step, device, matmul_block(p, device)[0])
    return
  for mode in args.modes.split(','):
    try:
      result[mode] = run_mode(mode, p, args, device)
    except Exception as e:  # pylint: disable=broad-except
      result[mode] = {'error': f'{type(e).__name__}: {e}'[:2000]}
    print(f'{mode}: {result[mode]}', file=sys.stderr, flush=True)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
