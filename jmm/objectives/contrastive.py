"""Contrastive image-text objectives: SigLIP's sigmoid loss and CLIP's softmax loss.

Both take L2-normalised embeddings `zimg` [batch, dim] and `ztxt` [batch, dim] where row i of each is a matching
pair. The objective's section (`config.objectives.NAME`, type 'contrastive') has `loss`: 'sigmoid' or 'softmax', and
`impl`: how it is computed across devices, 'dense'
(the single-device formulas below, on global arrays) or 'ring' / 'bidir' / 'gather' (per device under
`jax.shard_map`, never holding the global B x B logits; see "Losses across devices" below).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jmm.errors import ConfigError
from jmm.kernels.mesh_axes import BATCH_AXES  # noqa: F401  (re-exported: the tests read it here)
from jmm.kernels.mesh_axes import batch_axes


def pairwise_logits(zimg, ztxt, t, b=0.0):
  """Returns `t * zimg @ ztxt.T + b`  # [batch_img, batch_txt], computed in float32."""
  logits = jnp.einsum('id,jd->ij', zimg.astype(jnp.float32), ztxt.astype(jnp.float32))
  return logits * t + b


def sigmoid_loss(zimg, ztxt, t, b):
  """SigLIP loss (Zhai et al. 2023, eq. 1), averaged over the batch.

    L = -1/|B| sum_i sum_j log sigmoid(z_ij * (t * x_i . y_j + b)),   z_ij = 1 if i == j else -1.

  Every image-text pair is an independent binary classification, so no softmax normalisation over the batch
  is needed; the sum over j (not the mean) is the paper's normalisation.
  """
  logits = pairwise_logits(zimg, ztxt, t, b)
  labels = 2.0 * jnp.eye(logits.shape[0], logits.shape[1], dtype=logits.dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


def softmax_loss(zimg, ztxt, t):
  """CLIP loss (Radford et al. 2021): mean of image->text and text->image cross-entropy.

    L = 1/2 * ( -1/|B| sum_i log softmax_j(t x_i . y_j)[i]  +  -1/|B| sum_j log softmax_i(t x_i . y_j)[j] ).
  """
  logits = pairwise_logits(zimg, ztxt, t)
  n = logits.shape[0]
  diag = jnp.arange(n)
  i2t = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[diag, diag])
  t2i = -jnp.mean(jax.nn.log_softmax(logits, axis=0)[diag, diag])
  return 0.5 * (i2t + t2i)


# ---------------------------------------------------------------------------------------------------------------
# Losses across devices. Inside the jitted step `zimg`, `ztxt` are global [B, dim] arrays whose batch dimension is
# split over the mesh's batch axes. The dense functions above make XLA hold (a shard of) the global B x B logits;
# the forms below run per device under `jax.shard_map` and never build them:
#   ring   (SigLIP, Zhai et al. 2023, sec. 3.3): each device scores its image block against the text block it
#          holds, then passes the text block to its neighbour with `ppermute`; n steps for n devices.
#   bidir  the same ring with text blocks travelling both ways: ceil((n-1)/2) exchange steps instead of n-1.
#   gather (open_clip's `local_loss` with `gather_with_grad`): all-gather the text embeddings, score the local
#          rows against all columns; gradients flow back through the gather (its transpose is a reduce-scatter).
# Memory per device: ring/bidir O(b^2 + b*dim) for the per-device batch b whatever the device count; gather
# O(b*B + B*dim); dense as partitioned by XLA, O(b*B + B*dim) (rows of the logits), O(B^2) unsharded.
# benchmarks/loss_memory.py measures it.

IMPLS = {'sigmoid': ('dense', 'ring', 'bidir', 'gather'), 'softmax': ('dense', 'gather')}


def check_impl(name: str, impl: str) -> None:
  """Raises ConfigError (a ValueError) naming the field when `impl` cannot compute loss `name`."""
  if name not in IMPLS:
    raise ConfigError(f'loss={name!r} is not one of {sorted(IMPLS)}')
  if impl not in IMPLS[name]:
    raise ConfigError(f'impl={impl!r} is not available for loss={name!r}; '
                     f'choose one of {list(IMPLS[name])}')


def _block_terms(zimg, ztxt, t, b, own):
  """Sigmoid loss summed over one [b_img, b_txt] block, and the block's cosine similarities."""
  sims = jnp.einsum('id,jd->ij', zimg, ztxt)  # [b_img, b_txt]
  logits = sims * t + b
  labels = 2.0 * jnp.eye(*sims.shape, dtype=sims.dtype) - 1.0 if own else -jnp.ones_like(sims)
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)), sims


def _block_grads(zimg, ztxt, t, b, g, own):
  """Gradients of `g * _block_terms(...)[0]` w.r.t. zimg, ztxt, t, b, written out (the ring's backward pass).

  d/dx -log sigmoid(z x) = -z sigmoid(-z x), with x = t * sims + b.
  """
  sims = jnp.einsum('id,jd->ij', zimg, ztxt)  # [b_img, b_txt]
  logits = sims * t + b
  labels = 2.0 * jnp.eye(*sims.shape, dtype=sims.dtype) - 1.0 if own else -jnp.ones_like(sims)
  dlogits = -g * labels * jax.nn.sigmoid(-labels * logits)  # [b_img, b_txt]
  dsims = dlogits * t
  return dsims @ ztxt, dsims.T @ zimg, jnp.sum(dlogits * sims), jnp.sum(dlogits)


def _ring_schedule(n, bidir):
  """(full exchange steps, whether one last step fetches only the opposite block).

  One-way ring: n - 1 steps of one block each. Both ways: each step brings one block from each side.
  """
  if not bidir:
    return n - 1, False
  return (n - 1) // 2, n % 2 == 0


def _shift(x, axes, n, k):
  """Sends x from device j to device j + k (mod n) along the flattened batch axes."""
  return jax.lax.ppermute(x, axes, perm=[(j, (j + k) % n) for j in range(n)])


def _travel(ztxt, axes, n, bidir, visit, acc, zeros=None):
  """Brings every other device's text block here once, in ring order, calling `visit(acc, txt, dtxt)` on each.

  Each step sends the blocks on while they are being scored (the exchange does not wait for the matmuls, so
  XLA may overlap the two), at the price of one more text block in flight. With `zeros` (like ztxt), each block
  travels with a gradient accumulator that `visit` adds to, and the accumulators are sent home at the end:
  returns (acc, their sum at home); without, (acc, None).
  """
  steps, opposite = _ring_schedule(n, bidir)
  lanes = [(1, steps + opposite), (-1, steps)] if bidir else [(1, steps)]  # (direction, blocks it brings)
  lanes = [(d, c) for d, c in lanes if c]  # Two devices both ways: one lane, one block.
  common = min(c for _, c in lanes)
  grads_on = zeros is not None

  def send(xs):
    return [_shift(x, axes, n, d) for x, (d, _) in zip(xs, lanes)]

  def visit_lanes(acc, blocks, grads):
    grads = list(grads)
    for i, txt in enumerate(blocks):
      acc, dtxt = visit(acc, txt, grads[i] if grads_on else None)
      if grads_on:
        grads[i] = dtxt
    return acc, grads

  def body(_, carry):
    blocks, grads, acc = carry
    ahead = send(blocks)  # In flight while this step's blocks are scored.
    acc, grads = visit_lanes(acc, blocks, grads)
    return ahead, send(grads), acc

  blocks, grads = send([ztxt] * len(lanes)), [zeros] * len(lanes) if grads_on else []
  blocks, grads, acc = jax.lax.fori_loop(0, common - 1, body, (blocks, grads, acc))
  # The last common step. Even n both ways: lane 0 also fetches the opposite block k + n/2 meanwhile, so that
  # it is taken from one side only.
  extra = [i for i, (_, c) in enumerate(lanes) if c > common]
  ahead = [_shift(blocks[i], axes, n, lanes[i][0]) for i in extra]
  acc, grads = visit_lanes(acc, blocks, grads)
  for i, txt in zip(extra, ahead):
    acc, dtxt = visit(acc, txt, _shift(grads[i], axes, n, lanes[i][0]) if grads_on else None)
    if grads_on:
      grads[i] = dtxt
  if not grads_on:
    return acc, None
  return acc, sum(_shift(g, axes, n, -d * c) for g, (d, c) in zip(grads, lanes))  # c hops out, home in one.


def _ring_forward(zimg, ztxt, t, b, axes, n, bidir):
  """Per-device ring: local sigmoid-loss sum and similarity statistics over every text block of the batch."""
  loss, sims = _block_terms(zimg, ztxt, t, b, own=True)
  diag = jnp.diagonal(sims)  # [b] own positives.
  rival = jnp.max(jnp.where(jnp.eye(*sims.shape, dtype=bool), -jnp.inf, sims), axis=1)  # [b] best negative.

  def visit(acc, txt, _):
    loss, total, rival = acc
    block_loss, block_sims = _block_terms(zimg, txt, t, b, own=False)
    return (loss + block_loss, total + jnp.sum(block_sims), jnp.maximum(rival, jnp.max(block_sims, axis=1))), None

  (loss, total, rival), _ = _travel(ztxt, axes, n, bidir, visit, (loss, jnp.sum(sims), rival))
  stats = {'pos': jnp.sum(diag), 'all': total, 'hits': jnp.sum((diag >= rival).astype(jnp.float32))}
  return loss, stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring(zimg, ztxt, t, b, axes, n, bidir):
  return _ring_forward(zimg, ztxt, t, b, axes, n, bidir)


def _ring_fwd(zimg, ztxt, t, b, axes, n, bidir):
  return _ring_forward(zimg, ztxt, t, b, axes, n, bidir), (zimg, ztxt, t, b)


def _ring_bwd(axes, n, bidir, residuals, cotangents):
  """Runs the ring again; each text block carries its gradient with it and one last shift brings it home.

  Written by hand because autodiff through the forward loop would keep every visiting text block (n * b * dim
  per device) for the backward pass; this keeps memory flat in n at the cost of a second round of exchanges.
  """
  zimg, ztxt, t, b = residuals
  g = cotangents[0]  # Statistics are metrics: their cotangents are ignored.
  dzimg, dtxt, dt, db = _block_grads(zimg, ztxt, t, b, g, own=True)

  def visit(acc, txt, dtxt):
    dzimg, dt, db = acc
    gi, gt, gtemp, gbias = _block_grads(zimg, txt, t, b, g, own=False)
    return (dzimg + gi, dt + gtemp, db + gbias), dtxt + gt

  (dzimg, dt, db), came_home = _travel(ztxt, axes, n, bidir, visit, (dzimg, dt, db), zeros=jnp.zeros_like(ztxt))
  return dzimg, dtxt + came_home, jnp.reshape(dt, jnp.shape(t)), jnp.reshape(db, jnp.shape(b))


_ring.defvjp(_ring_fwd, _ring_bwd)


def _gather_terms(zimg, ztxt, t, b, axes, name):
  """Per-device local loss against all-gathered text embeddings: rows of this device, columns of the batch.

  The softmax loss's text->image half needs, for each local text, a log-sum-exp over every image: a column
  of the global logits. Each device holds a [b, B] row slab, so it sums its rows' share of every column and one
  psum of a [B] vector completes them; unlike open_clip's `local_loss`, the images are not gathered too, which
  halves the gathered embeddings and the [b, B] logits a device holds. Same loss, same gradients.
  """
  rows = zimg.shape[0]
  first = jax.lax.axis_index(axes) * rows  # Global index of this device's first pair.
  all_txt = jax.lax.all_gather(ztxt, axes, tiled=True)  # [B, dim]
  sims = jnp.einsum('id,jd->ij', zimg, all_txt)  # [b, B] rows i of the global similarity matrix.
  positive = jax.nn.one_hot(first + jnp.arange(rows), sims.shape[1], dtype=jnp.bool_)  # [b, B]
  diag = jnp.sum(jnp.where(positive, sims, 0.0), axis=1)  # [b] positives, pair i of this device.
  if name == 'sigmoid':
    loss = -jnp.sum(jax.nn.log_sigmoid(jnp.where(positive, 1.0, -1.0) * (sims * t + b)))
  else:
    logits = sims * t  # [b, B]
    i2t = -jnp.sum(jnp.where(positive, jax.nn.log_softmax(logits, axis=1), 0.0))
    # Column log-sum-exp across devices, shifted by the column max against overflow (so the shift carries no
    # gradient); the positive minus the shift is taken first, as log_softmax does, so that a confident match
    # (loss near 0) is not lost to rounding in lse - logit with both near t.
    shift = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=0)), axes)  # [B]
    log_sum = jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - shift), axis=0), axes))  # [B]
    own = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=first, slice_size=rows)  # [B] -> [b]
    positive_logit = jnp.sum(jnp.where(positive, logits, 0.0), axis=1)  # [b]
    t2i = jnp.sum(own(log_sum) - (positive_logit - own(shift)))
    loss = 0.5 * (i2t + t2i)
  rival = jnp.max(jnp.where(positive, -jnp.inf, sims), axis=1)  # [b]
  stats = {'pos': jnp.sum(diag), 'all': jnp.sum(sims), 'hits': jnp.sum((diag >= rival).astype(jnp.float32))}
  return loss, stats


def sharded_loss(zimg, ztxt, t, b, name='sigmoid', impl='ring', mesh=None):
  """Contrastive loss of global `zimg`, `ztxt` [B, dim] split over the batch axes, without the global logits.

  Returns `(loss, stats)` where the loss equals `sigmoid_loss` / `softmax_loss` of the whole batch and stats
  holds batch sums of the positive similarities ('pos'), of all similarities ('all') and the count of images
  whose matching text scores at least as high as every other text of the global batch ('hits'); each device
  computes them from the blocks it sees, which together cover every pair once. With no mesh in context, or
  batch axes of total size 1, it is the dense computation.
  """
  check_impl(name, impl)
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  axes = batch_axes(mesh)
  n = math.prod(mesh.shape[a] for a in axes) if axes else 1
  zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
  if impl == 'dense' or n == 1:
    return _dense_terms(zimg, ztxt, t, b, name)
  if zimg.shape[0] != ztxt.shape[0] or zimg.shape[0] % n:
    raise ValueError(f'impl={impl!r} needs image and text batches of equal size divisible by the '
                     f'{n} devices of the batch axes {axes}; got {zimg.shape[0]} and {ztxt.shape[0]}')

  def per_device(zimg, ztxt, t, b):  # zimg, ztxt: [B / n, dim]; t, b replicated.
    if impl == 'gather':
      loss, stats = _gather_terms(zimg, ztxt, t, b, axes, name)
    else:
      # Declared varying so the hand-written backward may return per-device partial gradients for t and b;
      # the transpose of this cast is the psum that adds them up.
      t_, b_ = jax.lax.pcast((t, b), axes, to='varying')
      loss, stats = _ring(zimg, ztxt, t_, b_, axes, n, impl == 'bidir')
    return jax.lax.psum((loss, stats), axes)

  spec = P(axes)
  loss, stats = jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())(
      zimg, ztxt, t, b)
  return loss / zimg.shape[0], stats  # Sum over all pairs / B, the dense losses' normalisation.


def _dense_terms(zimg, ztxt, t, b, name):
  """`sharded_loss`'s result on one device (the reference the sharded forms are tested against)."""
  loss = sigmoid_loss(zimg, ztxt, t, b) if name == 'sigmoid' else softmax_loss(zimg, ztxt, t)
  sims = pairwise_logits(zimg, ztxt, 1.0)  # [B, B]
  diag = jnp.diagonal(sims)
  rival = jnp.max(jnp.where(jnp.eye(*sims.shape, dtype=bool), -jnp.inf, sims), axis=1)
  stats = {'pos': jnp.sum(diag), 'all': jnp.sum(sims), 'hits': jnp.sum((diag >= rival).astype(jnp.float32))}
  return loss, stats


def hard_negative_loss(zimg, ztxt, ztxt_neg, t, b, name='sigmoid'):
  """The loss with one extra negative text per image, `ztxt_neg` [B, dim] (NegCLIP, Yuksekgonul et al. 2023).

  The extra texts are negatives of every image, as the batch's other texts are. Sigmoid: the [B, 2B] logits
  against [ztxt; ztxt_neg], summed and divided by B as in `sigmoid_loss`. Softmax: image->text over the 2B texts;
  text->image over the B images of each real text (a negative text has no image to find).
  """
  all_txt = jnp.concatenate([ztxt, ztxt_neg], axis=0)  # [2B, dim]
  n = zimg.shape[0]
  if name == 'sigmoid':
    logits = pairwise_logits(zimg, all_txt, t, b)  # [B, 2B]
    labels = 2.0 * jnp.eye(n, 2 * n, dtype=logits.dtype) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n
  logits = pairwise_logits(zimg, all_txt, t)  # [B, 2B]
  diag = jnp.arange(n)
  i2t = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[diag, diag])
  t2i = -jnp.mean(jax.nn.log_softmax(logits[:, :n], axis=0)[diag, diag])
  return 0.5 * (i2t + t2i)


def validate(config) -> None:
  """Checks this objective's section of `config.objectives`: `loss` ('sigmoid' | 'softmax'), `impl` and
  `hard_negatives` (dense only: the sharded forms score square blocks)."""
  check_impl(config.get('loss', 'sigmoid'), config.get('impl', 'dense'))
  hard = config.get('hard_negatives', False)
  if not isinstance(hard, bool):
    raise ConfigError(f'hard_negatives must be True or False, got {hard!r}')
  if hard and config.get('impl', 'dense') != 'dense':
    raise ConfigError(f"hard_negatives=True needs impl='dense', got impl={config.get('impl')!r}")


def batch_fields(config) -> tuple[str, ...]:
  """hard_negatives reads the batch's 'text_neg' (synthetic data: data.negative_captions=True)."""
  return ('text_neg',) if config.get('hard_negatives', False) else ()


def loss(outputs, batch, config):
  """The objective contract (`jmm.objectives`): outputs 'zimg', 'ztxt', 't', 'b' -> (loss, metrics).

  config: this objective's section, `loss` ('sigmoid' | 'softmax'), `impl` (how across devices) and
  `hard_negatives` (also score each image against its own 'ztxt_neg', the model's embedding of 'text_neg').
  """
  del batch  # Pairs are aligned by position; the model embedded 'text_neg' if the batch holds it.
  zimg, ztxt, t, b = outputs['zimg'], outputs['ztxt'], outputs['t'], outputs['b']
  name, impl = config.get('loss', 'sigmoid'), config.get('impl', 'dense')
  check_impl(name, impl)
  hard, hard_metrics = config.get('hard_negatives', False), {}
  if hard:
    if 'ztxt_neg' not in outputs:
      raise ValueError("hard_negatives=True but the model gave no 'ztxt_neg' (the batch lacks 'text_neg')")
    zneg = outputs['ztxt_neg']
    value = hard_negative_loss(zimg, ztxt, zneg, t, b, name)
    # Share of images whose caption beats its hard negative.
    hard_metrics = {'hard_neg_acc': jnp.mean(jnp.sum(zimg * ztxt, -1) > jnp.sum(zimg * zneg, -1))}
  axes = batch_axes()
  if impl != 'dense' and math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes) > 1:
    # Same metrics as below, from per-device blocks; in-batch accuracy counts a tie with the positive as a hit.
    value, stats = sharded_loss(zimg, ztxt, t, b, name, impl)
    n = zimg.shape[0]
    metrics = {'t': t, 'b': b, 'sim_pos': stats['pos'] / n,
               'sim_neg': (stats['all'] - stats['pos']) / max(n * (n - 1), 1), 'batch_i2t_acc': stats['hits'] / n}
    return value, metrics
  if not hard:
    value = sigmoid_loss(zimg, ztxt, t, b) if name == 'sigmoid' else softmax_loss(zimg, ztxt, t)
  sims = pairwise_logits(zimg, ztxt, 1.0)  # [batch, batch] cosine similarities.
  n = sims.shape[0]
  pos = jnp.trace(sims) / n
  neg = (jnp.sum(sims) - jnp.trace(sims)) / max(n * (n - 1), 1)
  in_batch_acc = jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(n))
  metrics = {'t': t, 'b': b, 'sim_pos': pos, 'sim_neg': neg, 'batch_i2t_acc': in_batch_acc, **hard_metrics}
  return value, metrics
