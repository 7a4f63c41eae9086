"""grain input pipelines for EVA pretraining and fine-tuning.

Graph (all lazy, random-access until the last steps):

  DecodedSource per source -> shuffle(seed) -> repeat -> [mix by weight]
  -> map_with_index(transform)
  -> host slice [process_index::process_count] -> to_iter_dataset(threads) -> batch
  -> mp_prefetch(workers) | thread prefetch -> LoaderIterator (skip counter, mixup, state)

The transform sees the element's index in the global stream, so augmentation and masks depend
only on (seed, index). Batches are the same for a given (seed, process count, workers); changing
`workers` regroups examples into batches (grain batches inside each worker).

Loaders yield `Batch`es: the device arrays apart from the host-side bookkeeping.
  batch.arrays: 'image' float32 [B,H,W,3] (normalized NHWC; image_size is an int S = S x S or a
                (H, W) pair / 'HxW' string, data/config.py image_hw), plus 'mask' bool [B,N] (pretraining)
                or 'label' int32 [B] / float32 [B,classes] with mixup/cutmix (classification);
  batch.valid:  bool [B], False only for evaluation padding;
  batch.skipped: records skipped as undecodable on this host since the start of training (restored
                with the iterator state).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import weakref
from typing import Any, Callable, Iterator

from absl import flags
import grain
import numpy as np

from eva_jax import host_memory
from eva_jax.data.decode import DecodedSource, Padding
from eva_jax.data.mixup import Mixup
from eva_jax.data.sources import open_source, source_field
from eva_jax.data.transforms import ClassifyTransform, NormalizeBatch, PretrainTransform


def open_sources(data_cfg, open_one: Callable = open_source) -> list[tuple[Any, float]]:
  """(source, weight) pairs of `config.data.mixture`, else [(config.data.source, 1.0)], opened by
  `open_one(spec, data_cfg)` (image sources; data/pairs.py passes its pair sources). A training
  program opens them once and hands them to its loader (`sources=`), so that a folder is listed
  once and the checkpoint's listing fingerprint (sources.train_data_fingerprint) is of the very
  listing the loader reads. ValueError for a weight <= 0."""
  mixture = [tuple(m) for m in (data_cfg.get('mixture') or ())]
  if not mixture:
    with source_field('config.data.source', data_cfg.source):
      return [(open_one(data_cfg.source, data_cfg), 1.0)]
  for spec, weight in mixture:
    if not weight > 0:
      raise ValueError(f'Mixture weight for {spec} must be > 0, got {weight}.')
  opened = []
  for i, (spec, weight) in enumerate(mixture):
    with source_field(f'config.data.mixture[{i}]', spec):
      opened.append((open_one(spec, data_cfg), float(weight)))
  return opened


def source_num_classes(data_cfg) -> int | None:
  """Classes of `config.data.source` (None if unlabeled), e.g. to size a classifier head."""
  return open_source(data_cfg.source, data_cfg).num_classes


def _sub_seed(seed: int, k: int) -> int:
  return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])   # fits grain's uint32


def host_stream(parts: list[tuple[grain.MapDataset, float]], transform: Callable, data_cfg, *,
                seed: int, train: bool, batch_size: int, process_index: int, process_count: int,
                num_epochs: int | None) -> grain.MapDataset:
  """The transformed examples this host reads, in order, from (decoded MapDataset, weight) parts
  (image, image-text and video loaders alike). Train: each part shuffled (data_cfg.shuffle) and
  repeated num_epochs times (None = forever), several parts mixed by weight. Eval: one ordered
  pass over the parts in order, padded (`Padding`) so that every host and worker gets the same
  number of full batches. Rows are dealt to hosts round-robin after `transform`."""
  ds = [p for p, _ in parts]
  if train:
    if data_cfg.shuffle:    # reshuffled every epoch: repeat() reseeds upstream shuffles
      ds = [p.shuffle(seed=_sub_seed(seed, k)) for k, p in enumerate(ds)]
    if len(ds) == 1:
      ds = ds[0].repeat(num_epochs)
    else:
      # grain's mix interleaves by exact proportions; components repeat so none runs dry. One
      # "epoch" of a mixture is as many examples as all sources hold together.
      n = sum(len(p) for p in ds)
      ds = grain.MapDataset.mix([p.repeat() for p in ds], [w for _, w in parts])
      if num_epochs is not None:
        ds = ds[:num_epochs * n]
  else:
    ds = ds[0] if len(ds) == 1 else grain.MapDataset.concatenate(ds)
    chunk = process_count * max(1, data_cfg.workers) * batch_size
    pad = math.ceil(len(ds) / chunk) * chunk - len(ds)
    if pad:
      ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source(Padding(pad))])
  ds = ds.map_with_index(transform)
  return ds[process_index::process_count]


@dataclasses.dataclass(frozen=True)
class Batch:
  """One host's batch: `arrays` go to the devices; `valid` and `skipped` stay on the host.

  `batch[key]` reads an array or a bookkeeping field ('valid', 'skipped') for convenience."""
  arrays: dict[str, Any]
  valid: np.ndarray
  skipped: int

  def __getitem__(self, key: str):
    if key in ('valid', 'skipped'):
      return getattr(self, key)
    return self.arrays[key]

  def replace(self, **changes) -> 'Batch':
    return dataclasses.replace(self, **changes)


class LoaderIterator(Iterator[Batch]):
  """The grain iterator plus host-side batch work, with JSON-serializable get_state/set_state."""

  def __init__(self, ds: grain.IterDataset, *, seed: int, process_index: int,
               mixup: Mixup | None = None, num_classes: int | None = None, source: str = ''):
    self._it = iter(ds)
    # Closes grain's threads/workers when this iterator is collected or, at the latest, at
    # interpreter exit while modules still exist (grain's own __del__ then fails noisily).
    self._closer = weakref.finalize(self, _close_grain_iterator, self._it)
    self._seed, self._process_index, self._mixup = seed, process_index, mixup
    self._batches = 0
    self._skipped = 0
    self._num_classes, self._source = num_classes, source

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    arrays = dict(next(self._it))
    self._skipped += int(arrays.pop('skipped').sum())
    valid = np.asarray(arrays.pop('valid'), bool)
    if self._num_classes is not None:
      self._check_labels(np.asarray(arrays['label'])[valid])
    if self._mixup is not None:
      # Seeded by the batch number so a restored iterator mixes exactly as the original did.
      rng = np.random.default_rng([self._seed, self._process_index, self._batches, 1])
      arrays['image'], arrays['label'] = self._mixup(np.asarray(arrays['image']), arrays['label'],
                                                     rng)
    self._batches += 1
    return Batch(arrays=arrays, valid=valid, skipped=self._skipped)

  def _check_labels(self, labels: np.ndarray) -> None:
    # A label the head has no logit for would be one-hot encoded as all zeros (train) or never
    # matched (eval): the run would "work" and report nonsense, so it stops here instead.
    bad = labels[(labels < 0) | (labels >= self._num_classes)]
    if bad.size:
      raise ValueError(f'{self._source or "The data"} yields label {int(bad[0])}, outside '
                       f'[0, {self._num_classes}) of the classifier head (config.num_classes='
                       f'{self._num_classes}). Set config.num_classes to at least '
                       f'{int(labels.max()) + 1} (or 0 to take it from the source).')

  def get_state(self) -> dict[str, Any]:
    return {'grain': self._it.get_state(), 'batches': self._batches, 'skipped': self._skipped}

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state['grain'])
    self._batches, self._skipped = int(state['batches']), int(state['skipped'])

  def close(self) -> None:
    """Stops prefetch threads and worker processes (also done at garbage collection/exit)."""
    self._closer()


def _close_grain_iterator(it) -> None:
  it.close()
  # grain 0.2.18's thread-prefetch iterator closes again from __del__ during interpreter
  # teardown, when its module globals are gone, and prints a traceback. Nothing is left to close.
  it.close = lambda: None


def read_threads(threads: int, workers: int = 0) -> int:
  """Decode threads per process: `data.threads`, capped when the step runs on the same CPU
  (host_memory.runs_on_cpu) so that all processes together use at most this process's cores
  (cores // workers each with worker processes). Decoding is CPU-bound, so threads beyond the
  cores add no images/s there; they preempt the step's own matmul threads instead. bench_cpu fed by
  the demo pipeline (2 cores, 2026-11-30), fed / synthetic images/s through the prefetch thread:
  workers 0, 16 threads 0.946 vs 2 threads 0.970; workers 2, 2 threads each 0.903-0.917 vs 1 thread
  each 0.962. Accelerator hosts keep every configured thread (remote reads hide latency with them).
  """
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
  cap = max(1, cores // max(1, workers))
  if threads > cap and host_memory.runs_on_cpu():
    logging.info('data.threads=%d capped at %d: the step runs on the same %d CPU cores.',
                 threads, cap, cores)
    return cap
  return threads


def _finish(ds: grain.MapDataset, data_cfg, *, batch_size: int, train: bool, seed: int,
            process_index: int, mixup: Mixup | None = None, num_classes: int | None = None,
            source: str = '') -> LoaderIterator:
  threads = read_threads(int(data_cfg.threads), int(data_cfg.workers))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads,
      # Elements are ~150 KB decoded; buffer enough to keep the threads busy, not grain's 500.
      prefetch_buffer_size=max(2 * threads, batch_size, 1)))
  it_ds = it_ds.batch(batch_size, drop_remainder=train,
                      batch_fn=NormalizeBatch(data_cfg.mean, data_cfg.std))
  if data_cfg.workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain reads its absl flags when starting workers; outside an absl app (plain scripts,
      # notebooks, pytest) nobody parsed them, so accept the defaults instead of crashing.
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(data_cfg.workers), per_worker_buffer_size=max(1, int(data_cfg.prefetch))))
  elif data_cfg.prefetch > 0:
    it_ds = grain.experimental.ThreadPrefetchIterDataset(
        it_ds, prefetch_buffer_size=int(data_cfg.prefetch))
  return LoaderIterator(it_ds, seed=seed, process_index=process_index, mixup=mixup,
                        num_classes=num_classes, source=source)


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax   # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  return int(process_index), int(process_count)


def build_pretrain_loader(data_cfg, *, image_size, patch_size: int, batch_size: int,
                          seed: int, train: bool = True, process_index: int | None = None,
                          process_count: int | None = None,
                          num_epochs: int | None = None, sources=None) -> LoaderIterator:
  """Masked-image-modeling `Batch`es: arrays 'image' [B, H, W, 3], 'mask' [B, (H//patch_size) *
  (W//patch_size)] for image_size (H, W) (an int S: S x S). `batch_size` is per host. train=False: one ordered pass, no flip, resize + center
  crop, the fixed eval mask, padded to full batches ('valid' marks real examples). `sources`:
  `open_sources(data_cfg)` already opened (None = open them here)."""
  pi, pc = _process(process_index, process_count)
  transform = PretrainTransform(data_cfg, image_size, patch_size, seed, train)
  sources = sources if sources is not None else open_sources(data_cfg)
  ds = host_stream([(grain.MapDataset.source(DecodedSource(rec, train)), w) for rec, w in sources],
                   transform, data_cfg, seed=seed, train=train, batch_size=batch_size,
                   process_index=pi, process_count=pc, num_epochs=num_epochs)
  return _finish(ds, data_cfg, batch_size=batch_size, train=train, seed=seed, process_index=pi)


def build_classification_loader(data_cfg, *, image_size, batch_size: int, seed: int,
                                train: bool, num_classes: int | None = None,
                                process_index: int | None = None,
                                process_count: int | None = None,
                                num_epochs: int | None = None, sources=None) -> LoaderIterator:
  """Fine-tuning `Batch`es: arrays 'image' [B, H, W, 3] for image_size (H, W) (an int S: S x S;
  'HxW'), 'label'. Train: RRC(finetune_scale) + flip
  + RandAugment, and with mixup/cutmix > 0 soft float32 labels [B, num_classes] that include
  label smoothing (otherwise int labels: apply data_cfg.label_smoothing in the loss, e.g. with
  `eva_jax.data.mixup.smooth_one_hot`). Eval: resize + center crop (crop_pct), padded.
  `sources`: `open_sources(data_cfg)` already opened (None = open them here)."""
  pi, pc = _process(process_index, process_count)
  sources = sources if sources is not None else open_sources(data_cfg)
  if len(sources) > 1:
    raise ValueError('Classification needs one labeled source; config.data.mixture is for '
                     'pretraining only.')
  found = sources[0][0].num_classes
  if found is None:
    raise ValueError(f'{sources[0][0].name} has no labels (use class sub-folders, a packed '
                     'folder with classes, or a TFDS dataset with a label feature).')
  if num_classes and num_classes < found:
    raise ValueError(f'{sources[0][0].name} has {found} classes but config.num_classes='
                     f'{num_classes}: labels {num_classes}..{found - 1} have no logit. Set '
                     f'config.num_classes to 0 (= {found}, from the source) or at least {found}.')
  num_classes = num_classes or found
  mixup = None
  if train and (data_cfg.mixup > 0 or data_cfg.cutmix > 0):
    mixup = Mixup(data_cfg.mixup, data_cfg.cutmix, prob=data_cfg.mixup_prob,
                  switch_prob=data_cfg.mixup_switch_prob,
                  label_smoothing=data_cfg.label_smoothing, num_classes=num_classes)
  transform = ClassifyTransform(data_cfg, image_size, seed, train)
  ds = host_stream([(grain.MapDataset.source(DecodedSource(rec, train)), w) for rec, w in sources],
                   transform, data_cfg, seed=seed, train=train, batch_size=batch_size,
                   process_index=pi, process_count=pc, num_epochs=num_epochs)
  return _finish(ds, data_cfg, batch_size=batch_size, train=train, seed=seed, process_index=pi,
                 mixup=mixup, num_classes=num_classes, source=sources[0][0].name)
