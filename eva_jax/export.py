r"""Export an eva_jax checkpoint to PyTorch.

  python -m eva_jax.export --workdir=workdirs/demo --format=timm --out=eva_demo.safetensors
  python -m eva_jax.export --checkpoint=workdirs/demo/checkpoints/150 --format=eva --out=eva_demo.pth

--format=timm  safetensors loadable by `timm.models.eva.Eva(**kwargs).load_state_dict(sd,
               strict=True)`; the kwargs go to FILE.json. A pretraining checkpoint becomes a
               backbone (the final `norm` kept, mask token and lm_head dropped: timm's Eva has
               neither); a fine-tuned one keeps fc_norm + head (global_pool='avg').
--format=eva   the official layout `{"model": state_dict}` (.pth): mask_token and lm_head kept for
               pretraining checkpoints, fc_norm and head for fine-tuned ones; timm's
               `checkpoint_filter_fn` accepts it.
"""
from __future__ import annotations

import json
import os

import ml_collections
from absl import app, flags, logging

from eva_jax import checkpoint as ckpt_lib
from eva_jax.convert import common, eva_torch

FLAGS = flags.FLAGS


def export(path: str, fmt: str, out: str) -> dict:
  """Writes `out` (and `out`.json for timm); returns a summary dict."""
  params, meta, step = ckpt_lib.restore_params(path)
  if 'student' not in meta or 'encoder' not in params:
    raise ValueError(f'{path!r} is not an eva_jax pretraining or fine-tuning checkpoint.')
  cfg = ml_collections.ConfigDict(meta['student'])
  flat = common.flatten(params)
  finetuned = meta.get('kind') == 'eva_finetune'
  if fmt == 'timm':
    flat = {k: v for k, v in flat.items() if not k.startswith('lm_head/')}
    sd = eva_torch.to_torch_state_dict(flat, cfg, 'timm')
    kwargs = eva_torch.timm_kwargs(cfg, num_classes=meta['num_classes'] if finetuned else 0,
                                   global_pool='avg' if finetuned and meta.get('pool') == 'mean'
                                   else 'token',
                                   use_fc_norm=finetuned)
    from safetensors.numpy import save_file
    save_file(sd, out, metadata={'format': 'pt', 'source': 'eva_jax', 'step': str(step)})
    with open(out + '.json', 'w') as f:
      json.dump(kwargs, f, indent=2)
  else:
    sd = eva_torch.to_torch_state_dict(flat, cfg, 'eva')
    import torch  # lazy: only the .pth writer needs it
    torch.save({'model': {k: torch.from_numpy(v) for k, v in sd.items()}}, out)
  return {'checkpoint': path, 'step': step, 'format': fmt, 'out': out, 'tensors': len(sd),
          'kind': meta.get('kind')}


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  path = FLAGS.checkpoint or FLAGS.workdir
  if not path or not FLAGS.out:
    raise app.UsageError('--workdir=DIR (or --checkpoint=DIR/checkpoints/STEP) and --out=FILE '
                         'are required.')
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  print(json.dumps(export(path, FLAGS.format, FLAGS.out)))


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'Run directory (its latest checkpoint).')
  flags.DEFINE_string('checkpoint', None, 'A checkpoints/<step> folder.')
  flags.DEFINE_enum('format', 'timm', ['timm', 'eva'], 'Output layout.')
  flags.DEFINE_string('out', None, 'Output file (.safetensors for timm, .pth for eva).')


if __name__ == '__main__':
  define_flags()
  app.run(main)
