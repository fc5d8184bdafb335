"""Helpers shared by the evaluators: the eval data a config names, materialised, and embedded in fixed batches.

Evaluators see the model only through two callables:
`embed_images(float32 [N, H, W, 3] in [-1, 1]) -> [N, D]` and `embed_texts(int32 [N, L]) -> [N, D]`, both
L2-normalised. Everything here is host-side numpy: evaluation sets are small (thousands of examples).

An eval's data is a dict shaped like `config.data` (see `data_with_defaults`): the synthetic data set, rendered
in memory, or a file source (webdataset / array_record / tfds, and the evaluation-only folder / captions_file),
decoded and resized to `resolution` by `jmm.evaluators.file_data`, which also reads integer class labels
(`label_key`) and lists of captions (`captions_key`) from the same examples. `validate_data` checks such a dict
and raises ConfigError naming the field.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from jmm.errors import ConfigError

# Fields `load_split` reads by default: enough for every evaluator in this package.
DEFAULT_FIELDS = ('image', 'caption', 'label', 'seen', 'colour', 'shape')


def get(config, name: str, default: Any) -> Any:
  """`config.get(name, default)` that also treats a field set to None as unset (and accepts config=None)."""
  if config is None:
    return default
  value = config.get(name, None)
  return default if value is None else value


def l2_normalise(x, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
  """Divides `x` by its L2 norm along `axis`; `eps` keeps an all-zero row finite (it stays zero)."""
  x = np.asarray(x, dtype=np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def images_to_float(images) -> np.ndarray:
  """uint8 [..., H, W, 3] -> float32 in [-1, 1], the range `embed_images` expects (same map as the pipeline)."""
  return np.asarray(images, dtype=np.float32) / 127.5 - 1.0


def embed_in_batches(fn: Callable, array, batch_size: int) -> np.ndarray:
  """Applies `fn` to `array` in batches of exactly `batch_size` rows and returns the concatenated outputs.

  The last batch is padded (by repeating its final row, so a function that normalises never sees an all-zero
  input) up to a full batch and the padding rows are trimmed from the result: a jitted `fn` is traced for one
  shape only, and a sharded `fn` always gets a batch that divides over its devices.
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  array = np.asarray(array)
  n = array.shape[0]
  if n == 0:
    raise ValueError('embed_in_batches got an empty array; there is nothing to embed')
  outputs = []
  for start in range(0, n, batch_size):
    batch = array[start:start + batch_size]
    valid = batch.shape[0]
    if valid < batch_size:
      pad = [(0, batch_size - valid)] + [(0, 0)] * (batch.ndim - 1)
      batch = np.pad(batch, pad, mode='edge')
    out = np.asarray(fn(batch))
    if out.shape[0] != batch_size:
      raise ValueError(f'fn returned {out.shape[0]} rows for a batch of {batch_size}')
    outputs.append(out[:valid])
  return np.concatenate(outputs, axis=0)


def embed_images_in_batches(embed_images: Callable, images_uint8, batch_size: int) -> np.ndarray:
  """Embeds uint8 images [N, H, W, 3] -> [N, D], converting each batch to [-1, 1] floats only when it is used.

  Converting per batch keeps the materialised split in uint8 (4x smaller than float32 at high resolution).
  """
  return embed_in_batches(lambda x: embed_images(images_to_float(x)), images_uint8, batch_size)


def embed_texts_in_batches(embed_texts: Callable, tokenizer, texts: Sequence[str], text_len: int,
                           batch_size: int) -> np.ndarray:
  """Tokenises `texts` to int32 [N, text_len] with `tokenizer.encode` and embeds them -> [N, D].

  Warns when texts were truncated (no eos left in the row): a prompt cut before its class name is silently
  a different prompt, and the metric then says more about text_len than about the model.
  """
  tokens = np.asarray(tokenizer.encode(list(texts), text_len), dtype=np.int32)  # [N, text_len]
  truncated = ~np.any(tokens == getattr(tokenizer, 'eos_id', 1), axis=1)  # [N]
  if truncated.any():
    logging.warning('%d of %d texts are longer than text_len=%d tokens and were truncated, e.g. %r',
                    int(truncated.sum()), len(tokens), text_len, texts[int(np.argmax(truncated))])
  return embed_in_batches(embed_texts, tokens, batch_size)


def load_split(source, num_examples: int | None = None,
               fields: Sequence[str] = DEFAULT_FIELDS) -> dict[str, Any]:
  """Reads the first `num_examples` examples of a random-access `source` into one array per field.

  Images stay uint8 [N, H, W, 3] (see `embed_images_in_batches`); string fields become a list[str] (what a
  tokenizer takes); every other field is stacked into a numpy array [N, ...]. The arrays are marked read-only
  because `synthetic_split` caches and shares them between evaluators.
  """
  n = len(source) if num_examples is None else min(int(num_examples), len(source))
  if n <= 0:
    raise ValueError(f'load_split needs at least one example; source has {len(source)}, asked for {num_examples}')
  columns: dict[str, list] = {f: [] for f in fields}
  for i in range(n):
    example = source[i]
    for f in fields:
      if f not in example:
        raise KeyError(f'source example has no field {f!r}; it has {sorted(example)}')
      columns[f].append(example[f])
  out: dict[str, Any] = {}
  for f, values in columns.items():
    if isinstance(values[0], str):
      out[f] = list(values)
    else:
      array = np.stack([np.asarray(v) for v in values])
      array.setflags(write=False)
      out[f] = array
  return out


@functools.lru_cache(maxsize=4)
def _cached_synthetic(split: str, resolution: int, num_examples: int, seed: int, max_objects: int):
  from jmm.data import synthetic  # Local import: evaluators must import without the data code built.
  source = synthetic.SyntheticCaptions(split, resolution=resolution, num_examples=num_examples, seed=seed,
                                       max_objects=max_objects)
  return load_split(source, num_examples)


def synthetic_split(split: str, config, *, num_examples: int, max_objects: int = 1) -> dict[str, Any]:
  """Materialises `num_examples` examples of SyntheticCaptions(split) at config.resolution / config.seed.

  Cached (the last few distinct splits): zero-shot and retrieval share the same held-out split, and evaluations
  at every eval step re-use it instead of re-rendering it. Callers must not modify the returned arrays.
  """
  return dict(_cached_synthetic(split, int(get(config, 'resolution', 32)), int(num_examples),
                                int(get(config, 'seed', 0)), int(max_objects)))


def synthetic_classes() -> tuple[list[str], int]:
  """Returns (CLASS_NAMES, len(SHAPES)) of the synthetic data: class id = colour_idx * num_shapes + shape_idx."""
  from jmm.data import synthetic  # Local import, as in `_cached_synthetic`.
  return list(synthetic.CLASS_NAMES), len(synthetic.SHAPES)


# ----------------------------------------------------------------------------------------------------------
# Eval data from a config: a dict shaped like `config.data`.
# ----------------------------------------------------------------------------------------------------------
DATA_NAMES = ('synthetic', 'webdataset', 'array_record', 'tfds', 'folder', 'captions_file')
FILE_DATA_NAMES = DATA_NAMES[1:]
LISTING_NAMES = ('folder', 'captions_file')  # Evaluation-only file sources, named by `path` (one directory / file).
EVAL_TRANSFORMS = ('resize', 'resize_crop')  # Deterministic: an eval set must be the same at every eval step.
SYNTHETIC_NUM_EXAMPLES = 2000  # Default num_examples of the synthetic data; file sources default to all.
DATA_DEFAULTS = dict(split='test', num_examples=None, resolution=32, seed=0, max_objects=1)


def as_dict(config) -> dict[str, Any]:
  """A ConfigDict, a mapping or None as a plain dict (nested ConfigDicts too)."""
  if config is None:
    return {}
  if hasattr(config, 'to_dict'):
    return config.to_dict()
  return dict(config)


def data_with_defaults(data, **overrides) -> dict[str, Any]:
  """An eval's data dict (ConfigDict or dict) with `overrides` applied and defaults filled in.

  Defaults: split 'test', resolution 32, seed 0, max_objects 1 and num_examples 2000 for the synthetic data
  (all examples of a file source); None counts as unset. Other fields (paths, path, image_key, caption_key,
  captions_key, image_root, tfds_name, data_dir, transform, index_cache...) pass through to the source.
  """
  out = {k: v for k, v in as_dict(data).items() if v is not None}
  out.update({k: v for k, v in overrides.items() if v is not None})
  for key, value in DATA_DEFAULTS.items():
    out.setdefault(key, value)
  if out.get('name') == 'synthetic' and out['num_examples'] is None:
    out['num_examples'] = SYNTHETIC_NUM_EXAMPLES
  return out


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def validate_data(data, field: str = 'data', prefix: str = '') -> None:
  """Cheap checks of an eval's data dict (no example is read); raises ConfigError naming `{prefix}{field}.X`.

  File patterns must match at least one file (a glob per pattern, as `jmm.data.mixture.validate_data`).
  """
  where = f'{prefix}{field}'
  if data is None or not hasattr(data, 'get'):
    raise ConfigError(f'{where} must be a dict like config.data (name, split, num_examples, ...), got {data!r}')
  data = data_with_defaults(data)
  name = data.get('name')
  if name not in DATA_NAMES:
    raise ConfigError(f'{where}.name={name!r} is not one of {list(DATA_NAMES)}')
  for key in ('resolution', 'num_examples'):
    value = data[key]
    if value is not None and (not _is_int(value) or value <= 0):
      raise ConfigError(f'{where}.{key} must be a positive integer, got {value!r}')
  if not isinstance(data['split'], str) or not data['split']:
    raise ConfigError(f'{where}.split must be a split name like "test", got {data["split"]!r}')
  captions_key = data.get('captions_key')
  if captions_key is not None:
    if name in ('synthetic', 'folder', 'captions_file'):
      raise ConfigError(f'{where}.captions_key={captions_key!r} is set, but data.name={name!r} takes none ('
                        + ('its captions come from caption_key)' if name == 'captions_file' else
                           'it has no caption lists)'))
    if not isinstance(captions_key, str) or not captions_key.strip('/'):
      raise ConfigError(f'{where}.captions_key must be a non-empty string (a member, key or feature holding a '
                        f'list of captions), got {captions_key!r}')
  if data.get('captions'):  # Evaluation reads the same captions whatever the training mix: runs stay comparable.
    raise ConfigError(f'{where}.captions={data["captions"]!r}: hybrid captions are for the training data '
                      '(config.data.captions); an eval reads caption_key (or captions_key lists), so remove it')
  if name == 'synthetic':
    from jmm.data import synthetic  # pylint: disable=g-import-not-at-top
    if data['split'] not in synthetic.SPLITS:
      raise ConfigError(f'{where}.split={data["split"]!r} is not one of {list(synthetic.SPLITS)}')
    if data['resolution'] < 8:
      raise ConfigError(f'{where}.resolution={data["resolution"]}: the synthetic data needs at least 8')
    if not _is_int(data['seed']) or data['seed'] < 0:
      raise ConfigError(f'{where}.seed must be an integer >= 0, got {data["seed"]!r}')
    if not _is_int(data['max_objects']) or not 1 <= data['max_objects'] <= len(synthetic.POSITIONS):
      raise ConfigError(f'{where}.max_objects must be an integer in [1, {len(synthetic.POSITIONS)}], '
                        f'got {data["max_objects"]!r}')
    return
  transform = data.get('transform', 'resize')
  if transform not in EVAL_TRANSFORMS:
    raise ConfigError(f'{where}.transform={transform!r} is not one of {list(EVAL_TRANSFORMS)} (evaluation '
                      'images must not be randomly cropped)')
  if name == 'tfds':
    if not data.get('tfds_name'):
      raise ConfigError(f'{where}.tfds_name is empty: data.name="tfds" needs a prepared TFDS data set name')
    return
  if name in LISTING_NAMES:
    _validate_listing(data, where)
    return
  if not data.get('paths'):
    raise ConfigError(f'{where}.paths is empty: data.name={name!r} needs shard paths or patterns')
  from jmm.data import webdataset  # pylint: disable=g-import-not-at-top
  try:
    webdataset.expand_paths(data['paths'], 'data.paths')
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e).replace('config.data.paths', f'{where}.paths')) from None


def _validate_listing(data: dict, where: str) -> None:
  """A folder's class sub-folders (one listing) or a captions file's columns (its header), by `where`.path."""
  from jmm.data import captions_file, folder  # pylint: disable=g-import-not-at-top
  name, path = data['name'], data.get('path')
  if not path or not isinstance(path, (str, os.PathLike)):
    what = ('a directory with one sub-folder of images per class' if name == 'folder' else
            'a .csv (header row; one row per caption) or .jsonl ({"image": ..., "captions": [...]}) file')
    hint = ' (data.paths is for shard sources)' if data.get('paths') else ''
    raise ConfigError(f'{where}.path is empty: data.name={name!r} needs {what}{hint}')
  path = str(path)
  try:
    if name == 'folder':
      folder.class_names(path, f'{where}.path')
      return
    present = captions_file.columns(path, f'{where}.path')
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from None
  keys = (('image_key', data.get('image_key') or 'image'),
          ('caption_key', data.get('caption_key') or captions_file.default_caption_key(path)))
  for field, key in keys:
    if key not in present:
      which = 'a column of its header' if captions_file.file_format(path) == 'csv' else 'a key of its first lines'
      raise ConfigError(f'{where}.{field}={key!r} is not {which} ({path!r} has {present})')


FLAT_DATA_FIELDS = ('resolution', 'num_examples', 'max_objects')  # Fields that moved into an eval's `data`.


def eval_data(config, prefix: str = '', default=None) -> dict[str, Any]:
  """The eval's `data` section with defaults (`data_with_defaults`); ConfigError when unset and no `default`,
  or when the eval still sets the data fields that used to sit beside `type` (resolution, num_examples...)."""
  flat = [k for k in FLAT_DATA_FIELDS if get(config, k, None) is not None]
  if flat:
    raise ConfigError(f'{prefix}{flat[0]} is set on the eval itself: the eval data fields moved into '
                      f'{prefix}data, e.g. data=dict(name="synthetic", split="test", {flat[0]}=...)')
  data = get(config, 'data', None) or default
  if data is None:
    raise ConfigError(f'{prefix}data is not set: give the eval data as a dict like config.data, e.g. '
                      'data=dict(name="synthetic", split="test", num_examples=2000, resolution=32, seed=1)')
  return data_with_defaults(data)


def read_lines(value, field: str, prefix: str = '') -> list[str]:
  """A list of strings, or a path to a text file with one string per line (blank lines skipped)."""
  if isinstance(value, (str, os.PathLike)):
    try:
      with open(value, encoding='utf-8') as f:
        lines = [line.strip() for line in f]
    except OSError as e:
      raise ConfigError(f'{prefix}{field}: cannot read the file {str(value)!r} ({type(e).__name__}: {e}); '
                        'give a list or a text file with one entry per line') from None
    lines = [line for line in lines if line]
  elif isinstance(value, (list, tuple)):
    lines = list(value)
  else:
    raise ConfigError(f'{prefix}{field} must be a list of strings or a path to a text file, got {value!r}')
  for i, line in enumerate(lines):
    if not isinstance(line, str) or not line.strip():
      raise ConfigError(f'{prefix}{field}[{i}]={line!r} must be a non-empty string')
  if not lines:
    raise ConfigError(f'{prefix}{field} is empty')
  return lines


def check_positive_ints(config, names: Sequence[str], prefix: str = '') -> None:
  """Raises ConfigError naming `{prefix}{name}` unless each set field is an integer > 0 (unset fields pass)."""
  for name in names:
    value = get(config, name, None)
    if value is not None and (not _is_int(value) or value <= 0):
      raise ConfigError(f'{prefix}{name} must be a positive integer, got {value!r}')


def check_ks(config, prefix: str = '') -> None:
  """`ks`, when set, must be a non-empty list of positive integers."""
  ks = get(config, 'ks', None)
  if ks is None:
    return
  if not isinstance(ks, (list, tuple)) or not ks or not all(_is_int(k) and k > 0 for k in ks):
    raise ConfigError(f'{prefix}ks must be a non-empty list of positive integers, got {ks!r}')


def known_class_names(data) -> list[str] | None:
  """Class names of a data set that defines them itself, else None: the synthetic data's (colour x shape) and a
  folder's (its sorted sub-folder names: label i is the i-th)."""
  data = as_dict(data)
  if data.get('name') == 'synthetic':
    return synthetic_classes()[0]
  if data.get('name') == 'folder' and data.get('path'):
    from jmm.data import folder  # pylint: disable=g-import-not-at-top
    try:
      return folder.class_names(str(data['path']))
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(str(e)) from None
  return None


def has_caption_lists(data) -> bool:
  """Whether the data gives several captions per image: a captions_file, or a file source with captions_key."""
  from jmm.evaluators import file_data  # pylint: disable=g-import-not-at-top
  return file_data.has_caption_lists(as_dict(data))


def load_data(data, *, fields: Sequence[str] = ('image', 'caption', 'label'), caption_key: str | None = None,
              label_key: str = 'label', captions_key: str | None = None) -> dict[str, Any]:
  """Materialises the eval data a data dict names: {'image': uint8 [N, H, W, 3], 'caption': list[str] [N],
  'captions': list[list[str]] [N], 'label': int [N]} (the `fields` asked for); cached, so evaluations at every
  eval step reuse it.

  Synthetic data: `caption_key` / `label_key` name fields of its examples (default 'caption' / 'label'; e.g.
  label_key='colour'), 'captions' holds the one caption of each image, and every field of `synthetic_split`
  comes back too ('seen', 'colour', 'shape'). File sources (`jmm.evaluators.file_data`): the caption is the
  source's (data.caption_key; `caption_key` overrides it), the caption lists come from data.captions_key
  (`captions_key` overrides it) and the label from `label_key`. Bad records are skipped with a warning and
  counted in 'bad_records'. Callers must not modify the returned arrays.
  """
  data = data_with_defaults(data)
  if data.get('name') not in DATA_NAMES:
    raise ConfigError(f'data.name={data.get("name")!r} is not one of {list(DATA_NAMES)}')
  if data.get('name') == 'synthetic':
    split = synthetic_split(data['split'], data, num_examples=data['num_examples'],
                            max_objects=data['max_objects'])
    out = dict(split)
    for field, key in (('caption', caption_key or 'caption'), ('label', label_key)):
      if field in fields or (field == 'caption' and 'captions' in fields):
        if key not in split:
          raise ConfigError(f'the synthetic data has no field {key!r} (for the {field}); it has {sorted(split)}')
        out[field] = split[key]
    if 'captions' in fields:
      out['captions'] = [[c] for c in out['caption']]
    return out
  if caption_key:
    data['caption_key'] = caption_key
  if captions_key:
    data['captions_key'] = captions_key
  return dict(_cached_files(json.dumps(data, sort_keys=True, default=str), tuple(fields), label_key))


@functools.lru_cache(maxsize=4)
def _cached_files(data_json: str, fields: tuple[str, ...], label_key: str) -> dict[str, Any]:
  return load_file_data(json.loads(data_json), fields, label_key)


def load_file_data(data: dict, fields: Sequence[str], label_key: str = 'label') -> dict[str, Any]:
  """`load_data` of a file source, uncached: the first data.num_examples readable examples (all if None)."""
  from jmm.evaluators import file_data  # pylint: disable=g-import-not-at-top
  return file_data.load(data, fields, label_key)


# ----------------------------------------------------------------------------------------------------------
# Scores: the global embeddings' cosine, or FILIP's token-wise late interaction (an eval's similarity='filip').
# ----------------------------------------------------------------------------------------------------------
TOKEN_BLOCK = 1 << 24  # Token-pair similarities (float32) scored at a time on the host: 64 MB.


def similarities(image_emb, text_emb) -> tuple[np.ndarray, np.ndarray]:
  """(i2t, t2i) scores [N, M] of images against texts, each direction's own.

  Global embeddings [N, D] and [M, D]: both are the cosine similarities. Token embeddings (the FILIP head's, an
  eval with similarity='filip': `run.token_embed_fns`) [N, T, D] and [M, L, D], padding tokens as zero rows:
  FILIP's late interaction (`jmm.models.filip_head.late_interaction`, the objective's function), i2t for
  image->text ranking and t2i for text->image. Scored in blocks of images and texts holding about TOKEN_BLOCK
  token pairs; the token embeddings themselves are held whole on the host (N x T x D + M x L x D floats).
  """
  image_emb, text_emb = np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)
  if image_emb.ndim == 2 and text_emb.ndim == 2:
    sims = image_emb @ text_emb.T
    return sims, sims
  if image_emb.ndim != 3 or text_emb.ndim != 3:
    raise ValueError(f'image and text embeddings must both be [N, D] or both token embeddings [N, T, D], got '
                     f'{image_emb.shape} and {text_emb.shape}')
  import jax  # pylint: disable=g-import-not-at-top  (token scores only)
  from jmm.models import filip_head  # pylint: disable=g-import-not-at-top
  score = jax.jit(filip_head.late_interaction, static_argnames='chunk')
  mask = np.any(text_emb != 0, axis=-1)  # [M, L] real tokens (unit rows); padding rows are zero.
  pairs = image_emb.shape[1] * text_emb.shape[1]
  rows = max(1, min(len(image_emb), TOKEN_BLOCK // (pairs * len(text_emb))))
  blocks = [score(image_emb[i:i + rows], text_emb, mask, chunk=max(1, TOKEN_BLOCK // (pairs * rows)))
            for i in range(0, len(image_emb), rows)]
  return tuple(np.concatenate([np.asarray(b[k]) for b in blocks]) for k in (0, 1))


# ----------------------------------------------------------------------------------------------------------
# Evaluating at embedding prefixes (Matryoshka representations, Kusupati et al. 2022): an eval entry's `dims`.
# ----------------------------------------------------------------------------------------------------------
def eval_dims(config, prefix: str = '', width: int | None = None) -> tuple[int, ...]:
  """The eval's `dims` (default ()): unique positive prefix widths, at most `width` when given; ConfigError."""
  dims = get(config, 'dims', ())
  if not isinstance(dims, (list, tuple)) or not all(_is_int(d) and d > 0 for d in dims):
    raise ConfigError(f'{prefix}dims must be a list of positive prefix widths such as (16, 32, 64) (the full '
                      f'width is always evaluated, unsuffixed), got {dims!r}')
  if len(set(dims)) != len(dims):
    raise ConfigError(f'{prefix}dims={tuple(dims)} repeats a width')
  if width is not None and any(d > width for d in dims):
    raise ConfigError(f'{prefix}dims={tuple(dims)}: {max(dims)} exceeds the embedding width {width}')
  return tuple(int(d) for d in dims)


def prefix_embeddings(z, dim: int) -> np.ndarray:
  """The first `dim` coordinates of each row of `z` [N, D], L2-normalised again -> [N, dim]."""
  return l2_normalise(np.asarray(z)[:, :dim])


def memoised(fn: Callable) -> Callable:
  """`fn` with its outputs cached by the content (shape, dtype, bytes) of its input array.

  Why content and not identity: evaluators build a fresh array per batch (padding, [-1, 1] conversion), so the
  same batch of a second pass is another object with the same bytes. Hashing a batch costs far less than
  embedding it.
  """
  cache: dict[tuple, np.ndarray] = {}

  def call(x):
    x = np.ascontiguousarray(x)
    key = (x.shape, x.dtype.str, hashlib.blake2b(memoryview(x).cast('B'), digest_size=16).digest())
    if key not in cache:
      cache[key] = np.array(fn(x))
    return cache[key].copy()  # An evaluator that edits its embeddings in place cannot touch the next pass's.
  return call


def evaluate_at_dims(evaluate: Callable, embed_images: Callable, embed_texts: Callable, tokenizer, config,
                     prefix: str = '') -> dict[str, float]:
  """`evaluate(...)` at the full width, then once per width d of config `dims` on embeddings cut to their first
  d coordinates and re-normalised, its metric keys suffixed '@d' ('top1@16'). Any evaluator gets this unchanged.

  The model embeds each input once: the passes share `memoised` embedding functions, and each prefix pass
  truncates the full embeddings. `scores_path` (zeroshot's score file) is written by the full-width pass only.
  """
  dims = eval_dims(config, prefix)
  if not dims:
    return dict(evaluate(embed_images, embed_texts, tokenizer, config))
  embed_images, embed_texts = memoised(embed_images), memoised(embed_texts)

  def cut(fn, dim):
    def call(x):
      z = fn(x)
      eval_dims(config, prefix, width=z.shape[-1])  # A width beyond the model's: the error names `dims`.
      return prefix_embeddings(z, dim)
    return call

  out = dict(evaluate(embed_images, embed_texts, tokenizer, config))
  if get(config, 'scores_path', ''):
    config = {**as_dict(config), 'scores_path': ''}
  for dim in dims:
    results = evaluate(cut(embed_images, dim), cut(embed_texts, dim), tokenizer, config)
    out.update({f'{k}@{dim}': v for k, v in results.items()})
  return out
