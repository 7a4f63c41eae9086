"""experiments/eva_jax_colab.ipynb runs top to bottom on CPU (10 pretraining steps) and draws."""
import json
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

import support

ROOT = support.ROOT
NOTEBOOK = os.path.join(ROOT, 'experiments', 'eva_jax_colab.ipynb')


def _kernel_for_this_python(tmp_path) -> str:
  """A kernelspec running this interpreter (the venv's ipykernel), first on JUPYTER_PATH, so a
  user-wide 'python3' kernel of another Python can never be picked."""
  name = 'eva_jax_test'
  spec_dir = tmp_path / 'jupyter' / 'kernels' / name
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': f'eva_jax test ({sys.executable})', 'language': 'python'}))
  return name


def test_notebook_runs_and_draws(tmp_path, monkeypatch):
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('EVA_JAX_NOTEBOOK_STEPS', '10')
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  kernel = _kernel_for_this_python(tmp_path)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  monkeypatch.setenv('TMPDIR', str(tmp_path))      # the notebook's fresh run goes to a mkdtemp
  # Run where a user opens it: experiments/ of the checkout (its install cell then uses the checkout).
  client = NotebookClient(nb, kernel_name=kernel, timeout=600, allow_errors=False,
                          resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
  t0 = time.perf_counter()
  client.execute()    # raises CellExecutionError (with the traceback) on the first failing cell
  elapsed = time.perf_counter() - t0
  print(f'notebook executed in {elapsed:.1f}s')

  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.get('execution_count') for c in code), 'a code cell did not run'
  errors = [o for c in code for o in c.outputs if o.output_type == 'error']
  assert not errors, errors
  images = [o for c in code for o in c.outputs if 'image/png' in o.get('data', {})]
  # teacher PCA, mask, before (5 panels), loss curves, after (5 panels)
  assert len(images) >= 5, [c.outputs for c in code]
  text = '\n'.join(o.get('text', '') for c in code for o in c.outputs if o.output_type == 'stream')
  assert 'mean masked cosine' in text and 'step 10' in text, text
