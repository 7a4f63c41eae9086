"""eva_jax.data.tokenizer equals open_clip.tokenize token for token on 1,000+ captions."""
import itertools

import numpy as np
import pytest

from eva_jax.data import tokenizer

TEMPLATES = ('a photo of a {}.', 'A BAD PHOTO OF THE {}!', '{}', 'my {} &amp; your {}',
             'the {}\'s tail, isn\'t it? we\'ll see; they\'re here, I\'m sure, you\'d agree',
             '  \t{}\n\n  in   the\u00a0park  ',
             'caf&eacute; {} &#233; &#x27;quoted&#x27; &lt;b&gt;',
             '{} \U0001F600\U0001F44D\U0001F3FD\u2764\ufe0f', '<start_of_text>{}<end_of_text>',
             '{} 2024-11-30 12:34 #tags @user http://example.com/a_b?c=1')
WORDS = ('cat', 'Caf\u00e9', 'na\u00efve r\u00e9sum\u00e9', 'e\u0301clair',    # NFC and NFD accents
         '\u65e5\u672c\u8a9e\u306e\u30ad\u30e3\u30d7\u30b7\u30e7\u30f3', '\u0412\u0430\u0441\u044f',
         '\u03b1\u03b2\u03b3 \u03a9', '\u0645\u0631\u062d\u0628\u0627', '\u0130stanbul \u00df',
         'zero\u200bwidth', '\u00c3\u00a9t\u00c3\u00a9 mojibake', 'ﬁne ligature', 'Ｆｕｌｌｗｉｄｔｈ',
         '&amp;amp; double', '\U0001F680 rocket', 'x' * 40, 'dog-walker', 'ROCKET Launch',
         "o'clock", 'ice\u2014cream \u201cquote\u201d', '<|endoftext|>', '\u00bd 3\u00b2 \u2163',
         'tab\tnew\nline', '\ud83d\ude00'.encode('utf-16', 'surrogatepass').decode('utf-16'))
SUFFIXES = ('', ' &quot;HDR&quot; 4K (close-up)', '\u3002\u00a1Ol\u00e9!',
            ' ' + ' '.join(f'word{i}' for i in range(90)), ' \u00e9' * 60)   # last two: over-long


def captions():
  out = [t.format(*[w] * t.count('{}')) + s
         for t, w, s in itertools.product(TEMPLATES, WORDS, SUFFIXES)]
  return out + ['', ' ', '\n\t ', '&nbsp;', '\u200b', '.', '\U0001F600' * 100]


@pytest.fixture(scope='module')
def reference():
  import open_clip   # pylint: disable=g-import-not-at-top
  texts = captions()
  return texts, open_clip.tokenize(texts).numpy()


def test_matches_open_clip_on_1000_captions(reference):
  texts, want = reference
  assert len(texts) >= 1000
  got = tokenizer.tokenize(texts)
  assert got.dtype == np.int32 and got.shape == (len(texts), 77)
  bad = np.flatnonzero((got != want).any(axis=1))
  assert not bad.size, f'{bad.size} rows differ, first {texts[bad[0]]!r}'
  # The set really exercises truncation (EOT kept last) and near-empty rows (SOT EOT only).
  full = got[:, -1] != 0
  assert full.sum() > 100 and (got[full, -1] == tokenizer.EOT_ID).all()
  assert ((got[:, 2] == 0) & (got[:, 1] == tokenizer.EOT_ID)).sum() >= 4


def test_context_length_and_single_string(reference):
  import open_clip   # pylint: disable=g-import-not-at-top
  texts = reference[0][::50]
  np.testing.assert_array_equal(tokenizer.tokenize(texts, context_length=16),
                                open_clip.tokenize(texts, context_length=16).numpy())
  np.testing.assert_array_equal(tokenizer.tokenize(texts[3]), tokenizer.tokenize([texts[3]]))


def test_vocab_matches_open_clip():
  from open_clip.tokenizer import SimpleTokenizer   # pylint: disable=g-import-not-at-top
  vocab, merges = tokenizer.vocab_and_merges()
  ref = SimpleTokenizer()
  assert vocab == ref.encoder and len(vocab) == tokenizer.VOCAB_SIZE
  assert dict(zip(merges, range(len(merges)))) == ref.bpe_ranks


def test_bad_input():
  with pytest.raises(TypeError, match='Decode bytes'):
    tokenizer.tokenize([b'bytes caption'])
  with pytest.raises(ValueError, match='context_length=1'):
    tokenizer.tokenize('a', context_length=1)
