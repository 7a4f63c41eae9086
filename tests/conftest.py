"""Shared fixtures: the demo photo set (and its train / held-out val split), and the multi-device
subprocess runner (tests/multidevice_worker.py on 8 fake CPU devices). One JAX persistent
compilation cache per test session (see pytest_configure)."""
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # `import support` from any folder

from eva_jax import host_memory  # noqa: E402

host_memory.keep_step_buffers_resident()   # as the eva-* commands do, before jax starts

CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'


def pytest_configure(config):
  """Points JAX's persistent compilation cache at a fresh folder for this session, shared by the
  xdist workers and every subprocess the tests start (they inherit the environment). A program
  compiled twice in a session with the same HLO (a run and its resume, a fixture's init and the
  training run's, a CLI subprocess repeating the test's evaluation) is then compiled once: the
  executable is the one a fresh compile gives, so no check changes. A cache set from outside
  (CACHE_ENV already in the environment, as on an xdist worker) is kept."""
  if os.environ.get(CACHE_ENV) or hasattr(config, 'workerinput'):
    return
  path = tempfile.mkdtemp(prefix='eva_jax_test_jit_cache_')
  config._eva_jax_cache = path
  os.environ[CACHE_ENV] = path
  if 'jax' in sys.modules:   # imported by a plugin before us: the env var was read already
    sys.modules['jax'].config.update('jax_compilation_cache_dir', path)


@pytest.fixture(autouse=True)
def _no_tensorflow_in_the_test_process():
  """TensorFlow and torch in one process segfault on the next torch op (tf_first or torch_first,
  the wheels on this machine): a test worker that imported TF crashed a later, unrelated test.
  Tests that need TF run it in a subprocess (support.run_python); this names any that does not."""
  before = 'tensorflow' in sys.modules
  yield
  if not before and 'tensorflow' in sys.modules:
    pytest.fail('This test imported TensorFlow into the test process, where a later torch op '
                'segfaults; run the TensorFlow part with support.run_python.', pytrace=False)


def pytest_unconfigure(config):
  path = getattr(config, '_eva_jax_cache', None)
  if path:
    shutil.rmtree(path, ignore_errors=True)


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
