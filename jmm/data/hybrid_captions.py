"""Hybrid captions (Lai et al. 2024, arXiv 2410.02740): an example with several captions, one drawn per example.

Web image-text data carries the page's AltText; recaptioning adds synthetic short or dense captions of the same
image. The paper trains on a per-example draw among them with set ratios (e.g. half AltText, half synthetic).
`config.data.captions` names the caption fields and their ratios:

    'alt_text=0.5,caption=0.5'        (the string form, for the command line)
    dict(alt_text=0.5, caption=0.5)   (a mapping, from Python)
    'alt_text'                        (one field: ratio 1)
    ''                                (unset: the source's own single caption, as before)

For the synthetic data the fields are its caption styles (jmm.data.synthetic.CAPTION_STYLES); for file sources
they are record fields: WebDataset members ('txt', or a key of the JSON member: 'json/alt'), ArrayRecord map
keys and TFDS features ('/' into nested ones). Per example the caption is drawn among the named fields it has
(non-empty text), their ratios renormalised over those; one with none of them is a bad record. A field of ratio
0 is never drawn (the synthetic data still adds it to the example).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

from jmm.data.transforms import BadRecord


def parse(value) -> dict[str, float]:
  """config.data.captions -> {field: ratio} in the given order, {} when unset; ValueError saying what is wrong."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return {}
  if isinstance(value, str):
    pairs = []
    for item in (s.strip() for s in value.split(',')):
      if not item:
        continue
      name, sep, ratio = item.rpartition('=')
      pairs.append((name.strip(), ratio.strip()) if sep else (item, '1'))
  elif isinstance(value, Mapping) or hasattr(value, 'items'):
    pairs = list(value.items())
  else:
    raise ValueError(f"expected 'field=ratio,...' or a mapping of field -> ratio, got a {type(value).__name__}")
  out: dict[str, float] = {}
  for name, ratio in pairs:
    if not isinstance(name, str) or not name.strip('/ '):
      raise ValueError(f'a caption field name must be a non-empty string, got {name!r}')
    try:
      number = float(ratio) if not isinstance(ratio, bool) else math.nan
    except (TypeError, ValueError):
      number = math.nan
    if not (math.isfinite(number) and number >= 0):
      raise ValueError(f'the ratio of {name!r} must be a finite number >= 0, got {ratio!r}')
    if name in out:
      raise ValueError(f'field {name!r} is named twice')
    out[name] = number
  if not out:
    raise ValueError('names no caption field')
  if not sum(out.values()) > 0:
    raise ValueError(f'all ratios are 0 ({out}): at least one field needs a positive ratio')
  return out


def drawn_fields(value) -> dict[str, float]:
  """parse(value) less the fields of ratio 0 (never drawn): the fields a file source reads."""
  return {field: ratio for field, ratio in parse(value).items() if ratio > 0}


def as_text(value) -> str:
  """A field's value as caption text: a string, bytes, or the first non-empty text of a list / array; else ''."""
  if isinstance(value, np.ndarray):
    value = value.item() if value.ndim == 0 else value.reshape(-1).tolist()
  if isinstance(value, (list, tuple)):
    value = next((t for t in (as_text(v) for v in value) if t), '')
  if isinstance(value, (bytes, bytearray)):
    value = bytes(value).decode('utf-8', 'replace')
  return value.strip() if isinstance(value, str) else ''


def choices(ratios: Mapping[str, float], read: Callable[[str], object], where: str) -> list[tuple[str, float]]:
  """[(text, ratio)] of the fields of positive ratio that `read(field)` finds as non-empty text.

  `read` returns the field's raw value or raises BadRecord / KeyError when the example lacks it (a missing
  field is just not a choice). BadRecord naming the fields when the example has none of them.
  """
  out = []
  for field, ratio in ratios.items():
    if ratio <= 0:
      continue
    try:
      text = as_text(read(field))
    except (BadRecord, KeyError):
      continue
    if text:
      out.append((text, float(ratio)))
  if not out:
    raise BadRecord(f'{where}: none of the caption fields {[f for f, r in ratios.items() if r > 0]} '
                    '(config.data.captions) holds text')
  return out


def draw(options: Sequence[tuple[str, float]], rng: np.random.Generator) -> str:
  """One text of [(text, ratio)], drawn with probability ratio / sum(ratios) (a single option: no draw)."""
  if len(options) == 1:
    return options[0][0]
  total = sum(r for _, r in options)
  u = rng.random() * total
  for text, ratio in options:
    u -= ratio
    if u < 0:
      return text
  return options[-1][0]  # u == total after rounding.


def stream(*key: int) -> np.random.Generator:
  """The caption draw's own generator for an example keyed by `key` (e.g. seed, source, position): `key` plus a
  trailing 1, so it never replays the stream of `key` itself (SeedSequence reads a missing entry as 0)."""
  return np.random.default_rng([*(int(k) % 2**32 for k in key), 1])
