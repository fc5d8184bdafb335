"""Tests for the SentencePiece tokenizer wrapper (jmm.data.tokenizer)."""
import os
import pickle

import numpy as np
import pytest

from jmm.data import synthetic
from jmm.data import tokenizer as T


@pytest.fixture(scope='module')
def captions():
  return synthetic.SyntheticCaptions('train', max_objects=2).captions(2000)


@pytest.fixture(scope='module')
def tok(tmp_path_factory, captions):
  return T.train_tokenizer(captions, str(tmp_path_factory.mktemp('tok') / 'sp.model'), vocab_size=128)


def test_ids_and_vocab(tok):
  assert tok.pad_id == 0 and tok.eos_id == 1
  assert 40 < tok.vocab_size <= 128


def test_encode_shape_eos_padding_and_round_trip(tok, captions):
  texts = captions[:20] + synthetic.SyntheticCaptions('test').captions(20)  # Unseen pairs in the text too.
  ids = tok.encode(texts, 48)
  assert ids.shape == (40, 48) and ids.dtype == np.int32
  for row in ids:
    n = int((row != 0).sum())
    assert row[n - 1] == tok.eos_id and not row[n:].any() and (row[:n - 1] > 2).all()  # No unk, no early eos.
  assert tok.decode(ids) == texts
  assert tok.decode(ids[0]) == texts[:1]


def test_truncation(tok):
  ids = tok.encode(['a small red triangle in the top left'], 3)
  assert ids.shape == (1, 3) and (ids != 0).all() and tok.eos_id not in ids
  with pytest.raises(TypeError):
    tok.encode('a string, not a list', 8)


def test_missing_model_names_the_path(tmp_path):
  missing = str(tmp_path / 'nope.model')
  with pytest.raises(FileNotFoundError, match='nope.model'):
    T.Tokenizer(missing)
  with pytest.raises(FileNotFoundError, match='nope.model'):
    T.get_tokenizer(missing, str(tmp_path), lambda: ['unused'], 64)


def test_training_is_deterministic_and_atomic(tmp_path, captions):
  a = T.train_tokenizer(captions[:500], str(tmp_path / 'a.model'), 64)
  b = T.train_tokenizer(captions[:500], str(tmp_path / 'b.model'), 64)
  with open(a.model_path, 'rb') as fa, open(b.model_path, 'rb') as fb:
    assert fa.read() == fb.read()
  assert sorted(os.listdir(tmp_path)) == ['a.model', 'b.model']  # No temporary files left behind.


def test_get_tokenizer_trains_once_then_reuses(tmp_path, captions):
  calls = []

  def sentences():
    calls.append(1)
    return captions[:500]

  first = T.get_tokenizer(None, str(tmp_path), sentences, 64)
  assert os.path.isfile(tmp_path / T.MODEL_FILENAME) and len(calls) == 1
  second = T.get_tokenizer('', str(tmp_path), sentences, 64)  # Cached: sentences_fn is not called again.
  assert len(calls) == 1
  texts = captions[:5]
  assert np.array_equal(first.encode(texts, 16), second.encode(texts, 16))
  by_path = T.get_tokenizer(first.model_path, str(tmp_path / 'elsewhere'), sentences, 64)
  assert by_path.vocab_size == first.vocab_size and len(calls) == 1


def test_pickles_by_value(tok, captions):
  clone = pickle.loads(pickle.dumps(tok))
  assert np.array_equal(clone.encode(captions[:8], 20), tok.encode(captions[:8], 20))
