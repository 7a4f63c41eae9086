"""The command-line convention and the one source of truth for configs.

Every eva-* program: absl flags + an ml_collections --config that takes a recipe name, a file or a
saved run; config.model = architecture name + overrides; run-owned fields refused in config.model.
"""
import json
import logging
import re
import subprocess
import sys

import ml_collections
import pytest

from eva_jax import configs
from eva_jax.models import config as model_config
from eva_jax.training import finetune, pretrain, trainer

import support

PROGRAMS = {   # module -> flags its --help must list
    'pretrain': ['--config', '--workdir'], 'finetune': ['--config', '--workdir'],
    'linear_probe': ['--config', '--workdir'],
    'export': ['--workdir', '--checkpoint', '--format', '--out', '--weights'],
    'benchmark': ['--config'], 'visualize': ['--workdir', '--image', '--out', '--teacher'],
    'plot': ['--workdir', '--out'], 'summary': ['--model'],
    'pack': ['--src', '--out', '--images_per_shard'],
    'data_benchmark': ['--config', '--compare_tfdata'],
}


def test_every_program_help_lists_its_flags_and_an_example():
  procs = {p: subprocess.Popen([sys.executable, '-m', f'eva_jax.cli.{p}', '--help'], env=support.ENV,
                               cwd=support.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for p in PROGRAMS}
  for program, proc in procs.items():
    out = proc.communicate(timeout=300)[0]
    command = 'eva-' + program.replace('_', '-')
    assert proc.returncode in (0, 1), out   # absl exits 1 after --help
    assert f'\n  {command} --' in out or f'\n  {command} g/14' in out, (program, out[:400])
    for flag in PROGRAMS[program]:
      assert re.search(rf'\n  --(\[no\])?{flag[2:]}:', out), (program, flag, out)
    assert 'Traceback' not in out


@pytest.mark.parametrize('recipe', ['pretrain_demo', 'bench_cpu', 'finetune_demo',
                                    'eva01_g14_pretrain', 'eva01_g14_ft_in21k'])
def test_model_name_picks_the_whole_architecture_on_any_recipe(recipe):
  cfg = configs.get(recipe)
  cfg.model.name = 'eva02-B/14'
  got = pretrain.student_config(cfg)
  want = model_config.encoder_config('eva02-B/14')
  overrides = model_config.model_overrides(cfg.model)   # the recipe's explicit fields stay
  for field in ('width', 'depth', 'heads', 'mlp_dim', 'patch_size', 'swiglu', 'sub_ln', 'rope',
                'init', 'rope_ref_grid'):
    assert got[field] == overrides.get(field, want[field]), (recipe, field)
  assert (got.width, got.swiglu, got.rope) == (768, True, True)
  assert got.image_size == cfg.image_size                       # the run owns the image size
  assert got.drop_path == cfg.model.drop_path                   # an explicit override stays


def test_overrides_apply_on_top_of_the_named_architecture():
  cfg = configs.get('bench_cpu')
  s = pretrain.student_config(cfg)
  assert (s.name, s.width, s.depth, s.heads, s.remat) == ('S/14', 384, 6, 6, 'dots_no_batch')
  cfg.model.depth = 3
  assert pretrain.student_config(cfg).depth == 3


@pytest.mark.parametrize('field,value,use', [('image_size', 56, 'config.image_size'),
                                             ('dtype', 'bfloat16', 'config.precision')])
def test_run_owned_fields_are_refused_in_config_model(field, value, use):
  cfg = configs.get('pretrain_demo')
  cfg.model[field] = value
  with pytest.raises(ValueError, match=f'config.model.{field} is set by the run.*{use}'):
    pretrain.student_config(cfg)


def test_unknown_model_name_and_field_errors():
  with pytest.raises(ValueError, match='Unknown encoder name .H/14. .config.model.name'):
    model_config.model_section('H/14')
  with pytest.raises(ValueError, match='config.model.depht is not an encoder field'):
    model_config.model_section('tiny', depht=3)


def test_recipe_names_files_and_args_resolve_alike():
  by_name = configs.get('eva01_g14_pretrain:bf16')
  by_file = configs.get(f'{support.ROOT}/configs/eva01_g14_pretrain.py:bf16')
  assert by_name.to_dict() == by_file.to_dict() and by_name.precision == 'bf16'
  assert configs.get('eva01_g14_pretrain').precision == 'fp16'
  assert {'pretrain_demo', 'finetune_demo', 'eva02_l14_pretrain'} <= set(configs.names())
  with pytest.raises(FileNotFoundError, match='Recipes: .*pretrain_demo'):
    configs.resolve('pretrain_dmeo')


def test_a_bare_recipe_name_is_the_recipe_beside_a_run_of_that_name(tmp_path, monkeypatch, caplog):
  # A user trial: a run made with --workdir=clip_demo, then --config=clip_demo silently read that
  # run (its init included) instead of the recipe.
  run = tmp_path / 'clip_demo'
  run.mkdir()
  (run / 'config.json').write_text('{}')
  monkeypatch.chdir(tmp_path)
  with caplog.at_level(logging.WARNING):
    assert configs.resolve('clip_demo').endswith('/configs/clip_demo.py')
  assert 'write --config=./clip_demo for it' in caplog.text
  assert configs.resolve('./clip_demo').endswith('saved_run.py:./clip_demo')


@pytest.mark.parametrize('recipe', ['pretrain_demo', 'finetune_demo', 'eva01_g14_ft_in1k_336'])
def test_saved_config_feeds_back_as_config(tmp_path, recipe):
  from etils import epath
  cfg = configs.get(recipe)
  cfg.model.depth = 3
  trainer.write_config(epath.Path(tmp_path), cfg, {'student': {'width': 64}})
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['model'] == {'name': cfg.model.name, 'depth': 3,
                            **({'drop_path': cfg.model.drop_path})}
  for spec in (str(tmp_path), str(tmp_path / 'config.json'), f'saved_run:{tmp_path}'):
    again = configs.get(spec)
    assert json.loads(json.dumps(again.to_dict(), default=str)) == \
        json.loads(json.dumps(cfg.to_dict(), default=str))
    assert pretrain.student_config(again).to_dict() == pretrain.student_config(cfg).to_dict()


def test_sharding_rules_come_from_the_config(caplog):
  import types
  from jax.sharding import PartitionSpec as P
  from eva_jax import parallel
  cfg = configs.get('pretrain_demo')
  assert parallel.rules_from_config(cfg) == parallel.LOGICAL_RULES
  mesh = types.SimpleNamespace(shape={'data': 1, 'fsdp': 4, 'tensor': 2})
  assert parallel.spec_for((64, 256), ('embed', 'mlp'), mesh) == P('fsdp', 'tensor')
  cfg.sharding_rules = (('mlp', None), ('embed', ('fsdp', 'tensor')))
  rules = parallel.rules_from_config(cfg)
  assert parallel.spec_for((64, 256), ('embed', 'mlp'), mesh, rules) == P(('fsdp', 'tensor'), None)
  cfg.sharding_rules = (('mlp', 'model'),)
  with pytest.raises(ValueError, match='sharding_rules entry'):
    parallel.rules_from_config(cfg)
  # g/14's width 1408 does not divide fsdp=256: replicated, and said so once.
  big = types.SimpleNamespace(shape={'data': 1, 'fsdp': 256, 'tensor': 1})
  with caplog.at_level('WARNING'):
    assert parallel.spec_for((1408, 6144), ('embed', 'mlp'), big) == P(None, None)
    parallel.spec_for((1408, 6144), ('embed', 'mlp'), big)
  warned = [r for r in caplog.records if 'size 1408' in r.getMessage()]
  assert len(warned) == 1 and 'stays replicated' in warned[0].getMessage()


def test_known_errors_are_one_line_and_exit_2(tmp_path):
  typo = support.run_cli('pretrain', '--config=pretrain_demo', f'--workdir={tmp_path}',
                         '--config.totl_steps=5')
  assert typo.returncode == 2 and 'Did you mean "total_steps"' in typo.stderr
  assert 'Traceback' not in typo.stderr
  owned = support.run_cli('finetune', '--config=finetune_demo', f'--workdir={tmp_path}',
                          '--config.model.image_size=56')
  assert owned.returncode == 2 and 'use --config.image_size' in owned.stderr
  assert 'Traceback' not in owned.stderr and len(owned.stderr.strip().splitlines()) <= 3
  assert not (tmp_path / 'config.json').exists()     # nothing written for a refused run
  shown = support.run_cli('finetune', '--config=finetune_demo', f'--workdir={tmp_path}',
                          '--config.model.image_size=56', '--traceback')
  assert shown.returncode != 0 and 'Traceback' in shown.stderr


def test_finetune_program_is_only_its_own_pieces():
  # The skeleton owns start-up, restore-or-init, the loop and closing: a program overrides hooks.
  own = {k for k, v in vars(finetune.FinetuneProgram).items() if callable(v)}
  hooks = {'validate', 'build', 'loader', 'open_train_sources', 'open_eval_source',
           'train_loader', 'init_state', 'evaluate', 'meta', 'resolved'}
  # ...plus reading config.init_from once (its weights and native size), fine-tuning's own job.
  assert own <= hooks | {'init_weights', 'native_image_size'}, own - hooks
  assert isinstance(configs.get('finetune_demo').model, ml_collections.ConfigDict)
