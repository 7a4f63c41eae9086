"""The one convention of every eva_jax command: absl flags plus an ml_collections config flag.

  --config=SPEC        a recipe name ('pretrain_demo', 'eva01_g14_pretrain:bf16'), a config file
                       ('configs/x.py[:arg]') or a saved run ('WORKDIR', 'WORKDIR/config.json');
  --config.a.b=VALUE   overrides any field of it;
  --workdir=DIR        where a run writes (local path or a URL such as gs://bucket/run).

Known errors (a bad config value, a missing or foreign checkpoint, unreadable data, a refused
resume, a workdir in use, a diverged run, a full disk) print one `error: ...` line and exit with
status 2; `--traceback` (or EVA_JAX_TRACEBACK=1) shows the trace.
"""
from __future__ import annotations

import ast
import errno
import os
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from eva_jax import configs, host_memory

FLAGS = flags.FLAGS
# Error types that mean "the input is wrong", not "the program is wrong".
KNOWN_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, KeyError, FloatingPointError)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def known_error_message(e: BaseException) -> str | None:
  """The one-line message of an error that means "the input (or the machine) is wrong", or None
  for a bug (its trace is kept). A full disk names the path being written."""
  if isinstance(e, OSError) and e.errno in DISK_FULL:
    where = f' writing {e.filename}' if e.filename else ''
    return (f'no space left on device{where} ({e.strerror or os.strerror(e.errno)}). Free space '
            'or point --workdir elsewhere; the checkpoints already saved are kept.')
  if isinstance(e, KNOWN_ERRORS):
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    # One line, as promised: multi-line messages (key lists of a checkpoint) are joined.
    return ' '.join(line.strip() for line in text.splitlines() if line.strip())
  return None


class _SpecParser(flags.ArgumentParser):
  """Wraps config_flags' file parser: resolves a config spec first (configs.resolve), then lets
  `post(cfg)` add program defaults before the command-line overrides apply."""

  def __init__(self, inner, post: Callable | None):
    self._inner, self._post = inner, post

  def parse(self, argument):
    if not isinstance(argument, str):
      return argument
    try:
      path = configs.resolve(argument)
    except FileNotFoundError as e:
      raise ValueError(str(e)) from None   # absl reports a ValueError as a one-line flag error
    cfg = self._inner.parse(path)
    return self._post(cfg) if self._post is not None and hasattr(cfg, 'to_dict') else cfg

  def flag_type(self):
    return self._inner.flag_type()


def define_config(help_text: str, post: Callable | None = None, kind: str | None = None) -> None:
  """Defines --config (required); `post(cfg)` may add program-specific defaults. kind: the
  program's config kind (training/checks.py KIND_COMMANDS), whose demo recipe --help names."""
  from eva_jax.training import checks   # pylint: disable=g-import-not-at-top
  example = checks.KIND_COMMANDS[kind][2] if kind else configs.names()[0]
  config_flags.DEFINE_config_file('config', None, f'{help_text} A recipe name (e.g. {example}), '
                                  'a config .py file[:arg] or a run directory / config.json.',
                                  lock_config=True)
  FLAGS['config'].parser = _SpecParser(FLAGS['config'].parser, post)


def define_workdir(help_text: str = 'Output directory (local or a URL such as gs://bucket/run); '
                   'an existing run resumes.', required: bool = True) -> None:
  flags.DEFINE_string('workdir', None, help_text)
  if required:
    flags.mark_flag_as_required('workdir')


def _show_in_help(names) -> None:
  """absl's --help lists the flags of the main module, which for a console script is the
  generated stub: register the program's flags there so --help shows them."""
  for name in names:
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


def run(main: Callable[[list[str]], int | None], doc: str, flag_names: list[str],
        field_flags: dict[str, str] | None = None) -> None:
  """Runs `main` under absl with the program's docstring as usage (it holds the example).
  field_flags: {config field: flag} for a command whose flags fill config fields (eva-zero-shot's
  --templates is config.eval.templates): its error messages then name the flag the user typed."""
  host_memory.keep_step_buffers_resident()   # before jax starts its CPU client (host_memory.py)
  flags.DEFINE_bool('traceback', False, 'Show the full traceback of known errors.')
  sys.modules['__main__'].__doc__ = doc
  _show_in_help(list(flag_names) + ['traceback'])

  started = []

  def wrapped(argv):
    started.append(True)
    if not FLAGS['verbosity'].present:   # orbax logs every file it writes at INFO
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except (*KNOWN_ERRORS, OSError) as e:
      message = known_error_message(e)
      if message is None or FLAGS.traceback or os.environ.get('EVA_JAX_TRACEBACK'):
        raise
      for field, flag in (field_flags or {}).items():
        message = message.replace(field, flag)
      print(f'error: {message}', file=sys.stderr, flush=True)
      print('(--traceback shows where.)', file=sys.stderr)
      return 2

  try:
    app.run(wrapped)
  except (AttributeError, KeyError) as e:
    if started:   # raised by the program itself: a bug, keep the trace
      raise
    # ml_collections raises these while parsing an override that names no config field.
    message = str(e.args[0] if e.args else e)
    try:   # the message arrives as the repr of a KeyError
      message = str(ast.literal_eval(message))
    except (ValueError, SyntaxError):
      pass
    message = message.replace('\n', ' ')
    print(f'error: a --config.* override names no field of the config: {message}',
          file=sys.stderr)
    sys.exit(2)


def run_training(program_class, doc: str, what: str) -> None:
  """The whole command of a training program: --config, --workdir, then the trainer skeleton."""
  define_config(f'{what} config.', kind=program_class.config_kind)
  define_workdir()

  def main(argv):
    del argv
    from eva_jax.training import trainer   # jax and the models: only once flags are parsed
    trainer.run(program_class(FLAGS.config), FLAGS.workdir)

  run(main, doc, ['config', 'workdir'])


def run_evaluation(module: str, doc: str, what: str, filename: str) -> None:
  """The whole command of a config-driven evaluation: --config and an optional --workdir. Runs
  `eva_jax.evaluation.<module>.evaluate(config) -> dict` (imported once flags are parsed), prints
  the result as one JSON line and, with --workdir, also writes it to WORKDIR/filename."""
  define_config(f'{what} config.', kind=module)
  define_workdir(f'Optional: writes {filename} here.', required=False)

  def main(argv):
    del argv
    import importlib   # pylint: disable=g-import-not-at-top
    import json   # pylint: disable=g-import-not-at-top
    from etils import epath   # pylint: disable=g-import-not-at-top
    out = importlib.import_module(f'eva_jax.evaluation.{module}').evaluate(FLAGS.config)
    if FLAGS.workdir:
      workdir = epath.Path(FLAGS.workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / filename).write_text(json.dumps(out, indent=2))
    print(json.dumps(out), flush=True)

  run(main, doc, ['config', 'workdir'])
