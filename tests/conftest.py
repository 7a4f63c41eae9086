"""Shared fixtures: the demo photo set (and its train / held-out val split), and the multi-device
subprocess runner (tests/multidevice_worker.py on 8 fake CPU devices)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # `import support` from any folder

from eva_jax import host_memory  # noqa: E402

host_memory.keep_step_buffers_resident()   # as the eva-* commands do, before jax starts


@pytest.fixture(scope='session')
def demo_dir():
  """The bundled demo set (8 photos x 48 crops, class sub-folders), built once per machine."""
  from eva_jax.data import demo
  return demo.ensure_demo_set()


@pytest.fixture(scope='session')
def demo_split(tmp_path_factory, demo_dir):
  """The demo crops split per class into train (first 36) and held-out val (last 12): symlinks."""
  root = tmp_path_factory.mktemp('demo_split')
  for c in sorted(os.listdir(demo_dir)):
    files = sorted(os.listdir(os.path.join(demo_dir, c)))
    for split, names in (('train', files[:36]), ('val', files[36:])):
      os.makedirs(root / split / c)
      for f in names:
        os.symlink(os.path.join(demo_dir, c, f), root / split / c / f)
  return root


@pytest.fixture(scope='session')
def multidevice():
  """run(*args) -> the last stdout line of tests/multidevice_worker.py ARGS on 8 CPU devices."""
  import support
  return support.run_worker
