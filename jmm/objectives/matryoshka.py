"""Matryoshka representations (Kusupati et al., NeurIPS 2022) for the contrastive image-text losses.

The contrastive loss is applied to nested prefixes of the embeddings: the first 16, 32, 64 ... coordinates of
`zimg` and `ztxt`, each prefix L2-normalised again, so that one model serves every prefix width and a
retrieval index can store 16 numbers per item instead of the full width. The model is unchanged; only the loss
sees the prefixes (MRL in the paper's terms, one head whose leading coordinates carry the most).

The objective's section (`config.objectives.NAME`, type 'matryoshka'):
  dims     ascending prefix widths; 0 = the full width, allowed last only. Default (16, 32, 64, 0).
  weights  one per prefix, >= 0, not all zero (default all 1). The loss is the weighted MEAN over the prefixes,
           sum_k w_k L_k / sum_k w_k, so its scale is a plain contrastive loss's whatever the number of prefixes
           (the paper sums with c_m = 1; with Adam only the gradient clipping sees the difference).
  loss, impl, hard_negatives: as the contrastive objective's (`jmm.objectives.contrastive`), which computes
           each prefix's term, so the sharded forms (ring, bidir, gather) and hard negatives work per prefix.
The temperature `t` and bias `b` are shared by the prefixes.

Re-normalising the prefix of the normalised `zimg` gives the same vector as normalising the prefix of the
tower's raw output (the norm cancels), so the model need not expose its pre-normalisation embedding.
"""
from __future__ import annotations

import jax.numpy as jnp

from jmm.errors import ConfigError
from jmm.objectives import contrastive

DEFAULT_DIMS = (16, 32, 64, 0)
_EMBEDDINGS = ('zimg', 'ztxt', 'ztxt_neg')  # The model outputs cut to each prefix.


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def dims_and_weights(config) -> tuple[tuple[int, ...], tuple[float, ...]]:
  """The section's (dims, weights) with defaults; raises ConfigError naming the field."""
  dims = config.get('dims', None)
  dims = DEFAULT_DIMS if dims is None else dims
  if not isinstance(dims, (list, tuple)) or not dims or not all(_is_int(d) and d >= 0 for d in dims):
    raise ConfigError(f'dims must be a non-empty list of prefix widths (integers > 0; 0 = the full width), '
                      f'got {dims!r}')
  dims = tuple(dims)
  if 0 in dims[:-1]:
    raise ConfigError(f'dims={dims}: 0 (the full width) may only come last')
  widths = dims[:-1] if dims[-1] == 0 else dims
  if any(a >= b for a, b in zip(widths, widths[1:])):
    raise ConfigError(f'dims={dims} must be strictly ascending (nested prefixes, smallest first)')
  weights = config.get('weights', None)
  weights = (1.0,) * len(dims) if weights is None else weights
  if (not isinstance(weights, (list, tuple)) or len(weights) != len(dims)
      or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)):
    raise ConfigError(f'weights must be {len(dims)} numbers >= 0, one per entry of dims={dims}, got {weights!r}')
  if not sum(weights):
    raise ConfigError(f'weights={tuple(weights)} are all zero')
  return dims, tuple(float(w) for w in weights)


def prefix(z, dim: int):
  """The first `dim` coordinates of each row of `z` [..., D], L2-normalised again (float32); 0 or D: `z` as it is.

  The full width is passed through untouched, so that term equals the plain contrastive loss bit for bit.
  """
  if dim == 0 or dim == z.shape[-1]:
    return z
  z = z[..., :dim].astype(jnp.float32)
  return z / jnp.sqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-12)  # eps: an all-zero prefix stays finite.


def validate(config) -> None:
  """Checks dims, weights, and the contrastive fields (loss, impl, hard_negatives)."""
  dims_and_weights(config)
  contrastive.validate(config)


def batch_fields(config) -> tuple[str, ...]:
  """As the contrastive objective: 'text_neg' with hard_negatives."""
  return contrastive.batch_fields(config)


def loss(outputs, batch, config):
  """The objective contract: the weighted mean of the contrastive loss over the prefixes -> (loss, metrics).

  Metrics: the contrastive objective's ('t', 'b', 'sim_pos', 'sim_neg', 'batch_i2t_acc', 'hard_neg_acc') at the
  widest prefix, and per prefix width d (0 resolved to the embedding width): 'loss@d', 'batch_i2t_acc@d'.
  """
  dims, weights = dims_and_weights(config)
  width = outputs['zimg'].shape[-1]
  if dims[-1] > width:
    raise ConfigError(f'dims={dims}: the widest prefix {dims[-1]} exceeds the embedding width {width} '
                      '(config.model.out_dim)')
  total, metrics = 0.0, {}
  for d, w in zip(dims, weights):
    cut = {**outputs, **{k: prefix(outputs[k], d) for k in _EMBEDDINGS if k in outputs}}
    value, term_metrics = contrastive.loss(cut, batch, config)
    d = d or width
    metrics[f'loss@{d}'] = value
    metrics[f'batch_i2t_acc@{d}'] = term_metrics['batch_i2t_acc']
    total = total + w * value
  metrics.update(term_metrics)  # The widest prefix's: a plain contrastive run's keys keep their meaning.
  return total / sum(weights), metrics
