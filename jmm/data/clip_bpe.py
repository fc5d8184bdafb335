"""CLIP's byte-level BPE tokenizer (Radford et al. 2021; GPT-2's byte-level BPE, Radford et al. 2019).

Loaded from HF's `vocab.json` + `merges.txt` (a directory holding both, or the path of either) or from
open_clip's / OpenAI's `bpe_simple_vocab_16e6.txt.gz` (merges only; the vocabulary is rebuilt from them as
OpenAI's tokenizer does: 256 byte symbols, the same with the end-of-word mark '</w>', the first 48,894
merges, then <|startoftext|> and <|endoftext|>: 49,408 ids).

Steps, as HF's CLIPTokenizer: NFC-normalise, collapse whitespace, lower-case; split into pre-tokens (the
special tokens, the contractions 's 't 're 've 'm 'll 'd, runs of letters, single digits, runs of other
non-space characters); map each pre-token's UTF-8 bytes to printable symbols (GPT-2's byte-to-unicode
table); mark the last symbol with '</w>'; merge adjacent pairs lowest merge rank first until none applies.
(open_clip also runs ftfy's text repair and HTML unescaping first; jmm does not, to need no extra package.)

Same interface as `jmm.data.tokenizer.Tokenizer`: `encode(texts, max_len) -> int32 [n, max_len]` with
<|startoftext|> ... <|endoftext|> (truncated texts keep <|endoftext|> last, as open_clip), padded with 0 as
open_clip (HF pads with <|endoftext|>; CLIP's pooling at the first / largest end-of-text id reads either).
"""
from __future__ import annotations

import gzip
import json
import os
import unicodedata
from typing import Sequence

import numpy as np

SOT, EOT = '<|startoftext|>', '<|endoftext|>'
EOW = '</w>'
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_OPENAI_MERGES = 49152 - 256 - 2  # Merges OpenAI's tokenizer uses from bpe_simple_vocab_16e6.txt.gz.


def byte_symbols() -> dict[int, str]:
  """GPT-2's reversible byte -> printable unicode character table.

  Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 bytes are mapped,
  in byte order, to the characters from U+0100 on, so no symbol is whitespace or a control character.
  """
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _is_letter(c: str) -> bool:
  return unicodedata.category(c).startswith('L')


def _is_number(c: str) -> bool:
  return unicodedata.category(c).startswith('N')


def pre_tokenize(text: str) -> list[str]:
  """Splits cleaned text like CLIP's regex
  `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`
  (alternatives tried in that order at each position; whitespace between matches dropped)."""
  out, i, n = [], 0, len(text)
  while i < n:
    c = text[i]
    match = next((s for s in (SOT, EOT, *_CONTRACTIONS) if text.startswith(s, i)), None)
    if match:
      j = i + len(match)
    elif _is_letter(c):
      j = i + 1
      while j < n and _is_letter(text[j]):
        j += 1
    elif _is_number(c):
      j = i + 1
    elif c.isspace():
      i += 1
      continue
    else:
      j = i + 1
      while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
        j += 1
    out.append(text[i:j])
    i = j
  return out


def clean(text: str) -> str:
  """NFC, whitespace runs -> one space, stripped, lower-cased (HF CLIPTokenizer's normaliser)."""
  return ' '.join(unicodedata.normalize('NFC', text).split()).lower()


def _read_merges(lines: Sequence[str], limit: int | None = None) -> list[tuple[str, str]]:
  merges = []
  for line in lines:
    if line.startswith('#version') or not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f'merges line {line!r} is not two symbols')
    merges.append((parts[0], parts[1]))
    if limit is not None and len(merges) == limit:
      break
  return merges


class ClipTokenizer:
  """CLIP BPE with batched fixed-length encoding: texts -> int32 [n, max_len]."""

  def __init__(self, path: str):
    path = os.fspath(path)
    self.model_path = path
    if path.endswith('.gz'):
      if not os.path.isfile(path):
        raise FileNotFoundError(f'CLIP BPE merges file not found: {path!r}')
      with gzip.open(path, 'rt', encoding='utf-8') as f:
        merges = _read_merges(f.read().split('\n'), _OPENAI_MERGES)
      symbols = list(byte_symbols().values())
      tokens = symbols + [s + EOW for s in symbols] + [a + b for a, b in merges] + [SOT, EOT]
      vocab = {t: i for i, t in enumerate(tokens)}
    else:
      directory = path if os.path.isdir(path) else os.path.dirname(path)
      vocab_path, merges_path = os.path.join(directory, 'vocab.json'), os.path.join(directory, 'merges.txt')
      for needed in (vocab_path, merges_path):
        if not os.path.isfile(needed):
          raise FileNotFoundError(f'CLIP BPE tokenizer {path!r}: {needed} not found (need vocab.json and '
                                  f'merges.txt side by side, or a bpe_simple_vocab_16e6.txt.gz)')
      with open(vocab_path, encoding='utf-8') as f:
        vocab = json.load(f)
      with open(merges_path, encoding='utf-8') as f:
        merges = _read_merges(f.read().split('\n'))
    for special in (SOT, EOT):
      if special not in vocab:
        raise ValueError(f'CLIP BPE tokenizer {path!r}: the vocabulary has no {special}')
    self._setup(vocab, merges)

  def _setup(self, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    self._vocab = dict(vocab)
    self._merges = list(merges)
    self._ranks = {pair: i for i, pair in enumerate(self._merges)}
    self._decoder = {i: t for t, i in self._vocab.items()}
    self._bytes = byte_symbols()
    self._unbytes = {s: b for b, s in self._bytes.items()}
    self._cache: dict[str, list[int]] = {}
    self.sot_id, self._eot = self._vocab[SOT], self._vocab[EOT]

  # Pickled as vocabulary and merges (Grain workers get a copy; the per-word cache is rebuilt).
  def __getstate__(self):
    return {'model_path': self.model_path, 'vocab': self._vocab, 'merges': self._merges}

  def __setstate__(self, state):
    self.model_path = state['model_path']
    self._setup(state['vocab'], [tuple(m) for m in state['merges']])

  def __repr__(self) -> str:
    return f'ClipTokenizer({self.model_path!r}, vocab_size={self.vocab_size})'

  @property
  def vocab_size(self) -> int:
    """Number of ids (the text embedding's size)."""
    return max(self._vocab.values()) + 1

  @property
  def pad_id(self) -> int:
    """Padding id: 0, as open_clip (in CLIP's vocabulary also the id of '!'; pooling never reads padding)."""
    return 0

  @property
  def eos_id(self) -> int:
    """<|endoftext|>, ending every encoded text (the text tower's 'eos' / 'argmax' pooling position)."""
    return self._eot

  def _bpe(self, word: str) -> list[int]:
    """One pre-token -> ids: byte symbols, '</w>' on the last, merges by rank."""
    if word in (SOT, EOT):
      return [self._vocab[word]]
    if word in self._cache:
      return self._cache[word]
    parts = [self._bytes[b] for b in word.encode('utf-8')]
    parts[-1] += EOW
    while len(parts) > 1:
      pairs = {(a, b) for a, b in zip(parts, parts[1:])}
      best = min(pairs, key=lambda p: self._ranks.get(p, len(self._ranks)))
      if best not in self._ranks:
        break
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    ids = [self._vocab.get(p, self._eot) for p in parts]  # Unknown symbol -> <|endoftext|>, HF's unk_token.
    self._cache[word] = ids
    return ids

  def tokenize(self, text: str) -> list[int]:
    """One text -> ids, without <|startoftext|> / <|endoftext|>."""
    return [i for word in pre_tokenize(clean(text)) for i in self._bpe(word)]

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Texts -> int32 [n, max_len]: sot, tokens, eot (kept last when truncated), then pad_id."""
    if isinstance(texts, str):
      raise TypeError('encode takes a sequence of texts; wrap a single text in a list')
    if max_len < 2:
      raise ValueError(f'max_len must be at least 2 (start and end tokens), got {max_len}')
    out = np.full((len(texts), max_len), self.pad_id, np.int32)  # [n, max_len]
    for row, text in zip(out, texts):
      ids = [self.sot_id, *self.tokenize(text)][:max_len - 1] + [self._eot]
      row[:len(ids)] = ids
    return out

  def decode(self, ids) -> list[str]:
    """int ids [n, L] (or [L]) -> texts; each row is read up to its first <|endoftext|>, <|startoftext|> dropped."""
    array = np.asarray(ids)
    if array.ndim == 1:
      array = array[None]
    if array.ndim != 2:
      raise ValueError(f'decode takes ids of shape [n, L] or [L], got shape {array.shape}')
    texts = []
    for row in array.tolist():
      if self._eot in row:
        row = row[:row.index(self._eot)]
      symbols = ''.join(self._decoder.get(i, '') for i in row if i != self.sot_id)
      words = symbols.split(EOW)  # '</w>' ends each word: the spaces cleaning collapsed.
      raw = b' '.join(bytes(self._unbytes[c] for c in w if c in self._unbytes) for w in words)
      texts.append(raw.decode('utf-8', errors='replace').strip())
    return texts
