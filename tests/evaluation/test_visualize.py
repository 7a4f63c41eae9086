"""eva-visualize and eva-plot on a tiny pretraining run (about 30 s on 2 CPU cores)."""
import json
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from eva_jax import checkpoint as ckpt_lib
from eva_jax import parallel
from eva_jax.data.demo import ensure_demo_set
from eva_jax.data.masking import BlockMaskGenerator
from eva_jax.evaluation import plot, visualize
from eva_jax.training import pretrain

import support

@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A 10-step demo pretraining run (workdir, config) and a demo photo."""
  workdir = str(tmp_path_factory.mktemp('viz_run'))
  cfg = visualize.demo_config()
  cfg.total_steps, cfg.log_every, cfg.checkpoint_every = 10, 5, 10
  cfg.eval_batches, cfg.progress, cfg.optim.warmup_steps = 1, False, 3
  pretrain.train(cfg, workdir)
  photo = os.path.join(ensure_demo_set(), 'chelsea', '000.jpg')
  return workdir, cfg, photo


def _png(path):
  img = Image.open(path)
  img.load()
  return img


def test_visualize_cli_png_and_mean_cosine_matches_the_train_steps_loss(run, tmp_path):
  workdir, cfg, photo = run
  out = tmp_path / 'viz.png'
  proc = support.run_cli('visualize', f'--workdir={workdir}', f'--image={photo}', f'--out={out}',
                         '--mask_seed=3')
  assert proc.returncode == 0, proc.stderr
  printed = proc.stdout
  mean_cos = float(re.search(r'mean masked cosine: (-?[\d.]+)', printed).group(1))
  img = _png(out)
  assert img.size == (2000, 460)                      # 5 panels of 4 x 4.6 inches at 100 dpi
  assert img.text['Description'] == 'panels: ' + ','.join(visualize.PANELS)
  assert len(visualize.PANELS) == 5

  # Independent: the trainer's own eval_step (its teacher init, its restore, its cosine_loss)
  # on the same image and mask gives loss == -mean masked cosine.
  mesh = parallel.make_mesh(cfg.mesh)
  task, _, tcfg = pretrain.build(cfg, mesh)
  ckpt = ckpt_lib.Checkpointer(workdir)
  state, _, _ = ckpt.restore(ckpt.latest_step(), task.abstract_state, task.state_shardings)
  ckpt.close()
  teacher_params = pretrain.random_teacher(tcfg, task.consts_shardings, cfg.seed + 1)
  _, x = visualize.load_image(photo, cfg.image_size)
  grid = (cfg.image_size // 14,) * 2
  mask = visualize.draw_mask(grid, cfg.data.mask.to_dict(), seed=3)
  asked = BlockMaskGenerator.from_config(grid, cfg.data.mask).num_masking_patches
  assert asked == 26 and 0 < mask.sum() <= asked    # the recipe ratio of the 8x8 grid
  batch = parallel.host_to_global({'image': x[None], 'mask': mask.reshape(1, -1)}, mesh)
  m = jax.device_get(task.eval_step(state.params, teacher_params, batch))
  assert int(m['masked_tokens']) == mask.sum()
  np.testing.assert_allclose(mean_cos, -float(m['loss']), atol=2e-6)

  # The visualizer's random teacher is bit-identical to the trainer's.
  models = visualize.load_models(workdir)
  ours = nnx.to_pure_dict(nnx.state(models.teacher, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               ours, jax.device_get(teacher_params))


def test_visualize_analysis_pieces(run):
  workdir, cfg, photo = run
  models = visualize.load_models(workdir)
  rgb, x = visualize.load_image(photo, models.image_size)
  assert rgb.shape == (112, 112, 3) and rgb.dtype == np.uint8 and x.dtype == np.float32
  mask = visualize.draw_mask(models.grid, models.mask, seed=0)
  a = visualize.analyze(models, x, mask)
  assert a.cos.shape == (8, 8) and np.all(np.abs(a.cos) <= 1 + 1e-6)
  assert a.student_features.shape == (64, 64) and a.teacher_targets.shape == (64, 48)
  rgb_pca = visualize.pca_rgb(a.teacher_targets, models.grid)
  assert rgb_pca.shape == (8, 8, 3) and rgb_pca.min() >= 0 and rgb_pca.max() <= 1
  greyed = visualize.masked_photo(rgb, mask, 14)
  assert np.all(greyed[np.kron(mask, np.ones((14, 14), bool))] == 128)
  # A teacher name gives the same random teacher as the run's (same architecture and seed).
  by_name = visualize.load_models(workdir, teacher='clip-tiny')
  np.testing.assert_array_equal(np.asarray(by_name.teacher.proj[...]),
                                np.asarray(models.teacher.proj[...]))


def test_visualize_errors(run, tmp_path):
  workdir, _, photo = run
  out = str(tmp_path / 'x.png')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    visualize.visualize(str(tmp_path / 'nope'), photo, out)
  with pytest.raises(FileNotFoundError, match='--image'):
    visualize.visualize(workdir, str(tmp_path / 'nope.jpg'), out)
  text = tmp_path / 'notes.jpg'
  text.write_text('not an image')
  with pytest.raises(ValueError, match='not a readable image'):
    visualize.visualize(workdir, str(text), out)
  empty = tmp_path / 'empty_run'
  empty.mkdir()
  # The command turns a known error into one line and exit status 2.
  proc = support.run_cli('visualize', f'--workdir={empty}', f'--image={photo}', f'--out={out}')
  assert proc.returncode == 2 and 'No finished checkpoint' in proc.stderr
  assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3
  assert not os.path.exists(out)
  # Errors name this command's flags, not the config fields behind them.
  with pytest.raises(ValueError, match=r'--out=.*x\.jpg: the figure is written as PNG'):
    visualize.visualize(workdir, photo, str(tmp_path / 'x.jpg'))
  with pytest.raises(ValueError, match=r'--num_masking_patches=1000 draws no block mask on the '
                     r'\d+x\d+ patch grid') as e:
    visualize.visualize(workdir, photo, out, num_masking_patches=1000)
  assert 'config.' not in str(e.value)
  with pytest.raises(ValueError, match=r"the run's mask setting draws no block mask on the 1x1 "
                     r'patch grid .* or a larger --image_size'):
    visualize.visualize(workdir, photo, out, image_size=14)
  assert not os.path.exists(out)


def test_plot_cli(run, tmp_path):
  workdir, _, _ = run
  out = tmp_path / 'curves.png'
  proc = support.run_cli('plot', f'--workdir={workdir}', f'--out={out}')
  assert proc.returncode == 0, proc.stderr
  img = _png(out)
  assert img.text['Description'] == 'panels: loss,learning rate,gradient norm,images / s'
  assert img.size == (1350, 640)   # 3 columns x 2 rows
  records = plot.read_metrics(workdir)
  assert records[-1]['val_loss'] < 0 and [r['step'] for r in records if 'loss' in r] == [1, 5, 10]


def test_plot_loss_scale_panel_and_errors(tmp_path):
  recs = [{'step': s, 'loss': -s / 10, 'lr': 1e-3, 'grad_norm': 1.0, 'images_per_sec': 10.0,
           'loss_scale': 2.0 ** (16 - s)} for s in (1, 2, 3)]
  (tmp_path / 'metrics.jsonl').write_text(
      '\n'.join(json.dumps(r) for r in recs) + '\n{"step": 4, "lo')   # partial last line: ignored
  names = plot.plot(str(tmp_path), str(tmp_path / 'c.png'))
  assert 'loss scale (fp16)' in names and len(plot.read_metrics(tmp_path)) == 3
  assert plot.undrawn(plot.read_metrics(tmp_path)) == []
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='No metrics file'):
    plot.plot(str(empty), str(tmp_path / 'e.png'))
  (empty / 'metrics.jsonl').write_text('')
  with pytest.raises(ValueError, match='empty'):
    plot.plot(str(empty), str(tmp_path / 'e.png'))


def test_plot_draws_clip_and_video_metrics(tmp_path):
  """An EVA-CLIP run's zero-shot, retrieval and logit-scale metrics each get a panel; numbers no
  panel draws are named, never dropped silently."""
  recs = [{'step': s, 'loss': 2.0 / s, 'lr': 1e-3, 'logit_scale': 14.0 + s} for s in (1, 2)]
  recs.append({'step': 2, 'zero_shot/top1': 0.5, 'zero_shot/top5': 1.0, 'zero_shot/count': 96,
               **{f'retrieval/{d}_R@{k}': 0.1 * k for d in ('image_to_text', 'text_to_image')
                  for k in (1, 5, 10)}})
  recs.append({'step': 2, 'eval_top1': 0.7, 'eval_top5': 0.9, 'eval_count': 96})
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in recs))
  names = plot.plot(str(tmp_path), str(tmp_path / 'c.png'))
  assert names == ['loss', 'learning rate', 'top-1', 'zero-shot top-k', 'image -> text recall',
                   'text -> image recall', 'logit scale (exp)']
  assert _png(tmp_path / 'c.png').text['Description'] == 'panels: ' + ','.join(names)
  assert plot.undrawn(recs) == ['eval_count', 'zero_shot/count']
  proc = support.run_cli('plot', f'--workdir={tmp_path}', f'--out={tmp_path / "c.jpg"}')
  assert proc.returncode == 2 and 'name the file .png' in proc.stderr
  assert not (tmp_path / 'c.jpg').exists()
