"""Video fine-tuning through the trainer skeleton (training/video.py): init from a timm image file
(inflation), training + multi-view evaluation, init from its own checkpoint at another frame
count, and the bad-input errors."""
import json

import jax
import numpy as np
import pytest

from eva_jax import checkpoint as ckpt_lib
from eva_jax.convert import eva_torch
from eva_jax.models import config as model_config, video as video_lib
from eva_jax.training import video as video_train

import support


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
  """2 classes x 3 small pan clips (16 frames of 32 px) written with PyAV."""
  return support.write_pan_clips(tmp_path_factory.mktemp('clips'), per_class=3)


@pytest.fixture(scope='module')
def timm_file(tmp_path_factory):
  """A random-init timm Eva (the tiny architecture at 28 px) saved as safetensors."""
  torch = pytest.importorskip('torch')
  tev = pytest.importorskip('timm.models.eva')
  from safetensors.torch import save_file
  cfg = model_config.encoder_config('tiny')
  cfg.image_size = 28
  torch.manual_seed(0)
  model = tev.Eva(**eva_torch.timm_kwargs(cfg))
  path = tmp_path_factory.mktemp('timm') / 'eva_tiny.safetensors'
  save_file(model.state_dict(), str(path))
  return path, {k: v.numpy() for k, v in model.state_dict().items()}


def _cfg(clips, **video):
  cfg = support.recipe('video_demo')
  cfg.data.source = f'video_folder:{clips}'
  cfg.eval_source = ''
  cfg.image_size = 28
  cfg.batch_size = 4
  cfg.total_steps = 3
  cfg.log_every = 1
  cfg.checkpoint_every = 3
  cfg.optim.warmup_steps = 1
  cfg.data.threads = 1
  cfg.video.num_frames = 4
  cfg.freeze_patch_embed = True     # the spec's default (the demo trains it)
  cfg.video.update(video)
  return cfg


def test_video_finetune_from_timm_image_file(tmp_path, clips, timm_file):
  path, sd = timm_file
  cfg = _cfg(clips)
  cfg.init_from = str(path)
  cfg.data.video.test_clips, cfg.data.video.test_crops = 2, 3
  program = video_train.VideoFinetuneProgram(cfg)
  from eva_jax.training import trainer
  last = trainer.run(program, str(tmp_path / 'run'))
  assert last['eval_count'] == 6 and 0.0 <= last['eval_top1'] <= 1.0
  assert np.isfinite(last['eval_loss'])
  # The run started from the inflated timm weights: the (frozen) patch kernel is the timm conv's
  # [t=1, p, p, C, D]; the pos-embed's cls row is timm's, its patch rows timm's repeated 4 times.
  params, meta, _ = ckpt_lib.restore_params(str(tmp_path / 'run'))
  enc = params['encoder']
  np.testing.assert_allclose(enc['patch_kernel'][0],
                             sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0), atol=1e-7)
  assert enc['pos_embed'].shape == (1 + 4 * 4, 64)
  assert meta['kind'] == 'eva_video_finetune' and meta['num_frames'] == 4
  # The checkpoint records the training listing; a resume on a changed listing (here: a linked
  # sub-folder adds a video, as the link-following walk does for folders the old one ignored)
  # is refused before anything is restored, instead of continuing at a stale position.
  import shutil
  from eva_jax.data import sources, video as video_data
  moved = shutil.copytree(clips, tmp_path / 'moved')
  assert meta['train_data'] == sources.listing_fingerprint(
      video_data.VideoFolderSource(str(moved))) and meta['train_data']['videos'] == 6
  extra = tmp_path / 'extra'
  extra.mkdir()
  shutil.copy(moved / 'c0' / '0.mp4', extra / '9.mp4')
  (moved / 'c0' / 'more').symlink_to(extra)
  changed = _cfg(moved)
  changed.total_steps = 6
  with pytest.raises(ValueError, match=r"Resume refused: train_data\.listing was '[0-9a-f]+'"):
    trainer.run(video_train.VideoFinetuneProgram(changed), str(tmp_path / 'run'))
  saved = json.load(open(tmp_path / 'run' / 'config.json'))
  assert saved['resolved']['tokens'] == 17
  # Export of the run to the official video layout (layout parity: tests/convert/test_video_export.py).
  import torch
  from eva_jax.convert import video_export
  video_export.export(str(tmp_path / 'run'), str(tmp_path / 'video.pth'))
  sd = torch.load(tmp_path / 'video.pth')['model']
  assert tuple(sd['patch_embed.proj.weight'].shape) == (64, 3, 1, 14, 14)
  assert tuple(sd['pos_embed'].shape) == (1, 17, 64) and tuple(sd['head.weight'].shape) == (2, 64)
  np.testing.assert_array_equal(sd['pos_embed'][0].numpy(), enc['pos_embed'])
  facts = json.load(open(f"{tmp_path / 'video.pth'}.json"))
  assert (facts['num_frames'], facts['tubelet'], facts['image_size']) == (4, 1, 28)

  # A video checkpoint into 8 frames of 42 px: the pos-embed resized trilinearly at init (the
  # init path alone: no training step is compiled).
  from eva_jax import parallel
  cfg2 = _cfg(clips, num_frames=8)
  cfg2.image_size = 42
  cfg2.init_from = str(tmp_path / 'run')
  program = video_train.VideoFinetuneProgram(cfg2)
  program.validate()
  task = program.build(parallel.make_mesh(cfg2.mesh))
  p8 = jax.device_get(program.init_state(task).params)
  pos = np.asarray(enc['pos_embed'])
  want = np.asarray(video_lib.resize_pos_3d(jax.numpy.asarray(pos[1:]), (4, 2, 2), (8, 3, 3)))
  np.testing.assert_allclose(p8['encoder']['pos_embed'][1:], want, atol=1e-6)
  np.testing.assert_array_equal(p8['encoder']['pos_embed'][0], pos[0])
  np.testing.assert_array_equal(p8['encoder']['patch_kernel'], enc['patch_kernel'])
  np.testing.assert_array_equal(p8['head']['kernel'], params['head']['kernel'])   # same classes
  np.testing.assert_array_equal(p8['fc_norm']['scale'], params['fc_norm']['scale'])


def test_multi_view_scores_average_softmax():
  logits = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
  got = np.asarray(video_train.multi_view_scores(logits, 3))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(got, p.reshape(2, 3, 5).mean(1), atol=1e-6)


def test_bad_input(tmp_path, clips, timm_file):
  from eva_jax.training import trainer
  with pytest.raises(ValueError, match='num_frames=6 is not divisible by the tubelet size 4'):
    trainer.run(video_train.VideoFinetuneProgram(_cfg(clips, num_frames=6, tubelet=4)),
                str(tmp_path / 'a'))
  path, _ = timm_file
  cfg = _cfg(clips)
  cfg.model.patch_size = 7
  cfg.init_from = str(path)
  with pytest.raises(ValueError, match='patch size 14 .* model.patch_size=7'):
    trainer.run(video_train.VideoFinetuneProgram(cfg), str(tmp_path / 'b'))
  lst = tmp_path / 'list.txt'
  lst.write_text('missing/a.mp4 0\nmissing/b.mp4 1\n')
  cfg = _cfg(clips)
  cfg.data.source = f'video_list:{lst}'
  with pytest.raises(FileNotFoundError, match='All 2 videos listed'):
    trainer.run(video_train.VideoFinetuneProgram(cfg), str(tmp_path / 'c'))
  # An evaluation list with more classes than the head: refused by validate, before any step (it
  # used to surface at the first evaluation, after training), and opened only once.
  wide = tmp_path / 'wide.txt'
  wide.write_text(''.join(f'{clips}/c{c % 2}/0.mp4 {c}\n' for c in range(3)))
  cfg = _cfg(clips)
  cfg.num_classes = 2
  cfg.eval_source = f'video_list:{wide}'
  with pytest.raises(ValueError, match=r"config.eval_source='video_list:.*' has 3 classes but the "
                     r'head has 2 \(config.num_classes=2\): no logit for labels 2..2. Set '
                     r'config.num_classes to at least 3'):
    video_train.VideoFinetuneProgram(cfg).validate()
  cfg.num_classes = 3
  program = video_train.VideoFinetuneProgram(cfg)
  program.validate()
  assert program.eval_sources() is program.eval_sources()
  assert program.eval_sources()[0][0].num_classes == 3
  # A class folder the training set lacks: its labels cannot be matched to the head.
  other = tmp_path / 'other'
  (other / 'c9').mkdir(parents=True)
  (other / 'c9' / '0.mp4').symlink_to(clips / 'c0' / '0.mp4')
  cfg.eval_source = f'video_folder:{other}'
  with pytest.raises(ValueError, match=r"config.eval_source: video_folder:.* has 1 of 1 class "
                     r"names that the training source .* \(2 classes\) does not have, e.g. 'c9'"):
    video_train.VideoFinetuneProgram(cfg).validate()
