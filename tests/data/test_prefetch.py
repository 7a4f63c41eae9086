"""Device prefetch: batches arrive on device, in order; the saved state = batches consumed (exact
resume even though the thread reads ahead); errors and the end of the data reach the consumer."""
import jax
import numpy as np
import pytest

from eva_jax import defaults, parallel
from eva_jax.data import pipeline as data_lib
from eva_jax.data.pipeline import Batch
from eva_jax.training import prefetch


def _loader(cfg):
  return data_lib.build_pretrain_loader(cfg.data, image_size=56, patch_size=14, batch_size=4,
                                        seed=0, train=True)


def _cfg():
  cfg = defaults.pretrain_defaults()
  cfg.data.source = 'demo'
  cfg.data.workers = 0
  cfg.data.threads = 2
  cfg.data.mask.num_masking_patches = 6
  cfg.data.mask.min_num_patches = 2
  return cfg


def test_prefetch_order_devices_and_exact_resume():
  cfg = _cfg()
  mesh = parallel.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  to_device = lambda b: parallel.host_to_global(b, mesh)
  plain = _loader(cfg)
  ref = [plain.__next__() for _ in range(6)]
  plain.close()

  pf = prefetch.DevicePrefetcher(_loader(cfg), to_device, size=2)
  got = [next(pf) for _ in range(3)]
  for g, r in zip(got, ref):
    assert set(g.arrays) == {'image', 'mask'} and isinstance(g.arrays['image'], jax.Array)
    assert g.skipped == r.skipped == 0 and np.array_equal(g.valid, r.valid)   # host-side, as read
    np.testing.assert_array_equal(np.asarray(g.arrays['image']), r.arrays['image'])
    np.testing.assert_array_equal(np.asarray(g.arrays['mask']), r.arrays['mask'])
  state = pf.get_state()
  assert state['batches'] == 3                     # consumed, not read ahead (the thread has more)
  pf.close()

  resumed = prefetch.DevicePrefetcher(_loader(cfg), to_device, size=2)
  resumed.set_state(state)
  for r in ref[3:]:
    np.testing.assert_array_equal(np.asarray(next(resumed)['image']), r['image'])
  assert resumed.get_state()['batches'] == 6
  # set_state mid-stream drops the read-ahead batches and continues from the given position.
  resumed.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(resumed)['image']), ref[3]['image'])
  resumed.close()


class _Finite:
  def __init__(self, n, fail_at=None):
    self.i, self.n, self.fail_at = 0, n, fail_at

  def __next__(self):
    if self.i == self.fail_at:
      raise RuntimeError('decode failed')
    if self.i >= self.n:
      raise StopIteration
    self.i += 1
    return Batch(arrays={'x': np.full((2,), self.i, np.float32)}, valid=np.ones(2, bool),
                 skipped=0)

  def get_state(self):
    return {'i': self.i}

  def set_state(self, s):
    self.i = s['i']


def test_prefetch_end_and_errors():
  pf = prefetch.DevicePrefetcher(_Finite(3), lambda b: jax.device_put(b), size=2)
  assert [float(b['x'][0]) for b in pf] == [1.0, 2.0, 3.0]
  assert pf.get_state() == {'i': 3}
  with pytest.raises(StopIteration):
    next(pf)
  pf = prefetch.DevicePrefetcher(_Finite(5, fail_at=2), lambda b: jax.device_put(b), size=2)
  next(pf), next(pf)
  with pytest.raises(RuntimeError, match='decode failed'):
    next(pf)
  assert pf.get_state() == {'i': 2}
