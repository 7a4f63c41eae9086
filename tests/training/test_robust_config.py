"""Issue 12 kind G: every config value is range-checked before anything is built or compiled.

The rules live in one table (eva_jax/training/checks.py RULES, models/config.py MODEL_RULES); these
tests make sure every numeric field of every recipe has a rule, that every rule refuses NaN and
out-of-range values naming the field, and that the issue's instances stop before building.
"""
import math
import time

import numpy as np
import pytest

from eva_jax import configs, ranges
from eva_jax.benchmark import add_benchmark_defaults
from eva_jax.models import config as model_config
from eva_jax.training import checks, finetune, pretrain

import support

RECIPES = [n for n in configs.names() if n != 'saved_run']


def _recipe(name):
  cfg = configs.get(name)
  if checks.config_kind(cfg) == 'pretrain':
    cfg = add_benchmark_defaults(cfg)   # eva-benchmark reads these fields of any pretraining config
  return cfg


def _set(cfg, path, value):
  parent, _, leaf = path.rpartition('.')
  node = cfg
  for part in parent.split('.') if parent else ():
    node = node[part]
  node[leaf] = value


def test_every_numeric_field_of_every_recipe_has_a_rule():
  missing = []
  for name in RECIPES:
    cfg = _recipe(name)
    rules = checks.RULES[checks.config_kind(cfg)]
    missing += [f'{name}: {p}' for p, _ in checks.numeric_leaves(cfg) if p not in rules]
  # The encoder fields (config.model overrides and the resolved architectures, teachers included).
  for name in model_config.ENCODER_NAMES + model_config.TEACHER_NAMES:
    enc = (model_config.encoder_config(name) if name in model_config.ENCODER_NAMES
           else model_config.teacher_config(name))
    missing += [f'model {name}: {k}' for k, v in enc.items()
                if ranges.is_number(v) and k not in model_config.MODEL_RULES]
  assert not missing, f'numeric config fields without a range rule: {missing}'
  # ... and the walk is not vacuous: it sees the fields the issue names.
  seen = {p for p, _ in checks.numeric_leaves(_recipe('pretrain_demo'))}
  assert {'keep_checkpoints', 'optim.lr', 'loss_scale.initial', 'mesh.fsdp', 'data.mask.ratio',
          'data.scale', 'distributed.process_id', 'benchmark.steps'} <= seen


def _bad_values(rule: ranges.Range, value):
  """Values just outside `rule` of the same type as `value` (a config field keeps its type)."""
  if isinstance(value, (tuple, list)):
    yield (math.nan,) + tuple(value[1:])
    yield tuple(value) + (value[-1],)                   # wrong length
    if rule.ordered:
      yield tuple(reversed(value)) if value[0] != value[-1] else ()
    return
  if isinstance(value, float):
    yield from (math.nan, math.inf, -math.inf)
  step = lambda x: max(1.0, abs(x))   # + 1 is lost in float rounding at 2^64
  if rule.lo > -math.inf:
    yield (rule.lo if rule.lo_open else rule.lo - step(rule.lo)) if isinstance(value, float) \
        else int(rule.lo) - 1
  if rule.hi < math.inf:
    yield (rule.hi if rule.hi_open else rule.hi + step(rule.hi)) if isinstance(value, float) \
        else int(rule.hi) + 1


def test_every_rule_refuses_nan_and_out_of_range_values_naming_the_field():
  tried = 0
  for name in RECIPES:
    base = _recipe(name)
    checks.check_config(base)   # the recipe as shipped is valid
    kind = checks.config_kind(base)
    for path, value in checks.numeric_leaves(base):
      rule = checks.RULES[kind][path]
      for bad in _bad_values(rule, value):
        if bad == () or bad in rule.also:
          continue
        cfg = base.copy_and_resolve_references()
        _set(cfg, path, bad)
        with pytest.raises(ValueError, match=f'config.{path}='):
          checks.check_config(cfg)
        tried += 1
  assert tried > 1000   # 1501: 12 recipes, 568 numeric fields, 1-5 values each


@pytest.mark.parametrize('path,value,message', [
    ('keep_checkpoints', 0, r'config.keep_checkpoints=0 is out of range: must be an integer >= 1 '
     r'\(0 would delete every checkpoint'),
    ('optim.lr', -1e-3, r'config.optim.lr=-0.001 is out of range: must be a finite number in '
     r'\(0, 1\]'),
    ('optim.lr', math.nan, r'config.optim.lr=nan is out of range'),
    ('optim.lr', math.inf, r'config.optim.lr=inf is out of range'),
    ('loss_scale.min_scale', 2.0 ** 17, r'config.loss_scale.initial=65536.0 is below '
     r'config.loss_scale.min_scale=131072.0'),
    ('loss_scale.initial', 0.5, r'config.loss_scale.initial=0.5 is out of range'),
    ('optim.min_lr', 0.5, r'config.optim.min_lr=0.5 is above config.optim.lr=0.002'),
    ('optim.warmup_steps', 150, r'config.optim.warmup_steps=150 must be < config.total_steps=150'),
    ('mesh.tensor', 0, r'config.mesh.tensor=0 is out of range: must be an integer >= 1 or -1'),
    ('data.mask.ratio', 1.0, r'config.data.mask.ratio=1.0 is out of range: must be a finite '
     r'number in \[0, 1\)'),
    ('data.scale', (0.9, 0.2), r'config.data.scale=\(0.9, 0.2\) is out of range: must be 2 values'
     r'.*not decreasing'),
    ('eval_every', 5, None),   # with eval_batches=0 below
    ('model.drop_path', math.nan, r'config.model.drop_path=nan is out of range'),
    ('model.depth', 0, r'config.model.depth=0 is out of range: must be an integer >= 1'),
])
def test_issue_instances_fail_before_building(tmp_path, path, value, message):
  cfg = support.recipe('pretrain_demo')
  _set(cfg, path, value)
  if path == 'eval_every':
    cfg.eval_batches = 0
    message = r'config.eval_every=5 asks for a validation loss .* config.eval_batches=0'
  t0 = time.perf_counter()
  with pytest.raises(ValueError, match=message):
    pretrain.train(cfg, str(tmp_path))
  # Refused by the checks, before the mesh, the teacher or any compilation.
  assert time.perf_counter() - t0 < 2.0
  assert not (tmp_path / 'checkpoints').exists() and not (tmp_path / 'config.json').exists()


def test_finetune_and_probe_and_data_bench_tables():
  ft = support.recipe('finetune_demo')
  ft.ema_decay = 0.999     # a 1000-step horizon in a 120-step run
  with pytest.raises(ValueError, match=r'config.ema_decay=0.999 averages over ~1000 steps, more '
                     r'than config.total_steps=120'):
    checks.check_config(ft)
  ft.ema_decay = 1.0
  with pytest.raises(ValueError, match=r'config.ema_decay=1.0 is out of range: .*\[0, 1\)'):
    checks.check_config(ft)
  probe = configs.get('linear_probe_demo')
  probe.holdout = 1.0
  with pytest.raises(ValueError, match=r'config.holdout=1.0 is out of range: .*\(0, 1\)'):
    checks.check_config(probe)
  probe.holdout, probe.knn_temperature = 0.25, 0.0
  with pytest.raises(ValueError, match='config.knn_temperature=0.0'):
    checks.check_config(probe)
  bench = configs.get('data_bench')
  bench.num_batches = 0
  with pytest.raises(ValueError, match='config.num_batches=0'):
    from eva_jax.data import benchmark
    benchmark.run(bench)
  pre = support.recipe('pretrain_demo')
  pre.data.mixture = (('demo', math.nan),)
  with pytest.raises(ValueError, match=r'config.data.mixture\[0\] weight=nan is out of range'):
    checks.check_config(pre)
  pre.data.mixture = ()
  pre.teacher.shard = 'tp'
  with pytest.raises(ValueError, match="config.teacher.shard='tp' must be one of 'replicate', "
                     "'fsdp'"):
    checks.check_config(pre)


def test_head_smaller_than_the_label_set_is_refused(demo_dir, tmp_path):
  """The 8-class demo with a 3-way head used to train and 'report' top-5 = 1.0."""
  cfg = support.recipe('finetune_demo', num_classes=3)
  program = finetune.FinetuneProgram(cfg)
  with pytest.raises(ValueError, match=r"config.data.source='demo' has 8 classes but "
                     r'the head has 3 \(config.num_classes=3\): no logit for labels 3..7'):
    program.validate()
  cfg.num_classes = 8
  finetune.FinetuneProgram(cfg).validate()      # exactly the label set: fine
  cfg.num_classes = 0
  p = finetune.FinetuneProgram(cfg)
  p.validate()
  assert p.num_classes == 8                     # 0 = from the source
  # An eval split with a class the training set lacks is refused (its labels cannot be matched);
  # one with a subset of the classes is read with the training set's numbering.
  import os
  names = sorted(os.listdir(demo_dir))
  cfg.num_classes = 8
  cfg.eval_source = 'folder:' + _folder_with_classes(demo_dir, names + ['zebra'], tmp_path / 'a')
  with pytest.raises(ValueError, match=r"config.eval_source: folder:.* has 1 of 9 class names "
                     r"that the training source .* \(8 classes\) does not have, e.g. 'zebra'"):
    finetune.FinetuneProgram(cfg).validate()
  cfg.eval_source = 'folder:' + _folder_with_classes(demo_dir, names[5:], tmp_path / 'b')
  cfg.image_size, cfg.batch_size = 28, 4
  p = finetune.FinetuneProgram(cfg)
  p.validate()
  (val, _), = p.eval_sources()
  assert val.num_classes == 8 and [val[i][1] for i in range(len(val))] == [5, 6, 7]
  loader = p.loader(train=False)   # what evaluation reads: the training numbering
  batch = next(iter(loader))
  assert batch.arrays['label'][batch.valid].tolist() == [5, 6, 7]
  loader.close()
  # ... and scores it among its own 3 classes (the ImageNet-A / -R protocol), checked against
  # numpy on the model's own logits; the full-head figures stay as they were.
  _check_subset_scoring(p, batch)
  # A mixture cannot train a classifier: refused up front, naming the field.
  cfg.data.mixture = (('demo', 1.0),)
  with pytest.raises(ValueError, match='config.data.mixture is for pretraining'):
    finetune.FinetuneProgram(cfg).validate()


def _check_subset_scoring(program, batch):
  from eva_jax import parallel
  from eva_jax.training import task as task_lib
  mask = program.eval_class_mask(8)
  assert mask.tolist() == [False] * 5 + [True] * 3
  assert finetune.classes_note(mask) == ' among 3 of 8 classes'   # printed with the scores
  assert finetune.classes_note(np.ones(8, bool)) == ''
  mesh = parallel.make_mesh(program.cfg.mesh)
  full, _ = finetune.build(program.cfg, mesh, 8)   # eval_classes None: the whole head
  sub, _ = finetune.build(program.cfg, mesh, 8, eval_classes=mask)
  state = full.init(0)
  model = task_lib.merge_pure(full.graphdef, full.template, full.eval_params(state))
  valid = batch.valid
  logits = np.asarray(model(batch.arrays['image']), np.float64)[valid]
  labels = batch.arrays['label'][valid]
  for task, m in ((sub, mask), (full, np.ones(8, bool))):
    got = finetune.eval_top_k(task, state, {}, program.loader(train=False), 0, 'image')
    z = np.where(m, logits, -np.inf)
    order = np.argsort(-z, 1)
    ce = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(3), labels]
    assert got['eval_count'] == 3
    assert got['eval_top1'] == np.mean(order[:, 0] == labels)
    assert got['eval_top5'] == np.mean([l in o[:5] for l, o in zip(labels, order)])
    np.testing.assert_allclose(got['eval_loss'], ce.mean(), rtol=1e-4)
  # An evaluation that scores nothing (every record unreadable) is refused, not reported as 0.
  class _Empty(list):
    def close(self):
      pass
  with pytest.raises(ValueError, match='Evaluation scored no image: all 0 records read'):
    finetune.eval_top_k(full, state, {}, _Empty(), 0, 'image')
  # With 3 allowed classes every label is in the top 5; over the 8-way head it need not be.
  assert finetune.eval_top_k(sub, state, {}, program.loader(train=False), 0,
                             'image')['eval_top5'] == 1.0
  # The printed line says what the figures are: held-out images, among 3 of the 8 classes.
  import contextlib
  import io
  with contextlib.redirect_stdout(io.StringIO()) as out:
    program.evaluate(sub, state, {}, 0)
  assert 'top5 1.0000 on 3 images among 3 of 8 classes' in out.getvalue(), out.getvalue()


def _folder_with_classes(demo_dir, names, root):
  import os
  import shutil
  photo = os.path.join(demo_dir, sorted(os.listdir(demo_dir))[0])
  first = os.path.join(photo, sorted(os.listdir(photo))[0])
  for name in names:
    os.makedirs(os.path.join(root, name))
    shutil.copy(first, os.path.join(root, name, '0.jpg'))
  return str(root)


def test_loaders_refuse_labels_outside_the_head(demo_dir):
  from eva_jax.data import pipeline
  data = configs.get('finetune_demo').data
  with pytest.raises(ValueError, match=r'demo.* has 8 classes but config.num_classes=3'):
    pipeline.build_classification_loader(data, image_size=56, batch_size=4, seed=0, train=False,
                                         num_classes=3, process_index=0, process_count=1)
  # A label past the head met while iterating (e.g. a source whose class count is wrong).
  import grain
  batches = [{'image': np.zeros((2, 4, 4, 3), np.float32), 'label': np.array([1, 5], np.int32),
              'valid': np.array([True, True]), 'skipped': np.zeros(2, np.int32)}]
  it = pipeline.LoaderIterator(grain.MapDataset.source(batches).to_iter_dataset(), seed=0,
                               process_index=0, num_classes=4, source='folder:/x')
  with pytest.raises(ValueError, match=r'folder:/x yields label 5, outside \[0, 4\) .* Set '
                     'config.num_classes to at least 6'):
    next(it)
  # Padding rows (valid False) carry label 0 and are not labels of the data.
  batches[0]['valid'] = np.array([True, False])
  it = pipeline.LoaderIterator(grain.MapDataset.source(batches).to_iter_dataset(), seed=0,
                               process_index=0, num_classes=4)
  assert next(it).arrays['label'].tolist() == [1, 5]


def test_another_trainers_config_gets_the_common_table():
  """A config of a trainer to come (trainer.Program) has no marker field: the run table applies."""
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(total_steps=10, batch_size=4, image_size=56, log_every=1,
                                       checkpoint_every=5, keep_checkpoints=0, seed=0))
  with pytest.raises(ValueError, match='config.keep_checkpoints=0 is out of range'):
    checks.check_config(cfg)
  cfg.keep_checkpoints = 1
  assert checks.check_config(cfg) == 'train'
