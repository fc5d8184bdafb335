"""ArrayRecord files of image-caption records as a random-access source, and the record format.

Record format (what `python -m jmm.data.prepare` writes): one msgpack map per record,

    {'image': <encoded image bytes, JPEG/PNG/WebP as found>, 'caption': <UTF-8 str>, 'key': <str, optional>}

msgpack because it is compact for bytes (no base64), has readers in every language, and is already here
(Flax serialises with it). Files are written with `group_size:1`, so reading one record decompresses only
that record: what Grain's random access needs (ArrayRecord's own advice for random-access use).

Hybrid captions (`captions`, jmm.data.hybrid_captions): fields are keys of the map ('/' into nested maps), and
an example's read returns the texts it has as 'caption_choices' for the pipeline to draw from.

Damage is counted, never fatal: a record that is not such a map, lacks a field or whose image does not decode
is a bad record; a file that cannot be opened or holds no record is a bad shard. Each bad shard stays in the
index as one placeholder entry whose read raises `BadRecord(kind='shard')`, so it is counted once per epoch.
"""
from __future__ import annotations

import itertools
import logging
from typing import Sequence

import msgpack
from array_record.python import array_record_data_source
from array_record.python import array_record_module

from jmm.data import hybrid_captions
from jmm.data.transforms import BadRecord
from jmm.data.webdataset import good_captions, expand_paths

WRITER_OPTIONS = 'group_size:1'


def encode_record(image: bytes, caption: str, key: str | None = None) -> bytes:
  """One example -> the msgpack bytes of an ArrayRecord record (see the module docstring)."""
  record = {'image': bytes(image), 'caption': str(caption)}
  if key is not None:
    record['key'] = str(key)
  return msgpack.packb(record, use_bin_type=True)


def unpack_record(data: bytes) -> dict:
  """msgpack record bytes -> the whole map (image, caption and any other keys); raises BadRecord if it is not one."""
  try:
    record = msgpack.unpackb(data, raw=False)
  except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as e:
    raise BadRecord(f'record is not msgpack: {type(e).__name__}: {e}') from None
  if not isinstance(record, dict):
    raise BadRecord(f'record is a {type(record).__name__}, expected a msgpack map')
  return record


def decode_record(data: bytes, image_key: str = 'image', caption_key: str = 'caption') -> dict:
  """msgpack record bytes -> {'image': bytes, 'caption': str}; raises BadRecord naming what is wrong."""
  return _example(unpack_record(data), image_key, caption_key)


def _image(record: dict, image_key: str) -> bytes:
  image = record.get(image_key)
  if not isinstance(image, bytes) or not image:
    raise BadRecord(f'record has no {image_key!r} bytes (keys: {sorted(record)})')
  return image


def _example(record: dict, image_key: str, caption_key: str) -> dict:
  image, caption = _image(record, image_key), record.get(caption_key)
  if isinstance(caption, bytes):
    caption = caption.decode('utf-8', 'replace')
  if not isinstance(caption, str) or not caption.strip():
    raise BadRecord(f'record has no {caption_key!r} text (keys: {sorted(record)})')
  return {'image': image, 'caption': caption.strip()}


def lookup(record: dict, key: str):
  """record[key], with '/' for nested maps ('captions/text'); raises BadRecord naming the key when absent."""
  value = record
  for part in key.split('/'):
    if not isinstance(value, dict) or part not in value:
      have = sorted(value) if isinstance(value, dict) else type(value).__name__
      raise BadRecord(f'record has no {key!r} (at {part!r}; has {have})')
    value = value[part]
  return value


def write_records(path: str, records) -> int:
  """Writes encoded records (bytes) to one ArrayRecord file; returns how many."""
  writer = array_record_module.ArrayRecordWriter(str(path), WRITER_OPTIONS)
  n = 0
  try:
    for record in records:
      writer.write(record)
      n += 1
  finally:
    writer.close()
  return n


class ArrayRecordSource:
  """Random access to the msgpack image-caption records of ArrayRecord files (see the module docstring).

  `source[i]` -> {'image': encoded bytes, 'caption': str}, or raises BadRecord. With `captions` (hybrid captions:
  {key: ratio}; caption_key is then unused) the caption is instead 'caption_choices': [(text, ratio)] of the keys
  of positive ratio the record has, and a record with none of them is bad.
  """

  def __init__(self, paths: str | Sequence[str], *, name: str = 'array_record', image_key: str = 'image',
               caption_key: str = 'caption', field: str = 'data.paths',
               captions: dict[str, float] | str | None = None):
    self.name = name
    self.image_key, self.caption_key = image_key, caption_key
    self.caption_ratios = hybrid_captions.drawn_fields(captions)
    self.paths = expand_paths(paths, field)
    good, self.shard_errors = [], {}
    for path in self.paths:
      try:
        n = len(array_record_data_source.ArrayRecordDataSource([path]))
        if n == 0:
          self.shard_errors[path] = 'empty shard (no records)'
        else:
          good.append(path)
      except (RuntimeError, OSError, ValueError) as e:
        self.shard_errors[path] = f'unreadable: {type(e).__name__}: {e}'
    for path, err in self.shard_errors.items():
      logging.warning('%s: shard %s: %s (skipped, counted as bad_shards/%s)', name, path, err, name)
    if not good:
      raise ValueError(f'{field}: no record in any of the {len(self.paths)} files of {paths!r} '
                       f'(empty or unreadable: {dict(itertools.islice(self.shard_errors.items(), 3))})')
    self._good_paths = good
    self._records = array_record_data_source.ArrayRecordDataSource(good)
    self._num_records = len(self._records)
    self._bad_shards = list(self.shard_errors.items())  # Placeholder entries after the records.

  def __len__(self) -> int:
    return self._num_records + len(self._bad_shards)

  def __repr__(self) -> str:
    return f'ArrayRecordSource({self.name!r}, {len(self.paths)} files, {len(self)} entries)'

  def _raw(self, index: int) -> bytes:
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range for {self!r}')
    if index >= self._num_records:
      path, err = self._bad_shards[index - self._num_records]
      raise BadRecord(f'{path}: {err}', kind='shard')
    try:
      return self._records[index]
    except (RuntimeError, OSError, ValueError) as e:
      raise BadRecord(f'cannot read record {index}: {type(e).__name__}: {e}') from None

  def __getitem__(self, index: int) -> dict:
    if self.caption_ratios:
      return self.read(index)[0]
    return decode_record(self._raw(int(index)), self.image_key, self.caption_key)

  def _caption_choices(self, record: dict, index: int) -> list[tuple[str, float]]:
    return hybrid_captions.choices(self.caption_ratios, lambda key: lookup(record, key), f'record {index}')

  def read(self, index: int, keys: Sequence[str] = (), caption: bool = True) -> tuple[dict, dict]:
    """(source[index], {key: raw value}) for other keys of the record's map ('a/b': key b of the map under a),
    such as a class label or a list of captions; BadRecord when a key is absent. caption=False: the example
    holds the image only, and a record without a caption is not bad (classification sets)."""
    record = unpack_record(self._raw(int(index)))
    if caption and self.caption_ratios:
      example = {'image': _image(record, self.image_key),
                 'caption_choices': self._caption_choices(record, int(index))}
    elif caption:
      example = _example(record, self.image_key, self.caption_key)
    else:
      example = {'image': _image(record, self.image_key)}
    return example, {k: lookup(record, k) for k in keys}

  def captions(self, n: int) -> list[str]:
    """Up to `n` captions in index order, bad records skipped: sentences to train a tokenizer on (hybrid
    captions: one drawn per record, from a stream keyed by its index)."""
    if self.caption_ratios:
      read = lambda i: hybrid_captions.draw(self._caption_choices(unpack_record(self._raw(i)), i),
                                            hybrid_captions.stream(i))
    else:
      read = lambda i: self[i]['caption']
    return list(itertools.islice(good_captions(self, read), n))
