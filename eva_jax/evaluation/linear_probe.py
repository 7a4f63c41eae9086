r"""Frozen-feature evaluation of an encoder: linear probe and k-NN.

  eva-linear-probe --config=linear_probe_demo --config.init_from=workdirs/demo [--workdir=DIR]

Protocol (EVA-CLIP / MAE): features of the frozen encoder on center crops (cls token or mean-pool
of the patch tokens), BatchNorm without affine parameters, then a linear head trained with AdamW
and cross-entropy. Because the encoder is frozen and inputs are not augmented, features are
computed once; the BatchNorm is then exactly a standardization with the training set's statistics
(its converged running averages). The k-NN classifier is DINO's: cosine similarity, k neighbours,
votes weighted by exp(sim / T). Prints a final JSON line: probe_top1, knn_top1, counts, and which
weights were probed (config.weights: auto = the EMA when the checkpoint has one, raw, ema).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eva_jax import checkpoint as ckpt_lib
from eva_jax.data import pipeline as data_lib
from eva_jax.data import sources as sources_lib
from eva_jax.data.config import format_hw, image_hw
from eva_jax.training import checks


def extract(encoder, data_cfg, *, image_size, batch_size: int, pool: str, seed: int = 0,
            limit: int = 0, sources=None) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, D] float32, labels [N]) of one ordered pass over `data_cfg.source` (or over
  `sources`, [(source, 1.0)] already opened).

  image_size: an int S (S x S) or (height, width) / 'HxW', each side a multiple of the patch; the
  encoder interpolates its pos-embed (and RoPE) to that grid.
  pool: 'mean' of the patch tokens (the model's prefix tokens excluded) or 'token' (the cls token;
  ValueError for an encoder without one)."""
  prefix = encoder.num_prefix
  if pool == 'token' and not prefix:
    raise ValueError("pool='token' needs a class token; this encoder has none: use pool='mean'.")
  fwd = jax.jit(lambda x: encoder(x))
  loader = data_lib.build_classification_loader(
      data_cfg, image_size=image_size, batch_size=batch_size, seed=seed, train=False,
      sources=sources)
  feats, labels, skipped = [], [], 0
  for b in loader:
    tokens = np.asarray(fwd(b.arrays['image']))
    f = tokens[:, prefix:].mean(1) if pool == 'mean' else tokens[:, 0]
    feats.append(f[b.valid])
    labels.append(np.asarray(b.arrays['label'])[b.valid])
    skipped = b.skipped
    if limit and sum(len(l) for l in labels) >= limit:
      break
  loader.close()
  name = sources[0][0].name if sources else data_cfg.source
  if skipped:
    print(f'Left out {skipped} unreadable images of {name} (not scored).', flush=True)
  if not sum(len(l) for l in labels):
    raise ValueError(f'No readable image in {name} ({skipped} unreadable): nothing to extract '
                     'features from.')
  return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int32)


def knn_top1(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07,
             num_classes: int | None = None, classes=None) -> float:
  """Weighted k-NN top-1 (cosine similarity, votes exp(sim / temperature)). classes: the labels
  predicted among (data/sources.py split_labels; None = all); a neighbour of another class then
  casts no vote."""
  num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
  a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
  sim = b @ a.T
  k = min(k, len(train_y))
  idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
  w = np.exp(np.take_along_axis(sim, idx, 1) / temperature)
  votes = np.zeros((len(test_y), num_classes))
  np.add.at(votes, (np.arange(len(test_y))[:, None], train_y[idx]), w)
  return float((_among(votes, classes).argmax(1) == test_y).mean())


def _among(scores: np.ndarray, classes) -> np.ndarray:
  """scores [N, C] (writable, changed in place) with every class outside `classes` at -inf; all
  kept when classes is None."""
  if classes is not None:
    excluded = np.ones(scores.shape[1], bool)
    excluded[np.asarray(classes, int)] = False
    scores[:, excluded] = -np.inf
  return scores


def linear_probe_top1(train_x, train_y, test_x, test_y, *, num_classes: int, epochs: int = 100,
                      lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 256,
                      seed: int = 0, classes=None) -> float:
  """BatchNorm(affine=False, eps 1e-6) + linear head trained with AdamW; returns test top-1,
  predicting among `classes` (data/sources.py split_labels; None = all)."""
  mean, var = train_x.mean(0), train_x.var(0)
  norm = lambda x: (x - mean) / np.sqrt(var + 1e-6)
  xtr, xte = jnp.asarray(norm(train_x)), jnp.asarray(norm(test_x))
  ytr = jnp.asarray(train_y)
  d = train_x.shape[1]
  params = {'w': jnp.zeros((d, num_classes)), 'b': jnp.zeros((num_classes,))}
  steps_per_epoch = max(1, len(train_y) // batch_size)
  tx = optax.adamw(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch), weight_decay=weight_decay)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(x @ p['w'] + p['b'], y).mean()
    g = jax.grad(loss)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    perm = rng.permutation(len(train_y))
    for i in range(steps_per_epoch):
      sel = perm[i * batch_size:(i + 1) * batch_size]
      params, opt = step(params, opt, xtr[sel], ytr[sel])
  logits = np.array(xte @ params['w'] + params['b'])   # a writable host copy
  return float((_among(logits, classes).argmax(-1) == test_y).mean())


def split_holdout(x, y, fraction: float, seed: int):
  """Deterministic stratified split for sources with a single split (e.g. demo)."""
  rng = np.random.default_rng(seed)
  test = np.zeros(len(y), bool)
  for c in np.unique(y):
    idx = np.flatnonzero(y == c)
    test[rng.permutation(idx)[:max(1, int(round(len(idx) * fraction)))]] = True
  return x[~test], y[~test], x[test], y[test]


def evaluate(cfg) -> dict:
  checks.check_config(cfg, 'linear_probe')   # every field range-checked before reading weights
  if not cfg.init_from:
    raise ValueError('config.init_from is required: an eva_jax workdir or checkpoint, or a timm / '
                     'official EVA file.')
  encoder, meta = ckpt_lib.encoder_from_checkpoint(cfg.init_from,
                                                   weights=cfg.get('weights', 'auto'))
  print(f"Linear probe / k-NN of {meta['source']}.", flush=True)
  size = cfg.image_size or encoder.cfg.image_size
  checks.image_grid(size, encoder.cfg.patch_size)   # a side off the patch grid: refused here
  kw = dict(image_size=size, batch_size=cfg.batch_size, pool=cfg.pool, seed=cfg.seed)
  train = data_lib.open_sources(cfg.data)
  if cfg.eval_source:
    # Opened and labelled by the training split's class names (data/sources.py align_classes)
    # before the training pass, so a split that cannot be matched is refused at once.
    with sources_lib.source_field('config.eval_source', cfg.eval_source):
      test = data_lib.open_source(cfg.eval_source, cfg.data)
    test = sources_lib.align_classes(test, train[0][0], 'config.eval_source')
  train_x, train_y = extract(encoder, cfg.data, sources=train, **kw)
  if cfg.eval_source:
    test_x, test_y = extract(encoder, cfg.data, sources=[(test, 1.0)], **kw)
  else:
    train_x, train_y, test_x, test_y = split_holdout(train_x, train_y, cfg.holdout, cfg.seed)
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  # A split holding a subset of the training classes is scored among its classes only.
  classes = sources_lib.split_labels(test) if cfg.eval_source else None
  if classes is not None:   # the head covers every training class, even one with no image read
    num_classes = max(num_classes, max(classes) + 1)
  out = {
      'init_from': cfg.init_from, 'weights': meta['weights_used'], 'pool': cfg.pool,
      'image_size': format_hw(image_hw(size)), 'train_images': int(len(train_y)),
      'test_images': int(len(test_y)), 'num_classes': num_classes,
      'test_classes': len(classes) if classes is not None else num_classes,
      'knn_top1': knn_top1(train_x, train_y, test_x, test_y, cfg.knn_k, cfg.knn_temperature,
                           num_classes, classes),
      'probe_top1': linear_probe_top1(train_x, train_y, test_x, test_y, num_classes=num_classes,
                                      epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      batch_size=cfg.probe_batch_size, seed=cfg.seed,
                                      classes=classes),
  }
  return out
