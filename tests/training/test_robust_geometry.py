"""Issue 12 kind B: teacher and student geometry is compared before anything compiles.

A transformers CLIP teacher with patch 16 and a patch-14 student used to compile for ~21 s and then
fail inside XLA with `mul got incompatible shapes (16, 64, 48), (16, 49, 48)`.
"""
import time

import pytest
import torch

from eva_jax.training import pretrain

import support


def _save_hf_teacher(path, patch, image_size=112):
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
  torch.manual_seed(0)
  cfg = CLIPVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, patch_size=patch, image_size=image_size,
                         projection_dim=48, hidden_act='quick_gelu')
  CLIPVisionModelWithProjection(cfg).save_pretrained(path)
  return str(path)


def test_patch16_teacher_and_patch14_student_fail_before_compiling(tmp_path):
  cfg = support.recipe('pretrain_demo')          # tiny student, patch 14, 112 px: an 8x8 grid
  cfg.teacher.checkpoint = _save_hf_teacher(tmp_path / 'clip16', 16)
  t0 = time.perf_counter()
  with pytest.raises(ValueError, match=(
      r"The teacher \S+ \(patch 16\) gives a 7x7 target grid at 112 px, the student \(patch 14\) "
      r"a 8x8 grid\. Set config.teacher.grid='resize_input'.*'resize_targets'.*"
      r"\(teacher: config.teacher.checkpoint='.*clip16'; student: tiny, patch 14\)")):
    pretrain.train(cfg, str(tmp_path / 'run'))
  elapsed = time.perf_counter() - t0
  # Reading the tiny teacher and comparing the grids; no step was compiled (was ~21 s, then a
  # shape error from XLA). Measured 1.6 s vs 21.2 s without the check, on 2 busy CPU cores.
  assert elapsed < 8.0, elapsed
  assert not list((tmp_path / 'run').glob('checkpoints/*'))     # nothing saved ...
  assert not (tmp_path / 'run' / 'config.json').exists()           # ... nor a config written

  # Control: a patch-14 teacher from the same writer passes the same check with the same student.
  ok = support.recipe('pretrain_demo')
  ok.teacher.checkpoint = _save_hf_teacher(tmp_path / 'clip14', 14)
  tcfg, params = pretrain.load_teacher(ok)
  assert tcfg.patch_size == 14 and tcfg.out_dim == 48 and params is not None
  pretrain.check_geometry(ok, pretrain.student_config(ok), tcfg, 'clip14')


@pytest.mark.parametrize('teacher,message', [
    ('clip-B/16', r"The teacher clip-B/16 \(patch 16\) gives a 7x7 target grid at 112 px, the "
     r"student \(patch 14\) a 8x8 grid.*\(teacher: config.teacher.name='clip-B/16'"),
    ('clip-B/32', r"The teacher clip-B/32 \(patch 32\) gives a 3.5x3.5 target grid at 112 px.*not "
     r'possible here: 112 is not a multiple of 32'),
])
def test_named_teacher_geometry_is_checked_in_validate(teacher, message):
  cfg = support.recipe('pretrain_demo')
  cfg.teacher.name = teacher
  with pytest.raises(ValueError, match=message):
    pretrain.PretrainProgram(cfg).validate()
  cfg.teacher.name = 'clip-S/14'      # same patch as the student: accepted
  pretrain.PretrainProgram(cfg).validate()
