"""The package installs from a wheel and runs outside the checkout.

Builds the wheel offline from a copy of the sources, installs it (no deps) into a scratch venv that
sees this interpreter's site-packages for the pinned dependencies, and runs `eva-pretrain` by
recipe name from a directory that is not the checkout.
"""
import glob
import os
import shutil
import site
import subprocess
import sys
import zipfile

import support

ROOT = support.ROOT
# What the build reads; copied so that setuptools' build/ and egg-info never land in the checkout.
BUILD_INPUTS = ('pyproject.toml', 'README.md', 'LICENSE', 'NOTICE', 'eva_jax', 'configs')


def _run(cmd, cwd, env, timeout=300, ok=(0,)):
  out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert out.returncode in ok, f'{cmd} exited {out.returncode}:\n{out.stdout}\n{out.stderr}'
  return out.stdout


def _source_packages():
  pkgs = {'eva_jax.configs'}
  for d, _, files in os.walk(os.path.join(ROOT, 'eva_jax')):
    if '__init__.py' in files:
      pkgs.add(os.path.relpath(d, ROOT).replace(os.sep, '.'))
  return pkgs


def test_wheel_installs_and_runs_outside_checkout(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  for name in BUILD_INPUTS:
    p = os.path.join(ROOT, name)
    if os.path.isdir(p):
      shutil.copytree(p, src / name, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    else:
      shutil.copy2(p, src / name)
  # PYTHONPATH (CI may point it at the checkout) would hide what the wheel installed; XLA_FLAGS
  # could fake a device count the small batch below does not divide.
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'XLA_FLAGS')}
  env['JAX_PLATFORMS'] = 'cpu'
  work = tmp_path / 'elsewhere'
  work.mkdir()

  _run([sys.executable, '-m', 'pip', 'wheel', str(src), '--no-deps', '--no-build-isolation',
        '--no-index', '-q', '-w', str(tmp_path / 'dist')], cwd=work, env=env)
  (wheel,) = glob.glob(str(tmp_path / 'dist' / 'eva_jax-*.whl'))
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
  in_wheel = {os.path.dirname(n).replace('/', '.') for n in names if n.endswith('/__init__.py')}
  assert in_wheel == _source_packages(), 'pyproject.toml [tool.setuptools] packages is out of date'
  recipes = [os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))]
  assert 'pretrain_demo.py' in recipes
  assert {f'eva_jax/configs/{r}' for r in recipes} <= names

  # A venv without pip or packages of its own; a .pth appends this interpreter's site-packages
  # (pip and the pinned dependencies) after the venv's own, so nothing is downloaded.
  venv = tmp_path / 'venv'
  _run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], cwd=work, env=env)
  py = str(venv / 'bin' / 'python')
  venv_site = _run([py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                   cwd=work, env=env).strip()
  with open(os.path.join(venv_site, '_deps.pth'), 'w') as f:
    f.write('\n'.join(site.getsitepackages()) + '\n')
  # --ignore-installed: an editable eva_jax in the deps' site-packages is not ours to uninstall.
  _run([py, '-m', 'pip', 'install', '--no-deps', '--no-index', '--ignore-installed', '-q', wheel],
       cwd=work, env=env)

  where = _run([py, '-c', 'import eva_jax, eva_jax.configs.pretrain_demo as d;'
                'print(eva_jax.__file__); print(d.__file__)'], cwd=work, env=env).split()
  for f in where:
    assert os.path.realpath(f).startswith(os.path.realpath(venv_site)), where

  script = str(venv / 'bin' / 'eva-pretrain')
  usage = _run([script, '--help'], cwd=work, env=env, ok=(0, 1))   # absl's --help exits 1
  assert '--config' in usage and '--workdir' in usage, usage

  wd = tmp_path / 'run'
  _run([script, '--config=pretrain_demo', f'--workdir={wd}', '--config.total_steps=2',
        '--config.optim.warmup_steps=1', '--config.batch_size=4', '--config.eval_batches=1',
        '--config.log_every=1', '--config.progress=False'], cwd=work, env=env, timeout=600)
  assert (wd / 'config.json').is_file()
  assert (wd / 'checkpoints' / '2').is_dir(), sorted(os.listdir(wd / 'checkpoints'))
