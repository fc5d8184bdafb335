"""The data side of the training seam: the source, the train iterator, the tokenizer and the batch spec that
`config.data` and `config.tokenizer` describe. Each reads only its own config sections.
"""
from __future__ import annotations

import jax
import numpy as np

from jmm.data import hybrid_captions
from jmm.data import pipeline
from jmm.data import synthetic
from jmm.data import tokenizer as tokenizer_lib
from jmm.errors import ConfigError

NAMES = ('synthetic', 'webdataset', 'array_record', 'tfds', 'mixture')
TRANSFORMS = ('resize', 'resize_crop', 'random_resized_crop')


def validate(config) -> None:
  """Checks config.data (and config.tokenizer) before any work; raises ConfigError naming the field."""
  from jmm import config as config_lib  # pylint: disable=g-import-not-at-top
  data = config.data
  config_lib.check_choice(config, 'data.name', NAMES)
  config_lib.check_choice(config, 'data.transform', TRANSFORMS)
  for field in ('data.resolution', 'data.text_len'):
    config_lib.check_positive_int(config, field)
  prob = data.get('short_caption_prob', 0.0)
  if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
    raise ConfigError(f'config.data.short_caption_prob must be a number in [0, 1], got {prob!r}')
  negatives = data.get('negative_captions', '')
  try:
    swaps = synthetic.parse_swaps(negatives)
  except ValueError as e:
    raise ConfigError(f'config.data.{e}') from None
  if (swaps or prob) and data.name != 'synthetic':
    raise ConfigError(
        f'config.data.negative_captions={negatives!r} / short_caption_prob={prob} are synthetic-data caption '
        f'augmentations, but data.name={data.name!r}: name the data in the config argument '
        f'(configs/siglip.py:data={data.name}), which leaves them off, or set both off')
  check_captions(data.get('captions', ''), 'data.captions', synthetic_data=data.name == 'synthetic')
  if data.name != 'synthetic':
    from jmm.data import mixture  # pylint: disable=g-import-not-at-top  (file sources only when asked for)
    try:
      mixture.validate_data(data)
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(str(e)) from None


def check_captions(value, field: str, synthetic_data: bool) -> dict[str, float]:
  """A hybrid-captions mix (`config.<field>`, jmm.data.hybrid_captions) -> {name: ratio}; ConfigError naming
  the field when it does not parse, or names a caption style the synthetic data lacks."""
  try:
    ratios = hybrid_captions.parse(value)
  except ValueError as e:
    raise ConfigError(f"config.{field}={value!r}: {e} (expected e.g. 'alt_text=0.5,caption=0.5')") from None
  unknown = sorted(set(ratios) - set(synthetic.CAPTION_STYLES)) if synthetic_data else []
  if unknown:
    raise ConfigError(f'config.{field}={value!r}: the synthetic data has no caption field {unknown[0]!r}; its '
                      f'fields: {list(synthetic.CAPTION_STYLES)}')
  return ratios


def make_source(config, split: str = 'train'):
  """The training data source named by `config.data.name`: synthetic, a file source, or a SourceMixture."""
  data = config.data
  if data.name == 'synthetic':
    return synthetic.SyntheticCaptions(split, resolution=data.resolution, seed=data.seed,
                                       max_objects=data.max_objects,
                                       short_caption_prob=data.get('short_caption_prob', 0.0),
                                       negative_captions=data.get('negative_captions', ''),
                                       captions=data.get('captions', '') or None)
  from jmm.data import mixture  # pylint: disable=g-import-not-at-top
  try:
    return mixture.make_sources(data, split)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from None


def batch_spec(config, batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of the model inputs every pipeline yields: 'image' float32 [B, res, res, 3] in the
  configured value range and 'text' int32 [B, text_len] (models initialise from it; no data is read)."""
  res, text_len = config.data.resolution, config.data.text_len
  return {'image': jax.ShapeDtypeStruct((batch_size, res, res, 3), np.float32),
          'text': jax.ShapeDtypeStruct((batch_size, text_len), np.int32)}


def batch_fields(config) -> tuple[str, ...]:
  """Every field a training batch holds: the synthetic data's labels and boxes too; file sources image + text."""
  if config.data.name != 'synthetic':
    return tuple(batch_spec(config))
  example = synthetic.SyntheticCaptions('train', resolution=8, num_examples=1, seed=0,
                                        max_objects=config.data.max_objects,
                                        negative_captions=config.data.get('negative_captions', ''))[0]
  fields = {pipeline.TEXT_FIELDS.get(k, k) for k, v in example.items() if k in pipeline.TEXT_FIELDS or
            not isinstance(v, str) and not (isinstance(v, (list, tuple)) and v and isinstance(v[0], str))}
  if 'phrases' in example:
    fields.update(pipeline.REGION_FIELDS)
  return tuple(sorted(fields))


def make_train_iterator(config, tokenizer, per_process_batch: int, process_index: int, process_count: int):
  """This process's iterator of training batches (its slice of the data), with get_state / set_state.

  File sources skip and count bad records: each batch carries `data_stats` (per source) for the trainer.
  """
  data = config.data
  knobs = dict(num_threads=data.get('num_threads', 1), prefetch=data.get('prefetch', 2),
               worker_count=data.get('worker_count', 0))
  source = make_source(config)
  if data.name == 'synthetic':
    return pipeline.train_iterator(
        source, tokenizer, batch_size=per_process_batch, text_len=data.text_len, seed=config.seed,
        shard_index=process_index, shard_count=process_count, split_batches=True, **knobs)
  from jmm.data import mixture  # pylint: disable=g-import-not-at-top
  sources, weights = (source.sources, source.weights) if isinstance(source, mixture.SourceMixture) else (
      [source], None)
  return pipeline.file_train_iterator(
      sources, tokenizer, mixture.make_transform(data), weights=weights, batch_size=per_process_batch,
      text_len=data.text_len, seed=config.seed, shard_index=process_index, shard_count=process_count,
      value_range=tuple(data.get('value_range', (-1.0, 1.0))),
      max_consecutive_bad=data.get('max_consecutive_bad', 1000), **knobs)


def make_tokenizer(config, workdir: str):
  """Loads `config.tokenizer.path`, or trains (once, cached in the workdir) a SentencePiece model."""
  path = config.tokenizer.get('path') or None
  source = make_source(config)
  return tokenizer_lib.get_tokenizer(
      path, workdir, lambda: source.captions(config.tokenizer.get('train_sentences', 20000)),
      config.tokenizer.vocab_size, pad_id=config.tokenizer.get('pad_id', tokenizer_lib.PAD_ID),
      canonicalize=config.tokenizer.get('canonicalize', False))
