"""CLIP byte-level BPE (jmm.data.clip_bpe) against HF's CLIPTokenizer on a tiny vocabulary made here."""
from __future__ import annotations

import gzip
import json
import pickle
import sys

import numpy as np
import pytest

from jmm.data import clip_bpe
from jmm.data import tokenizer as tokenizer_lib

import tiny_vocab

CORPUS = ('a photo of a red cat', 'the dog\'s ball is blue', 'two small green triangles in the top left',
          'photos of cats and dogs', 'a blue square, a red circle!', 'it\'s the 3rd photo')
TEXTS = ['A photo of a RED cat.', "the dog's ball   isn't blue", 'photos of 12 cats & dogs!!', 'café über 中文 🙂',
         "we'll see'd they've", 'triangles\tin\nthe  top left', '', 'x' * 40, 'a,b;c:d']


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """vocab.json + merges.txt (HF layout) and the same merges as an open_clip .txt.gz, in OpenAI's id order."""
  root = tmp_path_factory.mktemp('bpe')
  merges, tokens = tiny_vocab.write_clip_bpe(root, CORPUS, 40)
  lines = ['#version: 0.2'] + [f'{a} {b}' for a, b in merges]
  with gzip.open(root / 'bpe_simple_vocab_16e6.txt.gz', 'wt', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  return root, merges, len(tokens)


def _transformers():
  """transformers, importable beside a broken torchvision (see tests/test_convert.py), or skip."""
  pytest.importorskip('torch')
  if 'torchvision' not in sys.modules:
    try:
      import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except Exception:  # pylint: disable=broad-except
      for name in [n for n in sys.modules if n.startswith('torchvision')]:
        del sys.modules[name]
      sys.modules['torchvision'] = None
  return pytest.importorskip('transformers')


def _hf_tokenizer(root):
  transformers = _transformers()
  vocab = json.loads((root / 'vocab.json').read_text())
  merges = [tuple(line.split()) for line in (root / 'merges.txt').read_text().split('\n')[1:] if line]
  return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def test_matches_hf_clip_tokenizer(files):
  root, merges, size = files
  assert len(merges) == 40
  tok = clip_bpe.ClipTokenizer(str(root / 'vocab.json'))
  assert tok.vocab_size == size and tok.eos_id == size - 1 and tok.pad_id == 0
  hf = _hf_tokenizer(root)
  for text in TEXTS:
    assert tok.tokenize(text) == hf(text, add_special_tokens=False)['input_ids'], text
  # Fixed-length batches: <|startoftext|> ... <|endoftext|>, truncation keeps the end token; HF pads with
  # <|endoftext|> where jmm pads with 0, so rows are compared up to their first end token.
  max_len = 10
  ours = tok.encode(TEXTS, max_len)
  theirs = hf(TEXTS, padding='max_length', truncation=True, max_length=max_len)['input_ids']
  assert ours.shape == (len(TEXTS), max_len) and ours.dtype == np.int32
  for row, want in zip(ours.tolist(), theirs):
    end = want.index(tok.eos_id) + 1
    assert row[:end] == want[:end]
    assert all(i == 0 for i in row[end:])


def test_gz_merges_file_pickling_decode_and_get_tokenizer(files):
  root, _, _ = files
  from_json = clip_bpe.ClipTokenizer(str(root))
  from_gz = clip_bpe.ClipTokenizer(str(root / 'bpe_simple_vocab_16e6.txt.gz'))
  ids = from_json.encode(TEXTS, 24)
  np.testing.assert_array_equal(from_gz.encode(TEXTS, 24), ids)
  copy = pickle.loads(pickle.dumps(from_gz))
  np.testing.assert_array_equal(copy.encode(TEXTS, 24), ids)
  assert from_json.decode(from_json.encode(['A Photo  of 12 cats!'], 24)) == ['a photo of 1 2 cats !']
  picked = tokenizer_lib.get_tokenizer(str(root / 'merges.txt'), str(root), lambda: [], 0)
  assert isinstance(picked, clip_bpe.ClipTokenizer)
  with pytest.raises(FileNotFoundError, match='vocab.json'):
    clip_bpe.ClipTokenizer(str(root / 'missing' / 'vocab.json'))


def test_sentencepiece_matches_hf_siglip_tokenizer(tmp_path):
  """A SentencePiece model in SigLIP's layout (pad 0, eos 1, unk 2) loads in jmm and in HF's SiglipTokenizer,
  and with pad_id=1 (released SigLIP pads with eos) the fixed-length ids are the same."""
  sentences = [c.lower().replace("'", '').replace(',', '').replace('!', '') for c in CORPUS] * 20
  tok = tokenizer_lib.train_tokenizer(sentences, str(tmp_path / 'spiece.model'), 60)
  padded = tokenizer_lib.Tokenizer(tok.model_path, pad_id=1)
  assert (tok.pad_id, tok.eos_id, padded.pad_id) == (0, 1, 1)
  hf_tok = _transformers().SiglipTokenizer(vocab_file=tok.model_path)
  # (Texts that fit: HF keeps eos on truncated rows, as big_vision's eos='sticky'; jmm's encode drops it.)
  texts = ['a photo of a red cat', 'two small green triangles in the top left', 'the dogs ball is blue']
  want = hf_tok(texts, padding='max_length', truncation=True, max_length=32)['input_ids']
  np.testing.assert_array_equal(padded.encode(texts, 32), np.array(want, np.int32))
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(padded)).encode(texts, 32), padded.encode(texts, 32))
  with pytest.raises(ValueError, match='pad_id=5'):
    tokenizer_lib.Tokenizer(tok.model_path, pad_id=5)

