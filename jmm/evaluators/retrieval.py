"""Image <-> text retrieval: Recall@K in both directions over a held-out set of (image, caption) pairs.

Correctness is defined strictly by index, the standard (COCO / Flickr30k) protocol: a retrieved caption is
correct only if it was written for the query image, and a retrieved image only if it is the one the query
caption belongs to. The synthetic captions repeat (two images with the same attributes get the same caption),
so an identical caption of another image counts as a miss, and identical embeddings tie; ties are broken
towards the lower index. Recall on such data is therefore a lower bound on what a perfect model could score
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
  belongs to (an image may have several). An image query is correct at K if any of its own captions is among
  its K most similar texts; a text query if its own image is among the K most similar images. Ties are
  broken towards the lower index (stable sort). Every image must have at least one caption.
  """
  image_emb = np.asarray(image_emb, np.float32)
  text_emb = np.asarray(text_emb, np.float32)
  text_to_image = np.asarray(text_to_image)
  n, m = image_emb.shape[0], text_emb.shape[0]
  if text_to_image.shape != (m,):
    raise ValueError(f'text_to_image must be [{m}] (one image index per text), got {text_to_image.shape}')
  if m and (text_to_image.min() < 0 or text_to_image.max() >= n):
    raise ValueError(f'text_to_image holds indices outside [0, {n})')
  if np.any(np.bincount(text_to_image, minlength=n) == 0):
    raise ValueError('every image needs at least one caption for image->text recall')

  sims = image_emb @ text_emb.T  # [N, M]
  i2t_order = np.argsort(-sims, axis=1, kind='stable')  # [N, M] text indices, best first
  i2t_rank = _first_hit_rank(i2t_order, lambda o: text_to_image[o] == np.arange(n)[:, None])  # [N]
  t2i_order = np.argsort(-sims.T, axis=1, kind='stable')  # [M, N] image indices, best first
  t2i_rank = _first_hit_rank(t2i_order, lambda o: o == text_to_image[:, None])  # [M]

  metrics = {}
  for k in ks:
    metrics[f'i2t_r{k}'] = float(np.mean(i2t_rank < k))
  for k in ks:
    metrics[f't2i_r{k}'] = float(np.mean(t2i_rank < k))
  return metrics


def validate(config, prefix: str = '') -> None:
  """Checks the eval's fields without reading data; raises ConfigError naming the field (after `prefix`)."""
  common.validate_data(common.eval_data(config, prefix), 'data', prefix)
  common.check_positive_ints(config, ('batch_size', 'text_len'), prefix)
  common.check_ks(config, prefix)
  caption_key = common.get(config, 'caption_key', None)
  if caption_key is not None and (not isinstance(caption_key, str) or not caption_key):
    raise ConfigError(f'{prefix}caption_key must be a non-empty string, got {caption_key!r}')


def evaluate(embed_images, embed_texts, tokenizer, config) -> dict[str, float]:
  """Recall@K on the (image, caption) pairs of config.data, one caption per image.

  Reads config fields: data (a data dict, see `common.data_with_defaults`; required), caption_key (the
  caption field: 'caption' on the synthetic data; for a file source it overrides data.caption_key),
  batch_size (256), text_len (16), ks ((1, 5, 10)). Returns {'i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', ...},
  unprefixed.
  """
  batch_size = int(common.get(config, 'batch_size', 256))
  text_len = int(common.get(config, 'text_len', 16))
  ks = tuple(int(k) for k in common.get(config, 'ks', DEFAULT_KS))
  data = common.load_data(common.eval_data(config), fields=('image', 'caption'),
                          caption_key=common.get(config, 'caption_key', None))
  image_emb = common.embed_images_in_batches(embed_images, data['image'], batch_size)  # [N, D]
  text_emb = common.embed_texts_in_batches(embed_texts, tokenizer, data['caption'], text_len, batch_size)
  return recall_at_k(image_emb, text_emb, np.arange(len(data['caption'])), ks)
