"""Optimizer: schedule shape, weight decay on kernels only, frozen parameter groups, Adafactor runs."""
import jax
import jax.numpy as jnp
import ml_collections
import optax
import numpy as np
import pytest

from jmm import optim
from jmm.config import ConfigError


def _config(**kw):
  base = dict(name='adamw', lr=1e-2, wd=0.1, b1=0.9, b2=0.95, eps=1e-8, warmup_steps=10,
              schedule='cosine', min_lr_ratio=0.0, clip_norm=1.0, frozen=())
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _params():
  return {'image': {'Dense_0': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones((4,))}},
          'text': {'Dense_0': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones((4,))}},
          't': jnp.ones(())}


def test_schedule_warmup_then_cosine():
  sched = optim.make_schedule(_config(), total_steps=110)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 5e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1e-2, rtol=1e-6)
  np.testing.assert_allclose(float(sched(60)), 5e-3, rtol=1e-5)  # Half-way through the cosine.
  assert float(sched(110)) < 1e-8


@pytest.mark.parametrize('name', ['adamw', 'adafactor'])
def test_weight_decay_only_on_kernels(name):
  params = _params()
  tx, _ = optim.make_optimizer(_config(name=name, warmup_steps=0), params, total_steps=100)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # With zero gradients the only update is weight decay: it must touch kernels and nothing else.
  assert float(jnp.abs(updates['image']['Dense_0']['kernel']).max()) > 0
  assert float(jnp.abs(updates['image']['Dense_0']['bias']).max()) == 0
  assert float(jnp.abs(updates['t']).max()) == 0


def test_frozen_groups_get_no_updates():
  params = _params()
  tx, _ = optim.make_optimizer(_config(frozen=('^image/',), warmup_steps=0), params, total_steps=100)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates['image']['Dense_0']['kernel']).max()) == 0
  assert float(jnp.abs(updates['text']['Dense_0']['kernel']).max()) > 0
  with pytest.raises(ConfigError, match='freezes every parameter'):
    optim.make_optimizer(_config(frozen=('.*',)), params, total_steps=100)
  with pytest.raises(ConfigError, match='bad regex'):
    optim.make_optimizer(_config(frozen=('(',)), params, total_steps=100)


@pytest.mark.parametrize('name', ['adamw', 'adafactor'])
def test_optimizer_minimises_a_quadratic(name):
  params = {'w': {'kernel': jnp.full((4, 4), 3.0)}}
  tx, _ = optim.make_optimizer(_config(name=name, lr=0.1, wd=0.0, warmup_steps=0, schedule='constant'),
                               params, total_steps=200)
  state = tx.init(params)
  loss = lambda p: jnp.sum(p['w']['kernel'] ** 2)  # noqa: E731
  start = float(loss(params))
  for _ in range(100):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  assert float(loss(params)) < 0.05 * start


def test_unknown_optimizer_is_an_error():
  with pytest.raises(ConfigError, match='optim.name'):
    optim.make_optimizer(_config(name='sgd9'), _params(), total_steps=10)


@pytest.mark.parametrize('max_norm', [0.5, 100.0])
def test_clip_by_global_norm_matches_optax(max_norm):
  grads = {'a': jnp.arange(6.0).reshape(2, 3) - 2.0, 'b': jnp.array([3.0, -4.0])}
  ours, _ = optim.clip_by_global_norm(max_norm).update(grads, optim.clip_by_global_norm(max_norm).init(grads))
  theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.clip_by_global_norm(max_norm).init(grads))
  for k in grads:
    np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6)
  assert float(optax.tree.norm(ours)) == pytest.approx(min(max_norm, float(optax.tree.norm(grads))), rel=1e-6)
