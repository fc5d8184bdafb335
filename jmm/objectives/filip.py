"""FILIP: a contrastive loss on token-wise late-interaction similarities (Yao et al., ICLR 2022, "FILIP:
Fine-grained Interactive Language-Image Pre-Training").

Reads the FILIP head's outputs (`jmm/models/filip_head.py`: unit token embeddings 'zimg_tokens' [B, T, D],
'ztxt_tokens' [B, L, D], the text's 'txt_mask' [B, L]) and scores every image i against every text j with
`filip_head.late_interaction`: i2t[i, j] = the mean over i's tokens of the max over j's real tokens of the
token cosine similarity, t2i[i, j] = the mean over j's real tokens of the max over i's tokens. Padding is
masked out of both maxes and means.

The objective's section (`config.objectives.NAME`, type 'filip'):
  loss        'softmax' (default; the paper's eq. 3-4): image->text cross-entropy over the rows of t * i2t,
              text->image cross-entropy over the columns of t * t2i, averaged: each direction is scored with the
              similarity defined for it. 'sigmoid': SigLIP's pairwise loss with the model's t and b on both
              matrices, -1/B sum_ij log sigmoid(z_ij (t s_ij + b)), averaged over s = i2t and s = t2i; no
              softmax over the batch, so the sharded form needs no column statistics (Zhai et al. 2023).
              The default is the paper's form; the sigmoid form fits the SigLIP recipe's t / b (configs/filip.py).
  impl        'dense' (default: one device's formulas on the global batch, partitioned by XLA) | 'gather'.
  head        the head whose outputs are read (default 'filip': config.model.heads.filip).
  text_chunk  texts scored at a time (0 = all): the [b, B, T, L] token-pair block shrinks to [b, chunk, T, L].
The temperature 't' and bias 'b' are the model's (shared with a global contrastive term, if any).

Memory. The token-pair similarities are [B_img, B_txt, T, L] float32 when computed at once (B = 256, T = 196,
L = 16: 800 MB); `text_chunk` bounds what is live to [B_img, chunk, T, L], and the backward pass recomputes each
chunk instead of keeping it. impl='gather' on n devices (the mesh's batch axes, `jmm.kernels.mesh_axes`), per
device with b = B / n local pairs: all-gathers the TEXT token embeddings and masks only, B x L x D float32 +
B x L bools (B = 4096, L = 16, D = 768: 200 MB), and scores its b images against all B texts in both directions
([b, B] i2t and t2i, via [b, chunk, T, L] blocks). The image tokens (b x T x D, usually the larger) are never
gathered: t2i[i, j] of a local image i needs only i's tokens, and the text->image softmax over all images of a
column is completed by one psum of a [B] vector of partial exp-sums (as the contrastive 'gather' does). The
gather's transpose in the backward pass is a reduce-scatter of the gathered texts' gradient (B x L x D).

Hard negatives are not supported: the model embeds the batch's 'text_neg' only through the global head (the
head sees the positive captions' tokens), so `hard_negatives=True` is refused; a global contrastive term
beside this one may keep them.

Metrics: 't', 'b', 'sim_pos' / 'sim_neg' (mean of (i2t + t2i) / 2 over matching / non-matching pairs),
'batch_i2t_acc' (images whose caption has the highest i2t score in their row) and 'batch_t2i_acc' (texts whose
image has the highest t2i score in their column; ties count as hits), the same global numbers whatever `impl`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jmm import objectives as objectives_lib
from jmm.errors import ConfigError
from jmm.kernels.mesh_axes import batch_axes
from jmm.models import filip_head

LOSSES = ('softmax', 'sigmoid')
IMPLS = ('dense', 'gather')
_FIELDS = ('zimg_tokens', 'ztxt_tokens', 'txt_mask')


def validate(config) -> None:
  """loss, impl, head (a non-empty string), text_chunk (an int >= 0), hard_negatives (False only)."""
  if config.get('loss', 'softmax') not in LOSSES:
    raise ConfigError(f"loss={config.get('loss')!r} is not one of {list(LOSSES)}")
  if config.get('impl', 'dense') not in IMPLS:
    raise ConfigError(f"impl={config.get('impl')!r} is not one of {list(IMPLS)}")
  head = config.get('head', 'filip')
  if not isinstance(head, str) or not head:
    raise ConfigError(f'head must be the name of a FILIP head of config.model.heads, got {head!r}')
  chunk = config.get('text_chunk', 0)
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
    raise ConfigError(f'text_chunk must be an integer >= 0 (texts scored at a time; 0 = all), got {chunk!r}')
  if config.get('hard_negatives', False):
    raise ConfigError('hard_negatives=True is not supported by FILIP (the hard negatives are embedded by the '
                      'global head only); set it on a contrastive term beside this one')


def check_model(model_config, config) -> None:
  """config.model.heads must hold the head named by `head`, of type 'filip_head' (or a module path to one)."""
  objectives_lib.check_head(model_config, config, 'filip', 'filip_head')


def _column_lse(logits, axes):
  """log sum_i exp(logits[i, j]) over every image i of the global batch [B]; `logits` holds this device's rows.

  Across devices the max shift (no gradient) and the sum of exps are each one collective over a [B] vector.
  """
  if not axes:
    return jax.nn.logsumexp(logits, axis=0)
  shift = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=0)), axes)  # [B]
  return shift + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - shift), axis=0), axes))


def _terms(x, y, mask, t, b, name, chunk, first, axes):
  """Loss summed over this device's rows (local images x every text) and batch statistics.

  x [b, T, D] local image tokens, y [B, L, D] / mask [B, L] every text's; `first` the global index of the first
  local image; axes the batch axes (() on one device). The caller divides by B.
  """
  i2t, t2i = filip_head.late_interaction(x, y, mask, chunk)  # [b, B] each
  rows = i2t.shape[0]
  positive = jax.nn.one_hot(first + jnp.arange(rows), i2t.shape[1], dtype=jnp.bool_)  # [b, B]
  if name == 'sigmoid':
    labels = jnp.where(positive, 1.0, -1.0)
    loss = -0.5 * (jnp.sum(jax.nn.log_sigmoid(labels * (t * i2t + b)))
                   + jnp.sum(jax.nn.log_sigmoid(labels * (t * t2i + b))))
  else:
    image_to_text = -jnp.sum(jnp.where(positive, jax.nn.log_softmax(t * i2t, axis=1), 0.0))
    logits = t * t2i  # [b, B]: column j is text j's scores against this device's images.
    lse = _column_lse(logits, axes)  # [B]
    # Column j's positive lives on one device: each adds the positives of its own rows.
    text_to_image = jnp.sum(jnp.where(positive, lse[None, :] - logits, 0.0))
    loss = 0.5 * (image_to_text + text_to_image)
  i2t, t2i = jax.lax.stop_gradient((i2t, t2i))  # The statistics are metrics (and pmax has no derivative).
  both = 0.5 * (i2t + t2i)
  pos_i2t = jnp.sum(jnp.where(positive, i2t, 0.0), axis=1)  # [b]
  rival_i2t = jnp.max(jnp.where(positive, -jnp.inf, i2t), axis=1)  # [b]
  pos_t2i = jnp.sum(jnp.where(positive, t2i, 0.0), axis=0)  # [B]: non-zero only in this device's columns.
  rival_t2i = jnp.max(jnp.where(positive, -jnp.inf, t2i), axis=0)  # [B] over this device's rows
  if axes:
    pos_t2i, rival_t2i = jax.lax.psum(pos_t2i, axes), jax.lax.pmax(rival_t2i, axes)
  own = jax.lax.dynamic_slice_in_dim(jnp.arange(i2t.shape[1]), first, rows)  # This device's columns.
  stats = {'pos': jnp.sum(jnp.where(positive, both, 0.0)), 'all': jnp.sum(both),
           'i2t_hits': jnp.sum((pos_i2t >= rival_i2t).astype(jnp.float32)),
           't2i_hits': jnp.sum((pos_t2i[own] >= rival_t2i[own]).astype(jnp.float32))}
  return loss, stats


def filip_loss(zimg_tokens, ztxt_tokens, txt_mask, t, b, name='softmax', impl='dense', chunk=0, mesh=None):
  """(loss, stats) of the global batch: image i and text i match. stats: batch sums 'pos', 'all' of the
  pairs' (i2t + t2i) / 2 and the counts 'i2t_hits', 't2i_hits'. impl='gather' runs per device under shard_map
  over the mesh's batch axes (see the module docstring); with one device it is the dense computation."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  axes = batch_axes(mesh)
  n = math.prod(mesh.shape[a] for a in axes) if axes else 1
  x, y = zimg_tokens.astype(jnp.float32), ztxt_tokens.astype(jnp.float32)
  mask = txt_mask.astype(bool)
  count = x.shape[0]
  if x.shape[0] != y.shape[0]:
    raise ValueError(f'FILIP needs matching image and text batches, got {x.shape[0]} and {y.shape[0]}')
  if impl == 'dense' or n == 1:
    loss, stats = _terms(x, y, mask, t, b, name, chunk, 0, ())
    return loss / count, stats
  if count % n:
    raise ValueError(f"impl='gather' needs a batch divisible by the {n} devices of the batch axes {axes}, "
                     f'got {count}')

  def per_device(x, y, mask, t, b):  # [B / n, ...] each; t, b replicated.
    rows = x.shape[0]
    all_y = jax.lax.all_gather(y, axes, tiled=True)  # [B, L, D]
    all_mask = jax.lax.all_gather(mask, axes, tiled=True)  # [B, L]
    loss, stats = _terms(x, all_y, all_mask, t, b, name, chunk, jax.lax.axis_index(axes) * rows, axes)
    # Column statistics were already combined across devices: count each device's own columns once.
    return jax.lax.psum((loss, stats), axes)

  spec = P(axes)
  loss, stats = jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec, P(), P()), out_specs=P())(
      x, y, mask, t, b)
  return loss / count, stats


def loss(outputs, batch, config):
  """The objective contract: the FILIP head's token embeddings, 't', 'b' -> (loss, metrics)."""
  del batch  # The head carries the text mask.
  name = config.get('head', 'filip')
  head = outputs.get(name)
  if not isinstance(head, dict) or any(k not in head for k in _FIELDS):
    raise ValueError(f"the model gave no FILIP token embeddings under outputs[{name!r}] "
                     "(config.model.heads needs a 'filip_head' of that name)")
  t, b = outputs['t'], outputs['b']
  value, stats = filip_loss(head['zimg_tokens'], head['ztxt_tokens'], head['txt_mask'], t, b,
                            config.get('loss', 'softmax'), config.get('impl', 'dense'), config.get('text_chunk', 0))
  n = head['zimg_tokens'].shape[0]
  metrics = {'t': t, 'b': b, 'sim_pos': stats['pos'] / n,
             'sim_neg': (stats['all'] - stats['pos']) / max(n * (n - 1), 1),
             'batch_i2t_acc': stats['i2t_hits'] / n, 'batch_t2i_acc': stats['t2i_hits'] / n}
  return value, metrics

