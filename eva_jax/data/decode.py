"""Turning encoded records into RGB images without ever stopping a run on bad data.

`DecodedSource` wraps any record source (index -> (encoded bytes, label)) as a grain random-access
source. A record that cannot be read or decoded is skipped and the element carries `skipped=1`, so
the count rides inside the batch through grain's worker processes (summed by the loader as
`data/skipped`). In training its slot is filled by the next decodable record, so batch shapes and
the stream never change; in evaluation (substitute=False) the slot becomes a padding element
(valid False), so no image is scored twice and the scores are over the readable ones.
"""
from __future__ import annotations

import io
import logging
from typing import Any, Protocol

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# A run of this many undecodable records in a row means the source is not an image dataset.
MAX_CONSECUTIVE_BAD = 256
_MAX_LOGGED = 10   # per process; the count itself is exact, the log is only a hint


class RecordSource(Protocol):
  name: str
  num_classes: int | None

  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> tuple[bytes, int]: ...


class BadImageError(ValueError):
  pass


class Padding:
  """Source of `n` padding elements (image None, valid False): evaluation appends them so every
  host and worker gets the same number of full batches."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {'image': None, 'label': 0, 'skipped': 0, 'valid': False}


def _to_8bit_luma(img: Image.Image) -> Image.Image:
  """16/32-bit integer and float grayscale -> 8-bit 'L' (PIL's convert would clip, not scale)."""
  arr = np.asarray(img)
  if arr.dtype.kind == 'f':
    arr = arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
  elif img.mode.startswith('I;16') or arr.max(initial=0) > 255:
    arr = arr / 257.0      # full 16-bit range -> 0..255 (PNG 16-bit is the common case)
  return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), 'L')


def decode_image(data: Any) -> Image.Image:
  """Encoded bytes -> fully loaded RGB PIL image; raises BadImageError on anything undecodable."""
  if not isinstance(data, (bytes, bytearray)):
    data = bytes(data)       # TFDS may hand over numpy bytes scalars
  if not data:
    raise BadImageError('empty record')
  try:
    img = Image.open(io.BytesIO(data))
    img.load()               # forces the decode: truncation and corruption surface here
    if img.width < 1 or img.height < 1:
      raise BadImageError(f'image has no pixels ({img.width}x{img.height})')
    if img.mode == 'RGB':
      return img
    if img.mode in ('I', 'F') or img.mode.startswith('I;16'):
      img = _to_8bit_luma(img)
    elif img.mode == 'P' and 'transparency' in img.info:
      img = img.convert('RGBA')    # avoids PIL's palette-transparency warning
    # L, 1, LA, CMYK, ...; RGBA drops alpha, as torchvision's default loader does.
    return img.convert('RGB')
  except BadImageError:
    raise
  except (OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError,
          MemoryError, EOFError) as e:   # PIL's failure modes for corrupt/unknown data
    raise BadImageError(f'{type(e).__name__}: {e}') from e


class DecodedSource:
  """grain random-access source of {'image': RGB PIL, 'label', 'skipped', 'valid'}.

  substitute: True (training) fills an unreadable record's slot with the next readable one;
  False (evaluation) returns a padding element (image None, valid False, skipped 1) instead."""

  def __init__(self, records: RecordSource, substitute: bool = True):
    self.records = records
    self.substitute = substitute
    self._n = len(records)
    self._logged = 0
    self._bad_run = 0   # evaluation: unreadable records in a row read by this process

  def __len__(self) -> int:
    return self._n

  def __repr__(self) -> str:   # grain logs sources by repr; keep it short and stable
    return f'DecodedSource({self.records.name!r}, n={self._n})'

  def _read(self, index: int) -> tuple[Image.Image, int]:
    data, label = self.records[index]
    return decode_image(data), int(label)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    first_error = None
    for k in range(min(self._n, MAX_CONSECUTIVE_BAD)):
      j = (index + k) % self._n
      try:
        img, label = self._read(j)
      except (BadImageError, OSError, KeyError, ValueError) as e:
        first_error = first_error or e
        if not self.substitute:
          self._bad_run += 1
          if self._bad_run < min(self._n, MAX_CONSECUTIVE_BAD):
            return self._not_scored(index, e)
          break   # a source that is not images: refused below, as in training
        continue
      self._bad_run = 0
      if k and self._logged < _MAX_LOGGED:
        self._logged += 1
        log.warning('skipped undecodable record %d of %s (%s); used record %d instead',
                    index, self.records.name, first_error, j)
      return {'image': img, 'label': label, 'skipped': int(k > 0), 'valid': True}
    raise ValueError(
        f'{min(self._n, MAX_CONSECUTIVE_BAD)} consecutive records up to record {index} of '
        f'{self.records.name} could not be decoded (first error: {first_error}). '
        'Check that the source holds encoded images or videos (JPEG/PNG/WebP/MP4...).')

  def _not_scored(self, index: int, error: Exception) -> dict[str, Any]:
    if self._logged < _MAX_LOGGED:
      self._logged += 1
      log.warning('skipped undecodable record %d of %s (%s); evaluation leaves it out', index,
                  self.records.name, error)
    return {'image': None, 'label': 0, 'skipped': 1, 'valid': False}
