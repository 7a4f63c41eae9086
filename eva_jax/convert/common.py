"""Shared pieces of the checkpoint converters: reading PyTorch files lazily, strict key checks,
and building a model from a nested dict of host arrays.

torch is imported inside functions only, so `import eva_jax` never pulls it in.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from typing import Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx


class CheckpointError(ValueError):
  """A checkpoint that does not fit the requested model (missing/unexpected keys, shapes, format)."""


# (raw weights, EMA weights) key pairs of training checkpoints: the official EVA/BEiT/DeiT scripts
# save {'model', 'model_ema', ...}; timm's train.py saves {'state_dict', 'state_dict_ema', ...}.
_EMA_PAIRS = (('model', 'model_ema'), ('state_dict', 'state_dict_ema'))
WEIGHTS = ('auto', 'model', 'model_ema')

# Globals torch.load(weights_only=True) may rebuild besides tensors and plain containers. The
# official EVA training checkpoint pickles its argparse.Namespace as 'args'; a Namespace only holds
# attributes (it runs no code of the file), so rebuilding it is as safe as a dict. Anything else
# (a class of the training code, os.system, ...) is refused: unpickling it could run code.
def beside(path: str, name: str) -> str:
  """The file `name` in the folder of weights at `path` (the folder itself if `path` is one)."""
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  return os.path.join(folder, name)


def read_json_record(f: str):
  """The JSON object in file `f` that records facts about weights (config.json, an open_clip or timm
  kwargs json), or None when there is no such file. An unreadable one raises CheckpointError:
  ignoring it would turn its record into a guess."""
  if not os.path.isfile(f):
    return None
  try:
    with open(f) as fh:
      return json.load(fh)
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{f} is not readable JSON ({e}); fix or remove it.') from e


def _safe_globals() -> list:
  import argparse
  return [argparse.Namespace]


def _safe_global_names() -> set[str]:
  return {f'{g.__module__}.{g.__qualname__}' for g in _safe_globals()}


def _is_tensor(v) -> bool:
  return hasattr(v, 'shape') and hasattr(v, 'dtype')


def unwrap_state_dict(obj: Mapping, weights: str = 'auto', what: str = 'checkpoint') -> Mapping:
  """The state dict inside a checkpoint object, choosing raw or EMA weights.

  obj:     a state dict, or a training checkpoint {'model': sd, 'model_ema': sd, 'optimizer': ...,
           'args': ...} / {'state_dict': sd, 'state_dict_ema': sd, ...} / {'module': sd}.
  weights: 'auto' (the EMA weights when the file has them, else the raw ones: a run keeps an EMA
           copy only when its recipe asked for one, as the weights to evaluate and release),
           'model' (raw) or 'model_ema'. The choice is logged, as a WARNING naming the other
           option when 'auto' had both to pick from.
  Raises ValueError for an unknown `weights`, CheckpointError when 'model_ema' is asked of a file
  without EMA weights. Keys are returned as stored ('module.' stripping is the caller's).
  """
  if weights not in WEIGHTS:
    raise ValueError(f'weights must be one of {WEIGHTS}, got {weights!r}.')
  if any(_is_tensor(v) for v in obj.values()):     # a bare state dict
    if weights == 'model_ema':
      raise CheckpointError(f'{what} is a bare state dict without EMA weights; weights=\'model_ema\' '
                            "needs a training checkpoint holding 'model_ema'. Use weights='model' "
                            "or 'auto'.")
    return obj
  for raw, ema in _EMA_PAIRS:
    has_raw = isinstance(obj.get(raw), Mapping)
    has_ema = isinstance(obj.get(ema), Mapping)
    if not (has_raw or has_ema):
      continue
    if weights == 'model_ema' and not has_ema:
      raise CheckpointError(f'{what} has no EMA weights ({ema!r}; top-level keys: '
                            f'{sorted(map(str, obj))}). Use weights=\'model\' or \'auto\'.')
    if weights == 'model' and not has_raw:
      raise CheckpointError(f'{what} has only EMA weights ({ema!r}); use weights=\'model_ema\' or '
                            "'auto'.")
    pick = ema if (has_ema and weights != 'model') else raw
    if weights == 'auto' and has_raw and has_ema:
      logging.warning("%s holds raw (%r) and EMA (%r) weights: using the EMA weights %r "
                      "(weights='auto'); pass weights='model' for the raw ones.", what, raw, ema,
                      pick)
    else:
      logging.info('%s: using the weights under %r (weights=%r).', what, pick, weights)
    return unwrap_state_dict(obj[pick], 'auto', what)   # e.g. {'module': sd} inside
  for w in ('module', 'state_dict'):   # {'module': sd} (DDP) and other single wrappers
    if isinstance(obj.get(w), Mapping):
      return unwrap_state_dict(obj[w], weights, what)
  return obj


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

  weights: which weights of a training checkpoint (see unwrap_state_dict): 'auto', 'model',
  'model_ema'. The file is read with torch.load(weights_only=True): only tensors, plain containers
  and argparse.Namespace are rebuilt; any other pickled global raises CheckpointError naming it.
  """

  def __init__(self, path: str | os.PathLike, weights: str = 'auto'):
    if weights not in WEIGHTS:
      raise ValueError(f'weights must be one of {WEIGHTS}, got {weights!r}.')
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f'Checkpoint path {path!r} does not exist.')
    self.path = path
    self._files = _resolve_files(path)
    self._index: dict[str, tuple[str, str]] = {}   # key -> (kind, file)
    self._tensors: dict[str, object] = {}          # torch tensors for non-safetensors files
    # TorchScript archives record their modules: qualified name -> {'type': class name, and the
    # plain attributes num_heads / eps / approximate when the archive kept them (scripted, not
    # traced)}. Empty for state dicts and safetensors, which record only tensors.
    self.script_modules: dict[str, dict] = {}
    for f in self._files:
      if f.endswith('.safetensors'):
        from safetensors import safe_open
        if not os.path.isfile(f):
          raise CheckpointError(f'{path!r} names the shard {f!r}, which does not exist; fetch the '
                                'missing shard (its index lists every file).')
        try:
          with safe_open(f, framework='pt') as sf:
            for k in sf.keys():
              self._index[k] = ('st', f)
        except Exception as e:  # SafetensorError names no file; a truncated download is common
          raise CheckpointError(
              f'{f!r} ({os.path.getsize(f)} bytes) is not a readable safetensors file '
              f'({type(e).__name__}: {e}). It is probably truncated (an interrupted download or '
              'copy): fetch it again and compare its size with the source.') from e
      else:
        for k, t in _torch_load_flat(f, weights, self.script_modules).items():
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


def _is_torchscript(f: str) -> bool:
  """TorchScript archives are zips with <name>/constants.pkl and code/; torch.save zips have neither."""
  if not zipfile.is_zipfile(f):
    return False
  with zipfile.ZipFile(f) as z:
    return any(n.endswith('/constants.pkl') for n in z.namelist())


def _unsafe_globals(f: str, err: Exception) -> list[str]:
  """The pickled globals outside the allow-list (from torch's scan, else from its message)."""
  import torch
  found: list[str] = []
  if zipfile.is_zipfile(f):
    try:
      found = list(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    except Exception:  # noqa: BLE001 - only used to name the culprit
      found = []
  if not found:
    found = re.findall(r'GLOBAL ([\w.]+)', str(err))
  safe = _safe_global_names()
  return [g for g in dict.fromkeys(found) if g not in safe]


def _script_module_info(module) -> dict[str, dict]:
  out = {}
  for name, m in module.named_modules():
    d = {'type': getattr(m, 'original_name', type(m).__name__)}
    for attr in ('num_heads', 'eps', 'approximate'):
      try:
        v = getattr(m, attr)
      except (AttributeError, RuntimeError):
        continue
      if isinstance(v, (int, float, str)) and not isinstance(v, bool):
        d[attr] = v
    out[name] = d
  return out


def _unpickler_reason(e: Exception) -> str:
  """What torch's weights-only unpickler found, without its advice to retry with
  weights_only=False (which would run any code the file pickles)."""
  text = str(e)
  if 'WeightsUnpickler error:' in text:
    text = text.split('WeightsUnpickler error:', 1)[1].split('Check the documentation', 1)[0]
  return ' '.join(text.split())[:300] or type(e).__name__


def _torch_load_flat(f: str, weights: str = 'auto',
                     script_modules: dict | None = None) -> dict[str, object]:
  import torch
  what = f'Checkpoint {f!r}'
  if _is_torchscript(f):   # OpenAI's CLIP .pt: weights from the archive's state dict, no pickle
    try:
      module = torch.jit.load(f, map_location='cpu')
      obj = module.state_dict()
      if script_modules is not None:
        script_modules.update(_script_module_info(module))
    except Exception as e:
      raise CheckpointError(f'{f!r} looks like a TorchScript archive but torch.jit.load fails '
                            f'({type(e).__name__}: {e}).') from e
  else:
    try:
      with torch.serialization.safe_globals(_safe_globals()):
        obj = torch.load(f, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(f))
    except pickle.UnpicklingError as e:
      unsafe = _unsafe_globals(f, e)
      if unsafe:
        raise CheckpointError(
            f'{f!r} pickles {", ".join(unsafe)}, which is not plain data (allowed: tensors, '
            f'containers, numbers, strings, {", ".join(sorted(_safe_global_names()))}). eva_jax '
            'refuses to unpickle code from a checkpoint. If you trust the file, re-save its weights '
            'alone: torch.save(torch.load(f, weights_only=False)["model"], "weights.pth").') from e
      raise CheckpointError(f'{f!r} is neither a torch.save state dict nor a TorchScript archive '
                            f'(the unpickler says: {_unpickler_reason(e)}).') from e
    except Exception as e:
      raise CheckpointError(f'{f!r} is neither a torch.save state dict nor a TorchScript archive '
                            f'({type(e).__name__}: {str(e)[:300]}). A truncated or partly '
                            'downloaded file also reads like this: check its size, download it '
                            'again.') from e
  if hasattr(obj, 'state_dict') and not isinstance(obj, Mapping):
    obj = obj.state_dict()
  if not isinstance(obj, Mapping):
    raise CheckpointError(f'{f!r} holds a {type(obj).__name__}, not a state dict.')
  obj = unwrap_state_dict(obj, weights, what)
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
