"""Remat policies on the encoder: same loss and gradients as without remat, with and without scan."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmm.models import encoder


def _loss_and_grads(remat, policy, scan):
  model = encoder.Encoder(depth=2, mlp_dim=64, num_heads=2, remat=remat, remat_policy=policy, scan=scan)
  x = jax.random.normal(jax.random.key(0), (2, 6, 32))
  params = model.init(jax.random.key(1), x)['params']
  loss = lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, x)))  # noqa: E731
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize('scan,cases', [
    (False, [(True, 'none'), (False, 'dots'), (False, 'dots_no_batch')]),
    (True, [(False, 'dots')]),
])
def test_remat_policies_match_no_remat(scan, cases):
  ref_loss, ref_grads = _loss_and_grads(False, 'none', scan)
  for remat, policy in cases:
    loss, grads = _loss_and_grads(remat, policy, scan)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=policy)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)


def test_remat_policy_resolution():
  assert encoder.remat_policy(False, 'none') == (False, None)
  assert encoder.remat_policy(True, 'none') == (True, None)
  assert encoder.remat_policy(False, 'dots') == (True, jax.checkpoint_policies.checkpoint_dots)
  with pytest.raises(ValueError, match='remat_policy.*known: none, full, dots'):
    encoder.remat_policy(False, 'everything')


def test_dots_policy_saves_matmuls():
  # With 'dots' the backward pass recomputes no matmul; with 'full' it recomputes the forward's.
  def count_dots(policy):
    model = encoder.Encoder(depth=1, mlp_dim=64, num_heads=2, remat_policy=policy)
    x = jnp.ones((2, 6, 32))
    params = model.init(jax.random.key(1), x)['params']
    grad = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x)))
    return str(jax.jit(grad).lower(params).compile().as_text()).count(' dot(')
  assert count_dots('full') > count_dots('dots')
