"""Shared pieces of the checkpoint converters: reading PyTorch files lazily, strict key checks,
and building a model from a nested dict of host arrays.

torch is imported inside functions only, so `import eva_jax` never pulls it in.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class CheckpointError(ValueError):
  """A checkpoint that does not fit the requested model (missing/unexpected keys, shapes, format)."""


# Wrappers seen around state dicts in the wild ('model' in EVA, 'module' from DDP, 'state_dict').
_WRAPPERS = ('model', 'module', 'state_dict', 'model_ema')


def _to_numpy(t) -> np.ndarray:
  import torch  # lazy: converters only
  t = t.detach()
  if t.dtype == torch.bfloat16:
    t = t.float()
  return t.cpu().numpy()


class TensorSource(Mapping):
  """Read-only mapping name -> np.ndarray over a PyTorch checkpoint, converting one tensor at a time.

  Supports safetensors (memory-mapped via safe_open), plain `torch.save` state dicts (loaded with
  mmap=True where the zip format allows it) and TorchScript archives (`torch.jit.load`, e.g. OpenAI's
  ViT-L-14.pt). A directory is searched for model.safetensors / pytorch_model.bin and their sharded
  index files. Keeping one converted tensor alive at a time keeps peak host memory near 1-2x the
  weights.
  """

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f'Checkpoint path {path!r} does not exist.')
    self.path = path
    self._files = _resolve_files(path)
    self._index: dict[str, tuple[str, str]] = {}   # key -> (kind, file)
    self._tensors: dict[str, object] = {}          # torch tensors for non-safetensors files
    for f in self._files:
      if f.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(f, framework='pt') as sf:
          for k in sf.keys():
            self._index[k] = ('st', f)
      else:
        for k, t in _torch_load_flat(f).items():
          self._index[k] = ('pt', f)
          self._tensors[k] = t
    if not self._index:
      raise CheckpointError(f'No tensors found in {path!r}.')

  def __getitem__(self, key: str) -> np.ndarray:
    kind, f = self._index[key]
    if kind == 'st':
      from safetensors import safe_open
      with safe_open(f, framework='pt') as sf:
        return _to_numpy(sf.get_tensor(key))
    return _to_numpy(self._tensors[key])

  def shape(self, key: str) -> tuple[int, ...]:
    kind, f = self._index[key]
    if kind == 'st':
      from safetensors import safe_open
      with safe_open(f, framework='pt') as sf:
        return tuple(sf.get_slice(key).get_shape())
    return tuple(self._tensors[key].shape)

  def __contains__(self, key) -> bool:  # Mapping's default would load (and convert) the tensor
    return key in self._index

  def __iter__(self) -> Iterator[str]:
    return iter(self._index)

  def __len__(self) -> int:
    return len(self._index)


def _resolve_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  names = os.listdir(path)
  for single in ('model.safetensors', 'pytorch_model.bin'):
    if single in names:
      return [os.path.join(path, single)]
  for index in ('model.safetensors.index.json', 'pytorch_model.bin.index.json'):
    if index in names:
      import json
      with open(os.path.join(path, index)) as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
      return [os.path.join(path, s) for s in shards]
  found = [n for n in names if n.endswith(('.safetensors', '.bin', '.pt', '.pth'))]
  if len(found) == 1:
    return [os.path.join(path, found[0])]
  raise CheckpointError(
      f'{path!r} is a directory without model.safetensors or pytorch_model.bin '
      f'(found: {sorted(names)[:10]}). Pass the checkpoint file itself, or a save_pretrained directory.')


def _torch_load_flat(f: str) -> dict[str, object]:
  import torch
  import zipfile
  obj = None
  try:
    obj = torch.load(f, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(f))
  except Exception as e:  # TorchScript archives (OpenAI CLIP .pt) are not plain pickles.
    try:
      obj = torch.jit.load(f, map_location='cpu').state_dict()
    except Exception:
      raise CheckpointError(f'{f!r} is neither a torch.save state dict nor a TorchScript archive '
                            f'({type(e).__name__}: {e}).') from e
  if hasattr(obj, 'state_dict') and not isinstance(obj, Mapping):
    obj = obj.state_dict()
  if not isinstance(obj, Mapping):
    raise CheckpointError(f'{f!r} holds a {type(obj).__name__}, not a state dict.')
  for w in _WRAPPERS:  # unwrap {'model': sd}, {'module': sd}, ...
    if w in obj and isinstance(obj[w], Mapping) and not any(hasattr(v, 'shape') for v in obj.values()):
      obj = obj[w]
      break
  flat = {k: v for k, v in obj.items() if hasattr(v, 'shape')}
  for k in list(flat):  # DDP prefix
    if k.startswith('module.'):
      flat[k[len('module.'):]] = flat.pop(k)
  return flat


# -------------------------------------------------------------------------------------------------
def flatten(tree: Mapping, sep: str = '/') -> dict[str, object]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      for kk, vv in flatten(v, sep).items():
        out[f'{k}{sep}{kk}'] = vv
    else:
      out[str(k)] = v
  return out


def unflatten(flat: Mapping[str, object], sep: str = '/') -> dict:
  out: dict = {}
  for k, v in flat.items():
    d = out
    *parents, leaf = k.split(sep)
    for p in parents:
      d = d.setdefault(p, {})
    d[leaf] = v
  return out


def check_keys(expected: Mapping[str, tuple], got: Mapping[str, tuple], what: str) -> None:
  """Raises CheckpointError listing missing, unexpected and mis-shaped keys; never a partial load."""
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  shapes = sorted(f'{k}: checkpoint {tuple(got[k])} vs model {tuple(expected[k])}'
                  for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
  if missing or unexpected or shapes:
    parts = [f'{what} does not match the model.']
    if missing:
      parts.append(f'Missing keys ({len(missing)}): {", ".join(missing[:20])}'
                   + (' ...' if len(missing) > 20 else ''))
    if unexpected:
      parts.append(f'Unexpected keys ({len(unexpected)}): {", ".join(unexpected[:20])}'
                   + (' ...' if len(unexpected) > 20 else ''))
    if shapes:
      parts.append(f'Shape mismatches ({len(shapes)}): {"; ".join(shapes[:10])}')
    parts.append('Is it a checkpoint of another architecture or size? Check the model config.')
    raise CheckpointError('\n'.join(parts))


def model_params_abstract(cfg) -> dict[str, tuple]:
  """'a/b/c' -> shape of every parameter of the model `cfg` describes (nothing allocated)."""
  from eva_jax.models import vit
  state = nnx.to_pure_dict(nnx.state(vit.abstract(cfg), nnx.Param))
  return {k: tuple(v.shape) for k, v in flatten(state).items()}


def model_from_params(cfg, shapes: Mapping[str, tuple], load: Callable[[str], np.ndarray],
                      what: str = 'checkpoint'):
  """A VisionTransformer for `cfg` holding the converted parameters, checked strictly first.

  shapes: 'a/b/c' -> shape the converter will produce (checked against the model before any load).
  load:   'a/b/c' -> host array, called once per key; each array goes to the device right away, so
          the host never holds a second full copy of the weights.
  """
  from eva_jax.models import vit
  expected = model_params_abstract(cfg)
  check_keys(expected, shapes, what)
  model = vit.abstract(cfg)
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  flat = {}
  # Largest first: the host peak is then about the weights plus the last (small) tensor's copies.
  for k in sorted(expected, key=lambda k: -int(np.prod(expected[k]))):
    v = np.asarray(load(k), np.float32)
    if v.shape != expected[k]:
      raise CheckpointError(f'{what}: converted {k} has shape {v.shape}, model wants {expected[k]}.')
    # device_put makes one copy (jnp.asarray two on the CPU backend); waiting for it lets `v` go
    # before the next conversion, so the host peak stays near the weights plus one tensor.
    flat[k] = jax.device_put(v)
    flat[k].block_until_ready()
    del v
  nnx.replace_by_pure_dict(state, unflatten(flat))
  return nnx.merge(graphdef, state, rest)


def model_params_numpy(model) -> dict[str, np.ndarray]:
  """'a/b/c' -> float32 host array for every parameter of `model`."""
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {k: np.asarray(jax.device_get(v), np.float32) for k, v in flatten(state).items()}
