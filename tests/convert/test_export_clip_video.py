"""eva-export of the two run kinds no image format fits: an EVA-CLIP run to open_clip (loaded by
open_clip itself, strict, features vs ours) and a frame-averaged video run to timm / eva (the
image classifier, timm's per-frame forward vs ours); each refusal names the format that fits."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import clip_support
import support
from eva_jax import checkpoint as ckpt_lib
from eva_jax.convert import common, export, open_clip_export, open_clip_import, video_export
from eva_jax.models import clip as clip_lib

torch = pytest.importorskip('torch')
open_clip = pytest.importorskip('open_clip')
tev = pytest.importorskip('timm.models.eva')


def _load(module, params):
  """`module` (abstract or not) holding the nested numpy `params`."""
  state = nnx.state(module, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(module, state)
  return module


@pytest.fixture(scope='module')
def clip_run(tmp_path_factory):
  """A 1-step eva-clip run of the tiny towers at 28 px (SigLIP: logit bias; mean pool: fc_norm)."""
  from eva_jax.training import clip
  workdir = tmp_path_factory.mktemp('clip_run')
  cfg = support.recipe('clip_demo', image_size=28, batch_size=8, total_steps=1, log_every=1,
                       checkpoint_every=1, eval_every=0, loss='siglip')
  cfg.model.pool = 'avg'
  cfg.optim.warmup_steps = 0
  cfg.eval.zero_shot = cfg.eval.retrieval = ''
  cfg.data.device_prefetch = 0
  cfg.init.image = cfg.init.text = ''
  clip.train(cfg, str(workdir))
  return workdir


def test_clip_run_to_open_clip(clip_run, tmp_path):
  out = tmp_path / 'oc' / 'open_clip_pytorch_model.bin'
  proc = support.run_cli('export', f'--workdir={clip_run}', '--format=open_clip', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (summary['step'], summary['weights'], summary['model']) == (1, 'raw', 'eva-clip-tiny')
  params, meta, _ = ckpt_lib.restore_params(str(clip_run))
  mcfg = ml_collections.ConfigDict(meta['clip'])
  hub = json.loads((out.parent / 'open_clip_config.json').read_text())
  assert hub['model_cfg']['vision_cfg']['timm_model_name'] == \
      'local-dir:' + str(out.parent / 'timm_trunk')
  # open_clip alone builds the model from the folder and loads the weights (strict=True inside).
  oc = open_clip.create_model(f'local-dir:{out.parent}').eval()
  pre = open_clip.get_model_preprocess_cfg(oc)
  assert tuple(pre['size']) == (28, 28) and tuple(pre['mean']) == pytest.approx(
      (0.48145466, 0.4578275, 0.40821073))
  # The README's explicit lines: the model config's class + load_state_dict(strict=True).
  cfg = {k: v for k, v in hub['model_cfg'].items() if k != 'custom_text'}
  explicit = open_clip.model.CustomTextCLIP(**cfg)
  explicit.load_state_dict(torch.load(out), strict=True)
  for k, v in explicit.state_dict().items():
    assert torch.equal(v, oc.state_dict()[k]), k
  images, tokens, want_i, want_t = clip_support.open_clip_features(oc, 28)
  ours = _load(clip_lib.abstract(mcfg), params)
  got_i = np.asarray(ours.encode_image(jnp.asarray(images)))
  got_t = np.asarray(ours.encode_text(jnp.asarray(tokens, jnp.int32)))
  di, dt = np.abs(got_i - want_i).max(), np.abs(got_t - want_t).max()
  print(f'open_clip image max abs diff {di:.2e}, text {dt:.2e}')
  assert di < 1e-5 and dt < 1e-5, (di, dt)
  assert oc.logit_scale.item() == float(params['logit_scale'])
  assert oc.logit_bias.item() == float(params['logit_bias'])
  # eva-zero-shot's importer reads the file back bit-exact (open_clip_config.json checked too).
  back = open_clip_import.read_open_clip(str(out), mcfg)
  flat = common.flatten(params)
  assert sorted(back) == sorted(flat)
  for k, v in flat.items():
    np.testing.assert_array_equal(back[k], np.asarray(v).reshape(back[k].shape), err_msg=k)
  # safetensors: the same tensors.
  st = tmp_path / 'st' / 'open_clip_model.safetensors'
  export.export(str(clip_run), 'open_clip', str(st))
  oc2 = open_clip.create_model(f'local-dir:{st.parent}')
  for k, v in oc.state_dict().items():
    assert torch.equal(v, oc2.state_dict()[k]), k


def test_clip_run_refuses_image_formats(clip_run, tmp_path):
  for fmt, name in (('timm', 'x.safetensors'), ('eva', 'x.pth'), ('detectron2', 'x.pth'),
                    ('video', 'x.pth')):
    with pytest.raises(ValueError, match=r'EVA-CLIP run .*--format=open_clip') as e:
      export.export(str(clip_run), fmt, str(tmp_path / name))
    assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match='--format=open_clip'):
    video_export.export(str(clip_run), str(tmp_path / 'x.pth'))
  with pytest.raises(ValueError, match=r'\.bin / \.pth / \.safetensors'):
    export.export(str(clip_run), 'open_clip', str(tmp_path / 'x.pt'))
  # open_clip picks a folder's weights by its own name order: a folder holding another weights
  # file (an earlier export under another name) is refused, and nothing is written.
  (tmp_path / 'oc').mkdir()
  (tmp_path / 'oc' / 'open_clip_model.safetensors').write_bytes(b'an earlier export')
  with pytest.raises(ValueError, match=r'already holds open_clip_model\.safetensors: open_clip '
                     r'would load one of them, not open_clip_pytorch_model\.bin'):
    export.export(str(clip_run), 'open_clip', str(tmp_path / 'oc' / 'open_clip_pytorch_model.bin'))
  assert sorted(p.name for p in (tmp_path / 'oc').iterdir()) == ['open_clip_model.safetensors']


@pytest.mark.parametrize('name,pool', [('eva02-clip-tiny', 'token')])
def test_custom_trunk_folder_loads_in_open_clip(tmp_path, name, pool):
  """RoPE tower (ref_feat_shape through JSON), token pool: random weights, write_open_clip."""
  cfg = open_clip_import.clip_config_for(name, image_size=28, pool=pool)
  model = clip_support.random_clip(cfg)
  out = tmp_path / 'open_clip_pytorch_model.bin'
  rec = open_clip_export.write_open_clip(common.model_params_numpy(model), cfg, str(out),
                                         mean=(0.5,) * 3, std=(0.25,) * 3)
  assert rec['trunk'].startswith('local-dir:')
  oc = open_clip.create_model(f'local-dir:{tmp_path}').eval()
  images, tokens, want_i, want_t = clip_support.open_clip_features(oc, 28)
  got_i = np.asarray(model.encode_image(jnp.asarray(images)))
  got_t = np.asarray(model.encode_text(jnp.asarray(tokens, jnp.int32)))
  assert np.abs(got_i - want_i).max() < 1e-5 and np.abs(got_t - want_t).max() < 1e-5
  # A released tower at its released size names timm's own trunk (no folder needed).
  released = open_clip_import.clip_config_for('EVA02-B-16')
  assert open_clip_export.released_trunk(released) == 'eva02_base_patch16_clip_224'
  assert open_clip_export.released_trunk(open_clip_import.clip_config_for(
      'EVA02-B-16', image_size=112)) is None


@pytest.fixture(scope='module')
def frames_run(tmp_path_factory):
  """A 2-step frame-averaged video run (video.model=frame_average, 4 frames of 28 px, 2 classes)."""
  from eva_jax.training import trainer, video
  root = support.write_pan_clips(tmp_path_factory.mktemp('clips'), per_class=2)
  cfg = support.recipe('video_demo', image_size=28, batch_size=4, total_steps=2, log_every=1,
                       checkpoint_every=2, eval_source='')
  cfg.data.source = f'video_folder:{root}'
  cfg.data.threads = 1
  cfg.optim.warmup_steps = 1
  cfg.video.model = 'frame_average'
  cfg.video.time_noise = 0.0
  workdir = tmp_path_factory.mktemp('frames_run')
  trainer.run(video.VideoFinetuneProgram(cfg), str(workdir))
  return workdir


def test_frame_averaged_run_to_timm_and_eva(frames_run, tmp_path):
  from safetensors.numpy import load_file
  from eva_jax.models import video as video_lib
  params, meta, _ = ckpt_lib.restore_params(str(frames_run))
  assert meta['video_model'] == 'frame_average'
  out = tmp_path / 'frames.safetensors'
  summary = export.export(str(frames_run), 'timm', str(out))
  assert (summary['video_model'], summary['num_frames']) == ('frame_average', 4)
  sd = load_file(str(out))
  enc = params['encoder']
  np.testing.assert_array_equal(sd['patch_embed.proj.weight'],
                                enc['patch_kernel'].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(sd['pos_embed'][0], enc['pos_embed'])
  np.testing.assert_array_equal(sd['head.weight'], params['head']['kernel'].T)
  np.testing.assert_array_equal(sd['fc_norm.weight'], params['fc_norm']['scale'])
  kwargs = json.loads(open(f'{out}.json').read())
  ref = tev.Eva(**kwargs).eval()
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  clip = np.random.default_rng(1).normal(size=(2, 4, 28, 28, 3)).astype(np.float32)
  ecfg = ml_collections.ConfigDict(meta['student'])
  ours = _load(nnx.eval_shape(lambda: video_lib.FrameAveragedClassifier(
      ecfg, meta['num_classes'], rngs=nnx.Rngs(params=0))), params)
  got_f = np.asarray(ours.features(jnp.asarray(clip)))
  got = np.asarray(ours(jnp.asarray(clip)))
  with torch.no_grad():   # the README's per-frame recipe: patch tokens averaged over T and N
    x = ref.forward_features(torch.from_numpy(clip.reshape(8, 28, 28, 3)).permute(0, 3, 1, 2))
    x = ref.fc_norm(x[:, ref.num_prefix_tokens:].unflatten(0, (2, 4)).mean((1, 2)))
    want_f, want = x.numpy(), ref.head(x).numpy()
  # The head starts at 0.001 scale (head_init_scale): its logits are small, so the pooled
  # features (O(1)) are compared too.
  df, dl = np.abs(got_f - want_f).max(), np.abs(got - want).max()
  print(f'frame-averaged timm max abs diff: features {df:.2e}, logits {dl:.2e}')
  assert df < 1e-5 and dl < 1e-6, (df, dl)
  pth = tmp_path / 'frames.pth'
  export.export(str(frames_run), 'eva', str(pth))
  official = torch.load(pth)['model']
  for k in ('cls_token', 'pos_embed', 'head.weight', 'head.bias', 'fc_norm.weight'):
    np.testing.assert_array_equal(official[k].numpy(), sd[k], err_msg=k)


def test_frame_averaged_run_refusals(frames_run, tmp_path):
  for call in (lambda: export.export(str(frames_run), 'video', str(tmp_path / 'v.pth')),
               lambda: video_export.export(str(frames_run), str(tmp_path / 'v.pth'))):
    with pytest.raises(ValueError, match=r'frame-averaged .*--format=timm or --format=eva') as e:
      call()
    assert '--format=video' not in str(e.value) and '\n' not in str(e.value)
  with pytest.raises(ValueError, match=r"kind 'eva_video_finetune', not an EVA-CLIP run"):
    export.export(str(frames_run), 'open_clip', str(tmp_path / 'x.bin'))


@pytest.mark.parametrize('meta,fmt,fits', [
    ({'kind': 'eva_video_finetune', 'video_model': 'space_time'}, 'timm', '--format=video'),
    ({'kind': 'eva_video_finetune'}, 'eva', '--format=video'),   # runs before video_model
    ({'kind': 'eva_video_finetune', 'video_model': 'frame_average'}, 'video', '--format=timm'),
    ({'kind': 'eva_clip'}, 'eva', '--format=open_clip'),
    ({'kind': 'eva_pretrain'}, 'open_clip', '--format=timm'),
    ({}, 'open_clip', 'no eva_jax checkpoint')])
def test_check_format_names_the_fitting_format(meta, fmt, fits):
  with pytest.raises(ValueError, match=fits):
    export.check_format(meta, fmt, 'RUN')
  for ok in [('eva_video_finetune', 'space_time', 'video'),
             ('eva_video_finetune', 'frame_average', 'timm'),
             ('eva_video_finetune', 'frame_average', 'detectron2'),
             ('eva_clip', None, 'open_clip'), ('eva_finetune', None, 'eva')]:
    export.check_format({'kind': ok[0], 'video_model': ok[1]}, ok[2], 'RUN')
