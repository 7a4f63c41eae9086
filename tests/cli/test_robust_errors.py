"""Issue 12 kind L: errors a person can read, and no random-init teacher by accident.

Known errors of every category (config, teacher, checkpoint, data) print one `error:` line and
exit 2 from every command; --traceback / EVA_JAX_TRACEBACK=1 shows the trace. The paper recipes
refuse to start without config.teacher.checkpoint unless config.teacher.allow_random_init=True.
(The banner and record of a random-init teacher: tests/test_robust_tokens.py.)
"""
import json

import pytest

from eva_jax import configs
from eva_jax.training import pretrain

import support

PAPER = ['eva01_b16_pretrain', 'eva01_g14_pretrain', 'eva01_l14_pretrain', 'eva02_b14_pretrain',
         'eva02_l14_pretrain']


@pytest.mark.parametrize('name', PAPER)
def test_paper_recipes_refuse_a_random_teacher_unless_opted_in(name):
  cfg = configs.get(name)
  assert cfg.teacher.checkpoint == '' and cfg.teacher.allow_random_init is False
  with pytest.raises(ValueError, match=r'config.teacher.checkpoint is empty: .*RANDOM-INIT teacher'
                     r'.*--config.teacher.checkpoint=PATH'
                     r'.*--config.teacher.allow_random_init=True'):
    pretrain.PretrainProgram(cfg).validate()
  # A teacher *name* in checkpoint is a random-init teacher too (api.load_teacher builds one).
  cfg.teacher.checkpoint = 'clip-L/14'
  with pytest.raises(ValueError, match=r"config.teacher.checkpoint='clip-L/14' is a teacher name, "
                     'not a file'):
    pretrain.PretrainProgram(cfg).validate()
  cfg.teacher.checkpoint = ''
  cfg.teacher.allow_random_init = True
  pretrain.PretrainProgram(cfg).validate()


def test_demo_recipes_opt_in_and_old_saved_runs_keep_working(tmp_path):
  for name in ('pretrain_demo', 'bench_cpu'):
    assert configs.get(name).teacher.allow_random_init is True
  # A run saved before the field existed: empty checkpoint -> it ran a random teacher, and
  # repeating it still may; the field exists so it can be overridden.
  saved = configs.get('pretrain_demo').to_dict()
  del saved['teacher']['allow_random_init']
  saved['model'] = {'name': 'tiny'}
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  assert configs.get(str(tmp_path)).teacher.allow_random_init is True
  saved['teacher']['checkpoint'] = '/weights/ViT-L-14.pt'
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  assert configs.get(str(tmp_path)).teacher.allow_random_init is False
  # A fine-tuning run saved before eval_only (and a data field) existed: both come back with
  # their defaults, so --config=WORKDIR --config.eval_only=True works; what was saved is kept.
  ft = configs.get('finetune_demo').to_dict()
  del ft['eval_only'], ft['data']['crop_pct']
  ft['model'], ft['optim']['lr'] = {'name': 'tiny'}, 0.123
  (tmp_path / 'config.json').write_text(json.dumps(ft))
  again = configs.get(str(tmp_path))
  assert again.eval_only is False and again.optim.lr == 0.123
  assert again.data.crop_pct == configs.get('finetune_demo').data.crop_pct


def _one_line(proc, *expected):
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr and len(err) <= 3, proc.stderr[-2000:]
  line = [l for l in err if l.startswith('error: ')]
  assert len(line) == 1 and all(e in line[0] for e in expected), err
  return line[0]


def test_each_error_category_is_one_line_and_exit_2(tmp_path, demo_dir):
  w = f'--workdir={tmp_path / "w"}'
  # config: a value out of range (was: keep_checkpoints=0 deleted every checkpoint, exit 0).
  _one_line(support.run_cli('pretrain', '--config=pretrain_demo', w,
                            '--config.keep_checkpoints=0'),
            'config.keep_checkpoints=0 is out of range', 'would delete every checkpoint')
  # teacher: a paper recipe without a checkpoint.
  _one_line(support.run_cli('pretrain', '--config=eva01_b16_pretrain', w),
            'config.teacher.checkpoint is empty', 'config.teacher.allow_random_init=True')
  # checkpoint: a file that is no checkpoint (convert.common.CheckpointError).
  notes = tmp_path / 'notes.txt'
  notes.write_text('not a checkpoint')
  out = support.run_cli('linear_probe', '--config=linear_probe_demo', f'--config.init_from={notes}')
  _one_line(out, str(notes), 'Unsupported operand')
  assert 'weights_only' not in out.stderr        # never torch's advice to unpickle code
  # config: another program's config (was: a bare AttributeError naming one missing field).
  _one_line(support.run_cli('finetune', '--config=pretrain_demo', w),
            'This is not a fine-tuning config. It is a pretraining config: give it to eva-pretrain')
  # data: the 8-class demo with a 3-way head (was: trained and reported top-5 = 1.0).
  _one_line(support.run_cli('finetune', '--config=finetune_demo', w, '--config.num_classes=3'),
            "config.data.source='demo' has 8 classes but the head has 3 (config.num_classes=3)")
  assert not (tmp_path / 'w').exists()     # nothing written by any refused run
  # The trace on request.
  shown = support.run_cli('pretrain', '--config=pretrain_demo', w, '--config.keep_checkpoints=0',
                          env=dict(support.ENV, EVA_JAX_TRACEBACK='1'))
  assert shown.returncode != 0 and 'Traceback' in shown.stderr
  assert 'check_config' in shown.stderr


def test_a_config_is_refused_by_every_command_but_its_own():
  """Each demo recipe passes its own kind's check and is refused by every other one, naming the
  command it is for (training/checks.py require_kind, called by check_run and check_config)."""
  from eva_jax.training import checks
  for kind, (_, command, recipe) in checks.KIND_COMMANDS.items():
    cfg = support.recipe(recipe)
    checks.require_kind(cfg, kind)
    for other in checks.KIND_COMMANDS:
      if other != kind:
        with pytest.raises(ValueError, match=f'give it to {command}'):
          checks.require_kind(cfg, other)
