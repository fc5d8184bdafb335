"""Real-data sources from a config: one source (webdataset / array_record / tfds) or a weighted mixture.

`config.data.name` picks the kind; 'mixture' reads `config.data.mixture`, a list of entries

    dict(name='laion', type='webdataset', weight=0.7, paths='gs://bucket/laion-{00000..09999}.tar')
    dict(name='cc12m', type='array_record', weight=0.3, paths='/data/cc12m/*.array_record')

each with the single-source fields (paths, image_key, caption_key, tfds_name, split, data_dir) it needs, and
optionally its own hybrid-captions mix `captions` (else config.data.captions; jmm.data.hybrid_captions). A
source's name keys its bad-record counts in the metrics (`data/bad_records/laion`). Sources are built once
per process and cached by their fields: the trainer asks for them twice (tokenizer, iterator), and indexing
tar shards reads every header.
"""
from __future__ import annotations

import itertools
import json
from typing import Sequence

from jmm.data import transforms

KINDS = ('webdataset', 'array_record', 'tfds')
_CACHE: dict[str, object] = {}


class SourceMixture:
  """Several named sources with mixing weights; `captions(n)` samples tokenizer sentences by weight."""

  def __init__(self, sources: Sequence, weights: Sequence[float]):
    if len(sources) != len(weights) or not sources:
      raise ValueError(f'a mixture needs one weight per source, got {len(sources)} sources, weights {weights}')
    self.sources, self.weights = list(sources), [float(w) for w in weights]

  def __len__(self) -> int:
    return sum(len(s) for s in self.sources)

  def __repr__(self) -> str:
    return f'SourceMixture({[(s.name, w) for s, w in zip(self.sources, self.weights)]})'

  def captions(self, n: int) -> list[str]:
    """About `n` captions, taken from each source in proportion to its weight."""
    total = sum(self.weights)
    per_source = [max(1, round(n * w / total)) for w in self.weights]
    return list(itertools.chain.from_iterable(s.captions(k) for s, k in zip(self.sources, per_source)))


def _field(entry, key: str, default=''):
  value = entry.get(key, default) if hasattr(entry, 'get') else default
  return default if value is None else value


def build_source(entry, *, kind: str, name: str, split: str = 'train', field: str = 'config.data'):
  """One source of `kind` from a config entry (ConfigDict or dict); errors name `field`."""
  from jmm.data import array_record, tfds_source, webdataset  # pylint: disable=g-import-not-at-top
  image_key, caption_key = _field(entry, 'image_key'), _field(entry, 'caption_key')
  captions = _captions(entry, field) or None  # None: the source's one caption (caption_key), as without a mix.
  if kind in ('webdataset', 'array_record') and not _field(entry, 'paths'):
    raise ValueError(f'{field}.paths is empty: data.name={kind!r} needs shard paths or patterns, e.g. '
                     f'--config.data.paths=/data/shards-{{00000..00099}}.tar')
  paths_field = f'{field}.paths'.removeprefix('config.')
  if kind == 'webdataset':
    exts = (image_key,) if image_key else webdataset.IMAGE_EXTENSIONS
    return webdataset.WebDatasetSource(_field(entry, 'paths'), name=name, image_extensions=exts,
                                       caption_extension=caption_key or 'txt',
                                       index_cache=_field(entry, 'index_cache'), field=paths_field,
                                       captions=captions)
  if kind == 'array_record':
    return array_record.ArrayRecordSource(_field(entry, 'paths'), name=name, image_key=image_key or 'image',
                                          caption_key=caption_key or 'caption', field=paths_field,
                                          captions=captions)
  if kind == 'tfds':
    tfds_name = _field(entry, 'tfds_name')
    if not tfds_name:
      raise ValueError(f'{field}.tfds_name is empty: data.name="tfds" needs a prepared TFDS data set name')
    return tfds_source.TfdsSource(tfds_name, _field(entry, 'split') or split, data_dir=_field(entry, 'data_dir'),
                                  image_key=image_key or 'image', caption_key=caption_key or 'caption',
                                  source_name=name, captions=captions)
  raise ValueError(f'{field}: unknown data source type {kind!r}; known: {list(KINDS)}')


def _captions(entry, field: str) -> dict[str, float]:
  """An entry's hybrid-captions mix ({} when unset); ValueError naming `field`.captions."""
  from jmm.data import hybrid_captions  # pylint: disable=g-import-not-at-top
  value = _field(entry, 'captions')
  try:
    return hybrid_captions.parse(value)
  except ValueError as e:
    raise ValueError(f"{field}.captions={value!r}: {e} (expected e.g. 'txt=0.5,json/alt=0.5')") from None


def make_sources(data, split: str = 'train'):
  """The source (or SourceMixture) named by a `config.data` block; cached per process by its fields."""
  as_dict = data.to_dict() if hasattr(data, 'to_dict') else dict(data)
  key = json.dumps({'split': split, **as_dict}, sort_keys=True, default=str)
  if key in _CACHE:
    return _CACHE[key]
  if as_dict['name'] == 'mixture':
    entries = list(as_dict.get('mixture') or ())
    if not entries:
      raise ValueError('config.data.mixture is empty: data.name="mixture" needs entries like '
                       'dict(name="laion", type="webdataset", weight=1.0, paths="...")')
    sources, weights = [], []
    for i, entry in enumerate(entries):
      field = f'config.data.mixture[{i}]'
      for required in ('name', 'type', 'weight'):
        if required not in entry:
          raise ValueError(f'{field} is missing {required!r} (has {sorted(entry)})')
      if not float(entry['weight']) > 0:
        raise ValueError(f'{field}.weight must be positive, got {entry["weight"]!r}')
      if not entry.get('captions'):  # The entry's own mix, else the data's.
        entry = dict(entry, captions=as_dict.get('captions', ''))
      sources.append(build_source(entry, kind=entry['type'], name=entry['name'], split=split, field=field))
      weights.append(float(entry['weight']))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
      raise ValueError(f'config.data.mixture: source names must be distinct, got {names}')
    result = SourceMixture(sources, weights)
  else:
    result = build_source(data, kind=as_dict['name'], name=as_dict['name'], split=split)
  _CACHE[key] = result
  return result


def make_transform(data) -> transforms.ImageTransform:
  """The image transform of a `config.data` block: resolution, mode ('resize' unless set), crop scale, draft
  (JPEG reduced-scale decoding; default on)."""
  return transforms.ImageTransform(data.resolution, mode=data.get('transform', 'resize') or 'resize',
                                   crop_scale=tuple(data.get('crop_scale', (0.9, 1.0))),
                                   draft=bool(data.get('draft', True)))


def validate_data(data) -> None:
  """Cheap checks of a non-synthetic `config.data` block; raises ValueError / FileNotFoundError naming the field.

  Shard patterns must match at least one file (a glob per pattern, no shard is opened); the knobs must be in
  range. Damaged shards are found later, counted, not refused here.
  """
  from jmm.data import webdataset  # pylint: disable=g-import-not-at-top
  for knob, low in (('worker_count', 0), ('num_threads', 1), ('prefetch', 1), ('max_consecutive_bad', 1)):
    value = data.get(knob, low)
    if not isinstance(value, int) or value < low:
      raise ValueError(f'config.data.{knob} must be an integer >= {low}, got {value!r}')
  value_range = tuple(data.get('value_range', (-1.0, 1.0)))
  if len(value_range) != 2 or not value_range[0] < value_range[1]:
    raise ValueError(f'config.data.value_range must be (low, high) with low < high, got {value_range}')
  entries = ([(f'config.data.mixture[{i}]', e, e.get('type')) for i, e in enumerate(data.get('mixture') or ())]
             if data.name == 'mixture' else [('config.data', data, data.name)])
  if not entries:
    raise ValueError('config.data.mixture is empty: data.name="mixture" needs entries like '
                     'dict(name="laion", type="webdataset", weight=1.0, paths="...")')
  for field, entry, kind in entries:
    if kind not in KINDS:
      raise ValueError(f'{field}.type={kind!r} is not one of {list(KINDS)}')
    _captions(entry, field)
    if kind in ('webdataset', 'array_record'):
      if not _field(entry, 'paths'):
        raise ValueError(f'{field}.paths is empty: data.name={kind!r} needs shard paths or patterns')
      webdataset.expand_paths(_field(entry, 'paths'), f'{field}.paths'.removeprefix('config.'))
    elif not _field(entry, 'tfds_name'):
      raise ValueError(f'{field}.tfds_name is empty: a tfds source needs a prepared TFDS data set name')
