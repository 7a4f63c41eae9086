"""Workdirs on an object store (gs://bucket/run), without network.

The `gcs` fixture stands up a fake Google Cloud Storage that behaves like one: a flat map of object
names to bytes (no folders: a "folder" exists while some object name starts with it; no append;
writes replace whole objects). Both paths into real GCS are served from that one map:

- etils.epath (what eva_jax and orbax use for every file and folder operation): its fsspec backend
  asks fsspec for the 'gcs' filesystem, here `FakeGCSFileSystem` (real runs: gcsfs, or tf.io.gfile
  when TensorFlow is installed; the fixture turns the TF backend off so the fsspec one is used);
- TensorStore (orbax writes array data through its native `gcs` kvstore driver over HTTP): a small
  server implementing the GCS JSON API calls the driver makes (objects get/insert/delete/list with
  generation preconditions and byte ranges), which the driver is pointed at with
  TENSORSTORE_GCS_HTTP_URL, authenticated with GOOGLE_AUTH_TOKEN_FOR_TESTING.
"""
from __future__ import annotations

import http.server
import importlib
import importlib.util
import io
import json
import threading
import time
import urllib.parse

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.spec import AbstractFileSystem

import support


class _Bucket:
  """All objects of the fake store: 'bucket/name' -> (generation, bytes)."""

  def __init__(self):
    self.objects: dict[str, tuple[int, bytes]] = {}
    self.generation = 0
    self.lock = threading.Lock()
    self.http_requests = 0  # served to TensorStore

  def put(self, key: str, data: bytes) -> int:
    with self.lock:
      self.generation += 1
      self.objects[key] = (self.generation, bytes(data))
      return self.generation

  def names(self) -> list[str]:
    with self.lock:
      return sorted(self.objects)


STORE = _Bucket()


class _Upload(io.BytesIO):
  """A file opened for writing: the object appears whole at close (no partial objects)."""

  def __init__(self, key: str):
    super().__init__()
    self.key = key

  def close(self):
    if not self.closed:
      STORE.put(self.key, self.getvalue())
    super().close()


class FakeGCSFileSystem(AbstractFileSystem):
  """fsspec filesystem over STORE with object-store semantics (like gcsfs)."""

  protocol = ('gcs', 'gs')
  root_marker = ''

  def __init__(self, *args, **kwargs):
    kwargs.pop('finalize_on_close', None)  # what epath passes to gcsfs
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for p in ('gs://', 'gcs://'):
      if path.startswith(p):
        path = path[len(p):]
    return path.strip('/')

  def ls(self, path, detail=True, **kwargs):
    path = self._strip_protocol(path)
    with STORE.lock:
      objects = dict(STORE.objects)
    if path in objects:
      out = [{'name': path, 'size': len(objects[path][1]), 'type': 'file'}]
    else:
      prefix = path + '/' if path else ''
      entries = {}
      for name, (_, data) in objects.items():
        if not name.startswith(prefix):
          continue
        head, sep, _ = name[len(prefix):].partition('/')
        full = prefix + head
        entries[full] = ({'name': full, 'size': 0, 'type': 'directory'} if sep else
                         {'name': full, 'size': len(data), 'type': 'file'})
      if not entries:
        raise FileNotFoundError(path)
      out = [entries[k] for k in sorted(entries)]
    return out if detail else [e['name'] for e in out]

  def info(self, path, **kwargs):
    path = self._strip_protocol(path)
    with STORE.lock:
      if path in STORE.objects:
        return {'name': path, 'size': len(STORE.objects[path][1]), 'type': 'file'}
      if any(n.startswith(path + '/') for n in STORE.objects):
        return {'name': path, 'size': 0, 'type': 'directory'}
    raise FileNotFoundError(path)

  def _open(self, path, mode='rb', **kwargs):
    key = self._strip_protocol(path)
    if 'a' in mode or '+' in mode:
      raise NotImplementedError(f'object stores cannot open {path!r} in mode {mode!r}')
    if 'w' in mode or 'x' in mode:
      return _Upload(key)
    with STORE.lock:
      if key not in STORE.objects:
        raise FileNotFoundError(path)
      return io.BytesIO(STORE.objects[key][1])

  def mkdir(self, path, create_parents=True, **kwargs):
    pass  # no folders on an object store

  def makedirs(self, path, exist_ok=False):
    pass

  def rmdir(self, path):
    pass

  def rm_file(self, path):
    key = self._strip_protocol(path)
    with STORE.lock:
      if STORE.objects.pop(key, None) is None:
        raise FileNotFoundError(path)

  def _rm(self, path):
    self.rm_file(path)

  def rm(self, path, recursive=False, maxdepth=None):
    key = self._strip_protocol(path)
    with STORE.lock:
      doomed = [n for n in STORE.objects if n == key or (recursive and n.startswith(key + '/'))]
      if not doomed and not any(n.startswith(key + '/') for n in STORE.objects):
        raise FileNotFoundError(path)
      for n in doomed:
        del STORE.objects[n]

  def cp_file(self, path1, path2, **kwargs):
    a, b = self._strip_protocol(path1), self._strip_protocol(path2)
    with STORE.lock:
      data = STORE.objects[a][1]
    STORE.put(b, data)

  def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
    a, b = self._strip_protocol(path1), self._strip_protocol(path2)
    with STORE.lock:
      moves = [(n, b + n[len(a):]) for n in STORE.objects if n == a or n.startswith(a + '/')]
      for old, new in moves:
        STORE.objects[new] = STORE.objects.pop(old)


class _GCSJsonApi(http.server.BaseHTTPRequestHandler):
  """The GCS JSON API calls TensorStore's gcs driver makes, served from STORE."""

  protocol_version = 'HTTP/1.1'

  def log_message(self, *args):
    pass

  def _reply(self, code: int, body: bytes = b'', headers: dict | None = None):
    self.send_response(code)
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    if body and self.command != 'HEAD':
      self.wfile.write(body)

  def _json(self, obj, code=200):
    self._reply(code, json.dumps(obj).encode(), {'Content-Type': 'application/json'})

  def _route(self):
    STORE.http_requests += 1
    url = urllib.parse.urlsplit(self.path)
    query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
    parts = url.path.split('/')
    # /storage/v1/b/<bucket>/o[/<name>]  or  /upload/storage/v1/b/<bucket>/o
    i = parts.index('b')
    bucket, rest = parts[i + 1], parts[i + 2:]
    name = urllib.parse.unquote('/'.join(rest[1:])) if len(rest) > 1 else None
    return bucket, name, query

  @staticmethod
  def _meta(bucket, name, gen, data):
    return {'kind': 'storage#object', 'bucket': bucket, 'name': name, 'generation': str(gen),
            'metageneration': '1', 'size': str(len(data)),
            'updated': '2026-01-01T00:00:00.000Z', 'timeCreated': '2026-01-01T00:00:00.000Z'}

  def _precondition(self, query, current):
    """None when the request may go on, else the HTTP status to answer."""
    gen = current[0] if current else None
    if 'ifGenerationMatch' in query:
      want = int(query['ifGenerationMatch'])
      if (want == 0 and gen is not None) or (want != 0 and gen != want):
        return 412
    if 'ifGenerationNotMatch' in query and gen is not None and int(query['ifGenerationNotMatch']) == gen:
      return 304 if self.command == 'GET' else 412
    return None

  def do_GET(self):
    bucket, name, query = self._route()
    if name is None:  # list
      prefix = query.get('prefix', '')
      start, end = query.get('pageToken') or query.get('startOffset', ''), query.get('endOffset')
      items = []
      with STORE.lock:
        for key in sorted(STORE.objects):
          b, _, n = key.partition('/')
          if b != bucket or not n.startswith(prefix) or n < start or (end and n >= end):
            continue
          if query.get('pageToken') and n == query['pageToken']:
            continue
          gen, data = STORE.objects[key]
          items.append(self._meta(bucket, n, gen, data))
      return self._json({'kind': 'storage#objects', 'items': items})
    with STORE.lock:
      current = STORE.objects.get(f'{bucket}/{name}')
    status = self._precondition(query, current)
    if status is not None:
      return self._reply(status)
    if current is None:
      return self._json({'error': {'code': 404, 'message': 'No such object'}}, 404)
    gen, data = current
    if query.get('alt') != 'media':
      return self._json(self._meta(bucket, name, gen, data))
    headers = {'x-goog-generation': str(gen), 'x-goog-metageneration': '1',
               'Content-Type': 'application/octet-stream'}
    rng = self.headers.get('Range')
    if rng and rng.startswith('bytes='):
      lo, _, hi = rng[len('bytes='):].partition('-')
      if lo == '':  # suffix range: the last N bytes
        lo, hi = max(len(data) - int(hi), 0), len(data) - 1
      else:
        lo, hi = int(lo), (int(hi) if hi else len(data) - 1)
      hi = min(hi, len(data) - 1)
      if lo > hi and len(data):
        return self._reply(416)
      headers['Content-Range'] = f'bytes {lo}-{hi}/{len(data)}'
      return self._reply(206, data[lo:hi + 1], headers)
    return self._reply(200, data, headers)

  def do_POST(self):
    bucket, _, query = self._route()
    body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
    name = query['name']
    with STORE.lock:
      current = STORE.objects.get(f'{bucket}/{name}')
    status = self._precondition(query, current)
    if status is not None:
      return self._reply(status)
    gen = STORE.put(f'{bucket}/{name}', body)
    return self._json(self._meta(bucket, name, gen, body))

  def do_DELETE(self):
    bucket, name, query = self._route()
    key = f'{bucket}/{name}'
    with STORE.lock:
      current = STORE.objects.get(key)
      if current is None:
        return self._reply(404)
      if 'ifGenerationMatch' in query and int(query['ifGenerationMatch']) != current[0]:
        return self._reply(412)
      del STORE.objects[key]
    return self._reply(204)


@pytest.fixture
def gcs(monkeypatch):
  """gs:// served by the fake store (epath and TensorStore); yields the store."""
  for protocol in ('gcs', 'gs'):  # what fsspec.filesystem('gcs') builds (gcsfs otherwise)
    monkeypatch.setitem(importlib.import_module('fsspec.registry')._registry, protocol,
                        FakeGCSFileSystem)
  epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)  # epath: fsspec, not tf.io.gfile
  # orbax asks google-cloud-storage whether the bucket has a hierarchical namespace; it has not.
  from orbax.checkpoint._src.path import gcs_utils
  monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False)
  from eva_jax import checkpoint as ckpt_lib
  monkeypatch.setattr(ckpt_lib, '_require_gcs_client', lambda: None)  # same reason
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _GCSJsonApi)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', f'http://127.0.0.1:{server.server_port}')
  monkeypatch.setenv('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'fake-token')
  with STORE.lock:
    STORE.objects.clear()
    STORE.http_requests = 0
  yield STORE
  server.shutdown()
  server.server_close()
  epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()


def test_fake_store_is_an_object_store(gcs):
  """The fixture itself: epath on gs:// sees objects, implicit folders, and no append."""
  p = epath.Path('gs://bucket/run/a/b.txt')
  assert not epath.Path('gs://bucket/run').exists()
  p.parent.mkdir(parents=True, exist_ok=True)  # a no-op, as on GCS
  assert not epath.Path('gs://bucket/run').exists()
  p.write_text('hi')
  assert gcs.names() == ['bucket/run/a/b.txt']
  assert epath.Path('gs://bucket/run').is_dir() and p.read_text() == 'hi'
  assert [c.name for c in epath.Path('gs://bucket/run').iterdir()] == ['a']
  with pytest.raises(NotImplementedError):
    p.open('a')


def _read_events(path: epath.Path) -> dict[str, list[tuple[int, float]]]:
  """Scalars of a TensorBoard events file, parsed from its bytes (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  data, pos, out = path.read_bytes(), 0, {}
  while pos < len(data):
    (n,) = np.frombuffer(data[pos:pos + 8], '<u8')
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + int(n)])
    pos += 12 + int(n) + 4
    for v in event.summary.value:
      out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_metrics_writer(gcs):
  from eva_jax.training import metrics
  root = 'gs://bucket/run'
  w = metrics.MetricsWriter(root, flush_secs=3600)
  w.write({'step': 1, 'loss': 2.5, 'lr': 1e-3})
  w.write({'step': 2, 'loss': 2.0, 'lr': 2e-3, 'note': 'text'})
  assert 'bucket/run/metrics.jsonl' not in gcs.names()  # throttled: nothing uploaded yet
  w.flush()
  assert len(epath.Path(root, 'metrics.jsonl').read_text().splitlines()) == 2
  w.write({'step': 3, 'loss': 1.5, 'lr': 3e-3})
  w.close()
  lines = epath.Path(root, 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [1, 2, 3]
  # A resumed run (same workdir) keeps the earlier records and adds its own (and writes a new
  # events file, named after the second it starts in).
  time.sleep(1.05)
  w = metrics.MetricsWriter(root, flush_secs=0)
  w.write({'step': 4, 'loss': 1.0, 'lr': 4e-3})
  assert len(epath.Path(root, 'metrics.jsonl').read_text().splitlines()) == 4  # flush_secs=0
  w.close()
  events = sorted(epath.Path(root, 'tensorboard').iterdir())
  assert len(events) == 2 and all(e.name.startswith('events.out.tfevents.') for e in events)
  scalars = {}
  for e in events:
    for tag, points in _read_events(e).items():
      scalars.setdefault(tag, []).extend(points)
  assert sorted(scalars['loss']) == [(1, 2.5), (2, 2.0), (3, 1.5), (4, 1.0)]
  assert 'note' not in scalars


def test_metrics_writer_events_readable_by_tensorflow(gcs, tmp_path):
  """The events file is a valid TFRecord/Event stream (read back with TensorFlow's reader)."""
  from eva_jax.training import metrics
  w = metrics.MetricsWriter('gs://bucket/tf')
  w.write({'step': 7, 'loss': 0.25})
  w.close()
  (event_file,) = epath.Path('gs://bucket/tf/tensorboard').iterdir()
  local = tmp_path / event_file.name
  local.write_bytes(event_file.read_bytes())
  if importlib.util.find_spec('tensorflow') is None:   # read in a subprocess: conftest.py says why
    pytest.skip('tensorflow is not installed')
  out = support.run_python(
      'import json, tensorflow as tf\n'
      f'it = tf.compat.v1.train.summary_iterator({str(local)!r})\n'
      'print(json.dumps([(e.step, v.tag, v.simple_value) for e in it for v in e.summary.value]))')
  assert json.loads(out.strip().splitlines()[-1]) == [[7, 'loss', 0.25]]


def _small_state():
  import jax.numpy as jnp
  from flax import struct
  from eva_jax.training import precision

  @struct.dataclass
  class State:
    step: object
    params: object
    opt_state: object
    loss_scale: object

  params = {'encoder': {'w': jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
                        'b': jnp.ones((4,), jnp.bfloat16)}}
  return State(step=jnp.asarray(5, jnp.int32), params=params,
               opt_state={'mu': jax_tree_zeros(params)},
               loss_scale=precision.LossScale.create(True))


def jax_tree_zeros(tree):
  import jax
  import jax.numpy as jnp
  return jax.tree.map(jnp.zeros_like, tree)


def test_checkpointer_save_restore_resolve(gcs):
  """Orbax checkpoint on gs://: folders via epath, arrays via TensorStore's gcs driver."""
  import jax
  from eva_jax import checkpoint as ckpt_lib
  state = _small_state()
  shardings = jax.tree.map(lambda a: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
  ck = ckpt_lib.Checkpointer('gs://bucket/run', keep=2)
  assert str(ck.directory) == 'gs://bucket/run/checkpoints'
  for step in (5, 6, 7):
    ck.save(step, state.replace(step=jax.numpy.asarray(step)), {'pos': step}, {'kind': 'test'},
            force=True)
  ck.close()
  names = gcs.names()
  assert not [n for n in names if not n.startswith('bucket/run/checkpoints/')]  # nothing local
  assert sorted({n.split('/')[3] for n in names}) == ['6', '7']  # keep=2 deleted step 5
  assert 'bucket/run/checkpoints/7/commit_success.txt' in names
  assert gcs.http_requests > 0  # the arrays went through TensorStore's gcs driver
  assert any(n.startswith('bucket/run/checkpoints/7/state/ocdbt.process_0/d/') for n in names)
  ck = ckpt_lib.Checkpointer('gs://bucket/run')
  assert ck.latest_step() == 7
  restored, data, meta = ck.restore(7, state, shardings)
  ck.close()
  assert data == {'pos': 7} and meta == {'kind': 'test'} and int(restored.step) == 7
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored.params, state.params)
  for path in ('gs://bucket/run', 'gs://bucket/run/checkpoints', 'gs://bucket/run/checkpoints/7'):
    assert ckpt_lib.resolve(path) == ('gs://bucket/run/checkpoints/7', 7)
  params, meta, step = ckpt_lib.restore_params('gs://bucket/run')
  assert step == 7 and meta == {'kind': 'test'}
  assert isinstance(params['encoder']['w'], np.ndarray)
  np.testing.assert_array_equal(params['encoder']['w'], np.asarray(state.params['encoder']['w']))
  # A step whose save has not committed (no commit_success.txt on an object store) is not resolved.
  epath.Path('gs://bucket/run/checkpoints/7/commit_success.txt').unlink()
  assert ckpt_lib.resolve('gs://bucket/run') == ('gs://bucket/run/checkpoints/6', 6)
  with pytest.raises(FileNotFoundError, match='not a directory'):
    ckpt_lib.resolve('gs://bucket/elsewhere')


@pytest.fixture
def tiny_run_on_gcs(gcs):
  """A freshly initialized tiny pretraining checkpoint at gs://bucket/tiny (as test_api's)."""
  from eva_jax import checkpoint as ckpt_lib
  from eva_jax import defaults, parallel
  from eva_jax.training import pretrain
  cfg = defaults.pretrain_defaults(model='tiny', teacher='clip-tiny')
  cfg.image_size, cfg.batch_size = 56, 4
  task, scfg, tcfg = pretrain.build(cfg, parallel.make_mesh(cfg.mesh))
  state = task.init(7)
  ck = ckpt_lib.Checkpointer('gs://bucket/tiny')
  ck.save(0, state, {}, {'kind': 'eva_pretrain', 'student': scfg.to_dict(),
                         'teacher': tcfg.to_dict()}, force=True)
  ck.close()
  return 'gs://bucket/tiny', state


def test_encoder_from_checkpoint(tiny_run_on_gcs):
  from eva_jax import checkpoint as ckpt_lib
  path, _ = tiny_run_on_gcs
  model, meta = ckpt_lib.encoder_from_checkpoint(path)
  assert meta['kind'] == 'eva_pretrain'
  out = model(np.zeros((1, 56, 56, 3), np.float32))
  assert out.shape == (1, 17, 64)


def test_export_to_object_store(tiny_run_on_gcs, tmp_path, monkeypatch):
  """eva-export of a gs:// checkpoint to gs:// files (both formats), read back."""
  monkeypatch.chdir(tmp_path)
  import torch
  from safetensors.numpy import load
  from eva_jax.convert import export
  path, state = tiny_run_on_gcs
  cls = np.asarray(state.params['encoder']['cls_token'], np.float32).reshape(-1)
  for fmt, out in (('timm', 'gs://bucket/exports/model.safetensors'),
                   ('eva', 'gs://bucket/exports/model.pth')):
    summary = export.export(path, fmt, out)
    data = epath.Path(out).read_bytes()
    if fmt == 'timm':
      sd = load(data)
      assert json.loads(epath.Path(out + '.json').read_text())['embed_dim'] == 64
    else:
      sd = torch.load(io.BytesIO(data), weights_only=True)['model']
    assert len(sd) == summary['tensors'] > 0
    np.testing.assert_array_equal(np.asarray(sd['cls_token'], np.float32).reshape(-1), cls)
  assert not list(tmp_path.iterdir())  # nothing written locally


def test_gs_workdir_without_google_cloud_storage(monkeypatch):
  """A clear error up front instead of orbax's ImportError at the first resume."""
  import sys
  from eva_jax import checkpoint as ckpt_lib
  monkeypatch.setitem(sys.modules, 'google.cloud.storage', None)
  with pytest.raises(ImportError, match='pip install google-cloud-storage'):
    ckpt_lib.Checkpointer('gs://bucket/run')


def test_pretrain_on_gs(gcs, tmp_path, monkeypatch):
  """A few steps of the demo pretraining run with --workdir=gs://bucket/run: all files land there.

  (~30 s on 2 CPU cores: compilation; resuming on gs:// is covered by the Checkpointer test.)
  """
  from eva_jax import checkpoint as ckpt_lib
  from eva_jax import configs
  from eva_jax.training import pretrain

  def cfg(total):
    c = configs.get('pretrain_demo')
    c.progress, c.total_steps, c.log_every, c.checkpoint_every, c.eval_batches = False, total, 2, 2, 0
    c.image_size, c.batch_size, c.optim.warmup_steps = 56, 4, 1
    c.data.mask.num_masking_patches = 6
    return c

  monkeypatch.chdir(tmp_path)  # where a path layer that ignores the URL would make a gs:/ folder
  pretrain.train(cfg(4), 'gs://bucket/run')
  run = epath.Path('gs://bucket/run')
  assert json.loads((run / 'config.json').read_text())['total_steps'] == 4
  steps = [json.loads(l)['step'] for l in (run / 'metrics.jsonl').read_text().splitlines()]
  assert steps[0] == 1 and {2, 4} <= set(steps)
  assert ckpt_lib.resolve('gs://bucket/run') == ('gs://bucket/run/checkpoints/4', 4)
  assert [p.name for p in (run / 'checkpoints').iterdir()] == ['2', '4']
  assert list((run / 'tensorboard').iterdir())
  assert not list(tmp_path.iterdir())


def test_checkpointer_rejects_other_url_schemes():
  """orbax-checkpoint 0.12.8 writes arrays to gs:// (TensorStore gcs driver) or local files only."""
  from eva_jax import checkpoint as ckpt_lib
  with pytest.raises(ValueError, match='cannot write array data to s3://'):
    ckpt_lib.Checkpointer('s3://bucket/run')
