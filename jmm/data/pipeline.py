"""The input pipeline: a random-access source -> shuffled, repeated, decoded and tokenised batches (Grain).

    indices of source -> shard (this process's slice) -> shuffle(seed) -> repeat(num_epochs)
        -> batch (of indices) -> read the examples, decode images, tokenise captions

All of it is one Grain `MapDataset`: each batch is a pure function of (seed, batch index), so an iterator's
whole state is the index of the next batch ({'next_index': n}, JSON-serialisable) and restoring it resumes
bit-exactly, on any machine. Grain shuffles and batches example *indices*, and the examples are read inside
the per-batch map: Grain's per-element bookkeeping (stats, byte-size estimates) costs ~60 us on an example
dict of arrays but ~15 us on an int, a third of the synthetic source's render time saved. Decoding also runs
once per batch: the uint8 -> float conversion is one vectorised op and SentencePiece gets all captions at once.

Real data (tar shards, ArrayRecord, TFDS; `file_train_iterator`, below) takes another path: its records can be
bad, so examples are decoded one by one and the bad ones filtered out before batching (see that section).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import grain
import numpy as np

from jmm.data import hybrid_captions
from jmm.data import transforms

_UINT32 = 2**32


def stack_examples(examples: Sequence[dict]) -> dict[str, Any]:
  """A list of example dicts -> one dict of stacked arrays [B, ...]; string fields stay lists of strings."""
  out = {}
  for key, value in examples[0].items():
    values = [e[key] for e in examples]
    if isinstance(value, str) or (isinstance(value, tuple) and value and isinstance(value[0], str)):
      out[key] = values  # Captions, phrases: the tokenizer takes them as lists.
    else:
      out[key] = np.stack([np.asarray(v) for v in values])
  return out


# Caption fields a source may hold -> the token field of the batch ('negative_caption': jmm.data.synthetic's
# hard negatives, read by the contrastive objective's hard_negatives option). A source's 'phrases' (one per
# box, '' for padding) become 'text_regions' int32 [B, R, text_len] and 'region_valid' bool [B, R] (CLOC).
TEXT_FIELDS = {'caption': 'text', 'negative_caption': 'text_neg'}
REGION_FIELDS = ('text_regions', 'region_valid')


class _ReadBatch:
  """Grain map: a batch of source indices -> the decoded batch (images in [-1, 1], tokens; other strings dropped).

  A class rather than a closure so the pipeline pickles (Grain worker processes) with source and tokenizer.
  """

  def __init__(self, source, tokenizer, text_len: int):
    self.source = source
    self.tokenizer = tokenizer
    self.text_len = int(text_len)

  def __call__(self, indices) -> dict[str, np.ndarray]:
    batch = stack_examples([self.source[int(i)] for i in indices])
    out = {}
    for key, value in batch.items():
      if key == 'image':
        # Same map as jmm.evaluators.common.images_to_float: uint8 0..255 -> [-1, 1].
        out['image'] = np.asarray(value, np.float32) / 127.5 - 1.0  # [B, H, W, 3]
      elif key in TEXT_FIELDS:
        out[TEXT_FIELDS[key]] = self.tokenizer.encode(value, self.text_len)  # [B, text_len] int32
      elif key == 'phrases':  # Per-object phrases, '' past the last object: region labels (CLOC).
        flat = [p for phrases in value for p in phrases]
        rows, regions = len(value), len(value[0])
        tokens = self.tokenizer.encode(flat, self.text_len)  # [B * R, text_len]
        out['text_regions'] = np.asarray(tokens, np.int32).reshape(rows, regions, self.text_len)
        out['region_valid'] = np.array([[bool(p) for p in phrases] for phrases in value])  # [B, R]
      elif isinstance(value, list):
        continue  # Other string fields (phrases) have no numeric form for the model.
      elif value.dtype.kind == 'f':
        out[key] = value.astype(np.float32)  # boxes [B, max_objects, 4]
      elif value.dtype.kind in 'iu':
        out[key] = value.astype(np.int32)  # [B, ...]; labels and attributes as int32, as JAX prefers.
      else:
        out[key] = value
    if 'text' not in out:
      raise KeyError(f'source examples need a "caption" field to tokenise; they have {sorted(batch)}')
    return out


def make_dataset(source, tokenizer, *, batch_size: int, text_len: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, drop_remainder: bool = True, shard_index: int = 0,
                 shard_count: int = 1, split_batches: bool = False) -> grain.MapDataset:
  """A Grain MapDataset of decoded batches from a random-access `source` of example dicts.

  Batches: image float32 [B, H, W, 3] in [-1, 1]; text int32 [B, text_len]; label int32 [B]; seen bool [B];
  and the source's other numeric fields (ints as int32, floats as float32). Each process reads its own slice
  of the source (`shard_index`::`shard_count`) before shuffling, so processes never share an example, and
  `batch_size` is per process. num_epochs=None repeats forever (each epoch shuffled anew).

  split_batches=True instead shuffles and batches the *whole* source with the global batch (batch_size *
  shard_count) and gives each process its consecutive rows of every global batch: the global batches are then
  the same whatever the process count, so a 2-process run trains on exactly the batches of a 1-process run
  and a checkpoint's data state ({'next_index': n}, the same on every process) resumes under any process count.
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} must be in [0, shard_count={shard_count})')
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f'num_epochs must be positive or None (forever), got {num_epochs}')
  ds = grain.MapDataset.range(len(source))
  if shard_count > 1 and not split_batches:
    ds = ds.slice(slice(shard_index, None, shard_count))
  if shuffle:
    ds = ds.shuffle(seed=int(seed) % _UINT32)  # Grain takes a uint32 seed.
  ds = ds.repeat(num_epochs)
  if split_batches and shard_count > 1:
    ds = ds.batch(batch_size * shard_count, drop_remainder=drop_remainder, batch_fn=list)  # global batch
    ds = ds.map(_RowSlice(shard_index * batch_size, (shard_index + 1) * batch_size))  # this process's rows
  else:
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)  # [B] source indices
  return ds.map(_ReadBatch(source, tokenizer, text_len))


class _RowSlice:
  """Grain map: a list of a global batch's source indices -> this process's consecutive rows of it (picklable)."""

  def __init__(self, start: int, stop: int):
    self.start, self.stop = start, stop

  def __call__(self, indices):
    return indices[self.start:self.stop]


def train_iterator(source, tokenizer, *, batch_size: int, text_len: int, seed: int, shuffle: bool = True,
                   num_epochs: int | None = None, drop_remainder: bool = True, shard_index: int = 0,
                   shard_count: int = 1, num_threads: int = 1, prefetch: int = 2,
                   worker_count: int = 0, split_batches: bool = False) -> grain.DatasetIterator:
  """An iterator over `make_dataset(...)` batches with get_state() / set_state() for exact resumption.

  In-process by default: `num_threads` threads fill a buffer of `prefetch` batches (state stays the index of
  the next batch *returned*, so prefetching never skews a checkpoint). worker_count > 0 renders in that many
  Grain worker processes instead (mp_prefetch): the same batches in the same order, but its state is per
  worker, so restore it with the same count, and close() the iterator when done (Grain's shared-memory
  buffers are otherwise only reclaimed, noisily, at interpreter exit).
  """
  ds = make_dataset(source, tokenizer, batch_size=batch_size, text_len=text_len, seed=seed, shuffle=shuffle,
                    num_epochs=num_epochs, drop_remainder=drop_remainder, shard_index=shard_index,
                    shard_count=shard_count, split_batches=split_batches)
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  if worker_count > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                               per_worker_buffer_size=prefetch))
  return iter(iter_ds)


# ---------------------------------------------------------------------------------------------------------
# Real data (files): sources that may hold bad records, decoded per example, mixed, batched around the bad.
#
#   per source: indices -> shard -> shuffle -> repeat -> read + decode + augment (one example; a bad one
#   becomes a small marker)  ==mix by weight==>  batches of `batch_size` good examples, bad ones counted
#
# Bad records are filtered at the example level, before batching, so every batch keeps its fixed shape (jit)
# and every good example arrives exactly once per epoch; the counts of the bad ones ride in the next batch as
# `batch['data_stats']` ({'bad_records/NAME': n, 'bad_shards/NAME': n}), which is how they cross from Grain
# worker processes to the trainer. The batcher pulls until the batch is full and keeps nothing buffered past
# it, so the iterator state is still the parent's ({'next_index': n}) and resumption stays exact.
# ---------------------------------------------------------------------------------------------------------
class _ReadExample:
  """Grain map_with_index: (position in the stream, source index) -> decoded example, or a bad-record marker.

  The augmentation rng is seeded by (seed, source id, position), so an example's crop is a pure function of
  where it sits in the stream: the same after a resume, different in each epoch. So is the caption a source
  with hybrid captions offers ('caption_choices', jmm.data.hybrid_captions), drawn from a stream of its own
  keyed by the same numbers, which leaves the augmentation's draws as they are.
  """

  def __init__(self, source, transform, seed: int, source_id: int, log_first: int = 5):
    self.source, self.transform = source, transform
    self.seed, self.source_id = int(seed), int(source_id)
    self.log_first = log_first
    self._logged = 0

  def __call__(self, position: int, index) -> dict:
    try:
      record = self.source[int(index)]
      if 'caption_choices' in record:
        record['caption'] = hybrid_captions.draw(
            record['caption_choices'], hybrid_captions.stream(self.seed, self.source_id, int(position)))
      caption = record.get('caption')
      if not isinstance(caption, str) or not caption.strip():
        raise transforms.BadRecord(f'example {int(index)}: missing or empty caption')
      rng = np.random.default_rng([self.seed % _UINT32, self.source_id, int(position)])
      return {'image': self.transform(record['image'], rng), 'caption': caption, 'source': self.source_id}
    except Exception as e:  # pylint: disable=broad-except  (a bad record is counted, never a crash)
      kind = e.kind if isinstance(e, transforms.BadRecord) else 'record'
      if self._logged < self.log_first:
        self._logged += 1
        logging.warning('%s: skipping bad %s: %s: %s', getattr(self.source, 'name', '?'), kind,
                        type(e).__name__, e)
      return {'bad': kind, 'source': self.source_id, 'error': f'{type(e).__name__}: {e}'}


class _GoodBatches(grain.IterDataset):
  """Grain IterDataset: a stream of examples and bad-record markers -> fixed-size batches of good examples."""

  def __init__(self, parent: grain.IterDataset, **kw):
    super().__init__(parent)
    self.kw = kw

  def __iter__(self):
    return _GoodBatchIterator(self._parent.__iter__(), **self.kw)


class _GoodBatchIterator(grain.DatasetIterator):
  """Pulls examples until `batch_size` good ones; counts the bad ones per source and kind into the batch."""

  def __init__(self, parent, *, batch_size: int, tokenizer, text_len: int, names: Sequence[str],
               value_range: Sequence[float], drop_remainder: bool, keep_captions: bool, max_consecutive_bad: int,
               image_shape: tuple[int, ...]):
    super().__init__(parent)
    self.image_shape = tuple(image_shape)  # [H, W, 3]: the shape of an empty last batch's images.
    self.batch_size, self.tokenizer, self.text_len = batch_size, tokenizer, text_len
    self.names, self.value_range = list(names), tuple(value_range)
    self.drop_remainder, self.keep_captions = drop_remainder, keep_captions
    self.max_consecutive_bad = max_consecutive_bad

  def __next__(self) -> dict:
    images, captions, consecutive_bad = [], [], 0
    stats = {f'bad_{kind}s/{name}': 0 for name in self.names for kind in ('record', 'shard')}
    while len(images) < self.batch_size:
      try:
        example = next(self._parent)
      except StopIteration:
        if self.drop_remainder or not (images or any(stats.values())):
          raise
        break  # The last, partial batch (possibly of 0 examples, to carry the counts of trailing bad ones).
      if 'bad' in example:
        stats[f'bad_{example["bad"]}s/{self.names[example["source"]]}'] += 1
        consecutive_bad += 1
        if consecutive_bad >= self.max_consecutive_bad:
          raise RuntimeError(
              f'{consecutive_bad} bad records in a row (the last from {self.names[example["source"]]!r}: '
              f'{example["error"]}): the data looks unreadable; see the warnings above')
        continue
      consecutive_bad = 0
      images.append(example['image'])
      captions.append(example['caption'])
    images = np.stack(images) if images else np.zeros((0,) + self.image_shape, np.uint8)  # [B, H, W, 3]
    out = {'image': transforms.to_value_range(images, self.value_range),
           'text': self.tokenizer.encode(captions, self.text_len) if captions else np.zeros((0, self.text_len),
                                                                                             np.int32),
           'data_stats': stats}
    if self.keep_captions:
      out['caption'] = captions
    return out

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def make_example_dataset(sources: Sequence, transform, *, weights: Sequence[float] | None = None, seed: int,
                         shuffle: bool = True, num_epochs: int | None = None, shard_index: int = 0,
                         shard_count: int = 1) -> grain.MapDataset:
  """The stream of decoded examples (or bad-record markers) of one source or a weighted mixture of several.

  Each source is sliced for this process (`shard_index`::`shard_count`: processes never share an example),
  shuffled with its own seed and repeated, then read and decoded inside the map, so with worker processes the
  decoding happens there. Several sources are mixed by `weights` (`grain.MapDataset.mix`); a mixture repeats
  forever (num_epochs must be None), since epochs of sources of different sizes do not line up.
  """
  if not sources:
    raise ValueError('no data sources given')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} must be in [0, shard_count={shard_count})')
  if len(sources) > 1 and num_epochs is not None:
    raise ValueError(f'a mixture of {len(sources)} sources repeats forever: num_epochs must be None, '
                     f'got {num_epochs}')
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f'num_epochs must be positive or None (forever), got {num_epochs}')
  datasets = []
  for k, source in enumerate(sources):
    if len(source) < shard_count:
      raise ValueError(f'source {getattr(source, "name", k)!r} has {len(source)} entries, fewer than the '
                       f'{shard_count} processes reading it')
    ds = grain.MapDataset.range(len(source))
    if shard_count > 1:
      ds = ds.slice(slice(shard_index, None, shard_count))
    if shuffle:
      ds = ds.shuffle(seed=(int(seed) + 1_000_003 * k) % _UINT32)  # Grain takes a uint32 seed.
    ds = ds.repeat(num_epochs)
    datasets.append(ds.map_with_index(_ReadExample(source, transform, seed, k)))
  if len(datasets) == 1:
    return datasets[0]
  if weights is None or len(weights) != len(datasets) or min(weights) <= 0:
    raise ValueError(f'mixture weights must be {len(datasets)} positive numbers, got {weights}')
  return grain.MapDataset.mix(datasets, [float(w) for w in weights])


def file_train_iterator(sources: Sequence, tokenizer, transform, *, batch_size: int, text_len: int, seed: int,
                        weights: Sequence[float] | None = None, shuffle: bool = True,
                        num_epochs: int | None = None, drop_remainder: bool = True, shard_index: int = 0,
                        shard_count: int = 1, value_range: Sequence[float] = (-1.0, 1.0), num_threads: int = 1,
                        prefetch: int = 2, worker_count: int = 0, keep_captions: bool = False,
                        max_consecutive_bad: int = 1000) -> grain.DatasetIterator:
  """Batches of good examples from file sources (jmm.data.webdataset / array_record / tfds_source), resumable.

  Batches: image float32 [B, H, W, 3] in `value_range`, text int32 [B, text_len], data_stats (bad records
  and shards skipped since the previous batch, per source name), and caption (list of str) if keep_captions.
  Threads (`num_threads`) and worker processes (`worker_count`) as in `train_iterator`; with workers the
  whole per-example path (read, decode, augment) and the batching run in them. Unlike `train_iterator`'s, the
  batches then depend on the count: each worker batches its own share of the example stream (every
  worker_count-th example), so 2 workers give other batches than 0 or 1 (still deterministic, and resumable
  with the same count). `max_consecutive_bad` bad records in a row raise instead of spinning: data that is all
  bad is an error, not a stall.
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  examples = make_example_dataset(sources, transform, weights=weights, seed=seed, shuffle=shuffle,
                                  num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count)
  iter_ds = examples.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                       prefetch_buffer_size=prefetch * batch_size))
  names = [getattr(s, 'name', f'source{k}') for k, s in enumerate(sources)]
  if len(set(names)) != len(names):
    raise ValueError(f'data source names must be distinct (they key the bad-record counts), got {names}')
  iter_ds = _GoodBatches(iter_ds, batch_size=batch_size, tokenizer=tokenizer, text_len=text_len, names=names,
                         value_range=value_range, drop_remainder=drop_remainder, keep_captions=keep_captions,
                         max_consecutive_bad=max_consecutive_bad,
                         image_shape=(getattr(transform, 'resolution', 0),) * 2 + (3,))
  if worker_count > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                               per_worker_buffer_size=prefetch))
  return _TaggedIterator(iter(iter_ds), worker_count)


class _TaggedIterator:
  """A Grain iterator whose state records the worker count, so a resume with another count fails clearly.

  Grain's multi-worker state is per worker: restoring it under another `data.worker_count` would otherwise
  die in Grain with a KeyError deep inside, or silently replay a different order.
  """

  def __init__(self, iterator, worker_count: int):
    self.iterator, self.worker_count = iterator, int(worker_count)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self.iterator)

  def get_state(self) -> dict:
    return {'worker_count': self.worker_count, 'grain': self.iterator.get_state()}

  def set_state(self, state: dict) -> None:
    if 'grain' not in state:
      raise ValueError(f'data iterator state {sorted(state)} is not a file-source state (was the checkpoint '
                       f'written with another config.data.name?)')
    if state.get('worker_count') != self.worker_count:
      raise ValueError(f'the checkpointed data iterator ran with config.data.worker_count='
                       f'{state.get("worker_count")}; resume with that value, not {self.worker_count}')
    self.iterator.set_state(state['grain'])

  def close(self) -> None:
    if hasattr(self.iterator, 'close'):
      self.iterator.close()
