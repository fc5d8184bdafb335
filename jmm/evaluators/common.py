"""Helpers shared by the evaluators: materialising a held-out split and embedding it in fixed-size batches.

Evaluators see the model only through two callables:
`embed_images(float32 [N, H, W, 3] in [-1, 1]) -> [N, D]` and `embed_texts(int32 [N, L]) -> [N, D]`, both
L2-normalised. Everything here is host-side numpy: evaluation sets are small (thousands of examples).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

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
