"""Tiny CLIP BPE vocabularies for tests: learnt here from a few sentences, written in HF's layout."""
from __future__ import annotations

import collections
import json
import pathlib

from jmm.data import clip_bpe


def learn_merges(corpus, count):
  """Plain BPE training (most frequent adjacent pair first) over byte symbols with '</w>' word ends."""
  table = clip_bpe.byte_symbols()
  words = collections.Counter(w for text in corpus for w in clip_bpe.pre_tokenize(clip_bpe.clean(text)))
  split = {w: [table[b] for b in w.encode()] for w in words}
  for parts in split.values():
    parts[-1] += clip_bpe.EOW
  merges = []
  for _ in range(count):
    pairs = collections.Counter()
    for w, parts in split.items():
      for pair in zip(parts, parts[1:]):
        pairs[pair] += words[w]
    if not pairs:
      break
    best = max(sorted(pairs), key=lambda p: pairs[p])
    merges.append(best)
    for w, parts in split.items():
      out, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          out.append(parts[i] + parts[i + 1])
          i += 2
        else:
          out.append(parts[i])
          i += 1
      split[w] = out
  return merges


def write_clip_bpe(root, corpus, count: int = 40):
  """vocab.json + merges.txt (HF's CLIPTokenizer layout) in `root`, ids in OpenAI's order: 256 byte symbols, the
  same with '</w>', the merges, <|startoftext|>, <|endoftext|> -> (merges, tokens)."""
  root = pathlib.Path(root)
  merges = learn_merges(corpus, count)
  symbols = list(clip_bpe.byte_symbols().values())
  tokens = symbols + [s + clip_bpe.EOW for s in symbols] + [a + b for a, b in merges] + [clip_bpe.SOT, clip_bpe.EOT]
  (root / 'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
  lines = ['#version: 0.2'] + [f'{a} {b}' for a, b in merges]
  (root / 'merges.txt').write_text('\n'.join(lines) + '\n')
  return merges, tokens
