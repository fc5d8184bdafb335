"""Image <-> text retrieval: Recall@K in both directions over a held-out set of (image, caption) pairs.

Correctness is defined strictly by index, the standard (COCO / Flickr30k) protocol: a retrieved caption is
correct only if it was written for the query image, and a retrieved image only if it is the one the query
caption belongs to. With several captions per image (COCO's Karpathy 5k test and Flickr30k's 1k test: about 5
each) an image query is a hit at K when any of its captions is among the K nearest texts, and every caption is
a text query of its own. The synthetic captions repeat (two images with the same attributes get the same
caption), so an identical caption of another image counts as a miss, and identical embeddings tie; ties are
broken towards the lower index. Recall on such data is therefore a lower bound on what a perfect model could score
under a "same text" criterion, and it is comparable across models because the rule is fixed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jmm.errors import ConfigError
from jmm.evaluators import common

DEFAULT_KS = (1, 5, 10)


def _first_hit_rank(order, is_match) -> np.ndarray:
  """Rank (0-based) of the first retrieved item that matches, per query; `order` [Q, K] sorted candidates."""
  hits = is_match(order)  # [Q, K] bool
  rank = np.argmax(hits, axis=1)
  return np.where(np.any(hits, axis=1), rank, order.shape[1])  # No match at all: ranked past the end.


def recall_at_k(image_emb, text_emb, text_to_image, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """Recall@K for image->text ('i2t_r{k}') and text->image ('t2i_r{k}') retrieval by cosine similarity.

  image_emb [N, D] and text_emb [M, D] are L2-normalised; text_to_image [M] gives the image each caption
  belongs to (an image may have several). Token embeddings [N, T, D] / [M, L, D] (similarity='filip') rank
  images' texts by FILIP's i2t score and texts' images by its t2i score (`common.similarities`). An image query is correct at K if any of its own captions is among
  its K most similar texts; a text query if its own image is among the K most similar images. Ties are
  broken towards the lower index (stable sort). Every image must have at least one caption.
  """
  text_to_image = np.asarray(text_to_image)
  n, m = len(image_emb), len(text_emb)
  if text_to_image.shape != (m,):
    raise ValueError(f'text_to_image must be [{m}] (one image index per text), got {text_to_image.shape}')
  if m and (text_to_image.min() < 0 or text_to_image.max() >= n):
    raise ValueError(f'text_to_image holds indices outside [0, {n})')
  if np.any(np.bincount(text_to_image, minlength=n) == 0):
    raise ValueError('every image needs at least one caption for image->text recall')

  i2t, t2i = common.similarities(image_emb, text_emb)  # [N, M] each; one matrix for global embeddings.
  i2t_order = np.argsort(-i2t, axis=1, kind='stable')  # [N, M] text indices, best first
  i2t_rank = _first_hit_rank(i2t_order, lambda o: text_to_image[o] == np.arange(n)[:, None])  # [N]
  t2i_order = np.argsort(-t2i.T, axis=1, kind='stable')  # [M, N] image indices, best first
  t2i_rank = _first_hit_rank(t2i_order, lambda o: o == text_to_image[:, None])  # [M]

  metrics = {}
  for k in ks:
    metrics[f'i2t_r{k}'] = float(np.mean(i2t_rank < k))
  for k in ks:
    metrics[f't2i_r{k}'] = float(np.mean(t2i_rank < k))
  return metrics


def validate(config, prefix: str = '') -> None:
  """Checks the eval's fields without reading data; raises ConfigError naming the field (after `prefix`)."""
  common.check_positive_ints(config, ('batch_size', 'text_len'), prefix)
  common.check_ks(config, prefix)
  for field in ('caption_key', 'captions_key'):
    key = common.get(config, field, None)
    if key is not None and (not isinstance(key, str) or not key):
      raise ConfigError(f'{prefix}{field} must be a non-empty string, got {key!r}')
  common.validate_data(_data(config, prefix), 'data', prefix)


def _data(config, prefix: str = '') -> dict:
  """The eval's data dict with the eval's own caption_key / captions_key (when set) in place of the data's."""
  data = common.eval_data(config, prefix)
  for field in ('caption_key', 'captions_key'):
    if common.get(config, field, None) is not None:
      data[field] = common.get(config, field, None)
  return data


def evaluate(embed_images, embed_texts, tokenizer, config) -> dict[str, float]:
  """Recall@K on the images of config.data and their captions: one per image, or several.

  Several captions per image when the data gives caption lists (`common.has_caption_lists`): a captions_file,
  or a webdataset / array_record / tfds source whose captions_key names a list of captions per example
  ('json/captions', 'captions', 'captions/text'). The lists are flattened, image-major, into one text per
  caption (see `recall_at_k`). Otherwise each image's one caption (caption_key) is its only text.

  Reads config fields: data (a data dict, see `common.data_with_defaults`; required), caption_key (the
  caption field: 'caption' on the synthetic data; for a file source it overrides data.caption_key),
  captions_key (overrides data.captions_key), batch_size (256), text_len (16), ks ((1, 5, 10)). Returns
  {'i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', ...}, unprefixed.
  """
  batch_size = int(common.get(config, 'batch_size', 256))
  text_len = int(common.get(config, 'text_len', 16))
  ks = tuple(int(k) for k in common.get(config, 'ks', DEFAULT_KS))
  data_config = _data(config)
  if common.has_caption_lists(data_config):
    data = common.load_data(data_config, fields=('image', 'captions'))
    texts = [text for captions in data['captions'] for text in captions]  # [M], image-major
    text_to_image = np.repeat(np.arange(len(data['captions'])), [len(c) for c in data['captions']])  # [M]
  else:
    data = common.load_data(data_config, fields=('image', 'caption'),
                            caption_key=common.get(config, 'caption_key', None))
    texts, text_to_image = data['caption'], np.arange(len(data['caption']))
  image_emb = common.embed_images_in_batches(embed_images, data['image'], batch_size)  # [N, D]
  text_emb = common.embed_texts_in_batches(embed_texts, tokenizer, texts, text_len, batch_size)  # [M, D]
  return recall_at_k(image_emb, text_emb, text_to_image, ks)
