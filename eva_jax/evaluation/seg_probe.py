r"""Dense frozen-feature evaluation: a per-patch linear segmentation probe and its mIoU.

  eva-seg-probe --config=seg_probe_demo --config.init_from=workdirs/demo [--workdir=DIR]

Task: data/seg_demo.py (demo photos pasted on other demo photos inside random ellipses; a pixel's
label is its photo's class, 8 classes), deterministic from config.seed.

Protocol (the "linear" head of DINOv2's segmentation evaluation and of mmseg's BN + 1x1 conv):
the frozen encoder's patch tokens after its final norm (prefix tokens dropped) are reshaped to the
patch grid [N, h/p, w/p, D] once; each channel is standardized with the training set's statistics
(BatchNorm without affine, converged); a linear map (a 1x1 convolution) gives per-patch class
logits, which are **bilinearly upsampled to the pixels** (jax.image.resize, half-pixel centres as
torch's align_corners=False) and trained with per-pixel softmax cross-entropy, AdamW and a cosine
schedule (optax, jitted). Prediction is the argmax of the upsampled logits; the score is the mIoU
over classes of the confusion matrix accumulated over every held-out pixel (mmseg / torchmetrics
JaccardIndex: IoU_c = TP / (TP + FP + FN), classes absent from both prediction and labels are
left out of the mean). Also reported: pixel accuracy and the mIoU of always predicting the
training set's most frequent class (the floor a probe must beat).

config.init_from: anything checkpoint.read_encoder reads (an eva_jax workdir or checkpoint, a timm
or official EVA file); '' = a random-init encoder of config.model (seed config.seed), the baseline.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eva_jax import checkpoint as ckpt_lib
from eva_jax.data import seg_demo
from eva_jax.data.config import format_hw, image_hw
from eva_jax.training import checks


# -------------------------------------------------------------------------------------------------
# Scores
def confusion_matrix(pred, labels, num_classes: int, ignore_index: int = 255) -> np.ndarray:
  """int64 [C, C]: entry [t, p] counts pixels of true class t predicted as p. Pixels labelled
  `ignore_index` are not counted; any other label or prediction outside [0, C) is a ValueError."""
  pred, labels = np.asarray(pred).reshape(-1), np.asarray(labels).reshape(-1)
  if pred.shape != labels.shape:
    raise ValueError(f'predictions ({pred.size} pixels) and labels ({labels.size}) differ.')
  keep = labels != ignore_index
  pred, labels = pred[keep].astype(np.int64), labels[keep].astype(np.int64)
  for what, v in (('label', labels), ('prediction', pred)):
    bad = v[(v < 0) | (v >= num_classes)]
    if bad.size:
      raise ValueError(f'{what} {int(bad[0])} is outside [0, {num_classes}).')
  return np.bincount(labels * num_classes + pred,
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
  """float64 [C]: TP / (TP + FP + FN) per class from a confusion matrix; NaN where the class is in
  neither the labels nor the predictions (union 0)."""
  conf = np.asarray(conf, np.float64)
  tp = np.diag(conf)
  union = conf.sum(0) + conf.sum(1) - tp
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def mean_iou(conf: np.ndarray) -> float:
  """The mean of iou_per_class over the classes present (NaNs left out)."""
  iou = iou_per_class(conf)
  return float(np.nanmean(iou)) if np.isfinite(iou).any() else float('nan')


# -------------------------------------------------------------------------------------------------
# Features
def patch_features(encoder, images: np.ndarray, *, batch_size: int = 32, mean=None,
                   std=None) -> np.ndarray:
  """Frozen patch tokens on the grid: float32 [N, h/p, w/p, D] for uint8 images [N, h, w, 3]
  (normalized (x/255 - mean) / std; CLIP's by default). Prefix tokens (cls, registers) dropped."""
  from eva_jax.data.config import CLIP_MEAN, CLIP_STD
  mean = np.asarray(CLIP_MEAN if mean is None else mean, np.float32)
  std = np.asarray(CLIP_STD if std is None else std, np.float32)
  n, h, w, _ = images.shape
  gh, gw = checks.image_grid((h, w), encoder.cfg.patch_size, 'image size')
  fwd = jax.jit(lambda x: encoder.patch_tokens(x).astype(jnp.float32))
  bs = min(batch_size, n)
  out = []
  for i in range(0, n, bs):
    x = (images[i:i + bs].astype(np.float32) / 255.0 - mean) / std
    k = len(x)
    if k < bs:     # one compiled shape: pad the last batch
      x = np.concatenate([x, np.zeros((bs - k,) + x.shape[1:], np.float32)])
    out.append(np.asarray(fwd(x))[:k].reshape(k, gh, gw, -1))
  return np.concatenate(out)


# -------------------------------------------------------------------------------------------------
# The linear probe
def _logits(params, feats, size):
  """[B, gh, gw, D] standardized features -> [B, h, w, C] bilinearly upsampled logits."""
  x = jnp.einsum('bhwd,dc->bhwc', feats, params['w']) + params['b']
  return jax.image.resize(x, (x.shape[0],) + tuple(size) + (x.shape[-1],), 'bilinear')


def fit(train_feats: np.ndarray, train_labels: np.ndarray, *, num_classes: int, epochs: int = 50,
        lr: float = 1e-2, weight_decay: float = 1e-4, batch_size: int = 16,
        seed: int = 0) -> dict:
  """Trains the probe: feats float32 [N, gh, gw, D], labels int [N, h, w] -> params
  {'w' [D, C], 'b' [C], 'mean' [D], 'std' [D]} (numpy). AdamW, cosine lr to 0, zero init."""
  n, size = len(train_feats), tuple(train_labels.shape[1:])
  mean = train_feats.reshape(-1, train_feats.shape[-1]).mean(0)
  std = np.sqrt(train_feats.reshape(-1, train_feats.shape[-1]).var(0) + 1e-6)
  x = jnp.asarray((train_feats - mean) / std, jnp.float32)
  y = jnp.asarray(train_labels, jnp.int32)
  d = x.shape[-1]
  params = {'w': jnp.zeros((d, num_classes)), 'b': jnp.zeros((num_classes,))}
  batch_size = min(batch_size, n)
  steps_per_epoch = max(1, n // batch_size)
  tx = optax.adamw(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch),
                   weight_decay=weight_decay)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, xb, yb):
    def loss(p):
      # One-hot targets: the integer-label form's gradient is a scatter that XLA constant-folds
      # slowly (a > 1 s warning at 112 x 112) for the same number.
      return optax.softmax_cross_entropy(_logits(p, xb, size),
                                         jax.nn.one_hot(yb, num_classes)).mean()
    g = jax.grad(loss)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    perm = rng.permutation(n)
    for i in range(steps_per_epoch):
      sel = perm[i * batch_size:(i + 1) * batch_size]
      params, opt = step(params, opt, x[sel], y[sel])
  return {'w': np.asarray(params['w']), 'b': np.asarray(params['b']), 'mean': mean, 'std': std}


def predict(params: dict, feats: np.ndarray, size, batch_size: int = 16) -> np.ndarray:
  """int32 [N, h, w]: argmax of the upsampled logits of the probe `params` (from fit)."""
  size = image_hw(size, 'size')
  fn = jax.jit(lambda p, f: jnp.argmax(_logits(p, f, size), -1).astype(jnp.int32))
  p = {'w': jnp.asarray(params['w']), 'b': jnp.asarray(params['b'])}
  out = [np.asarray(fn(p, jnp.asarray((feats[i:i + batch_size] - params['mean']) / params['std'],
                                      jnp.float32)))
         for i in range(0, len(feats), batch_size)]
  return np.concatenate(out)


# -------------------------------------------------------------------------------------------------
# The whole evaluation
def load_encoder(cfg):
  """(VisionTransformer, description): config.init_from read by checkpoint.read_encoder, or a
  random-init encoder of config.model (seed config.seed) at the square native size
  max(config.image_size)."""
  if cfg.init_from:
    encoder, meta = ckpt_lib.encoder_from_checkpoint(cfg.init_from,
                                                     weights=cfg.get('weights', 'auto'))
    return encoder, meta['source']
  from eva_jax.models import config as model_config, vit
  if not cfg.image_size:
    raise ValueError("config.image_size=0 means the encoder's own size, but config.init_from is "
                     "empty (a random-init encoder has none): set config.image_size (e.g. 112).")
  patch = cfg.model.get('patch_size') or model_config.encoder_config(
      cfg.model.get('name') or 'tiny').patch_size
  checks.image_grid(cfg.image_size, patch)   # before building: names the nearest valid sizes
  h, w = image_hw(cfg.image_size)
  ecfg = model_config.resolve_encoder(cfg.model, image_size=max(h, w), dtype='float32')
  return vit.create(ecfg, cfg.seed), f'random-init {ecfg.name} (seed {cfg.seed})'


def evaluate(cfg) -> dict:
  """Builds the task, extracts frozen features, fits the probe, scores the held-out images.
  Returns a JSON-ready dict (mIoU, per-class IoU, pixel accuracy, the majority-class floor)."""
  checks.check_config(cfg, 'seg_probe')
  encoder, source = load_encoder(cfg)
  print(f'Segmentation probe of {source}.', flush=True)
  size = cfg.image_size or encoder.cfg.image_size
  grid = checks.image_grid(size, encoder.cfg.patch_size)
  hw = image_hw(size)
  t = cfg.task
  kw = dict(image_size=hw, seed=cfg.seed, shape=t.shape, area=tuple(t.area),
            cache_dir=t.cache_dir)
  names = seg_demo.class_names(t.cache_dir)
  c = len(names)
  train_x, train_y = seg_demo.make_split(t.train_images, split='train', **kw)
  test_x, test_y = seg_demo.make_split(t.test_images, split='test', **kw)
  fkw = dict(batch_size=cfg.batch_size, mean=tuple(cfg.mean), std=tuple(cfg.std))
  train_f = patch_features(encoder, train_x, **fkw)
  test_f = patch_features(encoder, test_x, **fkw)
  params = fit(train_f, train_y, num_classes=c, epochs=cfg.epochs, lr=cfg.lr,
               weight_decay=cfg.weight_decay, batch_size=cfg.probe_batch_size, seed=cfg.seed)
  conf = confusion_matrix(predict(params, test_f, hw, cfg.probe_batch_size), test_y, c)
  train_conf = confusion_matrix(predict(params, train_f, hw, cfg.probe_batch_size), train_y, c)
  majority = int(np.bincount(train_y.reshape(-1), minlength=c).argmax())
  floor = confusion_matrix(np.full_like(test_y, majority), test_y, c)
  iou = iou_per_class(conf)
  return {
      'init_from': cfg.init_from or '', 'encoder': source, 'image_size': format_hw(hw),
      'grid': f'{grid[0]}x{grid[1]}', 'classes': list(names), 'train_images': int(len(train_y)),
      'test_images': int(len(test_y)), 'miou': mean_iou(conf),
      'pixel_accuracy': float(np.trace(conf) / conf.sum()),
      'train_miou': mean_iou(train_conf),
      'majority_miou': mean_iou(floor),
      'iou': {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
  }
