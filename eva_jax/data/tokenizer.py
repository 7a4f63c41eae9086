"""CLIP's BPE tokenizer through `transformers.CLIPTokenizer` (Rust `tokenizers`), built offline.

The vocabulary is CLIP's: `bpe_simple_vocab_16e6.txt.gz` as shipped inside the open_clip wheel
(the torch extra), turned into the vocab and merges `transformers` takes exactly as CLIP's
`simple_tokenizer.py` (and open_clip's `tokenizer.py`) build them:

  vocab  = 256 byte-level symbols (GPT-2 `bytes_to_unicode` order) + the same with '</w>'
           + one symbol per merge, merges = file lines [1 : 49152 - 256 - 2 + 1]
           + '<start_of_text>' (49406), '<end_of_text>' (49407)       -> 49408 ids

`tokenize(texts)` equals `open_clip.tokenize(texts)` token for token (tests/data/test_tokenizer.py,
1,000+ captions): [SOT] + BPE(clean(text)) + [EOT], zero-padded to `context_length`; longer
sequences are cut to `context_length` with EOT as the last token.

Deviation from a plain `CLIPTokenizer` and why: its Rust normalizer (NFC, whitespace, lowercase)
does not run ftfy nor unescape HTML, so "caf&eacute;" or mojibake would tokenize differently from
what every CLIP checkpoint saw in training. `clean_text` therefore runs open_clip's cleaning
(ftfy.fix_text, html.unescape twice, whitespace collapse, lowercase) in Python and the library's
normalizer is switched off (re-normalizing the cleaned text could change it). Words are split by
open_clip's regex (a `tokenizers` Split, special tokens named as open_clip 3.x names them) before
the library tokenizes them, so literal special-token strings inside captions behave as in
open_clip (see `_splitter`). The BPE itself is the library's.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.metadata
import os
import threading
from typing import Sequence

import numpy as np

CONTEXT_LENGTH = 77      # all CLIP / EVA-CLIP text towers (EVA-SPEC "EVA-CLIP")
VOCAB_SIZE = 49408
SOT_TOKEN, EOT_TOKEN = '<start_of_text>', '<end_of_text>'   # open_clip 3.x names; ids 49406/7
SOT_ID, EOT_ID = 49406, 49407
_BPE_FILE = 'open_clip/bpe_simple_vocab_16e6.txt.gz'
_NUM_MERGES = 49152 - 256 - 2     # CLIP keeps the first 48,894 merges of the file
# open_clip's pre-tokenizer pattern (tokenizer.py SimpleTokenizer.pat, lower-cased text).
_SPLIT = (f'{SOT_TOKEN}|{EOT_TOKEN}|'
          r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def bpe_vocab_path() -> str:
  """Path of `bpe_simple_vocab_16e6.txt.gz` inside the installed open_clip wheel (not imported:
  importing open_clip loads torch). Raises FileNotFoundError naming the fix."""
  try:
    dist = importlib.metadata.distribution('open_clip_torch')
    path = str(dist.locate_file(_BPE_FILE))
  except importlib.metadata.PackageNotFoundError:
    path = ''
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(
        f'CLIP\'s BPE vocabulary {_BPE_FILE} was not found: it ships inside the open_clip wheel. '
        'Install it with `pip install "eva_jax[torch]"` (or `pip install open_clip_torch`).')
  return path


def vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """CLIP's vocab {symbol: id} (49,408 entries) and BPE merges (48,894 pairs, rank order) from the
  gzipped merges file, as CLIP's simple_tokenizer.py builds them."""
  # pylint: disable-next=g-import-not-at-top
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  with gzip.open(bpe_path or bpe_vocab_path()) as f:
    lines = f.read().decode('utf-8').split('\n')
  merges = [tuple(m.split()) for m in lines[1:_NUM_MERGES + 1]]
  symbols = list(bytes_to_unicode().values())
  symbols += [s + '</w>' for s in symbols]
  symbols += [''.join(m) for m in merges]
  symbols += [SOT_TOKEN, EOT_TOKEN]
  vocab = {s: i for i, s in enumerate(symbols)}
  if len(vocab) != VOCAB_SIZE:
    raise ValueError(f'{bpe_path or bpe_vocab_path()} gives {len(vocab)} distinct symbols, not '
                     f'CLIP\'s {VOCAB_SIZE}: the file is not CLIP\'s bpe_simple_vocab_16e6.')
  return vocab, merges


_BUILD_LOCK = threading.Lock()


def clip_tokenizer():
  """The `transformers.CLIPTokenizer` (Rust backend) over CLIP's vocabulary, built once per
  process in memory (~1 s; the vocab file is 1.3 MB, nothing is written). Thread-safe: grain's
  reader threads tokenize concurrently, and transformers' lazy imports are not."""
  with _BUILD_LOCK:
    return _build_tokenizer()


@functools.cache
def _build_tokenizer():
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import pre_tokenizers
  from transformers import CLIPTokenizer   # pylint: disable=g-import-not-at-top
  vocab, merges = vocab_and_merges()
  tok = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOT_TOKEN,
                      bos_token=SOT_TOKEN, eos_token=EOT_TOKEN, pad_token=EOT_TOKEN)
  backend = tok.backend_tokenizer
  backend.normalizer = None       # clean_text already did open_clip's normalization
  # The split into words happens before (`_split`), so the library sees words; its byte-level
  # step must not split them again with GPT-2's pattern.
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  if (tok.bos_token_id, tok.eos_token_id) != (SOT_ID, EOT_ID):
    raise ValueError(f'CLIP tokenizer built with SOT/EOT ids {tok.bos_token_id}/'
                     f'{tok.eos_token_id}, expected {SOT_ID}/{EOT_ID}.')
  return tok


@functools.cache
def _splitter():
  """open_clip's word split, run before the tokenizer: `tokenizers` would match the special-token
  strings anywhere in the text, open_clip only where its regex starts a word there ('"<end_of_text>'
  is '"<', 'end', ... for open_clip). Words that are exactly a special token still become it."""
  from tokenizers import Regex, pre_tokenizers   # pylint: disable=g-import-not-at-top
  return pre_tokenizers.Split(Regex(_SPLIT), behavior='removed', invert=True)


def clean_text(text: str) -> str:
  """open_clip's default cleaning ('lower'): ftfy.fix_text, html.unescape twice, strip, collapse
  whitespace, lowercase (open_clip tokenizer.py basic_clean + whitespace_clean)."""
  import ftfy   # pylint: disable=g-import-not-at-top
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return ' '.join(text.split()).strip().lower()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """Texts -> CLIP token ids, int32 [B, context_length] (B = 1 for a single string).

  Row = [SOT, BPE tokens of clean_text(text)..., EOT, 0...]; a row longer than context_length is
  truncated to context_length tokens with the last one replaced by EOT (open_clip tokenize).
  The EOT position is the argmax of the row (EOT has the largest id), which CLIP pooling uses.
  Raises ValueError for context_length < 2 and TypeError for a non-string text.
  """
  if isinstance(texts, str):
    texts = [texts]
  if context_length < 2:
    raise ValueError(f'context_length={context_length}: needs room for SOT and EOT (CLIP: 77).')
  for t in texts:
    if not isinstance(t, str):
      raise TypeError(f'tokenize takes strings; got {type(t).__name__} {t!r:.80}. Decode bytes '
                      'captions (UTF-8) first.')
  split = _splitter()
  words = [[w for w, _ in split.pre_tokenize_str(clean_text(t))] for t in texts]
  encodings = clip_tokenizer().backend_tokenizer.encode_batch(
      words, is_pretokenized=True, add_special_tokens=False)
  out = np.zeros((len(texts), context_length), np.int32)
  for row, enc in zip(out, encodings):
    ids = [SOT_ID, *enc.ids[:context_length - 2], EOT_ID]
    row[:len(ids)] = ids
  return out
