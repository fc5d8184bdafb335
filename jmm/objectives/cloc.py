"""CLOC's region losses: region-text contrastive and grounding (Chen et al. 2024, "Contrastive Localized
Language-Image Pre-Training", arXiv 2410.02746, Sec. 3), added to the image-level loss of another term.

Reads the CLOC head's outputs (`jmm/models/cloc_head.py`): the region embeddings 'zregion' [B, R, D] (the
Prompter on each labelled box), the predicted boxes 'box_pred' [B, R, 4] (the Prompter on each box's phrase), the
head's own scale 't' and bias 'b'; the phrases' text embeddings 'ztxt_regions' [B, R, D] (the text tower); and
from the batch the boxes 'boxes' [B, R, 4] (ymin, xmin, ymax, xmax in [0, 1]), 'region_valid' bool [B, R] (the
pipeline pads every image to R regions) and 'text_regions' int32 [B, R, L] (the phrases' tokens).

  region loss     SigLIP's sigmoid loss between every valid region and every valid phrase of the global batch
                  (every region in the batch a negative): -1/N sum_{i, j valid} log sigmoid(z_ij (t x_i.y_j + b))
                  with N the valid regions and z_ij = +1 when phrase j is region i's, -1 otherwise. With
                  same_text_positive (default) a phrase that reads the same as region i's (identical tokens: two
                  'a small red circle' in one batch) is a positive too: with few distinct phrases the plain
                  labels would push identical texts apart.
  grounding loss  the phrase's predicted box against its true box over the valid regions: l1_weight x the mean
                  absolute error of the four corners + giou_weight x (1 - generalised IoU) (Rezatofighi et al.
                  2019), both averaged over valid regions.
  loss            region_weight x region loss + grounding_weight x grounding loss.

The objective's section (`config.objectives.NAME`, type 'cloc'): head ('cloc'), region_weight (1.0),
grounding_weight (1.0), l1_weight (1.0), giou_weight (1.0), same_text_positive (True). The image-level loss is
a separate term (e.g. 'sigmoid', the contrastive objective), as in the paper's L_CLIP + L_CLOC.

Across devices: the [N, N] logits are one einsum on the global batch (regions and phrases sharded over the batch
axes); XLA all-gathers the phrase embeddings B x R x D and tokens B x R x L (B = 4096, R = 4, D = 768: 50 MB
float32) and each device scores its regions against all phrases, so each holds [B R / n, B R] logits. Padding
regions are masked out of rows and columns. Metrics: 't', 'b', 'region_loss', 'grounding_loss', 'region_acc'
(valid regions whose best-scoring valid phrase reads as their own), 'box_iou' (mean IoU of the predicted boxes).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jmm import objectives as objectives_lib
from jmm.errors import ConfigError

_WEIGHTS = ('region_weight', 'grounding_weight', 'l1_weight', 'giou_weight')


def validate(config) -> None:
  """head (a non-empty string), the weights (numbers >= 0), same_text_positive (a bool)."""
  head = config.get('head', 'cloc')
  if not isinstance(head, str) or not head:
    raise ConfigError(f'head must be the name of a CLOC head of config.model.heads, got {head!r}')
  for name in _WEIGHTS:
    value = config.get(name, 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise ConfigError(f'{name} must be a number >= 0, got {value!r}')
  if not isinstance(config.get('same_text_positive', True), bool):
    raise ConfigError(f"same_text_positive must be True or False, got {config.get('same_text_positive')!r}")


def check_model(model_config, config) -> None:
  """config.model.heads must hold the head named by `head`, of type 'cloc_head' (or a module path to one)."""
  objectives_lib.check_head(model_config, config, 'cloc', 'cloc_head')


def batch_fields(config) -> tuple[str, ...]:
  del config
  return ('boxes', 'region_valid', 'text_regions')


def _area(box):
  return jnp.maximum(box[..., 2] - box[..., 0], 0.0) * jnp.maximum(box[..., 3] - box[..., 1], 0.0)


def iou_and_giou(pred, true):
  """(IoU, generalised IoU) of boxes [..., 4] (ymin, xmin, ymax, xmax) -> [...] each."""
  lo = jnp.maximum(pred[..., :2], true[..., :2])
  hi = jnp.minimum(pred[..., 2:], true[..., 2:])
  inter = jnp.prod(jnp.maximum(hi - lo, 0.0), axis=-1)
  union = _area(pred) + _area(true) - inter
  iou = inter / jnp.maximum(union, 1e-9)
  hull = jnp.prod(jnp.maximum(pred[..., 2:], true[..., 2:]) - jnp.minimum(pred[..., :2], true[..., :2]), axis=-1)
  return iou, iou - (hull - union) / jnp.maximum(hull, 1e-9)


def region_text_loss(zregion, zphrase, tokens, valid, t, b, same_text_positive: bool = True):
  """(loss, accuracy) of the region-text sigmoid loss; zregion / zphrase [N, D], tokens [N, L], valid [N]."""
  logits = t * jnp.einsum('id,jd->ij', zregion.astype(jnp.float32), zphrase.astype(jnp.float32)) + b  # [N, N]
  n = logits.shape[0]
  positive = jnp.eye(n, dtype=bool)
  if same_text_positive:
    positive = jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1) | positive  # [N, N]
  pairs = valid[:, None] & valid[None, :]
  labels = jnp.where(positive, 1.0, -1.0)
  count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  loss = -jnp.sum(jnp.where(pairs, jax.nn.log_sigmoid(labels * logits), 0.0)) / count
  best = jnp.argmax(jnp.where(valid[None, :], jax.lax.stop_gradient(logits), -jnp.inf), axis=1)  # [N]
  hit = jnp.take_along_axis(positive, best[:, None], axis=1)[:, 0]
  return loss, jnp.sum(jnp.where(valid, hit, False)) / count


def grounding_loss(pred, true, valid, l1_weight: float = 1.0, giou_weight: float = 1.0):
  """(loss, mean IoU) of predicted boxes [N, 4] against true ones over the valid [N] regions."""
  count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  l1 = jnp.sum(jnp.where(valid, jnp.mean(jnp.abs(pred - true), axis=-1), 0.0)) / count
  iou, giou = iou_and_giou(pred, true)
  loss = l1_weight * l1 + giou_weight * jnp.sum(jnp.where(valid, 1.0 - giou, 0.0)) / count
  return loss, jnp.sum(jnp.where(valid, jax.lax.stop_gradient(iou), 0.0)) / count


def loss(outputs, batch, config):
  """The objective contract: the CLOC head's region embeddings and boxes, the phrases' embeddings -> (loss,
  metrics)."""
  name = config.get('head', 'cloc')
  head = outputs.get(name)
  if not isinstance(head, dict) or 'zregion' not in head or 'box_pred' not in head:
    raise ValueError(f"the model gave no CLOC region outputs under outputs[{name!r}] (config.model.heads needs a "
                     "'cloc_head' of that name, and the batch 'boxes' and 'text_regions')")
  if 'ztxt_regions' not in outputs:
    raise ValueError("the model gave no phrase embeddings 'ztxt_regions': the batch has no 'text_regions'")
  flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731  [B, R, ...] -> [B R, ...]
  valid = flat(batch['region_valid']).astype(bool)
  region, acc = region_text_loss(flat(head['zregion']), flat(outputs['ztxt_regions']), flat(batch['text_regions']),
                                 valid, head['t'], head['b'], config.get('same_text_positive', True))
  ground, iou = grounding_loss(flat(head['box_pred']), flat(batch['boxes']).astype(jnp.float32), valid,
                               config.get('l1_weight', 1.0), config.get('giou_weight', 1.0))
  total = config.get('region_weight', 1.0) * region + config.get('grounding_weight', 1.0) * ground
  return total, {'t': head['t'], 'b': head['b'], 'region_loss': region, 'grounding_loss': ground,
                 'region_acc': acc, 'box_iou': iou}
