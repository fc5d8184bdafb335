"""Contrastive image-text objectives: SigLIP's sigmoid loss and CLIP's softmax loss.

Both take L2-normalised embeddings `zimg` [batch, dim] and `ztxt` [batch, dim] where row i of each is a matching
pair. This file holds the single-device forms; `config.loss.name` picks one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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


def loss_fn(outputs, batch, config):
  """The objective's common signature: `(zimg, ztxt, extras)`, batch, config.loss -> (loss, metrics)."""
  del batch  # Pairs are aligned by position; the batch carries nothing else the loss needs.
  zimg, ztxt, extras = outputs
  t, b = extras['t'], extras['b']
  if config.name == 'sigmoid':
    loss = sigmoid_loss(zimg, ztxt, t, b)
  elif config.name == 'softmax':
    loss = softmax_loss(zimg, ztxt, t)
  else:
    raise ValueError(f'config.loss.name={config.name!r} is not one of sigmoid, softmax')
  sims = pairwise_logits(zimg, ztxt, 1.0)  # [batch, batch] cosine similarities.
  n = sims.shape[0]
  pos = jnp.trace(sims) / n
  neg = (jnp.sum(sims) - jnp.trace(sims)) / max(n * (n - 1), 1)
  in_batch_acc = jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(n))
  metrics = {'loss': loss, 't': t, 'b': b, 'sim_pos': pos, 'sim_neg': neg, 'batch_i2t_acc': in_batch_acc}
  return loss, metrics
