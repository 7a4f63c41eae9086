"""Batch-level mixup / cutmix with label smoothing: timm's `Mixup(mode='batch')` in numpy, NHWC.

Draws come from a `np.random.Generator` in timm's order (apply?, cutmix?, lambda, box centre), so
the same random stream gives the same images and targets as timm (checked in the tests).
"""
from __future__ import annotations

import numpy as np


def smooth_one_hot(labels: np.ndarray, num_classes: int, smoothing: float = 0.0) -> np.ndarray:
  """[B] int -> [B, C] float32 with `smoothing` spread uniformly (timm's off/on values)."""
  off = smoothing / num_classes
  y = np.full((len(labels), num_classes), off, np.float32)
  y[np.arange(len(labels)), labels] = 1.0 - smoothing + off
  return y


class Mixup:
  """Mixes each batch with its reverse (x[::-1]); lambda ~ Beta(alpha, alpha).

  With both alphas > 0 a batch uses cutmix with probability `switch_prob`. Cutmix pastes one
  square-ish box (side sqrt(1 - lambda) of the image, centre uniform, clipped at the border) and
  corrects lambda to the pasted area, as timm does with correct_lam=True.
  """

  def __init__(self, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
               switch_prob: float = 0.5, label_smoothing: float = 0.1, num_classes: int = 1000):
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
      raise ValueError('Mixup needs mixup_alpha > 0 or cutmix_alpha > 0.')
    self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
    self.prob, self.switch_prob = prob, switch_prob
    self.label_smoothing, self.num_classes = label_smoothing, num_classes

  def _params(self, rng) -> tuple[float, bool]:
    if not rng.random() < self.prob:
      return 1.0, False
    if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
      use_cutmix = bool(rng.random() < self.switch_prob)
      alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
    else:
      use_cutmix = self.cutmix_alpha > 0
      alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
    return float(rng.beta(alpha, alpha)), use_cutmix

  @staticmethod
  def cutmix_box(height: int, width: int, lam: float, rng) -> tuple[int, int, int, int]:
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    yl, yh = np.clip([cy - cut_h // 2, cy + (cut_h + 1) // 2], 0, height)
    xl, xh = np.clip([cx - cut_w // 2, cx + (cut_w + 1) // 2], 0, width)
    return int(yl), int(yh), int(xl), int(xh)

  def __call__(self, images: np.ndarray, labels: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """images [B,H,W,C] (mixed in place), int labels [B] -> (images, soft labels [B,classes])."""
    if len(images) % 2:
      raise ValueError(f'Mixup needs an even per-host batch, got {len(images)}.')
    lam, use_cutmix = self._params(rng)
    if lam != 1.0:
      if use_cutmix:
        yl, yh, xl, xh = self.cutmix_box(images.shape[1], images.shape[2], lam, rng)
        images[:, yl:yh, xl:xh] = images[::-1, yl:yh, xl:xh].copy()
        lam = 1.0 - (yh - yl) * (xh - xl) / float(images.shape[1] * images.shape[2])
      else:
        flipped = images[::-1] * (1.0 - lam)
        images *= lam
        images += flipped
    y = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
    return images, (y * lam + y[::-1] * (1.0 - lam)).astype(np.float32)
