"""Run files on local disks or object stores (gs://bucket/run, s3://...), through etils.epath.

epath is the path layer orbax already uses for checkpoints; everything else a run reads or writes
in its workdir (config.json, metrics.jsonl, TensorBoard events, exports) goes through it too, so a
workdir may be a URL. `epath.Path(p)` alone is enough to read or write one file; the two helpers
here cover what differs between a local path and a URL.
"""
from __future__ import annotations

import os

from etils import epath


def url_scheme(path: epath.PathLike) -> str | None:
  """'gs' for gs://bucket/run, None for a local path."""
  path = os.fspath(path)
  return path.split('://', 1)[0] if '://' in path else None


def as_path(path: epath.PathLike) -> epath.Path:
  """`path` as an epath.Path: URLs as given, local paths absolute with ~ expanded (orbax needs
  absolute paths; an object store has no working directory)."""
  if url_scheme(path) is not None:
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
