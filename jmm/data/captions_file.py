"""A CSV or JSONL listing of (image path, captions) as a random-access source: retrieval sets such as COCO
(Karpathy 5k test) or Flickr30k (1k test), with several captions per image.

Two formats, told apart by the file's extension:

  .csv / .tsv      a header row, then one row per caption: the `image_key` column (default 'image') holds the
                   image path, the `caption_key` column (default 'caption') one caption. An image with several
                   captions has several rows (the layout of Flickr30k's results.csv).
  .jsonl / .ndjson one JSON object per line: {"image": "photos/1.jpg", "captions": ["...", "..."]}; the
                   `caption_key` (default 'captions') holds a list of strings or one string.

In both, an image listed more than once gets the captions of all its rows, in file order, and images keep the
order of their first row. Image paths are relative to `image_root` (default: the listing's own folder), or
absolute, or URLs; the listing and the images are local or any fsspec URL. Other columns / keys of an image's
first row (a class label, an id) are returned by `read(i, keys)`.

Damage is counted, never fatal: a row that is not JSON, lacks the image or caption or has an empty one is a bad
record, and so is an image file that is missing or does not decode (found when it is read). A bad row stays in
the index as one placeholder entry whose read raises `BadRecord`, as in the shard sources, so a caller that skips
and counts bad records counts it once.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
from typing import Sequence

import fsspec

from jmm.data.transforms import BadRecord

CSV_EXTENSIONS = {'.csv': ',', '.tsv': '\t'}
JSONL_EXTENSIONS = ('.jsonl', '.ndjson')


def file_format(path: str, field: str = 'data.path') -> str:
  """'csv' or 'jsonl' from the listing's extension; ValueError naming `field` for any other."""
  ext = posixpath.splitext(str(path))[1].lower()
  if ext in CSV_EXTENSIONS:
    return 'csv'
  if ext in JSONL_EXTENSIONS:
    return 'jsonl'
  raise ValueError(f'{field}={str(path)!r}: a captions file must end in one of '
                   f'{sorted(CSV_EXTENSIONS) + list(JSONL_EXTENSIONS)} (CSV with a header row, or JSON lines)')


def default_caption_key(path: str) -> str:
  """'caption' for a CSV (one caption per row), 'captions' for JSON lines (a list per image)."""
  return 'caption' if file_format(path) == 'csv' else 'captions'


def _read_text(path: str, field: str) -> str:
  try:
    with fsspec.open(str(path), 'rb') as f:
      return f.read().decode('utf-8-sig')
  except (OSError, UnicodeDecodeError) as e:
    raise FileNotFoundError(f'{field}={str(path)!r}: cannot read the captions file ({type(e).__name__}: {e})') \
        from None


def columns(path: str, field: str = 'data.path', lines: int = 100) -> list[str]:
  """The column names of a CSV (its header), or the keys found in the objects of a JSONL file's first `lines`
  lines (lines that are not JSON objects skipped: they are bad records, counted when read): for config checks."""
  fmt = file_format(path, field)
  text = _read_text(path, field)
  if fmt == 'csv':
    header = next(csv.reader(io.StringIO(text), delimiter=CSV_EXTENSIONS[posixpath.splitext(path)[1].lower()]),
                  [])
    return [h.strip() for h in header]
  keys = set()
  for line in text.splitlines()[:lines]:
    try:
      row = json.loads(line) if line.strip() else None
    except ValueError:
      continue
    keys |= set(row) if isinstance(row, dict) else set()
  return sorted(keys)


def _as_captions(value) -> list[str] | None:
  """A caption or a list of captions -> the non-empty stripped ones; None when the value is neither."""
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
    return None
  return [v.strip() for v in value if v.strip()]


class CaptionsFileSource:
  """Random access to the images of a captions listing (see the module docstring).

  `source[i]` -> {'image': encoded bytes, 'caption': its first caption, 'captions': list[str], 'path': str},
  or raises BadRecord.
  """

  def __init__(self, path: str, *, name: str = 'captions_file', image_key: str = 'image',
               caption_key: str | None = None, image_root: str | None = None, field: str = 'data.path'):
    self.name, self.path = name, str(path)
    self._prefix = field.rsplit('.', 1)[0]  # Errors name `field` (the path) or its siblings ('data.image_key').
    self.image_key = image_key or 'image'
    self.caption_key = caption_key or default_caption_key(self.path)
    fmt = file_format(self.path, field)
    root = image_root or posixpath.dirname(self.path)
    text = _read_text(self.path, field)
    if fmt == 'csv':
      rows = self._csv_rows(text, posixpath.splitext(self.path)[1].lower())
    else:
      rows = self._jsonl_rows(text)
    self._entries: list = []  # dict(path, captions, row) per image, or a str: a bad row's error.
    by_path: dict[str, dict] = {}
    for where, row in rows:
      if isinstance(row, str):
        self._entries.append(f'{self.path}:{where}: {row}')
        continue
      image, captions = row.get(self.image_key), _as_captions(row.get(self.caption_key))
      if not isinstance(image, str) or not image.strip():
        self._entries.append(f'{self.path}:{where}: no {self.image_key!r} image path')
      elif not captions:
        self._entries.append(f'{self.path}:{where}: no {self.caption_key!r} caption text')
      else:
        image = image.strip()
        if image not in by_path:
          by_path[image] = dict(path=_join(root, image), captions=[], row=row)
          self._entries.append(by_path[image])
        by_path[image]['captions'] += captions
    bad = sum(isinstance(e, str) for e in self._entries)
    if bad:
      logging.warning('%s: %d bad rows in %s (first: %s); counted as bad records', name, bad, self.path,
                      next(e for e in self._entries if isinstance(e, str)))
    if not by_path:
      raise ValueError(f'{field}={self.path!r}: no row with both an {self.image_key!r} image path and '
                       f'{self.caption_key!r} caption text ({bad} bad rows)')

  def _csv_rows(self, text: str, ext: str):
    reader = csv.DictReader(io.StringIO(text), delimiter=CSV_EXTENSIONS[ext])
    header = [h.strip() for h in reader.fieldnames or []]
    for key, what in ((self.image_key, 'image_key'), (self.caption_key, 'caption_key')):
      if key not in header:
        raise ValueError(f'{self._prefix}.{what}={key!r} is not a column of {self.path!r} '
                         f'(its header: {header})')
    reader.fieldnames = header
    for line, row in enumerate(reader, start=2):
      yield f'line {line}', {k: v for k, v in row.items() if k is not None}

  def _jsonl_rows(self, text: str):
    for line, raw in enumerate(text.splitlines(), start=1):
      if not raw.strip():
        continue
      try:
        row = json.loads(raw)
      except ValueError as e:
        yield f'line {line}', f'not JSON ({e})'
        continue
      yield f'line {line}', row if isinstance(row, dict) else f'a JSON {type(row).__name__}, not an object'

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f'CaptionsFileSource({self.path!r}, {len(self)} entries)'

  def _entry(self, index: int) -> dict:
    if not 0 <= index < len(self._entries):
      raise IndexError(f'index {index} out of range for {self!r}')
    entry = self._entries[index]
    if isinstance(entry, str):
      raise BadRecord(entry)
    return entry

  def read(self, index: int, keys: Sequence[str] = ()) -> tuple[dict, dict]:
    """(source[index], {key: the value of that column / key in the image's first row}); BadRecord if absent."""
    entry = self._entry(int(index))
    missing = [k for k in keys if entry['row'].get(k) in (None, '')]
    if missing:
      raise BadRecord(f'{self.path}: image {entry["path"]} has no {missing[0]!r} (has {sorted(entry["row"])})')
    return self[index], {k: entry['row'][k] for k in keys}

  def __getitem__(self, index: int) -> dict:
    entry = self._entry(int(index))
    fs, local = fsspec.core.url_to_fs(entry['path'])
    try:
      image = fs.cat_file(local)
    except OSError as e:
      raise BadRecord(f'{self.path}: cannot read image {entry["path"]}: {type(e).__name__}: {e}') from None
    return {'image': image, 'caption': entry['captions'][0], 'captions': list(entry['captions']),
            'path': entry['path']}

  def captions(self, n: int) -> list[str]:
    """Up to `n` captions in file order: sentences to train a tokenizer on."""
    out = [c for e in self._entries if not isinstance(e, str) for c in e['captions']]
    return out[:n]


def _join(root: str, path: str) -> str:
  if '://' in path or posixpath.isabs(path) or not root:
    return path
  return posixpath.join(root, path)
