"""Image-text pairs for contrastive (CLIP) training: sources, bad-pair accounting and grain loaders.

Sources (`eva_jax.data.pair_sources`), named by one string like the image sources:
webdataset:PATTERN (img2dataset tar shards), arrayrecord:GLOB (packed pairs), folder:DIR (images
with same-named .txt), demo[:train|val]. A caption file is one caption (img2dataset), except in
`load_retrieval_set`, where its lines are the image's captions (clip_benchmark's webdataset
convention for retrieval sets).

Bad pairs never stop a run: an empty caption, non-UTF-8 text, a missing image or caption, an
undecodable image or an unreadable record is skipped (its slot filled by the next good pair, as
`eva_jax.data.decode.DecodedSource` does for images), counted per kind (`SKIP_KINDS`) and logged
for the first few.

Loaders yield `PairBatch`es, the `eva_jax.data.pipeline.Batch` contract plus per-kind counts:
  arrays: 'image' float32 [B, H, W, 3] CLIP-normalized NHWC, 'text' int32 [B, 77] CLIP tokens;
  valid:  bool [B] (False only for evaluation padding);
  skipped: bad pairs skipped on this host since the start (restored with the iterator state);
  skipped_by_kind: the same split by kind.
Training crops with open_clip's train transform (RandomResizedCrop scale (0.9, 1.0), bicubic, no
flip; `config.data.pair_scale` overrides the scale); evaluation resizes the shorter side and
center-crops (open_clip's val transform).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator

import grain
import numpy as np

from eva_jax.data import pipeline
from eva_jax.data.decode import BadImageError, MAX_CONSECUTIVE_BAD, decode_image
from eva_jax.data.pair_sources import BadPairError, Pair, open_pair_source
from eva_jax.data.tokenizer import CONTEXT_LENGTH, clip_tokenizer, tokenize
from eva_jax.data.transforms import NormalizeBatch, resize_center_crop, resized_crop, rrc_params

log = logging.getLogger(__name__)

SKIP_KINDS = ('missing_image', 'missing_text', 'bad_utf8', 'empty_text', 'bad_image',
              'unreadable')
TRAIN_SCALE = (0.9, 1.0)     # open_clip transform.py image_transform(is_train=True) default
_MAX_LOGGED = 10


# ---------------------------------------------------------------------------------- decoding --

def check_pair(pair: Pair) -> tuple[Any, str]:
  """(RGB PIL image, caption str) of a pair; BadPairError(kind) when it cannot be used."""
  if pair.image is None:
    raise BadPairError('missing_image', f'{pair.key}: no image')
  if pair.text is None:
    raise BadPairError('missing_text', f'{pair.key}: no caption')
  text = pair.text
  if isinstance(text, (bytes, bytearray)):
    try:
      text = bytes(text).decode('utf-8')
    except UnicodeDecodeError as e:
      raise BadPairError('bad_utf8', f'{pair.key}: caption is not UTF-8 ({e})') from e
  if not text.strip():
    raise BadPairError('empty_text', f'{pair.key}: empty caption')
  try:
    image = decode_image(pair.image)
  except BadImageError as e:
    raise BadPairError('bad_image', f'{pair.key}: {e}') from e
  return image, text


class DecodedPairSource:
  """grain source of {'image': PIL, 'text': str, 'skipped', 'skipped_kinds' int32 [K], 'valid'}.

  A bad pair at `index` is replaced by the next good one; the element then counts the bad pair's
  kind (once: later bad pairs it passed over are counted at their own index). substitute=False
  (evaluation): a bad pair becomes a padding element (image None, valid False) that counts it,
  so no pair is scored twice (decode.DecodedSource)."""

  def __init__(self, pairs, substitute: bool = True):
    self.pairs, self._n, self._logged = pairs, len(pairs), 0
    self.substitute = substitute

  def __len__(self) -> int:
    return self._n

  def __repr__(self) -> str:
    return f'DecodedPairSource({self.pairs.name!r}, n={self._n})'

  def __getitem__(self, index: int) -> dict[str, Any]:
    index, first = int(index), None
    for k in range(min(self._n, MAX_CONSECUTIVE_BAD)):
      try:
        image, text = check_pair(self.pairs[(index + k) % self._n])
      except BadPairError as e:
        first = first or e
      except (OSError, KeyError, ValueError) as e:   # unreadable record or shard
        first = first or BadPairError('unreadable', str(e))
      else:
        break
      if not self.substitute:
        break
    else:
      raise ValueError(
          f'{min(self._n, MAX_CONSECUTIVE_BAD)} consecutive pairs from pair {index} of '
          f'{self.pairs.name} are unusable (first: {first.kind}: {first}). Check that the source '
          'holds images with UTF-8 captions.')
    kinds = np.zeros(len(SKIP_KINDS), np.int32)
    if first is not None:
      kinds[SKIP_KINDS.index(first.kind)] = 1
      if self._logged < _MAX_LOGGED:
        self._logged += 1
        instead = (f'used pair {(index + k) % self._n} instead' if self.substitute
                   else 'evaluation leaves it out')
        log.warning('skipped pair %d of %s (%s: %s); %s', index, self.pairs.name, first.kind,
                    first, instead)
    if not self.substitute and first is not None:
      return {'image': None, 'text': '', 'skipped': 1, 'skipped_kinds': kinds, 'valid': False}
    return {'image': image, 'text': text, 'skipped': int(k > 0), 'skipped_kinds': kinds,
            'valid': True}


class PairTransform:
  """map_with_index: train = RandomResizedCrop(scale, ratio, bicubic), eval = resize + center crop;
  caption -> CLIP tokens int32 [context_length]. Randomness from (seed, stream index) only."""

  def __init__(self, data_cfg, image_size: int, seed: int, train: bool,
               context_length: int = CONTEXT_LENGTH):
    self.size, self.seed, self.train = int(image_size), int(seed), train
    self.context_length = int(context_length)
    self.scale = tuple(data_cfg.get('pair_scale', TRAIN_SCALE))
    self.ratio = tuple(data_cfg.ratio)
    clip_tokenizer()   # built (or failing, e.g. open_clip's vocab missing) before any worker

  def __call__(self, index: int, element) -> dict[str, Any]:
    out = {'skipped': np.int32(element['skipped']), 'valid': np.bool_(element['valid']),
           'skipped_kinds': element.get('skipped_kinds', np.zeros(len(SKIP_KINDS), np.int32))}
    img = element['image']
    if img is None:   # evaluation padding
      return {'image': np.zeros((self.size, self.size, 3), np.uint8),
              'text': np.zeros(self.context_length, np.int32), **out}
    if self.train:
      rng = np.random.default_rng([self.seed, int(index)])
      img = resized_crop(img, rrc_params(*img.size, self.scale, self.ratio, rng), self.size)
    else:
      img = resize_center_crop(img, self.size)
    return {'image': np.asarray(img), 'text': tokenize(element['text'], self.context_length)[0],
            **out}


# ----------------------------------------------------------------------------------- loaders --

@dataclasses.dataclass(frozen=True)
class PairBatch(pipeline.Batch):
  """`Batch` plus the skipped pairs by kind ({kind: count} since the start, on this host)."""
  skipped_by_kind: dict[str, int] = dataclasses.field(default_factory=dict)


class PairLoaderIterator(Iterator[PairBatch]):
  """`pipeline.LoaderIterator` plus per-kind skip counts; get_state/set_state are JSON-ready and
  restore both (save them with the checkpoint as the image loaders' state is)."""

  def __init__(self, inner: pipeline.LoaderIterator):
    self._inner = inner
    self._kinds = np.zeros(len(SKIP_KINDS), np.int64)

  def __iter__(self):
    return self

  def __next__(self) -> PairBatch:
    b = next(self._inner)
    arrays = dict(b.arrays)
    self._kinds += np.asarray(arrays.pop('skipped_kinds')).sum(0)
    return PairBatch(arrays=arrays, valid=b.valid, skipped=b.skipped,
                     skipped_by_kind=dict(zip(SKIP_KINDS, map(int, self._kinds))))

  def get_state(self) -> dict[str, Any]:
    return {**self._inner.get_state(), 'skipped_by_kind': dict(zip(SKIP_KINDS,
                                                                  map(int, self._kinds)))}

  def set_state(self, state: dict[str, Any]) -> None:
    self._inner.set_state(state)
    kinds = state.get('skipped_by_kind', {})
    self._kinds = np.asarray([int(kinds.get(k, 0)) for k in SKIP_KINDS], np.int64)

  def close(self) -> None:
    self._inner.close()


def open_pair_sources(data_cfg) -> list[tuple[Any, float]]:
  """(pair source, weight) of `config.data.mixture` or `config.data.source`
  (pipeline.open_sources with pair sources)."""
  return pipeline.open_sources(data_cfg, open_pair_source)


def build_pair_loader(data_cfg, *, image_size: int, batch_size: int, seed: int,
                      train: bool = True, context_length: int = CONTEXT_LENGTH,
                      process_index: int | None = None, process_count: int | None = None,
                      num_epochs: int | None = None, sources=None) -> PairLoaderIterator:
  """Image-text `PairBatch`es from `config.data.source` or the weighted `config.data.mixture`.

  `batch_size` is per host. Train: shuffled (data_cfg.shuffle) and repeated, sources mixed by
  weight with grain's exact-proportion mix, incomplete last batch dropped. Eval (train=False): one
  ordered pass over the sources in order, padded to full batches (valid marks real pairs).
  Same stream for a given (seed, process count, workers), as `pipeline.build_pretrain_loader`.
  `sources`: `open_pair_sources(data_cfg)` already opened (None = open them here)."""
  pi, pc = pipeline._process(process_index, process_count)   # pylint: disable=protected-access
  sources = sources if sources is not None else open_pair_sources(data_cfg)
  ds = pipeline.host_stream(
      [(grain.MapDataset.source(DecodedPairSource(src, train)), w) for src, w in sources],
      PairTransform(data_cfg, image_size, seed, train, context_length), data_cfg, seed=seed,
      train=train, batch_size=batch_size, process_index=pi, process_count=pc,
      num_epochs=num_epochs)
  # pylint: disable-next=protected-access
  inner = pipeline._finish(ds, data_cfg, batch_size=batch_size, train=train, seed=seed,
                           process_index=pi)
  return PairLoaderIterator(inner)


@dataclasses.dataclass
class RetrievalSet:
  """An evaluation set for `evaluation.zero_shot.retrieval_recall`: images float32 [I, H, W, 3]
  (CLIP-normalized, resize + center crop), tokens int32 [T, 77], text_image_index int32 [T],
  keys [I], skipped_by_kind {kind: count} of the pairs left out."""
  images: np.ndarray
  tokens: np.ndarray
  text_image_index: np.ndarray
  keys: list[str]
  skipped_by_kind: dict[str, int]


def load_retrieval_set(spec: str, data_cfg, *, image_size: int,
                       context_length: int = CONTEXT_LENGTH, limit: int = 0) -> RetrievalSet:
  """All pairs of one source in memory; the non-empty lines of a caption are that image's captions
  (clip_benchmark's convention). Bad pairs are left out and counted. `limit` > 0 keeps the first
  `limit` pairs. For small sets (held-out demo crops, Flickr30k/COCO 5k test)."""
  src = open_pair_source(spec, data_cfg)
  normalize = NormalizeBatch(data_cfg.mean, data_cfg.std)
  kinds = dict.fromkeys(SKIP_KINDS, 0)
  images, captions, index, keys = [], [], [], []
  for i in range(min(len(src), limit) if limit > 0 else len(src)):
    try:
      pair = src[i]
      image, text = check_pair(pair)
    except BadPairError as e:
      kinds[e.kind] += 1
      continue
    except (OSError, KeyError, ValueError):
      kinds['unreadable'] += 1
      continue
    lines = [line for line in text.splitlines() if line.strip()]
    images.append(normalize.normalize(np.asarray(resize_center_crop(image, image_size)),
                                      np.empty((image_size, image_size, 3), np.float32)))
    captions += lines
    index += [len(keys)] * len(lines)
    keys.append(pair.key)
  if not images:
    raise ValueError(f'{src.name} holds no usable pair for retrieval (skipped: {kinds}).')
  if sum(kinds.values()):
    log.warning('retrieval set %s: left out %d bad pairs %s', src.name, sum(kinds.values()),
                {k: v for k, v in kinds.items() if v})
  return RetrievalSet(np.stack(images), tokenize(captions, context_length),
                      np.asarray(index, np.int32), keys, kinds)
