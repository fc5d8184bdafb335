"""SentencePiece tokenizers: load a .model file, or train one on captions and cache it in the workdir.

SentencePiece is what SigLIP ships (its `.model` files load here unchanged). The ids are fixed by convention:
pad = 0 (so zero-padded batches are padding), eos = 1 (appended to every text: the text tower can pool the
last real token), unk = 2, and no bos.
"""
from __future__ import annotations

import io
import os
import re
import string
import tempfile
from typing import Callable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
MODEL_FILENAME = 'tokenizer.model'
_PUNCTUATION = str.maketrans('', '', string.punctuation)


def canonicalize(text: str) -> str:
  """SigLIP's text cleaning (big_vision's prompt_engineering.canonicalize_text, which HF's SiglipTokenizer
  and open_clip's SigLIP tokenizer also apply): lower-case, drop ASCII punctuation, collapse whitespace."""
  return re.sub(r'\s+', ' ', text.lower().translate(_PUNCTUATION)).strip()


class Tokenizer:
  """A SentencePiece model with batched, fixed-length encoding: texts -> int32 [n, max_len]."""

  def __init__(self, model_path: str, pad_id: int = PAD_ID, canonicalize: bool = False):
    """pad_id: the id rows are padded with. 0 is jmm's convention; released SigLIP models were trained with
    texts padded with eos (1: big_vision's pad_value=1, HF SiglipTokenizer's pad_token '</s>'), and their
    'last'-token pooling reads the padding, so use pad_id=1 with them. canonicalize: clean every text with
    `canonicalize` first, as released SigLIP models expect."""
    model_path = os.fspath(model_path)
    self._canonicalize = bool(canonicalize)
    if pad_id not in (PAD_ID, EOS_ID):
      raise ValueError(f'pad_id={pad_id}: expected {PAD_ID} (pad) or {EOS_ID} (eos, as released SigLIP)')
    self._pad_id = int(pad_id)
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f'SentencePiece model not found: {model_path!r}')
    self.model_path = model_path
    with open(model_path, 'rb') as f:
      self._load(f.read())

  def _load(self, proto: bytes) -> None:
    self._proto = proto
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    if self._sp.pad_id() != PAD_ID or self._sp.eos_id() != EOS_ID:
      raise ValueError(f'{self.model_path!r} has pad_id={self._sp.pad_id()}, eos_id={self._sp.eos_id()}; '
                       f'jmm needs pad_id={PAD_ID} and eos_id={EOS_ID}')

  # Pickled by value (the model bytes), so Grain worker processes need no access to the file.
  def __getstate__(self):
    return {'model_path': self.model_path, 'proto': self._proto, 'pad_id': self._pad_id,
            'canonicalize': self._canonicalize}

  def __setstate__(self, state):
    self.model_path = state['model_path']
    self._pad_id = state.get('pad_id', PAD_ID)
    self._canonicalize = state.get('canonicalize', False)
    self._load(state['proto'])

  def __repr__(self) -> str:
    return f'Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})'

  @property
  def vocab_size(self) -> int:
    """Number of ids (pieces, specials included): the text embedding's size."""
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    """Padding id (0 unless constructed with pad_id=1)."""
    return self._pad_id

  @property
  def eos_id(self) -> int:
    """End-of-sequence id (always 1), appended to every encoded text."""
    return EOS_ID

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Texts -> int32 [n, max_len]: pieces then eos, truncated to max_len and right-padded with pad_id.

    One SentencePiece call for the whole list (it loops in C++), then a single padded array.
    """
    if isinstance(texts, str):
      raise TypeError('encode takes a sequence of texts; wrap a single text in a list')
    if max_len <= 0:
      raise ValueError(f'max_len must be positive, got {max_len}')
    texts = [canonicalize(t) for t in texts] if self._canonicalize else list(texts)
    pieces = self._sp.encode(texts, out_type=int, add_eos=True)
    out = np.full((len(pieces), max_len), self._pad_id, np.int32)  # [n, max_len]
    for row, ids in zip(out, pieces):
      ids = ids[:max_len]
      row[:len(ids)] = ids
    return out

  def decode(self, ids) -> list[str]:
    """int ids [n, L] (or one sequence [L]) -> texts; each row is read up to its first eos, pads dropped."""
    array = np.asarray(ids)
    if array.ndim == 1:
      array = array[None]
    if array.ndim != 2:
      raise ValueError(f'decode takes ids of shape [n, L] or [L], got shape {array.shape}')
    rows = []
    for row in array.tolist():
      if EOS_ID in row:
        row = row[:row.index(EOS_ID)]
      rows.append([i for i in row if i != PAD_ID])
    return self._sp.decode(rows)


def train_tokenizer(sentences: Sequence[str], model_path: str, vocab_size: int,
                    model_type: str = 'bpe') -> Tokenizer:
  """Trains a SentencePiece model on `sentences` and writes it atomically to `model_path`.

  The model is trained in memory, written to a temporary file beside the target and moved into place with
  os.replace, so a reader (or another process training the same file) never sees a half-written model. One
  thread, a fixed seed and no path inside the proto make the bytes deterministic. `vocab_size` is an upper
  bound (hard_vocab_limit=False): a tiny caption language may have fewer pieces than asked for. BPE is the
  default because unigram's seed-piece extraction finds almost no multi-character pieces in a language of
  a few dozen distinct words (it falls back to ~45 mostly single-character pieces).
  """
  sentences = list(sentences)
  if not sentences:
    raise ValueError('train_tokenizer needs at least one sentence')
  if model_type not in ('unigram', 'bpe'):
    raise ValueError(f'model_type={model_type!r}: expected "unigram" or "bpe"')
  model_path = os.fspath(model_path)
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  proto = io.BytesIO()
  spm.set_random_generator_seed(0)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=proto, vocab_size=int(vocab_size), model_type=model_type,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0,
      num_threads=1, input_sentence_size=0, minloglevel=2)
  fd, tmp = tempfile.mkstemp(prefix='.tokenizer-', suffix='.tmp', dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(proto.getvalue())
    os.replace(tmp, model_path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return Tokenizer(model_path)


def get_tokenizer(path: str | None, workdir: str, sentences_fn: Callable[[], list[str]],
                  vocab_size: int, pad_id: int = PAD_ID, canonicalize: bool = False) -> Tokenizer:
  """The tokenizer at `path`, else workdir/tokenizer.model, trained there from `sentences_fn()` if absent.

  `path` is a SentencePiece `.model` (SigLIP), or CLIP's BPE files: a directory with vocab.json + merges.txt,
  either file's path, or open_clip's bpe_simple_vocab_16e6.txt.gz (`jmm.data.clip_bpe`). pad_id: see
  `Tokenizer` (1 for released SigLIP weights; SentencePiece only); canonicalize: see `Tokenizer` (SentencePiece
  only: CLIP's BPE does its own cleaning).

  Caching it in the workdir keeps the vocabulary fixed across restarts of a run (a retrained model could
  differ from the one the checkpoint's embeddings were learnt with); `sentences_fn` is only called to train.
  """
  if path:
    if os.path.isdir(path) or path.endswith(('.json', '.txt', '.txt.gz')):  # CLIP's BPE files (vocab + merges).
      from jmm.data import clip_bpe  # pylint: disable=g-import-not-at-top
      return clip_bpe.ClipTokenizer(path)
    return Tokenizer(path, pad_id, canonicalize)  # FileNotFoundError naming the path if it is missing.
  cached = os.path.join(workdir, MODEL_FILENAME)
  if os.path.isfile(cached):
    return Tokenizer(cached)
  return train_tokenizer(sentences_fn(), cached, vocab_size)
