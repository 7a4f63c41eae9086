"""Zero-shot classifier weights and accuracy against open_clip; retrieval recall@k against a
brute-force sort."""
import subprocess
import sys

import numpy as np
import pytest

import support
from eva_jax.evaluation import zero_shot

D = 32


@pytest.fixture(scope='module')
def table():
  """A fixed random embedding table: the text encoder of both sides is its mean over the tokens
  of each row up to and including EOT (CLIP pools at EOT; this is a simple stand-in)."""
  return np.random.default_rng(0).normal(size=(49408, D)).astype(np.float32)


def np_encode_text(table, tokens):
  tokens = np.asarray(tokens)
  keep = np.arange(tokens.shape[1]) <= tokens.argmax(1)[:, None]   # up to EOT (largest id)
  return (table[tokens] * keep[..., None]).sum(1) / keep.sum(1, keepdims=True)


class TorchTextModel:
  """What open_clip's build_zero_shot_classifier calls: encode_text(tokens, normalize=True)."""

  def __init__(self, table):
    import torch   # pylint: disable=g-import-not-at-top
    self.table = torch.from_numpy(table)

  def encode_text(self, tokens, normalize=False):
    import torch   # pylint: disable=g-import-not-at-top
    keep = torch.arange(tokens.shape[1])[None] <= tokens.argmax(1)[:, None]
    f = (self.table[tokens] * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    return torch.nn.functional.normalize(f, dim=-1) if normalize else f


@pytest.fixture(scope='module')
def meta():
  return zero_shot.imagenet_metadata()


def test_imagenet_metadata_equals_open_clip(meta):
  from open_clip import zero_shot_metadata as ref   # pylint: disable=g-import-not-at-top
  assert meta['classnames'] == tuple(ref.IMAGENET_CLASSNAMES) and len(meta['classnames']) == 1000
  assert len(meta['openai_templates']) == 80 and len(meta['simple_templates']) == 7
  for ours, theirs in ((meta['openai_templates'], ref.OPENAI_IMAGENET_TEMPLATES),
                       (meta['simple_templates'], ref.SIMPLE_IMAGENET_TEMPLATES)):
    assert [t.format('tench') for t in ours] == [t('tench') for t in theirs]


def test_metadata_loads_without_torch():
  code = ('import sys; from eva_jax.evaluation import zero_shot as z; m = z.imagenet_metadata(); '
          'assert "torch" not in sys.modules, "torch imported"; print(len(m["classnames"]))')
  out = subprocess.run([sys.executable, '-c', code], env=support.ENV, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.split()[-1] == '1000', out.stderr


def test_classifier_and_accuracy_match_open_clip(table, meta):
  import open_clip   # pylint: disable=g-import-not-at-top
  import torch   # pylint: disable=g-import-not-at-top
  from open_clip.zero_shot_classifier import build_zero_shot_classifier
  from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
  classnames = list(meta['classnames'][:23])   # 3 batches of 10 classes (last one partial)
  want = build_zero_shot_classifier(TorchTextModel(table), open_clip.tokenize, classnames,
                                    OPENAI_IMAGENET_TEMPLATES, num_classes_per_batch=10).numpy()
  got = zero_shot.build_zero_shot_classifier(lambda t: np_encode_text(table, t), classnames,
                                             meta['openai_templates'], classes_per_batch=7)
  assert got.shape == (D, 23) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=0), 1.0, atol=1e-6)

  # Accuracy: open_clip_train's recipe (logits = 100 f @ W, torch.topk) on random image features
  # that lean towards their class so top-1 is neither 0 nor 1.
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 23, size=200)
  images = rng.normal(size=(200, D)).astype(np.float32) + 4.0 * want.T[labels]
  logits = 100 * torch.nn.functional.normalize(torch.from_numpy(images), dim=-1) @ \
      torch.from_numpy(want)
  pred = logits.topk(5, 1, True, True)[1].t()
  correct = pred.eq(torch.from_numpy(labels).view(1, -1).expand_as(pred))
  ref = {k: float(correct[:k].reshape(-1).float().sum()) / 200 for k in (1, 5)}
  batches = [{'image': images[i:i + 64], 'label': labels[i:i + 64]} for i in range(0, 200, 64)]
  # The padded Batch form: invalid rows (here garbage) must not count.
  from eva_jax.data.pipeline import Batch   # pylint: disable=g-import-not-at-top
  pad = Batch(arrays={'image': rng.normal(size=(5, D)).astype(np.float32),
                      'label': np.zeros(5, np.int32)}, valid=np.zeros(5, bool), skipped=0)
  acc = zero_shot.zero_shot_accuracy(lambda x: x, got, batches + [pad])
  assert acc['count'] == 200 and 0.2 < ref[1] < 0.9, ref
  assert acc['top1'] == pytest.approx(ref[1]) and acc['top5'] == pytest.approx(ref[5])


def brute_force_recall(img, txt, idx, k):
  img = img / np.linalg.norm(img, axis=1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  t2i = np.mean([idx[t] in np.argsort(-(img @ txt[t]))[:k] for t in range(len(txt))])
  i2t = np.mean([bool(set(np.argsort(-(txt @ img[i]))[:k]) & set(np.flatnonzero(idx == i)))
                 for i in range(len(img))])
  return i2t, t2i


def test_retrieval_recall_equals_brute_force():
  rng = np.random.default_rng(2)
  n_img = 40
  idx = np.concatenate([np.arange(n_img), rng.integers(0, n_img, size=80)])   # 1-5 captions each
  img = rng.normal(size=(n_img, D)).astype(np.float32)
  txt = (0.3 * img[idx] + rng.normal(size=(len(idx), D))).astype(np.float32) * 3.0
  got = zero_shot.retrieval_recall(img, txt, idx)
  for k in (1, 5, 10):
    i2t, t2i = brute_force_recall(img, txt, idx, k)
    assert got[f'image_to_text_R@{k}'] == pytest.approx(i2t)
    assert got[f'text_to_image_R@{k}'] == pytest.approx(t2i)
  assert 0 < got['text_to_image_R@1'] < got['text_to_image_R@10'] < 1
  with pytest.raises(ValueError, match='no caption'):
    zero_shot.retrieval_recall(img, txt[idx != 3], idx[idx != 3])


def test_encode_all_pads_last_chunk():
  seen = []
  def enc(x):
    seen.append(x.shape[0])
    return x[:, :3] * 2
  x = np.arange(50, dtype=np.float32).reshape(10, 5)
  np.testing.assert_array_equal(zero_shot.encode_all(enc, x, batch_size=4), x[:, :3] * 2)
  assert seen == [4, 4, 4]


def test_evaluate_combines_both(table):
  import types   # pylint: disable=g-import-not-at-top
  from eva_jax.data.tokenizer import tokenize   # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  classnames = ['cat', 'dog', 'rocket', 'cup of coffee', 'galaxy', 'retina']
  captions = [f'a photo of a {c}' for c in classnames] + [f'my {c}' for c in classnames]
  idx = np.arange(12) % 6
  enc_text = lambda t: np_encode_text(table, t)
  # Images: noisy copies of their caption embeddings, so both benchmarks land between 0 and 1.
  images = enc_text(tokenize(captions[:6])) + rng.normal(size=(6, D)).astype(np.float32) * 0.3
  labels = np.arange(6)
  got = zero_shot.evaluate(lambda x: x, enc_text, classifier_batches=[{'image': images,
                                                                       'label': labels}],
                           classnames=classnames, templates=('a photo of a {}', 'my {}'),
                           retrieval=types.SimpleNamespace(images=images,
                                                           tokens=tokenize(captions),
                                                           text_image_index=idx),
                           batch_size=4)
  weights = zero_shot.build_zero_shot_classifier(enc_text, classnames, ('a photo of a {}', 'my {}'))
  want = zero_shot.zero_shot_accuracy(lambda x: x, weights, [{'image': images, 'label': labels}])
  assert got['zero_shot/top1'] == want['top1'] and got['zero_shot/top5'] == want['top5']
  rec = zero_shot.retrieval_recall(images, enc_text(tokenize(captions)), idx)
  for k, v in rec.items():
    assert got[f'retrieval/{k}'] == pytest.approx(v, abs=1e-9)
  assert got['zero_shot/count'] == 6 and got['zero_shot/unreadable'] == 0
  assert (got['retrieval/images'], got['retrieval/captions'], got['retrieval/bad_pairs']) == (6, 12, 0)
  assert len(got) == 8 + 5
