"""Zero-shot classification and image<->text retrieval for two-tower (CLIP) models.

Encoders are plain callables so any model (ours, a converted one, a test double) plugs in:
  encode_image(images float32 [B, H, W, 3]) -> [B, D]
  encode_text(tokens int32 [B, 77])         -> [B, D]
Outputs may be numpy or jax arrays; they are L2-normalized here, metrics are computed on the host
in float32 numpy.

Recipes:
- Zero-shot classifier: open_clip `zero_shot_classifier.build_zero_shot_classifier` (CLIP, Radford
  et al. 2021, "prompt ensembling"): every (class, template) prompt is encoded and L2-normalized,
  averaged over templates, L2-normalized again; weights are [D, C].
- Zero-shot top-k: open_clip_train `zero_shot.py`: logits = 100 * normalized image features @
  weights, top-k hit if the label is among the k largest logits.
- Retrieval recall@k: clip_benchmark `zeroshot_retrieval.py` (as open_clip reports it), several
  captions per image: text->image R@k = share of captions whose image is in their top k images;
  image->text R@k = share of images with at least one of their captions in their top k captions.

The ImageNet-1k class names and prompt templates that ship in the open_clip wheel are available
through `imagenet_metadata()` without importing torch.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np

Encoder = Callable[[Any], Any]
RECALL_KS = (1, 5, 10)


@functools.cache
def imagenet_metadata() -> dict[str, tuple[str, ...]]:
  """{'classnames': 1000 ImageNet class names, 'openai_templates': CLIP's 80 prompts,
  'simple_templates': its 7 short prompts} from `open_clip/zero_shot_metadata.py` in the open_clip
  wheel. Templates are format strings with one '{}' (the file holds lambdas; each is called with
  '{}'). The file is executed on its own, not imported as part of open_clip (whose package
  __init__ imports torch). Raises FileNotFoundError when the wheel (torch extra) is missing."""
  try:
    path = str(importlib.metadata.distribution('open_clip_torch').locate_file(
        'open_clip/zero_shot_metadata.py'))
  except importlib.metadata.PackageNotFoundError:
    path = ''
  if not path or not os.path.isfile(path):
    raise FileNotFoundError('open_clip/zero_shot_metadata.py (ImageNet class names and templates)'
                            ' ships in the open_clip wheel: `pip install "eva_jax[torch]"`.')
  spec = importlib.util.spec_from_file_location('_open_clip_zero_shot_metadata', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  as_format = lambda ts: tuple(t('{}') if callable(t) else str(t) for t in ts)
  return {'classnames': tuple(module.IMAGENET_CLASSNAMES),
          'openai_templates': as_format(module.OPENAI_IMAGENET_TEMPLATES),
          'simple_templates': as_format(module.SIMPLE_IMAGENET_TEMPLATES)}


def l2_normalize(x, axis: int = -1) -> np.ndarray:
  """x / ||x|| along `axis` in float32 (a zero vector stays zero instead of becoming NaN)."""
  x = np.asarray(x, np.float32)
  n = np.linalg.norm(x, axis=axis, keepdims=True)
  return x / np.maximum(n, np.finfo(np.float32).tiny)


def _prompt(template: str | Callable[[str], str], classname: str) -> str:
  return template(classname) if callable(template) else template.format(classname)


def build_zero_shot_classifier(encode_text: Encoder, classnames: Sequence[str],
                               templates: Sequence[str | Callable[[str], str]], *,
                               tokenize: Callable[[list[str]], Any] | None = None,
                               classes_per_batch: int = 10) -> np.ndarray:
  """Zero-shot classifier weights, float32 [D, C] (column c = class c), as open_clip builds them.

  Each prompt `template.format(classname)` (or `template(classname)` for callables) is tokenized
  (default `eva_jax.data.tokenizer.tokenize`, int32 [B, 77]) and encoded; the embeddings are
  L2-normalized, averaged over templates and L2-normalized again. `classes_per_batch` classes are
  encoded per call (all templates of a class in the same call), so the batch the encoder sees is
  classes_per_batch * len(templates) (the last one smaller). Raises ValueError for no classes or
  no templates, or an encoder returning a wrong number of rows."""
  if not classnames or not templates:
    raise ValueError(f'A zero-shot classifier needs class names and templates; got '
                     f'{len(classnames)} class names and {len(templates)} templates.')
  if tokenize is None:
    from eva_jax.data.tokenizer import tokenize   # pylint: disable=g-import-not-at-top
  columns = []
  for start in range(0, len(classnames), max(1, classes_per_batch)):
    names = classnames[start:start + max(1, classes_per_batch)]
    prompts = [_prompt(t, c) for c in names for t in templates]
    emb = l2_normalize(encode_text(tokenize(prompts)))
    if emb.ndim != 2 or emb.shape[0] != len(prompts):
      raise ValueError(f'encode_text returned shape {emb.shape} for {len(prompts)} prompts; '
                       'expected [prompts, embed_dim].')
    columns.append(l2_normalize(emb.reshape(len(names), len(templates), -1).mean(1)))
  return np.concatenate(columns).T


def topk_correct(logits, labels, ks: Sequence[int] = (1, 5)) -> dict[int, np.ndarray]:
  """{k: bool [B]}: label among the k largest logits of its row (k capped at the class count).
  Ties at the k-th place count as hits (float features make them measure-zero)."""
  logits = np.asarray(logits, np.float32)
  labels = np.asarray(labels).astype(np.int64)
  if labels.min(initial=0) < 0 or labels.max(initial=0) >= logits.shape[1]:
    raise ValueError(f'labels must lie in [0, {logits.shape[1]}) (the classifier\'s classes); '
                     f'got {labels.min()}..{labels.max()}.')
  own = np.take_along_axis(logits, labels[:, None], axis=1)
  rank = (logits > own).sum(axis=1)      # classes scoring strictly higher than the true one
  return {k: rank < min(k, logits.shape[1]) for k in ks}


def zero_shot_accuracy(encode_image: Encoder, classifier: np.ndarray,
                       batches: Iterable[Any], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """Zero-shot top-k accuracy (fraction in [0, 1]) over `batches` of labeled images.

  batches: `eva_jax.data.pipeline.Batch`es (arrays 'image', 'label'; padding rows with valid False
  are left out) or dicts with 'image', 'label' [and 'valid']. classifier: [D, C] from
  `build_zero_shot_classifier`. Returns {'top1': .., 'top5': .., 'count': n images scored,
  'unreadable': n left out by the loader (a Batch's running `skipped`; 0 for dicts)} (the top-k
  keys follow ks)."""
  classifier = np.asarray(classifier, np.float32)
  hits = {k: 0 for k in ks}
  count = unreadable = 0
  for b in batches:
    if hasattr(b, 'arrays'):    # a pipeline Batch
      arrays, valid, unreadable = b.arrays, b.valid, b.skipped
    else:
      arrays, valid = b, b.get('valid', np.ones(len(b['label']), bool))
    valid = np.asarray(valid, bool)
    logits = 100.0 * l2_normalize(encode_image(arrays['image'])) @ classifier
    for k, ok in topk_correct(logits[valid], np.asarray(arrays['label'])[valid], ks).items():
      hits[k] += int(ok.sum())
    count += int(valid.sum())
  if not count:
    raise ValueError('zero_shot_accuracy got no (valid) images to classify.')
  return {**{f'top{k}': hits[k] / count for k in ks}, 'count': count, 'unreadable': unreadable}


def retrieval_recall(image_features, text_features, text_image_index,
                     ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
  """Image<->text retrieval recall@k, several captions per image (clip_benchmark's protocol).

  image_features [I, D], text_features [T, D] (any scale; cosine similarity is used),
  text_image_index int [T]: the image each caption describes (every image needs >= 1 caption).
  Returns {'image_to_text_R@k': fraction of images with one of their captions among their k most
  similar captions, 'text_to_image_R@k': fraction of captions whose image is among their k most
  similar images} for k in ks. Ties with a positive count as hits. Raises ValueError on index out
  of range, shapes that disagree, or an image without captions."""
  img, txt = l2_normalize(image_features), l2_normalize(text_features)
  idx = np.asarray(text_image_index).astype(np.int64)
  if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1] or idx.shape != txt.shape[:1]:
    raise ValueError(f'retrieval_recall: image features {img.shape}, text features {txt.shape} '
                     f'and text_image_index {idx.shape} must be [I, D], [T, D] and [T].')
  if idx.min(initial=0) < 0 or idx.max(initial=0) >= len(img):
    raise ValueError(f'text_image_index must lie in [0, {len(img)}); got {idx.min()}..{idx.max()}.')
  missing = np.setdiff1d(np.arange(len(img)), idx)
  if missing.size:
    raise ValueError(f'{missing.size} images have no caption (first: image {missing[0]}); drop '
                     'them from the retrieval set.')
  scores = txt @ img.T                                          # [T, I]
  positive = np.zeros(scores.shape, bool)
  positive[np.arange(len(idx)), idx] = True
  # text -> image: rank of the caption's image among all images.
  t2i_rank = (scores > scores[np.arange(len(idx)), idx][:, None]).sum(1)
  # image -> text: rank of the best-scoring caption of the image among all captions.
  best_pos = np.where(positive, scores, -np.inf).max(0)        # [I]
  i2t_rank = (scores.T > best_pos[:, None]).sum(1)
  out = {}
  for k in ks:
    out[f'image_to_text_R@{k}'] = float((i2t_rank < k).mean())
    out[f'text_to_image_R@{k}'] = float((t2i_rank < k).mean())
  return out


def encode_all(encode: Encoder, inputs: np.ndarray, batch_size: int = 256,
               pad_to_batch: bool = True) -> np.ndarray:
  """encode(inputs[i:i+batch_size]) for all rows, float32 [N, D]. With pad_to_batch the last chunk
  is zero-padded to batch_size (one compiled shape for jitted encoders) and the padding dropped."""
  out = []
  for start in range(0, len(inputs), batch_size):
    chunk = np.asarray(inputs[start:start + batch_size])
    n = len(chunk)
    if pad_to_batch and n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(encode(chunk), np.float32)[:n])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def evaluate(encode_image: Encoder, encode_text: Encoder, *,
             classifier_batches: Iterable[Any] | None = None,
             classnames: Sequence[str] = (), templates: Sequence[str] = (),
             retrieval: Any = None, batch_size: int = 256,
             tokenize: Callable[[list[str]], Any] | None = None) -> dict[str, float]:
  """Both benchmarks as one flat dict of floats, ready to log next to the training metrics.

  Zero-shot (when classifier_batches and classnames are given): 'zero_shot/top1', 'zero_shot/top5',
  'zero_shot/count' (images scored), 'zero_shot/unreadable' (left out) over labeled image batches (e.g. `build_classification_loader(..., train=False)` on held-out
  crops) with the classifier of classnames x templates. Retrieval (when `retrieval` is given: an
  `eva_jax.data.pairs.RetrievalSet` or anything with images, tokens, text_image_index):
  'retrieval/image_to_text_R@k', 'retrieval/text_to_image_R@k' for k = 1, 5, 10, with
  'retrieval/images', 'retrieval/captions' and 'retrieval/bad_pairs' (left out). Encoders see
  batches of `batch_size` (zero-padded at the end) for the retrieval set."""
  out: dict[str, float] = {}
  if classifier_batches is not None and classnames:
    weights = build_zero_shot_classifier(encode_text, classnames, templates or ('{}',),
                                         tokenize=tokenize)
    acc = zero_shot_accuracy(encode_image, weights, classifier_batches,
                             ks=(1, min(5, len(classnames))))
    out['zero_shot/top1'] = acc['top1']
    out['zero_shot/top5'] = acc[f'top{min(5, len(classnames))}']
    out['zero_shot/count'], out['zero_shot/unreadable'] = acc['count'], acc['unreadable']
  if retrieval is not None:
    recall = retrieval_recall(encode_all(encode_image, retrieval.images, batch_size),
                              encode_all(encode_text, retrieval.tokens, batch_size),
                              retrieval.text_image_index)
    out.update({f'retrieval/{k}': v for k, v in recall.items()})
    out['retrieval/images'] = len(retrieval.images)
    out['retrieval/captions'] = len(retrieval.tokens)
    out['retrieval/bad_pairs'] = sum(getattr(retrieval, 'skipped_by_kind', {}).values())
  return out
