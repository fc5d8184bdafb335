"""Losses across devices (ring, bidirectional ring, gather) against the dense single-device loss and gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jmm.errors import ConfigError
from jmm.validation import validate
from jmm.objectives import contrastive

AXES = ('data', 'fsdp', 'tensor')
COMBOS = [('sigmoid', 'ring'), ('sigmoid', 'bidir'), ('sigmoid', 'gather'), ('softmax', 'gather')]
T, BIAS = 10.0, -5.0


def _mesh(shape, names=AXES):
  devices = jax.devices()[:int(np.prod(shape))]
  return jax.make_mesh(shape, names[:len(shape)], axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                       devices=devices)


def _embeddings(batch, dim=16, seed=0):
  # Independent directions: similarities spread over [-1, 1], so no softmax saturates and float32 gradients
  # are well conditioned (aligned pairs at t=10 make the softmax gradient a cancellation of near-equal terms).
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(2, batch, dim)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  return z[0], z[1]


def _run(fn, *args):
  """jit-compiles and runs fn; XLA's backend optimisations off: these tiny programs are all compile time."""
  return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})(*args)


def _value_and_grads(fn, zimg, ztxt):
  return jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(zimg, ztxt, jnp.float32(T), jnp.float32(BIAS))


def _dense(name):
  return lambda zimg, ztxt, t, b: contrastive._dense_terms(zimg, ztxt, t, b, name)[0]


def _assert_close(got, want, rtol=1e-5):
  """Relative error ||got - want|| / ||want|| below rtol for every leaf (exact zeros must stay zero)."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    scale = np.linalg.norm(w)
    assert np.linalg.norm(g - w) <= rtol * scale + (1e-30 if scale == 0 else 0.0), (g, w)


# Every mesh of the contract and per-device batches 1, 3, 4 (global 8, 24, 32 on 8 devices, 4 and 12 on 4).
@pytest.mark.parametrize('shape,per_device', [((8,), 1), ((8, 1, 1), 3), ((4, 2, 1), 4), ((2, 2, 2), 3),
                                              ((2, 2, 2), 1)])
def test_sharded_losses_equal_dense_loss_and_gradients(shape, per_device):
  mesh = _mesh(shape)
  devices = int(np.prod([s for s, a in zip(shape, AXES) if a in contrastive.BATCH_AXES]))
  zimg, ztxt = _embeddings(devices * per_device, seed=per_device)

  def all_impls(zimg, ztxt):
    return [_value_and_grads(lambda *a, n=name, i=impl: contrastive.sharded_loss(*a, n, i)[0], zimg, ztxt)
            for name, impl in COMBOS]

  with jax.set_mesh(mesh):
    got = _run(all_impls, zimg, ztxt)
  for (name, impl), result in zip(COMBOS, got):
    _assert_close(result, _value_and_grads(_dense(name), zimg, ztxt))


@pytest.mark.parametrize('devices', [2, 3, 5, 7])
def test_rings_on_odd_and_small_device_counts(devices):
  """Fails if a ring schedule misses or repeats a block on n devices: loss, gradients or batch statistics.

  Bidirectional schedule: 2 devices take one exchange (the opposite block only), 3 one (two blocks), 5 and 7
  two and three (odd rings split evenly both ways, no opposite block); 5 and 7 use part of the 8 devices.
  """
  zimg, ztxt = _embeddings(2 * devices, seed=devices)
  want = _value_and_grads(_dense('sigmoid'), zimg, ztxt)
  want_stats = contrastive._dense_terms(zimg, ztxt, T, BIAS, 'sigmoid')[1]
  impls = ('ring', 'bidir')

  def with_stats(impl, zi, zt):  # ((loss, stats), grads) from one pass.
    fn = lambda *a: contrastive.sharded_loss(*a, 'sigmoid', impl)  # noqa: E731
    return jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True)(zi, zt, jnp.float32(T), jnp.float32(BIAS))

  with jax.set_mesh(_mesh((devices,))):
    got = _run(lambda zi, zt: [with_stats(impl, zi, zt) for impl in impls], zimg, ztxt)
  for impl, ((loss, stats), grads) in zip(impls, got):
    _assert_close((loss, grads), want)
    for key in ('pos', 'all', 'hits'):
      np.testing.assert_allclose(float(stats[key]), float(want_stats[key]), rtol=1e-5, atol=1e-6,
                                 err_msg=f'{impl} {key}')


def _normalised_loss_fn(impl, name):
  """The objective's loss on raw features that are L2-normalised first, as the model's towers do."""
  config = ml_collections.ConfigDict({'loss': name, 'impl': impl})

  def fn(params, x, y):
    zimg = x @ params['wi']
    ztxt = y @ params['wt']
    zimg = zimg / jnp.linalg.norm(zimg, axis=-1, keepdims=True)
    ztxt = ztxt / jnp.linalg.norm(ztxt, axis=-1, keepdims=True)
    outputs = {'zimg': zimg, 'ztxt': ztxt, 't': jnp.exp(params['log_t']), 'b': params['b']}
    return contrastive.loss(outputs, {}, config)

  return jax.value_and_grad(fn, has_aux=True)


def test_objective_under_jit_and_grad_matches_dense_with_metrics():
  rng = np.random.default_rng(7)
  batch, width, dim = 16, 12, 8
  wi = rng.normal(size=(width, dim)).astype(np.float32)
  params = {'wi': wi, 'wt': (wi + 0.5 * rng.normal(size=(width, dim))).astype(np.float32),
            'log_t': np.float32(np.log(10.0)), 'b': np.float32(-5.0)}
  x = rng.normal(size=(batch, width)).astype(np.float32)
  y = (x + 0.5 * rng.normal(size=(batch, width))).astype(np.float32)  # Partly matching: accuracy strictly in (0, 1).
  combos = [('sigmoid', 'ring'), ('sigmoid', 'bidir'), ('softmax', 'gather')]
  want = _run(lambda *a: [_normalised_loss_fn('dense', name)(*a) for name, _ in combos], params, x, y)
  mesh = _mesh((4, 2, 1))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  with jax.set_mesh(mesh):
    xs, ys = jax.device_put(x, sharding), jax.device_put(y, sharding)
    got = _run(lambda *a: [_normalised_loss_fn(impl, name)(*a) for name, impl in combos], params, xs, ys)
  for ((loss, metrics), grads), ((got_loss, got_metrics), got_grads) in zip(want, got):
    assert 0.0 < float(metrics['batch_i2t_acc']) < 1.0
    _assert_close((got_loss, got_grads), (loss, grads))
    for key in ('sim_pos', 'sim_neg', 'batch_i2t_acc', 't', 'b'):
      np.testing.assert_allclose(float(got_metrics[key]), float(metrics[key]), rtol=1e-5, atol=1e-6, err_msg=key)


def test_sharded_impls_fall_back_to_dense_without_batch_devices():
  zimg, ztxt = _embeddings(6)
  outputs = {'zimg': zimg, 'ztxt': ztxt, 't': jnp.float32(T), 'b': jnp.float32(BIAS)}
  dense_cfg = ml_collections.ConfigDict({'loss': 'sigmoid', 'impl': 'dense'})
  want, want_metrics = contrastive.loss(outputs, {}, dense_cfg)
  ring_cfg = ml_collections.ConfigDict({'loss': 'sigmoid', 'impl': 'ring'})
  for mesh in (None, _mesh((1, 1, 8))):  # No mesh; a mesh whose batch axes have size 1 ('tensor' only).
    if mesh is None:
      got, got_metrics = contrastive.loss(outputs, {}, ring_cfg)
    else:
      with jax.set_mesh(mesh):
        got, got_metrics = contrastive.loss(outputs, {}, ring_cfg)
    assert float(got) == float(want)
    assert {k: float(v) for k, v in got_metrics.items()} == {k: float(v) for k, v in want_metrics.items()}


def _device_shapes(jaxpr, out):
  """Shapes of the values one device holds: every value of `jaxpr` and the jaxprs nested in its equations.

  A shard_map's outputs are left out: outside the map they are the global view of per-device values (residuals
  of [b, B] per device read [B, B] there); its body, which is per device, is walked like any other.
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name != 'shard_map':
      out.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, 'shape'))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if hasattr(sub, 'eqns') or hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
          _device_shapes(sub, out)
  return out


def test_ring_never_holds_global_logits():
  devices, per_device = 8, 4
  batch = devices * per_device
  zimg, ztxt = _embeddings(batch)
  with jax.set_mesh(_mesh((devices,))):
    for name, impl in COMBOS + [('sigmoid', 'dense'), ('softmax', 'dense')]:
      fn = lambda *a, n=name, i=impl: _value_and_grads(lambda *b: contrastive.sharded_loss(*b, n, i)[0], *a)
      shapes = _device_shapes(jax.make_jaxpr(fn)(zimg, ztxt), set())
      assert ((batch, batch) in shapes) == (impl == 'dense'), (name, impl)
      if impl in ('ring', 'bidir'):  # Per device: blocks of b x b, never b x B.
        assert (per_device, per_device) in shapes and (per_device, batch) not in shapes


def test_impl_must_fit_the_loss():
  zimg, ztxt = _embeddings(4)
  outputs = {'zimg': zimg, 'ztxt': ztxt, 't': jnp.float32(T), 'b': jnp.float32(BIAS)}
  with pytest.raises(ValueError, match="impl='ring' is not available for loss='softmax'"):
    contrastive.loss(outputs, {}, ml_collections.ConfigDict({'loss': 'softmax', 'impl': 'ring'}))
  with pytest.raises(ValueError, match="impl='allreduce'"):
    contrastive.sharded_loss(zimg, ztxt, T, BIAS, 'sigmoid', 'allreduce')
  with jax.set_mesh(_mesh((8,))), pytest.raises(ValueError, match='divisible'):
    contrastive.sharded_loss(*_embeddings(12), T, BIAS, 'sigmoid', 'ring')
  from configs import clip
  config = clip.get_config()
  assert config.objectives.softmax.impl == 'dense'
  config.objectives.softmax.impl = 'bidir'
  with pytest.raises(ConfigError, match="config.objectives.softmax: impl='bidir'"):
    validate(config)
  config.objectives.softmax.impl = 'gather'
  validate(config)
