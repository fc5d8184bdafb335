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
def test_locked_subtrees_get_no_updates_and_no_optimizer_state(name):
  """`locked` (config.model.locked's parameters): zero updates, weight decay included, and no moments at all."""
  params = {**_params(), 'image': {'Dense_0': {'kernel': jnp.ones((64, 32)), 'bias': jnp.ones((32,))}}}
  config = _config(name=name, warmup_steps=0)
  state_bytes = lambda tx: sum(x.nbytes for x in jax.tree.leaves(tx.init(params)))  # noqa: E731
  free, _ = optim.make_optimizer(config, params, total_steps=100)
  tx, _ = optim.make_optimizer(config, params, total_steps=100, locked=('image',))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates['image']))
  assert float(jnp.abs(updates['text']['Dense_0']['kernel']).max()) > 0
  # The image tower's 2080 parameters were the bulk of the moments (AdamW: mu and nu; Adafactor: momentum and
  # factored statistics); what is left is the small text tower's and the scalars'.
  assert state_bytes(tx) < 0.25 * state_bytes(free)
  paths = [optim.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tx.init(params))[0]]
  assert not any('/image/' in f'/{p}/' for p in paths)
  with pytest.raises(ConfigError, match='locked image, text freezes every parameter'):
    optim.make_optimizer(config, {'image': params['image'], 'text': params['text']}, 100, locked=('image', 'text'))


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


@pytest.mark.parametrize('name', ['adamw', 'adafactor'])
def test_weight_decay_size_follows_the_schedule(name):
  """Fails if weight decay has the wrong size, misses the schedule, or touches biases / scalars."""
  kernel = jnp.arange(1.0, 13.0).reshape(3, 4)
  params = {'Dense_0': {'kernel': kernel, 'bias': jnp.full((4,), 2.0)}, 'LayerNorm_0': {'scale': jnp.full((4,), 3.0)},
            't': jnp.full((), 4.0)}
  config = _config(name=name, lr=1e-2, wd=0.1, warmup_steps=2, schedule='linear', min_lr_ratio=0.0)
  tx, sched = optim.make_optimizer(config, params, total_steps=6)
  state = tx.init(params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  for step in range(5):
    updates, state = tx.update(zero_grads, state, params)
    # AdamW (optax): -lr(step) * wd * param. Adafactor (ScalingViT's decoupled decay): -wd * lr(step) / lr * param.
    factor = float(sched(step)) * config.wd / (config.lr if name == 'adafactor' else 1.0)
    np.testing.assert_allclose(updates['Dense_0']['kernel'], -factor * kernel, rtol=1e-5, atol=1e-12,
                               err_msg=f'step {step}')
    for leaf in (updates['Dense_0']['bias'], updates['LayerNorm_0']['scale'], updates['t']):
      assert float(jnp.abs(leaf).max()) == 0.0
  assert float(sched(0)) == 0.0 and float(sched(3)) > 0.0  # The steps above cover warmup and decay.


def test_linear_and_constant_schedules():
  """Fails if the 'linear' or 'constant' schedule (warmup included) changes shape or end value."""
  linear = optim.make_schedule(_config(schedule='linear', min_lr_ratio=0.1), total_steps=110)
  for step, want in [(0, 0.0), (5, 5e-3), (10, 1e-2), (60, 5.5e-3), (85, 3.25e-3), (110, 1e-3), (200, 1e-3)]:
    np.testing.assert_allclose(float(linear(step)), want, rtol=1e-5, atol=1e-12, err_msg=f'step {step}')
  constant = optim.make_schedule(_config(schedule='constant', min_lr_ratio=0.1), total_steps=110)
  for step, want in [(0, 0.0), (5, 5e-3), (10, 1e-2), (60, 1e-2), (110, 1e-2), (500, 1e-2)]:
    np.testing.assert_allclose(float(constant(step)), want, rtol=1e-5, atol=1e-12, err_msg=f'step {step}')
  no_warmup = optim.make_schedule(_config(schedule='linear', warmup_steps=0), total_steps=100)
  np.testing.assert_allclose([float(no_warmup(s)) for s in (0, 50, 100)], [1e-2, 5e-3, 0.0], atol=1e-9)


def test_make_optimizer_clips_the_global_norm():
  """Fails if make_optimizer stops clipping gradients above clip_norm (or clips those below it)."""
  params = {'a': {'kernel': jnp.zeros((2, 3))}, 'b': jnp.zeros((2,))}
  grads = {'a': {'kernel': jnp.arange(6.0).reshape(2, 3) - 2.0}, 'b': jnp.array([3.0, -4.0])}
  norm = float(optax.tree.norm(grads))  # sqrt(19 + 25)

  def first_update(g, clip_norm):
    # eps=1 makes Adam's update depend on the gradient's size (with eps ~ 0 it is ~sign(g), blind to clipping).
    tx, _ = optim.make_optimizer(_config(lr=1.0, wd=0.0, eps=1.0, warmup_steps=0, schedule='constant',
                                         clip_norm=clip_norm), params, total_steps=10)
    return tx.update(g, tx.init(params), params)[0]

  scaled = jax.tree.map(lambda g: g * (1.0 / norm), grads)  # The same direction at global norm 1.
  clipped = first_update(grads, 1.0)
  assert not np.allclose(first_update(grads, 0.0)['b'], clipped['b'])  # Clipping does change this update.
  for got, want in zip(jax.tree.leaves(clipped), jax.tree.leaves(first_update(scaled, 0.0))):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(first_update(grads, 2 * norm)), jax.tree.leaves(first_update(grads, 0.0))):
    np.testing.assert_array_equal(got, want)  # Below clip_norm: untouched.


def test_adafactor_first_step_is_lr_times_sign():
  """Fails if Adafactor's factored-RMS scaling, momentum or learning rate wiring changes its first update."""
  params = {'w': {'kernel': jnp.zeros((3, 4))}, 'b': jnp.zeros((4,))}
  grads = {'w': {'kernel': jnp.arange(12.0).reshape(3, 4) - 5.5}, 'b': jnp.array([0.5, -2.0, 3.0, -0.01])}
  tx, _ = optim.make_optimizer(_config(name='adafactor', lr=0.1, wd=0.0, warmup_steps=0, schedule='constant',
                                       clip_norm=0.0), params, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Step 1: beta2 = 1 - 1^-0.8 = 0, so the second moment is g^2 and the update g / |g| (momentum starts at 0).
  for got, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, -0.1 * np.sign(g), rtol=1e-6)
