"""Eval data from files: the examples of a file source, decoded and resized, with labels and caption lists.

Sources (`data.name`): webdataset / array_record / tfds, built by `jmm.data.build.make_source` as for training,
and two that only evaluation reads: 'folder' (`jmm.data.folder`: ROOT/CLASS/IMAGE, labelled by sub-folder) and
'captions_file' (`jmm.data.captions_file`: a CSV or JSONL listing of image paths and captions). Fields:

  image     uint8 [N, resolution, resolution, 3] (greyscale and RGBA images become RGB)
  caption   list[str]: the source's caption (data.caption_key); a captions_file's first caption of an image
  captions  list[list[str]]: every caption of each image: a captions_file's own; else read from
            data.captions_key (below) when set, a list of strings or one string (a one-element list); else
            [caption]
  label     int64 [N]: read from `label_key` (below); a folder's label is its sub-folder's index

A key (label_key, captions_key) names: for WebDataset, a member extension ('cls'), with a '/' path into a JSON
member ('json/captions': the 'captions' list of KEY.json; a .json member is always read as JSON); for ArrayRecord,
a key of the msgpack map ('/' into nested maps); for TFDS, a feature ('captions/text', COCO's caption sequence);
for a captions_file, a column (CSV) or key (JSONL). Examples that lack a field asked for, or whose image does not
decode, are bad records: skipped, counted and reported in one warning; only when no example is readable is it an
error. Imports nothing of jmm.evaluators (common imports this module).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from jmm.errors import ConfigError

def has_caption_lists(data) -> bool:
  """Whether `data` gives several captions per image: a captions_file, or a source with captions_key set."""
  return data.get('name') == 'captions_file' or bool(data.get('captions_key'))


def parse_label(value, label_key: str) -> int:
  """An integer class id from a label member / field: an int, a numpy scalar, or text like '3'; else BadRecord."""
  from jmm.data.transforms import BadRecord  # pylint: disable=g-import-not-at-top
  if isinstance(value, np.ndarray):
    value = value.reshape(-1)[0] if value.size else ''
  if isinstance(value, (bytes, bytearray)):
    value = bytes(value).decode('utf-8', 'replace')
  try:
    if isinstance(value, str):
      return int(value.strip())
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
      return int(value)
  except ValueError:
    pass
  raise BadRecord(f'label_key={label_key!r}: {value!r} is not an integer class id')


def parse_captions(value, captions_key: str) -> list[str]:
  """A caption list from a field: a list / array of strings or bytes, or one string; empty texts dropped."""
  from jmm.data.transforms import BadRecord  # pylint: disable=g-import-not-at-top
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, (str, bytes)):
    value = [value]
  if not isinstance(value, (list, tuple)):
    raise BadRecord(f'captions_key={captions_key!r}: a {type(value).__name__} is not a caption list')
  texts = []
  for text in value:
    if isinstance(text, bytes):
      text = text.decode('utf-8', 'replace')
    if not isinstance(text, str):
      raise BadRecord(f'captions_key={captions_key!r}: {text!r} in the list is not text')
    if text.strip():
      texts.append(text.strip())
  if not texts:
    raise BadRecord(f'captions_key={captions_key!r}: no caption text')
  return texts


def make_source(data: dict):
  """The random-access source a data dict names (see the module docstring); ConfigError naming the field."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jmm.data import build, captions_file, folder  # pylint: disable=g-import-not-at-top
  try:
    if data['name'] == 'folder':
      return folder.ImageFolderSource(data.get('path') or '', name='folder')
    if data['name'] == 'captions_file':
      return captions_file.CaptionsFileSource(
          data.get('path') or '', image_key=data.get('image_key') or 'image',
          caption_key=data.get('caption_key') or None, image_root=data.get('image_root') or None)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from None
  return build.make_source(ml_collections.ConfigDict({'data': data, 'seed': 0}), data['split'])


def _wds_member(key: str) -> tuple[str, list[str]]:
  """'json/captions' -> ('json', ['captions']): a WebDataset member extension and a path into its JSON."""
  ext, *path = key.split('/')
  return ext.lower().lstrip('.'), path


def _webdataset_values(data: dict, keys: Sequence[str]) -> Callable[[int, dict], dict]:
  """(index, example) -> {key: value} for WebDataset keys; members other than the example's caption member are
  read from the same shards indexed with that member in its place: rows group by key in the same order, so row
  i of each is example i."""
  from jmm.data import webdataset  # pylint: disable=g-import-not-at-top
  from jmm.data.transforms import BadRecord  # pylint: disable=g-import-not-at-top
  caption_ext = (data.get('caption_key') or webdataset.CAPTION_EXTENSION).lower().lstrip('.')
  image_key = data.get('image_key') or ''
  sides = {}
  for key in keys:
    ext, _ = _wds_member(key)
    if ext != caption_ext and ext not in sides:
      sides[ext] = webdataset.WebDatasetSource(
          data['paths'], name=f'webdataset:{ext}', caption_extension=ext,
          image_extensions=(image_key,) if image_key else webdataset.IMAGE_EXTENSIONS,
          index_cache=data.get('index_cache') or '')

  def value(index: int, example: dict, key: str):
    ext, path = _wds_member(key)
    text = example['caption'] if ext == caption_ext else sides[ext][index]['caption']
    if not path and ext != 'json':
      return text
    try:
      value = json.loads(text)
    except ValueError:
      raise BadRecord(f'example {index}: the .{ext} member is not JSON (for {key!r})') from None
    for part in path:
      if not isinstance(value, dict) or part not in value:
        raise BadRecord(f'example {index}: the .{ext} member has no {key!r}')
      value = value[part]
    return value

  return lambda index, example: {k: value(index, example, k) for k in keys}


def _reader(data: dict, fields: Sequence[str], label_key: str) -> tuple[Any, Callable[[int], dict]]:
  """(source, index -> {field: value}) for the fields asked (images still encoded); raises BadRecord / OSError."""
  name = data['name']
  captions_key = data.get('captions_key') or None
  if name == 'folder':
    if {'caption', 'captions'} & set(fields):
      raise ConfigError("data.name='folder' has no captions (it gives images and labels: zero-shot, linear probe)")
    source = make_source(data)
    return source, lambda i: {k: v for k, v in source[i].items() if k in fields}
  # The keys read beside image and caption, and whether the source's own caption is wanted at all.
  keys = ([label_key] if 'label' in fields else []) + (
      [captions_key] if 'captions' in fields and captions_key and name != 'captions_file' else [])
  need_caption = 'caption' in fields or ('captions' in fields and not captions_key)
  if name == 'webdataset' and not need_caption and keys:
    data = dict(data, caption_key=_wds_member(keys[0])[0])  # Index the member read anyway as the caption.
  source = make_source(data)
  if name == 'webdataset':
    values = _webdataset_values(data, keys)

    def read(i: int) -> tuple[dict, dict]:
      example = source[i]
      return example, values(i, example)
  elif name == 'captions_file':
    read = lambda i: source.read(i, keys)
  else:
    read = lambda i: source.read(i, keys, caption=need_caption)

  def row(i: int) -> dict:
    example, extra = read(i)
    out = {'image': example['image']}
    if 'caption' in fields:
      out['caption'] = example['caption']
    if 'captions' in fields:
      out['captions'] = (example['captions'] if 'captions' in example else
                         parse_captions(extra[captions_key], captions_key) if captions_key else [example['caption']])
    if 'label' in fields:
      out['label'] = parse_label(extra[label_key], label_key)
    return out
  return source, row


def load(data: dict, fields: Sequence[str], label_key: str = 'label') -> dict[str, Any]:
  """The first data.num_examples readable examples (all if None) of a file source: {field: values}, uncached."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jmm.data import mixture, transforms  # pylint: disable=g-import-not-at-top
  fields = tuple(fields)
  source, read = _reader(data, fields, label_key)
  # Full JPEG decodes (no draft scaling) unless the data dict asks otherwise: the pixels a peer's preprocessing
  # of the same files sees, so converted weights score as they do in their own framework.
  transform = (mixture.make_transform(ml_collections.ConfigDict({'draft': False, **data}))
               if 'image' in fields else None)
  want = len(source) if data.get('num_examples') is None else int(data['num_examples'])
  columns: dict[str, list] = {f: [] for f in fields}
  bad, first_error = 0, None
  for i in range(len(source)):
    if len(columns[fields[0]]) >= want:
      break
    try:
      example = read(i)
      if 'image' in fields:
        example['image'] = transform(example['image'])
    except (transforms.BadRecord, OSError) as e:
      bad, first_error = bad + 1, first_error or f'example {i}: {e}'
      continue
    for f in fields:
      columns[f].append(example[f])
  n = len(columns[fields[0]])
  where = data.get('paths') or data.get('path') or data.get('tfds_name')
  if bad:
    logging.warning('eval data %s: skipped %d bad records (first: %s)', where, bad, first_error)
  if not n:
    raise ValueError(f'eval data {where!r}: no readable example ({bad} bad; first: {first_error})')
  if n < want and data.get('num_examples') is not None:
    logging.warning('eval data %s: asked for num_examples=%d, has %d readable', where, want, n)
  out: dict[str, Any] = {}
  for f, values in columns.items():
    if f in ('caption', 'captions'):
      out[f] = list(values)
    else:
      array = np.stack(values) if f == 'image' else np.asarray(values, dtype=np.int64)
      array.setflags(write=False)
      out[f] = array
  out['bad_records'] = bad
  return out
