"""eva_jax.load_encoder on a freshly initialized pretraining state, and its errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eva_jax
from eva_jax import checkpoint as ckpt_lib
from eva_jax import defaults, parallel
from eva_jax.models import vit
from eva_jax.training import pretrain, task as task_lib


@pytest.fixture(scope='module')
def fresh_run(tmp_path_factory):
  cfg = defaults.pretrain_defaults(model='tiny', teacher='clip-tiny')
  cfg.image_size, cfg.batch_size = 56, 4
  mesh = parallel.make_mesh(cfg.mesh)
  task, scfg, tcfg = pretrain.build(cfg, mesh)
  state = task.init(7)
  workdir = tmp_path_factory.mktemp('fresh')
  ck = ckpt_lib.Checkpointer(str(workdir))
  ck.save(0, state, {}, {'kind': 'eva_pretrain', 'student': scfg.to_dict(),
                         'teacher': tcfg.to_dict()}, force=True)
  ck.close()
  return workdir, scfg, jax.tree.map(np.asarray, state.params)


def test_load_encoder_reproduces_the_saved_model(fresh_run):
  workdir, scfg, params = fresh_run
  x = np.random.default_rng(0).normal(size=(2, 56, 56, 3)).astype(np.float32)
  mask = np.zeros((2, 16), bool)
  mask[:, ::3] = True
  graphdef, template = nnx.split(vit.abstract(scfg), nnx.Param)
  ref_model = task_lib.merge_pure(graphdef, template, params['encoder'])
  for path in (workdir, workdir / 'checkpoints', workdir / 'checkpoints' / '0'):
    enc = eva_jax.load_encoder(path)
    out = np.asarray(enc(x))
    assert out.shape == (2, 17, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.asarray(ref_model(jnp.asarray(x))), atol=1e-6)
  masked = np.asarray(enc(x, mask))
  np.testing.assert_allclose(masked, np.asarray(ref_model(jnp.asarray(x), jnp.asarray(mask))),
                             atol=1e-6)
  assert np.abs(masked - out).max() > 1e-3   # the mask token really enters
  bf16 = eva_jax.load_encoder(workdir, dtype='bf16')
  assert np.abs(np.asarray(bf16(x)) - out).max() < 0.1


def test_load_encoder_errors(fresh_run, tmp_path):
  workdir, _, _ = fresh_run
  with pytest.raises(FileNotFoundError, match='does not exist'):
    eva_jax.load_encoder(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='No finished checkpoint'):
    eva_jax.load_encoder(tmp_path)
  enc = eva_jax.load_encoder(workdir)
  with pytest.raises(ValueError, match='NHWC'):
    enc(np.zeros((2, 3, 56, 56), np.float32))
