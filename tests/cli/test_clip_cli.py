"""eva-clip and eva-zero-shot follow the command convention (cli/common.py): --help lists the flags
and an example; bad input is one `error:` line with exit status 2."""
import re
import subprocess
import sys

import support


def _start(program, *args):
  return subprocess.Popen([sys.executable, '-m', f'eva_jax.cli.{program}', *args],
                          env=support.ENV, cwd=support.ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_help_and_one_line_errors(tmp_path):
  procs = {   # all at once: each is mostly interpreter start-up and imports
      'clip_help': _start('clip', '--help'),
      'zero_shot_help': _start('zero_shot', '--help'),
      'bad_loss': _start('clip', '--config=clip_demo', f'--workdir={tmp_path / "w"}',
                         '--config.loss=triplet'),
      'bad_templates': _start('clip', '--config=clip_demo', f'--workdir={tmp_path / "w2"}',
                              '--config.eval.templates=fancy'),
      'no_checkpoint': _start('zero_shot', f'--checkpoint={tmp_path / "missing"}'),
  }
  out = {k: (p.communicate(timeout=300), p.returncode) for k, p in procs.items()}
  for key, command, flags in (('clip_help', 'eva-clip', ['config', 'workdir']),
                              ('zero_shot_help', 'eva-zero-shot',
                               ['checkpoint', 'zero_shot', 'retrieval', 'classnames',
                                'templates'])):
    (stdout, stderr), rc = out[key]
    text = stdout + stderr
    assert rc in (0, 1) and f'\n  {command} --' in text, text[:400]
    for flag in flags:
      assert re.search(rf'\n  --{flag}:', text), (key, flag)
  for key, words in (('bad_loss', ["config.loss='triplet'", 'clip, siglip']),
                     ('bad_templates', ["config.eval.templates='fancy'"]),
                     ('no_checkpoint', ['missing'])):
    (stdout, stderr), rc = out[key]
    errors = [line for line in stderr.splitlines() if line.startswith('error:')]
    assert rc == 2 and len(errors) == 1, (key, stderr[-1500:])
    assert all(w in errors[0] for w in words), (key, errors[0])
    assert 'Traceback' not in stderr
