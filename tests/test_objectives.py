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


def _loop_reference(zimg, ztxt, t, b, name):
  """The losses and in-batch metrics written out pair by pair in jnp (differentiable), for the objective test."""
  n = zimg.shape[0]
  sims = [[jnp.dot(zimg[i], ztxt[j]) for j in range(n)] for i in range(n)]
  if name == 'sigmoid':
    loss = 0.0
    for i in range(n):
      for j in range(n):
        loss -= jax.nn.log_sigmoid((1.0 if i == j else -1.0) * (t * sims[i][j] + b))
    loss /= n
  else:
    rows = [-jax.nn.log_softmax(jnp.stack([t * sims[i][j] for j in range(n)]))[i] for i in range(n)]
    cols = [-jax.nn.log_softmax(jnp.stack([t * sims[i][j] for i in range(n)]))[j] for j in range(n)]
    loss = 0.5 * (sum(rows) / n + sum(cols) / n)
  pos = sum(sims[i][i] for i in range(n)) / n
  neg = sum(sims[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  acc = sum(jnp.argmax(jnp.stack(sims[i])) == i for i in range(n)) / n
  return loss, {'sim_pos': pos, 'sim_neg': neg, 'batch_i2t_acc': acc}


@pytest.mark.parametrize('name', ['sigmoid', 'softmax'])
def test_contrastive_objective_against_loop_reference(name):
  """The objective contract's loss(outputs, batch, config): value, metrics and gradients against a loop."""
  zimg, ztxt = (jnp.asarray(x) for x in _embeddings(5, 5, 8, seed=3))
  t, b = jnp.float32(7.0), jnp.float32(-3.0)
  config = {'loss': name, 'impl': 'dense'}

  def objective(zimg, ztxt, t, b):
    return contrastive.loss({'zimg': zimg, 'ztxt': ztxt, 't': t, 'b': b}, {}, config)

  loss, metrics = objective(zimg, ztxt, t, b)
  want, want_metrics = _loop_reference(zimg, ztxt, t, b, name)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
  for key, value in want_metrics.items():
    np.testing.assert_allclose(float(metrics[key]), float(value), rtol=1e-5, atol=1e-6)
  assert float(metrics['t']) == 7.0 and float(metrics['b']) == -3.0
  argnums = (0, 1, 2, 3) if name == 'sigmoid' else (0, 1, 2)  # The softmax loss ignores the bias.
  got = jax.grad(lambda *a: objective(*a)[0], argnums=argnums)(zimg, ztxt, t, b)
  ref = jax.grad(lambda *a: _loop_reference(*a, name)[0], argnums=argnums)(zimg, ztxt, t, b)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)


def test_contrastive_objective_validates_its_section():
  contrastive.validate({'loss': 'softmax', 'impl': 'gather'})
  with pytest.raises(ValueError, match="loss='hinge'"):
    contrastive.validate({'loss': 'hinge'})
  with pytest.raises(ValueError, match="impl='ring'.*loss='softmax'"):
    contrastive.validate({'loss': 'softmax', 'impl': 'ring'})


def _hard_negative_reference(zimg, ztxt, zneg, t, b, name):
  """Each image against every text of the batch and every hard negative, written out pair by pair."""
  n = zimg.shape[0]
  texts = [ztxt[j] for j in range(n)] + [zneg[j] for j in range(n)]  # 2n candidates; j < n are the captions.
  sims = [[jnp.dot(zimg[i], texts[j]) for j in range(2 * n)] for i in range(n)]
  if name == 'sigmoid':
    loss = 0.0
    for i in range(n):
      for j in range(2 * n):
        loss -= jax.nn.log_sigmoid((1.0 if i == j else -1.0) * (t * sims[i][j] + b))
    return loss / n
  rows = [-jax.nn.log_softmax(jnp.stack([t * sims[i][j] for j in range(2 * n)]))[i] for i in range(n)]
  cols = [-jax.nn.log_softmax(jnp.stack([t * sims[i][j] for i in range(n)]))[j] for j in range(n)]
  return 0.5 * (sum(rows) / n + sum(cols) / n)


@pytest.mark.parametrize('name,n', [('sigmoid', 4), ('sigmoid', 1), ('softmax', 5)])
def test_hard_negatives_against_loop_reference(name, n):
  """hard_negatives=True: the loss and its gradients (through the negatives too) against the loop; the
  hard-negative accuracy counts images whose caption beats their own negative."""
  zimg, ztxt = (jnp.asarray(x) for x in _embeddings(n, n, 8, seed=7))
  zneg = jnp.asarray(_embeddings(n, n, 8, seed=8)[1])
  t, b = jnp.float32(6.0), jnp.float32(-2.0)
  config = {'loss': name, 'impl': 'dense', 'hard_negatives': True}
  assert contrastive.batch_fields(config) == ('text_neg',)

  def objective(zimg, ztxt, zneg, t, b):
    return contrastive.loss({'zimg': zimg, 'ztxt': ztxt, 'ztxt_neg': zneg, 't': t, 'b': b}, {}, config)

  loss, metrics = objective(zimg, ztxt, zneg, t, b)
  np.testing.assert_allclose(float(loss), float(_hard_negative_reference(zimg, ztxt, zneg, t, b, name)), rtol=1e-5)
  want_acc = np.mean(np.sum(zimg * ztxt, -1) > np.sum(zimg * zneg, -1))
  assert float(metrics['hard_neg_acc']) == pytest.approx(want_acc)
  plain, _ = contrastive.loss({'zimg': zimg, 'ztxt': ztxt, 't': t, 'b': b}, {}, {'loss': name})
  assert float(loss) > float(plain)  # The negatives add terms.
  argnums = (0, 1, 2, 3, 4) if name == 'sigmoid' else (0, 1, 2, 3)
  got = jax.grad(lambda *a: objective(*a)[0], argnums=argnums)(zimg, ztxt, zneg, t, b)
  ref = jax.grad(lambda *a: _hard_negative_reference(*a, name), argnums=argnums)(zimg, ztxt, zneg, t, b)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)


def test_hard_negatives_config_errors():
  with pytest.raises(ValueError, match="hard_negatives=True needs impl='dense'"):
    contrastive.validate({'loss': 'sigmoid', 'impl': 'ring', 'hard_negatives': True})
  with pytest.raises(ValueError, match='hard_negatives must be True or False'):
    contrastive.validate({'loss': 'sigmoid', 'hard_negatives': 'yes'})
  assert contrastive.batch_fields({'loss': 'sigmoid'}) == ()
  with pytest.raises(ValueError, match="no 'ztxt_neg'"):
    z = jnp.ones((2, 4)) / 2
    contrastive.loss({'zimg': z, 'ztxt': z, 't': 1.0, 'b': 0.0}, {}, {'hard_negatives': True})
