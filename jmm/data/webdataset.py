"""WebDataset tar shards (as img2dataset writes them: KEY.jpg + KEY.txt + KEY.json) as a random-access source.

Grain's global shuffle, per-process slicing and exact resumption all need random access, which a tar stream
does not give. So each shard's tar headers are scanned once (512-byte blocks: name, size, where the data
starts; the data itself is never read), the members are grouped by KEY (the base name up to its first dot, as
the WebDataset convention has it), and an example is then read by offset: one ranged read (`fs.cat_file`)
that covers its image and caption members, which sit next to each other in the tar. Paths are local or any
fsspec URL (gs://, s3://, https://...); the index lives in memory (36 bytes per example) and travels to Grain
worker processes inside the pickled source. Every process indexes every shard (it reads its own slice of all
examples); with `index_cache` (a folder, local or fsspec) each shard's index is also saved there as a small
.npz keyed by the shard's path and size, so later runs and the other processes skip the scan.

Hybrid captions (`captions`, jmm.data.hybrid_captions): fields are members ('txt') or keys of a JSON member
('json/alt': key 'alt' of KEY.json), and the index then keeps every member they name; an example's read returns
the texts it has as 'caption_choices' for the pipeline to draw from.

Damage is counted, never fatal: a key without caption or image, a member cut short by a truncated tar, or an
image that does not decode is a bad *record*; an empty, missing or unparsable shard is a bad *shard*. Both
stay in the index as entries whose read raises `BadRecord`, so the pipeline meets and counts each exactly once
per epoch. Only when no shard holds a single example is it an error (naming the pattern), never a stall.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import itertools
import json
import logging
import os
import re
from typing import Iterable, Sequence

import fsspec
import numpy as np

from jmm.data import hybrid_captions
from jmm.data.transforms import BadRecord

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
CAPTION_EXTENSION = 'txt'
_BLOCK = 512
_BAD_SHARD = -2  # image_size sentinel of a placeholder entry standing for a damaged or empty shard.


# ---------------------------------------------------------------------------------------------------------
# Path patterns: braces ({000..099}, {a,b}) and globs (*, ?, [...]), local or fsspec.
# ---------------------------------------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
  """'a-{000..002}.tar' -> ['a-000.tar', 'a-001.tar', 'a-002.tar']; '{x,y}' alternatives; nested and repeated.

  Numeric ranges keep the zero padding of their first bound (the WebDataset / bash convention).
  """
  match = re.search(r'\{([^{}]*)\}', pattern)
  if not match:
    return [pattern]
  head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
  numeric = re.fullmatch(r'(\d+)\.\.(\d+)', body)
  if numeric:
    lo, hi = numeric.groups()
    width = len(lo) if lo.startswith('0') else 0
    step = 1 if int(hi) >= int(lo) else -1
    options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
  else:
    options = body.split(',')
  return [out for option in options for out in expand_braces(head + option + tail)]


def expand_paths(patterns: str | Sequence[str], field: str = 'data.paths') -> list[str]:
  """Shard patterns ('::'-separated string or a list) -> the de-duplicated list of paths they name, in order.

  A brace pattern names its files even if some are missing (they become counted bad shards); a glob names
  what exists. Raises FileNotFoundError naming `field` and the pattern when nothing at all matches.
  """
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split('::') if p.strip()]
  patterns = [str(p).strip() for p in patterns]
  if not patterns:
    raise ValueError(f'config.{field} is empty: give shard paths or patterns (glob or {{000..099}} braces)')
  out = []
  for pattern in patterns:
    found, any_exists = [], False
    for path in expand_braces(pattern):
      fs, local = fsspec.core.url_to_fs(path)
      if any(c in path for c in '*?['):
        matched = [_unstrip(fs, p, path) for p in sorted(fs.glob(local))]
        found, any_exists = found + matched, any_exists or bool(matched)
      else:
        exists = fs.exists(local)
        any_exists = any_exists or exists
        if exists or '{' in pattern:
          found.append(path)
    if not any_exists:
      raise FileNotFoundError(f'config.{field}: pattern {pattern!r} matches no file')
    out += found
  return list(dict.fromkeys(out))


def _unstrip(fs, path: str, like: str) -> str:
  return path if '://' not in like else fs.unstrip_protocol(path)


# ---------------------------------------------------------------------------------------------------------
# Tar header scan.
# ---------------------------------------------------------------------------------------------------------
def _octal(field: bytes) -> int:
  if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB.
    return int.from_bytes(field[1:], 'big')
  text = field.split(b'\0', 1)[0].strip()
  return int(text, 8) if text else 0


def scan_tar(path: str) -> tuple[list[tuple[str, int, int]], int, str | None]:
  """The regular-file members of a tar as (name, data offset, size), the file size, and the first error.

  Reads only the 512-byte headers (checksums verified; GNU long names and pax paths honoured). A member whose
  data runs past the end of the file is still listed (its read will fail and be counted); a header cut short
  or failing its checksum stops the scan with an error string, keeping the members before it.
  """
  fs, local = fsspec.core.url_to_fs(path)
  members, long_name, offset = [], None, 0
  try:
    size = fs.size(local)
    with fs.open(local, 'rb') as f:
      while offset + _BLOCK <= size:
        f.seek(offset)
        header = f.read(_BLOCK)
        if len(header) < _BLOCK:
          return members, size, f'truncated tar header at byte {offset}'
        if header == b'\0' * _BLOCK:
          return members, size, None  # End-of-archive marker.
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
          return members, size, f'bad tar header checksum at byte {offset}'
        name = header[:100].split(b'\0', 1)[0].decode('utf-8', 'replace')
        if header[257:262] == b'ustar' and header[345:500].strip(b'\0'):
          name = header[345:500].split(b'\0', 1)[0].decode('utf-8', 'replace') + '/' + name
        member_size, kind = _octal(header[124:136]), header[156:157]
        data = offset + _BLOCK
        if kind in (b'L', b'x'):  # GNU long name / pax extended header: the next member's real name.
          f.seek(data)
          text = f.read(member_size)
          if kind == b'L':
            long_name = text.split(b'\0', 1)[0].decode('utf-8', 'replace')
          else:
            found = re.search(rb'\d+ path=([^\n]*)\n', text)
            long_name = found.group(1).decode('utf-8', 'replace') if found else None
        elif kind in (b'0', b'\0', b'7'):
          members.append((long_name or name, data, member_size))
          long_name = None
        offset = data + (member_size + _BLOCK - 1) // _BLOCK * _BLOCK
      if 0 < size - offset < _BLOCK:
        return members, size, f'truncated tar header at byte {offset}'
      return members, size, None
  except (OSError, ValueError) as e:
    return members, 0, f'{type(e).__name__}: {e}'


def split_key(name: str) -> tuple[str, str]:
  """'dir/000123.jpg' -> ('dir/000123', 'jpg'): the key is the base name up to its first dot (WebDataset)."""
  folder, base = os.path.split(name)
  stem, _, ext = base.partition('.')
  return os.path.join(folder, stem), ext.lower()


# ---------------------------------------------------------------------------------------------------------
# The source.
# ---------------------------------------------------------------------------------------------------------
_ENTRY = np.dtype([('shard', np.int32), ('image_offset', np.int64), ('image_size', np.int64),
                   ('caption_offset', np.int64), ('caption_size', np.int64)])


def _entry_dtype(num_captions: int) -> np.dtype:
  """_ENTRY, plus (captionK_offset, captionK_size) for each caption member K >= 1 (hybrid captions)."""
  if num_captions <= 1:
    return _ENTRY
  return np.dtype(_ENTRY.descr + [(f'caption{k}_{what}', np.int64) for k in range(1, num_captions)
                                  for what in ('offset', 'size')])


def _member_columns(k: int) -> tuple[str, str]:
  """The index columns (offset, size) of caption member k."""
  return ('caption_offset', 'caption_size') if k == 0 else (f'caption{k}_offset', f'caption{k}_size')


def member_path(field: str) -> tuple[str, list[str]]:
  """'json/alt' -> ('json', ['alt']): a member extension and the key path into its JSON ('txt' -> ('txt', []))."""
  ext, *path = field.split('/')
  return ext.lower().lstrip('.'), path


def _index_shard(shard: int, path: str, image_extensions: Sequence[str], caption_extensions: Sequence[str],
                 cache_dir: str = '') -> tuple[np.ndarray, str | None]:
  """One shard's entries ([examples] of _entry_dtype) and its error; from `cache_dir` when indexed there before."""
  cache_path = _cache_path(cache_dir, path, image_extensions, caption_extensions) if cache_dir else None
  if cache_path:
    try:
      with fsspec.open(cache_path, 'rb') as f:
        cached = np.load(io.BytesIO(f.read()), allow_pickle=False)
        rows, error = cached['rows'].copy(), str(cached['error']) or None
      rows['shard'] = shard
      return rows, error
    except (OSError, ValueError, KeyError):
      pass  # Not cached yet (or unreadable): scan, then write it.
  members, _, error = scan_tar(path)
  groups: dict[str, dict[str, tuple[int, int]]] = {}
  for name, offset, size in members:
    key, ext = split_key(name)
    groups.setdefault(key, {})[ext] = (offset, size)
  rows = []
  for parts in groups.values():
    image = next((parts[e] for e in image_extensions if e in parts), (-1, -1))
    captions = [x for e in caption_extensions for x in parts.get(e, (-1, -1))]
    rows.append((shard, image[0], image[1], *captions))
  if not rows and error is None:
    error = 'empty shard (no tar members)'
  if error is not None:
    # One placeholder: the damage is counted once per epoch.
    rows.append((shard, -1, _BAD_SHARD) + (-1, -1) * len(caption_extensions))
  rows = np.array(rows, _entry_dtype(len(caption_extensions)))
  if cache_path and not error:  # Damaged shards are scanned again next time: they may have been repaired.
    _write_atomically(cache_path, rows)
  return rows, error


def _cache_path(cache_dir: str, path: str, image_extensions: Sequence[str],
                caption_extensions: Sequence[str]) -> str | None:
  """Where a shard's index is cached: keyed by its path, size and the member extensions that group it."""
  fs, local = fsspec.core.url_to_fs(path)
  try:
    size = fs.size(local)
  except OSError:
    return None
  key = hashlib.sha1(f'{path}\0{size}\0{",".join(image_extensions)}\0{",".join(caption_extensions)}'.encode())
  key = key.hexdigest()
  return f'{cache_dir.rstrip("/")}/{os.path.basename(local)}.{key[:16]}.index.npz'


def _write_atomically(path: str, rows: np.ndarray) -> None:
  buf = io.BytesIO()
  np.savez(buf, rows=rows, error=np.array(''))
  fs, local = fsspec.core.url_to_fs(path)
  try:
    fs.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f'{local}.tmp{os.getpid()}'
    fs.pipe_file(tmp, buf.getvalue())
    fs.mv(tmp, local)  # Readers see the whole file or none (processes may index the same shard at once).
  except OSError as e:
    logging.warning('cannot write the shard index cache %s: %s', path, e)


class WebDatasetSource:
  """Random access to image-caption examples in WebDataset tar shards (see the module docstring).

  `source[i]` -> {'image': encoded bytes, 'caption': str}, or raises BadRecord. With `captions` (hybrid
  captions: {field: ratio}, fields as in the module docstring; caption_extension is then unused) the caption is
  instead 'caption_choices': [(text, ratio)] of the fields of positive ratio the example has, and an example with
  none of them is a bad record.
  """

  def __init__(self, paths: str | Sequence[str], *, name: str = 'webdataset',
               image_extensions: Sequence[str] = IMAGE_EXTENSIONS, caption_extension: str = CAPTION_EXTENSION,
               index_threads: int = 16, index_cache: str = '', field: str = 'data.paths',
               captions: dict[str, float] | str | None = None):
    self.name = name
    self.paths = expand_paths(paths, field)
    self.image_extensions = tuple(e.lower().lstrip('.') for e in image_extensions)
    self.caption_extension = caption_extension.lower().lstrip('.')
    self.caption_ratios = hybrid_captions.drawn_fields(captions)
    # The members indexed as captions: the one caption member, or every member the hybrid fields name.
    self._members = (tuple(dict.fromkeys(member_path(f)[0] for f in self.caption_ratios)) if self.caption_ratios
                     else (self.caption_extension,))
    # Members read as JSON: a .json one (as the evaluators read it), or one a field names a key of.
    self._json_members = {e for e, keys in map(member_path, self.caption_ratios) if keys or e == 'json'}
    with concurrent.futures.ThreadPoolExecutor(max(1, min(index_threads, len(self.paths)))) as pool:
      results = list(pool.map(lambda a: _index_shard(*a, self.image_extensions, self._members, index_cache),
                              enumerate(self.paths)))
    self.shard_errors = {self.paths[i]: err for i, (_, err) in enumerate(results) if err}
    self._index = np.concatenate([rows for rows, _ in results])  # [examples] of _ENTRY
    for path, err in self.shard_errors.items():
      logging.warning('%s: shard %s: %s (skipped, counted as bad_shards/%s)', name, path, err, name)
    if not (self._index['image_size'] != _BAD_SHARD).any():
      raise ValueError(f'{field}: no example in any of the {len(self.paths)} shards of {paths!r} '
                       f'(empty or unreadable: {dict(itertools.islice(self.shard_errors.items(), 3))})')

  def __len__(self) -> int:
    return len(self._index)

  def __repr__(self) -> str:
    return f'WebDatasetSource({self.name!r}, {len(self.paths)} shards, {len(self)} entries)'

  def _read(self, path: str, start: int, end: int) -> bytes:
    fs, local = fsspec.core.url_to_fs(path)
    return fs.cat_file(local, start=start, end=end)

  def _entry(self, index: int):
    if not 0 <= index < len(self._index):
      raise IndexError(f'index {index} out of range for {self!r}')
    entry = self._index[index]
    path = self.paths[entry['shard']]
    if entry['image_size'] == _BAD_SHARD:
      raise BadRecord(f'{path}: {self.shard_errors.get(path)}', kind='shard')
    return entry, path

  def __getitem__(self, index: int) -> dict:
    if self.caption_ratios:
      return self._hybrid(int(index), image=True)
    entry, path = self._entry(int(index))
    if entry['image_size'] < 0:
      raise BadRecord(f'{path}: example {index} has no image member ({"/".join(self.image_extensions)})')
    if entry['caption_size'] < 0:
      raise BadRecord(f'{path}: example {index} has no .{self.caption_extension} caption')
    start = min(entry['image_offset'], entry['caption_offset'])
    end = max(entry['image_offset'] + entry['image_size'], entry['caption_offset'] + entry['caption_size'])
    try:
      data = self._read(path, int(start), int(end))
    except OSError as e:
      raise BadRecord(f'{path}: cannot read example {index}: {e}') from None
    if len(data) < end - start:
      raise BadRecord(f'{path}: example {index} is truncated ({len(data)} of {end - start} bytes)')
    image = data[entry['image_offset'] - start:entry['image_offset'] - start + entry['image_size']]
    caption = data[entry['caption_offset'] - start:entry['caption_offset'] - start + entry['caption_size']]
    return {'image': image, 'caption': _caption(caption, path, index)}

  def _hybrid(self, index: int, image: bool) -> dict:
    """{'image' (if asked for), 'caption_choices'} of a hybrid-captions example, from one ranged read."""
    entry, path = self._entry(index)
    if image and entry['image_size'] < 0:
      raise BadRecord(f'{path}: example {index} has no image member ({"/".join(self.image_extensions)})')
    spans = {ext: (int(entry[_member_columns(k)[0]]), int(entry[_member_columns(k)[1]]))
             for k, ext in enumerate(self._members)}
    spans = {ext: span for ext, span in spans.items() if span[1] >= 0}
    wanted = list(spans.values()) + ([(int(entry['image_offset']), int(entry['image_size']))] if image else [])
    if not spans:
      raise BadRecord(f'{path}: example {index} has none of the caption members {list(self._members)} '
                      '(config.data.captions)')
    start, end = min(o for o, _ in wanted), max(o + n for o, n in wanted)
    try:
      data = self._read(path, start, end)
    except OSError as e:
      raise BadRecord(f'{path}: cannot read example {index}: {e}') from None
    if len(data) < end - start:
      raise BadRecord(f'{path}: example {index} is truncated ({len(data)} of {end - start} bytes)')
    members: dict[str, object] = {}

    def read(field: str):
      ext, keys = member_path(field)
      if ext not in members:
        offset, size = spans[ext]  # KeyError: the example lacks the member, so the field is not a choice.
        try:
          text = bytes(data[offset - start:offset - start + size]).decode('utf-8')
          members[ext] = json.loads(text) if ext in self._json_members else text
        except ValueError:  # Not UTF-8, or not JSON: no choice from this member.
          members[ext] = None
      value = members[ext]
      for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
      return value

    out = {'caption_choices': hybrid_captions.choices(self.caption_ratios, read, f'{path}: example {index}')}
    if image:
      out['image'] = bytes(data[entry['image_offset'] - start:entry['image_offset'] - start + entry['image_size']])
    return out

  def captions(self, n: int) -> list[str]:
    """Up to `n` captions in index order, bad records skipped: sentences to train a tokenizer on (hybrid
    captions: one drawn per example, from a stream keyed by its index)."""
    if self.caption_ratios:
      read = lambda i: hybrid_captions.draw(self._hybrid(i, image=False)['caption_choices'],
                                            hybrid_captions.stream(i))
      return list(itertools.islice(good_captions(self, read), n))
    return list(itertools.islice(good_captions(self, self._caption_only), n))

  def _caption_only(self, index: int) -> str:
    entry, path = self._entry(index)
    if entry['caption_size'] < 0:
      raise BadRecord('no caption')
    start, size = int(entry['caption_offset']), int(entry['caption_size'])
    data = self._read(path, start, start + size)
    if len(data) < size:
      raise BadRecord('truncated caption')
    return _caption(data, path, index)


def _caption(data: bytes, path: str, index: int) -> str:
  try:
    text = bytes(data).decode('utf-8').strip()
  except UnicodeDecodeError:
    raise BadRecord(f'{path}: example {index}: caption is not UTF-8') from None
  if not text:
    raise BadRecord(f'{path}: example {index}: empty caption')
  return text


def good_captions(source, read) -> Iterable[str]:
  """Yields `read(i)` for i = 0, 1, ... of `source`, skipping records that raise BadRecord or OSError."""
  for i in range(len(source)):
    try:
      yield read(i)
    except (BadRecord, OSError):
      continue
