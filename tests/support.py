"""Helpers shared by the tests (imported as `support`: tests/ is on sys.path through conftest.py)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses import this checkout's eva_jax, whatever is installed.
ENV = dict(os.environ, PYTHONPATH=ROOT)
ENV8 = dict(ENV, XLA_FLAGS='--xla_force_host_platform_device_count=8')


def recipe(name, arg=None, **overrides):
  """A recipe config by name (eva_jax.configs), progress bar off, top-level fields overridden."""
  from eva_jax import configs
  cfg = configs.get(f'{name}:{arg}' if arg else name)
  cfg.progress = False
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def run_cli(program, *args, env=None, timeout=600, cwd=ROOT):
  """`python -m eva_jax.cli.<program> ARGS`; returns the CompletedProcess (text output)."""
  return subprocess.run([sys.executable, '-m', f'eva_jax.cli.{program}', *map(str, args)],
                        cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def run_python(code: str, timeout=600) -> str:
  """Runs `code` in a fresh `python -c` (this checkout's eva_jax; cwd tests/, so the test helpers
  import) and returns its stdout; AssertionError with its stderr when it fails. For TensorFlow:
  TensorFlow and torch in one process segfault on the next torch op (the wheels on this
  machine), so TF is never imported into the test process (conftest.py checks)."""
  out = subprocess.run([sys.executable, '-c', code], cwd=os.path.join(ROOT, 'tests'), env=ENV,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def run_worker(*args, timeout=600):
  """tests/multidevice_worker.py ARGS on 8 fake CPU devices; returns its last stdout line."""
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'multidevice_worker.py'),
                        *map(str, args)], env=ENV8, capture_output=True, text=True, check=True,
                       timeout=timeout)
  return out.stdout.strip().splitlines()[-1]


def snapshot(workdir):
  """Every file under workdir with its bytes: 'nothing was changed' is checked on all of them."""
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      p = os.path.join(root, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, workdir)] = fh.read()
  return out


def pretrain_batches(cfg, n, seed=0):
  """n host batches for a pretraining step: random images, each with max_masked random patches
  masked (~40%, the most the step's masked-token slots hold; the block generator masks as many or
  fewer). Patch 14, as the tiny test models."""
  import numpy as np
  from eva_jax.data.masking import max_masked
  rng = np.random.default_rng(seed)
  g = cfg.image_size // 14
  k = max_masked((g, g), cfg.data.mask)
  return [{'image': rng.normal(size=(cfg.batch_size, cfg.image_size, cfg.image_size, 3)
                               ).astype(np.float32),
           'mask': np.stack([rng.permuted(np.arange(g * g) < k) for _ in range(cfg.batch_size)])}
          for _ in range(n)]


def write_pan_clips(root, per_class: int, classes: int = 2):
  """`classes` x `per_class` small pan clips (16 frames of 32 px, PyAV) under root/c<k>/<i>.mp4:
  the same photo panned in a class's direction (data/demo.py pan_clip). Returns root."""
  import numpy as np   # pylint: disable=g-import-not-at-top
  from eva_jax.data import demo   # pylint: disable=g-import-not-at-top
  photo = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
  photo = photo.repeat(8, 0).repeat(8, 1)
  for c in range(classes):
    (root / f'c{c}').mkdir()
    for i in range(per_class):
      demo.write_video(str(root / f'c{c}' / f'{i}.mp4'),
                       demo.pan_clip(photo, c, np.random.default_rng([c, i]), size=32))
  return root
