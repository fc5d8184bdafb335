"""Contrastive losses against the papers' formulas written out element by element."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmm.objectives import contrastive


def _embeddings(n, m, d, seed):
  rng = np.random.default_rng(seed)
  zimg = rng.normal(size=(n, d)).astype(np.float32)
  ztxt = rng.normal(size=(m, d)).astype(np.float32)
  return (zimg / np.linalg.norm(zimg, axis=1, keepdims=True),
          ztxt / np.linalg.norm(ztxt, axis=1, keepdims=True))


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


@pytest.mark.parametrize('n,d,t,b', [(1, 4, 10.0, -10.0), (5, 8, 10.0, -10.0), (7, 3, 2.5, 0.3)])
def test_sigmoid_loss_is_the_paper_formula(n, d, t, b):
  zimg, ztxt = _embeddings(n, n, d, seed=n)
  # SigLIP eq. 1: -1/|B| sum_i sum_j log(1 / (1 + exp(z_ij (-t x_i.y_j - b)))).
  want = 0.0
  for i in range(n):
    for j in range(n):
      z = 1.0 if i == j else -1.0
      want -= _log_sigmoid(z * (t * float(zimg[i] @ ztxt[j]) + b))
  want /= n
  got = contrastive.sigmoid_loss(jnp.asarray(zimg), jnp.asarray(ztxt), t, b)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize('n,d,t', [(2, 4, 1.0), (6, 8, 14.3)])
def test_softmax_loss_is_clip_cross_entropy(n, d, t):
  zimg, ztxt = _embeddings(n, n, d, seed=10 + n)
  logits = t * zimg.astype(np.float64) @ ztxt.T.astype(np.float64)
  i2t = -np.mean([logits[i, i] - np.log(np.sum(np.exp(logits[i]))) for i in range(n)])
  t2i = -np.mean([logits[j, j] - np.log(np.sum(np.exp(logits[:, j]))) for j in range(n)])
  got = contrastive.softmax_loss(jnp.asarray(zimg), jnp.asarray(ztxt), t)
  np.testing.assert_allclose(float(got), 0.5 * (i2t + t2i), rtol=1e-5)


def test_losses_prefer_matching_pairs():
  zimg, _ = _embeddings(8, 8, 16, seed=0)
  rng = np.random.default_rng(1)
  shuffled = zimg[rng.permutation(8)]
  for loss in (lambda a, b: contrastive.sigmoid_loss(a, b, 10.0, -5.0),
               lambda a, b: contrastive.softmax_loss(a, b, 10.0)):
    assert float(loss(zimg, zimg)) < float(loss(zimg, shuffled))


def test_loss_fn_metrics_and_gradients():
  zimg, ztxt = _embeddings(4, 4, 8, seed=3)
  cfg = type('C', (), {'name': 'sigmoid'})()
  extras = {'t': jnp.float32(10.0), 'b': jnp.float32(-10.0)}
  loss, metrics = contrastive.loss_fn((zimg, ztxt, extras), {}, cfg)
  assert set(metrics) >= {'loss', 't', 'b', 'sim_pos', 'sim_neg', 'batch_i2t_acc'}
  np.testing.assert_allclose(float(loss), float(contrastive.sigmoid_loss(zimg, ztxt, 10.0, -10.0)))
  grad = jax.grad(lambda b: contrastive.sigmoid_loss(zimg, ztxt, 10.0, b))(-10.0)
  # At b = -10 nearly every pair is predicted negative; the positives pull b up (gradient < 0).
  assert float(grad) < 0
  with pytest.raises(ValueError, match='loss.name'):
    contrastive.loss_fn((zimg, ztxt, extras), {}, type('C', (), {'name': 'hinge'})())
