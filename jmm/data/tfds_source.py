"""A TFDS data set as a random-access image-caption source, through `tfds.data_source` (no TensorFlow at run time).

`tfds.data_source(name, split=..., data_dir=...)` reads a prepared data set's ArrayRecord files directly and
decodes its features with numpy, which is what Grain wants: random access, no tf.data graph. The data set must
be prepared already (`download=False`: training never downloads). Which features hold the image and caption
is configurable (`data.image_key`, `data.caption_key`), with '/' for nested features ('caption/text') and the
first element taken when a caption feature holds several (COCO-style lists). Hybrid captions (`captions`,
jmm.data.hybrid_captions): features to draw the caption from, returned as 'caption_choices' for the pipeline.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import numpy as np

from jmm.data import hybrid_captions
from jmm.data.transforms import BadRecord
from jmm.data.webdataset import good_captions


def _tfds_data_source(name: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only when used)
  return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)


def _lookup(example: Any, key: str):
  value = example
  for part in key.split('/'):
    if not isinstance(value, dict) or part not in value:
      have = sorted(value) if isinstance(value, dict) else type(value).__name__
      raise BadRecord(f'example has no feature {key!r} (at {part!r}; has {have})')
    value = value[part]
  return value


def _as_text(value) -> str:
  if isinstance(value, np.ndarray):
    if value.ndim == 0:
      value = value.item()
    elif value.size:
      value = value.reshape(-1)[0]
    else:
      value = ''
  elif isinstance(value, (list, tuple)):
    value = value[0] if value else ''
  if isinstance(value, bytes):
    value = value.decode('utf-8', 'replace')
  return str(value).strip() if value is not None else ''


class TfdsSource:
  """Random access to (image, caption) pairs of a prepared TFDS data set; `source[i]` -> dict or BadRecord.

  `data_source_fn(name, split, data_dir)` builds the underlying random-access source; tests pass a stand-in.
  With `captions` ({feature: ratio}; caption_key is then unused) the caption is instead 'caption_choices':
  [(text, ratio)] of the features of positive ratio the example has; an example with none of them is bad.
  """

  def __init__(self, name: str, split: str = 'train', *, data_dir: str | None = None, image_key: str = 'image',
               caption_key: str = 'caption', source_name: str | None = None,
               data_source_fn: Callable[[str, str, str | None], Any] | None = None,
               captions: dict[str, float] | str | None = None):
    self.name = source_name or name
    self.tfds_name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.caption_key = image_key, caption_key
    self.caption_ratios = hybrid_captions.drawn_fields(captions)
    try:
      self._source = (data_source_fn or _tfds_data_source)(name, split, data_dir)
    except Exception as e:  # TFDS raises many types for a missing or unprepared data set.
      raise ValueError(f'config.data.tfds_name={name!r} (split {split!r}, data_dir {data_dir!r}) cannot be '
                       f'opened: {type(e).__name__}: {e}') from e
    if len(self._source) == 0:
      raise ValueError(f'config.data.tfds_name={name!r} split {split!r} has no examples')

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return f'TfdsSource({self.tfds_name!r}, split={self.split!r}, {len(self)} examples)'

  def __getitem__(self, index: int) -> dict:
    return self.read(index)[0]

  def read(self, index: int, keys: Sequence[str] = (), caption: bool = True) -> tuple[dict, dict]:
    """(source[index], {key: raw value}) for other features of the same example ('label', 'captions/text'),
    from one read and decode of it; BadRecord when a feature is absent. caption=False: the example holds the
    image only (classification sets such as imagenet2012 have no caption feature)."""
    try:
      example = self._source[int(index)]
    except (OSError, ValueError, RuntimeError) as e:
      raise BadRecord(f'{self.tfds_name}[{index}]: cannot read: {type(e).__name__}: {e}') from None
    image = _lookup(example, self.image_key)
    if isinstance(image, np.ndarray) and image.dtype == object:
      image = image.item()  # Encoded bytes (SkipDecoding) arrive as a 0-d object array.
    out = {'image': image}
    if caption and self.caption_ratios:
      out['caption_choices'] = self._caption_choices(example, index)
    elif caption:
      out['caption'] = _as_text(_lookup(example, self.caption_key))
      if not out['caption']:
        raise BadRecord(f'{self.tfds_name}[{index}]: empty {self.caption_key!r}')
    return out, {k: _lookup(example, k) for k in keys}

  def _caption_choices(self, example, index: int) -> list[tuple[str, float]]:
    return hybrid_captions.choices(self.caption_ratios, lambda key: _lookup(example, key),
                                   f'{self.tfds_name}[{index}]')

  def captions(self, n: int) -> list[str]:
    """Up to `n` captions in index order, bad records skipped: sentences to train a tokenizer on (hybrid
    captions: one drawn per example, from a stream keyed by its index)."""
    if self.caption_ratios:
      read = lambda i: hybrid_captions.draw(self._caption_choices(self._source[i], i), hybrid_captions.stream(i))
    else:
      read = lambda i: _as_text(_lookup(self._source[i], self.caption_key))
    return list(itertools.islice(good_captions(self, read), n))
