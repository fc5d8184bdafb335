"""Turns images with captions into ArrayRecord shards that `data.name='array_record'` trains on.

  python -m jmm.data.prepare --images=DIR --out=OUT [--shard_size=10000]
  python -m jmm.data.prepare --captions=pairs.csv --out=OUT     (or .jsonl; columns/keys: path, caption)

--images: every image under DIR (recursively; jpg, jpeg, png, webp) whose caption is the text file beside it
with the same stem (`cat.jpg` + `cat.txt`). --captions: a CSV with a header, or JSON lines, naming each image
`path` (relative to the file's folder, or absolute) and its `caption`; --path_column / --caption_column
rename them. Images are checked by a full decode and stored as they are (no re-encoding), unless --max_size
asks to shrink the longer side (then re-encoded as JPEG, quality 95). Records are msgpack maps {'image',
'caption', 'key'} (format: jmm/data/array_record.py), written in input order to OUT/PREFIX-00000.array_record,
... with `shard_size` records each, plus OUT/PREFIX.json with the counts. Unreadable images, missing or empty
captions are skipped and counted, never fatal; a progress line goes to stderr.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import json
import os
import sys
import time
from typing import Iterable, Sequence

from PIL import Image

from jmm.data import array_record

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')


def find_images(folder: str) -> list[tuple[str, str | None]]:
  """(image path, caption or None) for every image under `folder`, captions from sibling STEM.txt files."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'--images={folder!r} is not a directory')
  out = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in IMAGE_EXTENSIONS:
        continue
      caption_path = os.path.join(root, stem + '.txt')
      caption = None
      if os.path.isfile(caption_path):
        with open(caption_path, encoding='utf-8', errors='replace') as f:
          caption = f.read()
      out.append((os.path.join(root, name), caption))
  return out


def read_caption_file(path: str, path_column: str = 'path',
                      caption_column: str = 'caption') -> list[tuple[str, str | None]]:
  """(image path, caption) rows of a CSV (with a header) or JSONL file; relative paths are from its folder."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--captions={path!r} does not exist')
  base = os.path.dirname(os.path.abspath(path))
  rows = []
  with open(path, encoding='utf-8', newline='') as f:
    if path.lower().endswith(('.jsonl', '.json')):
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f'{path}:{n}: not a JSON object: {e}') from None
    elif path.lower().endswith(('.csv', '.tsv')):
      rows = list(csv.DictReader(f, delimiter='\t' if path.lower().endswith('.tsv') else ','))
    else:
      raise ValueError(f'--captions={path!r}: expected a .csv, .tsv or .jsonl file')
  if rows and (path_column not in rows[0] or caption_column not in rows[0]):
    raise ValueError(f'{path}: rows need {path_column!r} and {caption_column!r} fields (found {sorted(rows[0])}); '
                     f'see --path_column / --caption_column')
  return [(os.path.join(base, str(r.get(path_column) or '')), r.get(caption_column)) for r in rows]


def _encode_one(image_path: str, caption: str | None, max_size: int) -> tuple[bytes | None, str]:
  """(record bytes, '') or (None, reason skipped)."""
  caption = (caption or '').strip()
  if not caption:
    return None, 'missing_caption'
  try:
    with open(image_path, 'rb') as f:
      data = f.read()
    image = Image.open(io.BytesIO(data))
    image.load()  # A full decode: truncated and corrupt files fail here, not in training.
    if max_size and max(image.size) > max_size:
      scale = max_size / max(image.size)
      image = image.convert('RGB').resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                          Image.BICUBIC)
      buf = io.BytesIO()
      image.save(buf, 'JPEG', quality=95)
      data = buf.getvalue()
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return None, 'bad_image'
  return array_record.encode_record(data, caption, key=os.path.basename(image_path)), ''


class _Progress:
  """A one-line progress bar on stderr: done/total, rate, ETA, skipped; redrawn at most 4 times a second."""

  def __init__(self, total: int, stream=None, width: int = 30):
    self.total, self.stream, self.width = total, stream or sys.stderr, width
    self.start = self.last = time.perf_counter()

  def update(self, done: int, skipped: int, final: bool = False) -> None:
    now = time.perf_counter()
    if not final and now - self.last < 0.25:
      return
    self.last = now
    frac = done / self.total if self.total else 1.0
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else 0.0
    bar = '#' * int(frac * self.width) + '.' * (self.width - int(frac * self.width))
    self.stream.write(f'\r[{bar}] {done}/{self.total} ({100 * frac:.1f}%) {rate:.0f} img/s, ETA {eta:.0f}s, '
                      f'{skipped} skipped' + ('\n' if final else ''))
    self.stream.flush()


def prepare(examples: Sequence[tuple[str, str | None]], out_dir: str, *, shard_size: int = 10_000,
            prefix: str = 'data', max_size: int = 0, threads: int = 0, progress: bool = True) -> dict:
  """Writes `examples` (image path, caption) as ArrayRecord shards in `out_dir`; returns the counts.

  Decoding runs on `threads` threads (0: one per CPU); records keep the input order, so the same input gives
  the same shards.
  """
  if shard_size <= 0:
    raise ValueError(f'--shard_size must be positive, got {shard_size}')
  os.makedirs(out_dir, exist_ok=True)
  counts = {'written': 0, 'missing_caption': 0, 'bad_image': 0}
  paths, shard, bar = [], [], _Progress(len(examples)) if progress else None

  def flush():
    path = os.path.join(out_dir, f'{prefix}-{len(paths):05d}.array_record')
    array_record.write_records(path, shard)
    paths.append(path)
    shard.clear()

  with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
    results = pool.map(lambda e: _encode_one(e[0], e[1], max_size), examples, chunksize=16)
    for done, (record, reason) in enumerate(results, 1):
      if record is None:
        counts[reason] += 1
      else:
        shard.append(record)
        counts['written'] += 1
        if len(shard) == shard_size:
          flush()
      if bar:
        bar.update(done, done - counts['written'])
  if shard:
    flush()
  if bar:
    bar.update(len(examples), len(examples) - counts['written'], final=True)
  summary = {**counts, 'shards': [os.path.basename(p) for p in paths], 'format': 'msgpack {image, caption, key}'}
  with open(os.path.join(out_dir, f'{prefix}.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv: Iterable[str] | None = None) -> int:
  """Command-line entry point (see the module docstring); returns the exit status."""
  parser = argparse.ArgumentParser(prog='python -m jmm.data.prepare', description=__doc__.split('\n\n')[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--images', help='folder of images with STEM.txt captions beside them')
  source.add_argument('--captions', help='CSV (with header) or JSONL of image path + caption')
  parser.add_argument('--out', required=True, help='output folder for the .array_record shards')
  parser.add_argument('--shard_size', type=int, default=10_000, help='records per shard')
  parser.add_argument('--prefix', default='data', help='shard file name prefix')
  parser.add_argument('--max_size', type=int, default=0, help='shrink images whose longer side exceeds this')
  parser.add_argument('--threads', type=int, default=0, help='decode threads (0: one per CPU)')
  parser.add_argument('--path_column', default='path')
  parser.add_argument('--caption_column', default='caption')
  args = parser.parse_args(argv)
  try:
    examples = (find_images(args.images) if args.images else
                read_caption_file(args.captions, args.path_column, args.caption_column))
    if not examples:
      raise ValueError(f'no images found in {args.images or args.captions!r}')
    summary = prepare(examples, args.out, shard_size=args.shard_size, prefix=args.prefix,
                      max_size=args.max_size, threads=args.threads)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {summary["written"]} records in {len(summary["shards"])} shards to {args.out} '
        f'(skipped: {summary["missing_caption"]} missing captions, {summary["bad_image"]} bad images)')
  if not summary['written']:
    print('error: no usable example', file=sys.stderr)
    return 1
  print(f'train on them: --config.data.name=array_record --config.data.paths="{args.out}/{args.prefix}-*.array_record"')
  return 0


if __name__ == '__main__':
  sys.exit(main())
