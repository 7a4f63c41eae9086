"""Contrastive (EVA-CLIP) training: tower initialization against the files it came from (a MIM
checkpoint, a random-init transformers text tower: features < 1e-4), an end-to-end run with
zero-shot / retrieval metrics, exact resume, and the per-tower learning rates."""
import json
import logging
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from eva_jax import checkpoint as ckpt_lib
from eva_jax import parallel
from eva_jax.cli import common
from eva_jax.convert.common import CheckpointError
from eva_jax.models import clip as clip_lib
from eva_jax.training import clip, optim, pretrain

import support

torch = pytest.importorskip('torch')

EVAL_KEYS = ['zero_shot/top1', 'zero_shot/top5'] + [
    f'retrieval/{d}_R@{k}' for d in ('image_to_text', 'text_to_image') for k in (1, 5, 10)]


def tiny_cfg(**overrides):
  cfg = support.recipe('clip_demo')
  cfg.image_size = 28                     # 2x2 patches of 14
  cfg.batch_size = 8
  cfg.total_steps = 4
  cfg.optim.warmup_steps = 1
  cfg.log_every = 1
  cfg.checkpoint_every = 2
  cfg.eval_every = 0
  cfg.eval.batch_size = 16
  cfg.eval.limit = 16
  cfg.data.device_prefetch = 0
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope='module')
def mim_checkpoint(tmp_path_factory):
  """An eva_jax pretraining checkpoint of the demo student ('tiny'), the image tower's source."""
  workdir = tmp_path_factory.mktemp('mim')
  cfg = support.recipe('pretrain_demo')
  cfg.image_size = 28
  task, scfg, tcfg = pretrain.build(cfg, parallel.make_mesh(cfg.mesh))
  ck = ckpt_lib.Checkpointer(str(workdir))
  ck.save(0, task.init(3), {}, {'kind': 'eva_pretrain', 'student': scfg.to_dict(),
                                'teacher': tcfg.to_dict()}, force=True)
  ck.close()
  return workdir


def _text_reference(path, width):
  import transformers
  torch.manual_seed(0)
  ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=77, hidden_act='gelu', projection_dim=32,
      eos_token_id=2)).eval()
  ref.save_pretrained(path)
  return ref


@pytest.fixture(scope='module')
def text_tower(tmp_path_factory):
  path = tmp_path_factory.mktemp('text')
  return path, _text_reference(path, 32)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, mim_checkpoint, text_tower):
  """A 4-step run (checkpoints at 2 and 4), and a copy of it cut back to step 2 then resumed."""
  full = tmp_path_factory.mktemp('clip_full')
  cfg = tiny_cfg()
  cfg.init.image, cfg.init.text = str(mim_checkpoint), str(text_tower[0])
  last = clip.train(cfg, str(full))
  resumed = tmp_path_factory.mktemp('clip_resumed')
  shutil.copytree(full / 'checkpoints' / '2', resumed / 'checkpoints' / '2')
  shutil.copy(full / 'config.json', resumed / 'config.json')
  cfg.eval.zero_shot = cfg.eval.retrieval = ''   # evaluation does not touch the state: skip it
  cfg.init.image = cfg.init.text = ''   # a resume reads no init: these must change nothing
  clip.train(cfg, str(resumed))
  return full, resumed, last


def _records(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def built(mim_checkpoint, text_tower):
  """(program, task) initialized from the MIM checkpoint and the transformers text tower."""
  cfg = tiny_cfg()
  cfg.init.image, cfg.init.text = str(mim_checkpoint), str(text_tower[0])
  program = clip.ClipProgram(cfg)
  program.validate()
  return program, program.build(parallel.make_mesh(cfg.mesh))


def test_towers_start_from_their_files(built, mim_checkpoint, text_tower):
  program, task = built
  params = jax.device_get(program.init_state(task).params)
  enc, _, _ = ckpt_lib.restore_params(str(mim_checkpoint))
  enc = enc['encoder']
  for name in ('patch_kernel', 'pos_embed', 'cls_token'):
    np.testing.assert_array_equal(params['visual'][name], enc[name])
  np.testing.assert_array_equal(params['visual']['blocks']['layers']['attn']['qkv'],
                                enc['blocks']['layers']['attn']['qkv'])
  # Text features of the loaded tower equal the transformers model's (fp32, < 1e-4).
  from eva_jax.data.tokenizer import tokenize
  tokens = tokenize(['a photo of a cat', 'a rocket on the launch pad', 'galaxies'])
  model = task.model(params)
  ours = np.asarray(model.encode_text(tokens))
  ref = text_tower[1]   # eos_token_id=2: transformers' argmax (EOT = largest id) pooling
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(tokens.astype(np.int64))).text_embeds.numpy()
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


def test_run_logs_zero_shot_and_retrieval(runs):
  full, _, last = runs
  recs = _records(full)
  train = [r for r in recs if 'loss' in r]
  assert [r['step'] for r in train] == [1, 2, 3, 4]
  assert all(np.isfinite(r['loss']) and r['loss'] > 0 for r in train)
  evals = [r for r in recs if 'zero_shot/top1' in r]
  assert len(evals) == 1 and evals[0]['step'] == 4
  for k in EVAL_KEYS:
    assert 0.0 <= evals[0][k] <= 1.0 and last[k] == evals[0][k]
  assert evals[0]['zero_shot/top5'] >= evals[0]['zero_shot/top1']
  assert evals[0]['retrieval/image_to_text_R@10'] >= evals[0]['retrieval/image_to_text_R@1']


def test_resume_equals_uninterrupted(runs):
  full, resumed, _ = runs
  a, _, step_a = ckpt_lib.restore_params(str(full))
  b, _, step_b = ckpt_lib.restore_params(str(resumed))
  assert step_a == step_b == 4
  jax.tree.map(np.testing.assert_array_equal, a, b)
  loss = lambda w: {r['step']: r['loss'] for r in _records(w) if 'loss' in r}   # noqa: E731
  assert {s: v for s, v in loss(full).items() if s > 2} == loss(resumed)
  # config.json still names the towers the run started from, not the unused init of the resume.
  init = [json.loads((w / 'config.json').read_text())['init'] for w in (full, resumed)]
  assert init[0] == init[1] and init[0]['image'] and init[0]['text']


def test_zero_shot_command_repeats_the_run_eval(runs, tmp_path):
  full, _, last = runs
  output = tmp_path / 'new' / 'folder' / 'metrics.json'   # its folder is made, before evaluating
  out = support.run_cli('zero_shot', f'--checkpoint={full}', '--batch_size=16', '--limit=16',
                        f'--output={output}')
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert json.loads(output.read_text()) == got
  for k in EVAL_KEYS:
    assert got[k] == pytest.approx(last[k], abs=1e-6), k
  # The counts behind the fractions: held-out demo crops, and retrieval pairs up to --limit.
  assert got['zero_shot/count'] > 0 and got['retrieval/images'] == 16
  assert got['retrieval/captions'] >= 16 and got['zero_shot/unreadable'] == 0
  # Nothing to evaluate, and a bad --templates: one line each, naming the flags.
  out = support.run_cli('zero_shot', f'--checkpoint={full}', '--zero_shot=', '--retrieval=')
  assert out.returncode == 2 and "--zero_shot='' and --retrieval='' leave nothing" in out.stderr
  out = support.run_cli('zero_shot', f'--checkpoint={full}', '--templates=fancy', '--retrieval=')
  assert out.returncode == 2 and "--templates='fancy' must be one of" in out.stderr
  assert 'config.eval' not in out.stderr
  out = support.run_cli('zero_shot', f'--checkpoint={full}', f'--output={tmp_path}')
  assert out.returncode == 2 and 'is a folder: name the JSON file' in out.stderr


def test_bad_inputs(tmp_path, caplog, built):
  # A global batch too small for the contrastive loss: a warning naming the batch.
  with caplog.at_level(logging.WARNING):
    clip.ClipProgram(tiny_cfg(batch_size=6)).validate()
  assert 'config.batch_size=6' in caplog.text and 'too small' in caplog.text
  # A text tower of another width than the config: one line naming both widths.
  _text_reference(tmp_path, 48)
  cfg = tiny_cfg()
  cfg.init.text = str(tmp_path)
  program = clip.ClipProgram(cfg)
  program.validate()
  with pytest.raises(CheckpointError) as e:   # the same model as `built`: reuse its task
    program.init_state(built[1])
  msg = common.known_error_message(e.value)
  assert msg is not None and '\n' not in msg
  assert 'text.width: file 48 vs config 32' in msg


@pytest.mark.parametrize('name', ['adamw', 'lamb'])
def test_per_tower_learning_rates(name):
  """After one step at peak lr, Adam's update of a zero parameter with gradient 1 is the
  parameter's effective lr (LAMB: trust ratio 1 at zero weights), and weight decay of a weight at
  1 with zero gradient is lr x wd: both per tower, per block."""
  mcfg = clip_lib.clip_config('eva-clip-tiny')
  params = nnx.to_pure_dict(nnx.state(clip_lib.abstract(mcfg), nnx.Param))
  ocfg = ml_collections.ConfigDict(dict(
      name=name, lr=5e-4, min_lr=0.0, warmup_steps=0, b1=0.9, b2=0.98, eps=1e-12,
      weight_decay=0.1, clip_norm=0.0, layer_decay=1.0, towers=dict(
          visual=dict(lr=4e-4, weight_decay=0.05, layer_decay=0.85),
          text=dict(lr=4e-5, weight_decay=0.2, layer_decay=0.75))))
  tx, _ = optim.make_optimizer(ocfg, params, total_steps=10)
  zeros = jax.tree.map(lambda p: np.zeros(p.shape, np.float32), params)
  ones = jax.tree.map(lambda p: np.ones(p.shape, np.float32), params)
  update = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])
  lr = jax.tree.map(lambda u: -np.asarray(u), update(ones, zeros))
  dv, dt = mcfg.vision.depth, mcfg.text.depth
  vis = lr['visual']['blocks']['layers']['mlp']['fc1']['kernel']
  txt = lr['text']['blocks']['layers']['mlp']['fc1']['kernel']
  for i in range(dv):
    np.testing.assert_allclose(vis[i], 4e-4 * 0.85 ** (dv - i), rtol=1e-5)
  for j in range(dt):
    np.testing.assert_allclose(txt[j], 4e-5 * 0.75 ** (dt - j), rtol=1e-5)
  np.testing.assert_allclose(lr['visual']['patch_kernel'], 4e-4 * 0.85 ** (dv + 1), rtol=1e-5)
  np.testing.assert_allclose(lr['text']['token_embedding'], 4e-5 * 0.75 ** (dt + 1), rtol=1e-5)
  np.testing.assert_allclose(lr['visual_head']['kernel'], 4e-4, rtol=1e-5)
  np.testing.assert_allclose(lr['text']['text_projection'], 4e-5, rtol=1e-5)
  np.testing.assert_allclose(lr['logit_scale'], 5e-4, rtol=1e-5)
  if name == 'lamb':   # the trust ratio rescales a pure-decay update to ||w||: AdamW only
    return
  # Decoupled weight decay (Adam part is 0 with zero gradients): lr x wd on matrices only.
  wd = jax.tree.map(lambda u: -np.asarray(u), update(zeros, ones))
  vk = wd['visual']['blocks']['layers']['mlp']['fc1']
  np.testing.assert_allclose(vk['kernel'][0], 4e-4 * 0.85 ** dv * 0.05, rtol=1e-4)
  np.testing.assert_array_equal(vk['bias'], 0.0)
  tk = wd['text']['blocks']['layers']['mlp']['fc1']['kernel']
  np.testing.assert_allclose(tk[0], 4e-5 * 0.75 ** dt * 0.2, rtol=1e-4)
  np.testing.assert_array_equal(wd['text']['positional_embedding'], 0.0)
  np.testing.assert_array_equal(wd['logit_scale'], 0.0)


def test_saved_clip_run_is_a_config(runs):
  # --config=WORKDIR repeats a contrastive run: the CLIP model section, its own range table.
  from eva_jax import configs
  from eva_jax.training import checks
  full, _, _ = runs
  cfg = configs.get(str(full))
  assert checks.check_config(cfg) == 'clip'
  assert clip.clip_model_config(cfg).to_dict() == clip.clip_model_config(tiny_cfg()).to_dict()
  cfg.model.patch_dropout = 1.0
  with pytest.raises(ValueError, match='config.model.patch_dropout=1.0 is out of range'):
    checks.check_config(cfg)


def test_zero_shot_names_follow_the_folder_labels(tmp_path, caplog):
  """An empty class folder takes no label (data/sources.py FolderSource), so the zero-shot names
  must skip it too: one name per folder would otherwise shift every later class onto the wrong
  prompt (a user trial: top-1 0.83 -> 0.50 from one empty folder)."""
  from PIL import Image
  from eva_jax.data import sources
  for name in ('cat', 'cup', 'rocket'):
    (tmp_path / name).mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / name / 'a.png')
  (tmp_path / 'empty').mkdir()
  (tmp_path / '.ipynb_checkpoints').mkdir()   # hidden: no class, as in the folder walk
  ev = ml_collections.ConfigDict({'classnames': ''})
  folder = clip.open_zero_shot_folder(str(tmp_path))
  labels = dict(zip(sources.FolderSource(str(tmp_path)).paths,
                    sources.FolderSource(str(tmp_path)).labels))
  assert clip.class_names(ev, folder) == ['cat', 'cup', 'rocket']
  ev = ml_collections.ConfigDict({'classnames': ('a cat', 'a cup', 'a teapot', 'a rocket')})
  with caplog.at_level(logging.WARNING):
    names = clip.class_names(ev, folder)
  assert "['a teapot'] are left out" in caplog.text
  for path, label in labels.items():   # each image's label names its own folder
    assert names[label] == 'a ' + path.split('/')[-2]
  ev.classnames = ('a cat', 'a cup', 'a rocket')
  assert clip.class_names(ev, folder) == ['a cat', 'a cup', 'a rocket']
  ev.classnames = ('a cat', 'a cup')
  with pytest.raises(ValueError, match=r'2 class names .* 3 class folders with images \(empty, '
                     r'no label: empty\)'):
    clip.class_names(ev, folder)
