"""Input-pipeline throughput: images/s of read + JPEG decode + resize to 224 + tokenise, from tar and ArrayRecord.

  python benchmarks/data.py [--num_images=512] [--resolution=224] [--batch=64] [--out=benchmarks/results/data.json]

Makes `num_images` synthetic JPEGs of 256-384 px a side (smooth gradients plus noise, quality 90: between a
photo and pure noise in how hard they decode), writes them as WebDataset tar shards and as ArrayRecord shards
(jmm.data.prepare's format), and times `jmm.data.pipeline.file_train_iterator` over them: 1 thread in-process,
then one thread and one worker process per CPU core. It prints a table (images/s of wall time, and per core:
images per CPU-second of this process and its workers) and the machine's load average, and writes everything
as JSON. Timings exclude the first batch (start-up).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from jmm.data import array_record  # noqa: E402
from jmm.data import pipeline  # noqa: E402
from jmm.data import tokenizer as tokenizer_lib  # noqa: E402
from jmm.data import transforms  # noqa: E402
from jmm.data import webdataset  # noqa: E402

_WORDS = ('a photo of a red dog on the beach at sunset near blue water with two people and a small boat in '
          'the distance under a cloudy sky').split()


def make_jpeg(i: int) -> bytes:
  """A 256-384 px JPEG: a smooth colour gradient plus noise."""
  rng = np.random.default_rng(i)
  h, w = (int(x) for x in rng.integers(256, 385, 2))
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  base = rng.uniform(0, 255, 3) + rng.uniform(-0.5, 0.5, 3) * (x[..., None] + y[..., None])
  image = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, 'JPEG', quality=90)
  return buf.getvalue()


def make_caption(i: int) -> str:
  """A 6-15 word caption drawn from a small vocabulary (tokenising cost of a short alt-text)."""
  rng = np.random.default_rng(10_000 + i)
  return ' '.join(rng.choice(_WORDS, int(rng.integers(6, 16))))


def write_shards(folder: str, images: list[bytes], captions: list[str], per_shard: int) -> tuple[str, str]:
  """The same examples as tar shards and ArrayRecord shards; returns the two path patterns."""
  for s in range(0, len(images), per_shard):
    with tarfile.open(os.path.join(folder, f'shard-{s // per_shard:05d}.tar'), 'w') as tar:
      for i in range(s, min(s + per_shard, len(images))):
        for name, data in ((f'{i:09d}.jpg', images[i]), (f'{i:09d}.txt', captions[i].encode()),
                           (f'{i:09d}.json', b'{}')):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    array_record.write_records(os.path.join(folder, f'data-{s // per_shard:05d}.array_record'),
                               (array_record.encode_record(images[i], captions[i], str(i))
                                for i in range(s, min(s + per_shard, len(images)))))
  return os.path.join(folder, 'shard-*.tar'), os.path.join(folder, 'data-*.array_record')


def cpu_seconds() -> float:
  """CPU time (user + system) of this process and its live children (Grain workers), all threads."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
  except ImportError:
    return time.process_time()
  total = 0.0
  me = psutil.Process()
  for proc in [me] + me.children(recursive=True):
    try:
      times = proc.cpu_times()
      total += times.user + times.system
    except psutil.Error:
      pass
  return total


def time_pipeline(source, tok, transform, *, batch: int, images: int, num_threads: int,
                  worker_count: int) -> tuple[float, float]:
  """(images per wall second, images per CPU second) over `images` examples after the first batch.

  Images per CPU second is the per-core rate: on a machine shared with other jobs it stays honest where wall
  time does not (a core lent to someone else costs wall time, not CPU time).
  """
  it = pipeline.file_train_iterator([source], tok, transform, batch_size=batch, text_len=64, seed=0,
                                    num_threads=num_threads, prefetch=4, worker_count=worker_count)
  try:
    next(it)
    start, cpu_start, seen = time.perf_counter(), cpu_seconds(), 0
    while seen < images:
      seen += len(next(it)['text'])
    return seen / (time.perf_counter() - start), seen / (cpu_seconds() - cpu_start)
  finally:
    if hasattr(it, 'close'):
      it.close()


def time_stages(images: list[bytes], captions: list[str], tok, transform, batch: int) -> dict[str, float]:
  """Single-thread microseconds per image of decode + resize alone and of tokenisation alone."""
  start = time.perf_counter()
  for data in images:
    transform(data, np.random.default_rng(0))
  decode = (time.perf_counter() - start) / len(images)
  start = time.perf_counter()
  for s in range(0, len(captions), batch):
    tok.encode(captions[s:s + batch], 64)
  tokenise = (time.perf_counter() - start) / len(captions)
  return {'decode_resize_us': 1e6 * decode, 'tokenise_us': 1e6 * tokenise}


def main() -> None:
  """Runs the benchmark (see the module docstring)."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--num_images', type=int, default=512)
  parser.add_argument('--resolution', type=int, default=224)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--epochs', type=int, default=2, help='passes over the images timed per setting')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                                    'data.json'))
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # Grain worker processes read absl flags; this script parses its own.
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    images = [make_jpeg(i) for i in range(args.num_images)]
    captions = [make_caption(i) for i in range(args.num_images)]
    tar_pattern, ar_pattern = write_shards(tmp, images, captions, per_shard=128)
    tok = tokenizer_lib.train_tokenizer(captions, os.path.join(tmp, 'sp.model'), 64)
    print(f'made {args.num_images} JPEGs (mean {np.mean([len(b) for b in images]) / 1024:.0f} KiB) in '
          f'{time.perf_counter() - t0:.1f}s; {cores} CPU cores', flush=True)
    sources = {'tar': webdataset.WebDatasetSource(tar_pattern, name='tar'),
               'array_record': array_record.ArrayRecordSource(ar_pattern, name='array_record')}
    count = args.epochs * args.num_images
    rows = []
    settings = [('resize', 1, 0), ('resize', cores, 0), ('resize', 1, cores), ('random_resized_crop', 1, 0)]
    for name, source in sources.items():
      for mode, threads, workers in settings:
        transform = transforms.ImageTransform(args.resolution, mode)
        ips, per_cpu = time_pipeline(source, tok, transform, batch=args.batch, images=count, num_threads=threads,
                                     worker_count=workers)
        rows.append(dict(source=name, transform=mode, threads=threads, workers=workers, images_per_s=ips,
                         images_per_cpu_s=per_cpu))
        print(f'  {name:12s} {mode:20s} threads={threads} workers={workers}: {ips:7.1f} images/s, '
              f'{per_cpu:7.1f} per CPU-second', flush=True)
    stages = time_stages(images[:128], captions, tok, transforms.ImageTransform(args.resolution, 'resize'),
                         args.batch)
  load = os.getloadavg()
  print(f'\nInput pipeline at {args.resolution} px, batch {args.batch} ({platform.processor() or "cpu"}, '
        f'{cores} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} during the run)')
  print(f'{"source":13s} {"transform":20s} {"threads":>7s} {"workers":>7s} {"images/s":>9s} '
        f'{"per core (images/CPU-s)":>24s}')
  for r in rows:
    print(f'{r["source"]:13s} {r["transform"]:20s} {r["threads"]:7d} {r["workers"]:7d} '
          f'{r["images_per_s"]:9.1f} {r["images_per_cpu_s"]:24.1f}')
  print(f'single thread, per image: decode + resize {stages["decode_resize_us"]:.0f} us, '
        f'tokenise {stages["tokenise_us"]:.1f} us')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'resolution': args.resolution, 'batch': args.batch, 'num_images': args.num_images,
               'cores': cores, 'load_average': load, 'rows': rows, 'stages': stages}, f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
