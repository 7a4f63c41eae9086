"""Wall time and peak host memory of eva_jax.load_teacher on a ViT-L/14 CLIP checkpoint.

Saves a random-init transformers CLIPVisionModelWithProjection of OpenAI's ViT-L/14 shape
(hidden 1024, 24 layers, 16 heads, MLP 4096, patch 14, image 224, projection 768; ~1.2 GB fp32)
with save_pretrained (or, with --format=bin, as a transformers-4 style pytorch_model.bin), then
loads it in a FRESH process and measures load_teacher's wall time and the process's peak RSS
(resource.getrusage ru_maxrss). Prints one JSON line.

  python experiments/teacher_load_benchmark.py [--format=safetensors|bin] [--dir=DIR] [--parity]

--dir reuses/keeps the checkpoint there (default: a temp dir, deleted afterwards).
--parity also compares the loaded teacher with the transformers forward on one 224px image
(after the memory measurement, in the parent process). The checkpoint is written by a separate
subprocess so that the measured process starts from a small parent.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _rss_gb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # Linux: KiB


def _status_gb(field):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) / 2 ** 20
  return float('nan')


def _hwm_gb():
  """VmHWM: this address space's peak RSS (ru_maxrss can carry over a large parent's across exec)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 2 ** 20
  return float('nan')


def child(path: str) -> None:
  t0 = time.perf_counter()
  import jax
  import torch  # noqa: F401  (the loader imports it; counted in the baseline, not in the load)
  import safetensors  # noqa: F401
  import eva_jax
  from eva_jax import api  # noqa: F401
  import_s = time.perf_counter() - t0
  base, base_hwm = _rss_gb(), _hwm_gb()
  t0 = time.perf_counter()
  teacher = eva_jax.load_teacher(path)
  jax.block_until_ready(jax.tree.leaves(teacher._state))
  load_s = time.perf_counter() - t0
  peak, peak_hwm = _rss_gb(), _hwm_gb()
  # After the load, with the checkpoint source still referenced by nothing: anonymous (heap, the
  # CPU-backend device arrays) vs file-backed (page cache of mmapped checkpoint files) resident memory.
  anon, filebacked = _status_gb('RssAnon'), _status_gb('RssFile')
  c = teacher.config
  print(json.dumps(dict(import_s=round(import_s, 2), load_s=round(load_s, 2),
                        baseline_rss_gb=round(base, 3), peak_rss_gb=round(peak, 3),
                        baseline_vmhwm_gb=round(base_hwm, 3), peak_vmhwm_gb=round(peak_hwm, 3),
                        end_rss_anon_gb=round(anon, 3), end_rss_file_gb=round(filebacked, 3),
                        config=dict(name=c.name, width=c.width, depth=c.depth, heads=c.heads,
                                    mlp_dim=c.mlp_dim, patch=c.patch_size, image=c.image_size,
                                    out_dim=c.out_dim))))


def save_l14(path: str, fmt: str):
  import torch
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
  cfg = CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                         intermediate_size=4096, patch_size=14, image_size=224, projection_dim=768,
                         hidden_act='quick_gelu', layer_norm_eps=1e-5)
  torch.manual_seed(0)
  model = CLIPVisionModelWithProjection(cfg).eval()
  if fmt == 'bin':   # transformers 5 only writes safetensors; this is what transformers 4 wrote
    cfg.save_pretrained(path)
    torch.save(model.state_dict(), os.path.join(path, 'pytorch_model.bin'))
  else:
    model.save_pretrained(path)


def _run(args, env):
  out = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, capture_output=True,
                       text=True, env=env)
  if out.returncode:
    sys.stderr.write(out.stderr)
    raise SystemExit(out.returncode)
  return out.stdout


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--format', default='safetensors', choices=['safetensors', 'bin'])
  ap.add_argument('--dir', default='')
  ap.add_argument('--parity', action='store_true')
  ap.add_argument('--child', default='')
  ap.add_argument('--save', default='')
  a = ap.parse_args()
  if a.child:
    return child(a.child)
  if a.save:
    return save_l14(a.save, a.format)

  # The parent stays small (no torch model in it): on Linux ru_maxrss of a child can start at its
  # parent's peak, so the checkpoint is written by one subprocess and loaded by another.
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  path = a.dir or tempfile.mkdtemp(prefix='clip_l14_')
  os.makedirs(path, exist_ok=True)
  weights = lambda: [f for f in os.listdir(path) if f.endswith(('.safetensors', '.bin'))]
  t0 = time.perf_counter()
  if not weights():
    _run(['--save', path, '--format', a.format], env)
  save_s = time.perf_counter() - t0
  nbytes = sum(os.path.getsize(os.path.join(path, f)) for f in weights())
  fmt = 'bin' if any(f.endswith('.bin') for f in weights()) else 'safetensors'
  try:
    r = json.loads(_run(['--child', path], env).strip().splitlines()[-1])
    gb = nbytes / 2 ** 30
    r.update(checkpoint='transformers CLIPVisionModelWithProjection ViT-L/14 (random init)',
             format=fmt, weights_gb=round(gb, 3), save_s=round(save_s, 1),
             peak_over_weights=round(r['peak_rss_gb'] / gb, 2),
             load_rss_over_weights=round((r['peak_rss_gb'] - r['baseline_rss_gb']) / gb, 2),
             cpus=os.cpu_count(), loadavg_1m=round(os.getloadavg()[0], 1))
    if a.parity:
      import numpy as np
      import torch
      from transformers import CLIPVisionModelWithProjection
      import eva_jax
      model = CLIPVisionModelWithProjection.from_pretrained(path).eval()
      x = np.random.default_rng(0).standard_normal((1, 224, 224, 3)).astype(np.float32)
      with torch.no_grad():
        h = model.vision_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        ref = model.visual_projection(model.vision_model.post_layernorm(
            h.last_hidden_state[:, 1:])).numpy()
      ours = np.asarray(eva_jax.load_teacher(path)(x))
      r['parity_max_abs_diff'] = float(np.abs(ours - ref).max())
      r['parity_target_max_abs'] = float(np.abs(ref).max())
    print(json.dumps(r))
  finally:
    if not a.dir:
      shutil.rmtree(path, ignore_errors=True)


if __name__ == '__main__':
  main()
