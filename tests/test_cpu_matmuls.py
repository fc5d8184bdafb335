"""oneDNN matmuls on XLA:CPU (jmm.cpu_matmuls): the options, the safety check, and the training step under them."""
from __future__ import annotations

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmm import cpu_matmuls

ONEDNN = cpu_matmuls.ONEDNN_OPTIONS
x86 = pytest.mark.skipif(platform.machine().lower() not in ('x86_64', 'amd64'), reason='oneDNN checks: x86-64')


def _hlo(fn, *args, options=ONEDNN):
  return jax.jit(fn).lower(*args).compile(compiler_options=options).as_text()


def _args(*shapes):
  keys = jax.random.split(jax.random.key(0), len(shapes))
  return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]


def test_compiler_options_by_mode_and_backend():
  assert cpu_matmuls.compiler_options('xla', 'cpu') == {}
  assert cpu_matmuls.compiler_options('onednn', 'gpu') == {}
  assert cpu_matmuls.compiler_options('auto', 'tpu') == {}
  assert cpu_matmuls.compiler_options('onednn', 'cpu') == ONEDNN
  with pytest.raises(ValueError, match='cpu_matmuls=.*onednn'):
    cpu_matmuls.compiler_options('mkl', 'cpu')


@x86
@pytest.mark.parametrize('case', ['dot', 'dot_plus_bias'])
def test_safe_fusions_are_accepted_and_run_on_onednn(case):
  x, w, b = _args((48, 40), (40, 24), (24,))
  fn = {'dot': lambda x, w, b: x @ w, 'dot_plus_bias': lambda x, w, b: x @ w + b}[case]
  hlo = _hlo(fn, x, w, b)
  assert '__onednn_fusion' in hlo  # The options really route the dot to oneDNN...
  assert cpu_matmuls.unsupported_fusions(hlo) == []  # ...in a fusion the check accepts.
  step, onednn = cpu_matmuls.checked_jit(lambda o: jax.jit(fn, compiler_options=o), ONEDNN, x, w, b)
  assert onednn
  np.testing.assert_allclose(step(x, w, b), fn(*(np.asarray(a) for a in (x, w, b))), rtol=1e-5, atol=1e-5)


@x86
@pytest.mark.parametrize('case', ['two_dots', 'prologue', 'batched_scaled'])
def test_fusions_onednn_gets_wrong_are_refused_and_the_step_falls_back(case):
  # Run with the options, the first two kill the process ("partition compile failed") and the third returns
  # wrong numbers; so they are only compiled here, and run through checked_jit's fallback.
  x, a, y, b = _args((4, 2, 16, 8), (4, 2, 16, 8), (4, 2, 16, 8), (4, 2, 8, 16))
  mm = lambda u, v: jnp.einsum('bhqd,bhkd->bhqk', u, v)
  fn = {'two_dots': lambda x, a, y, b: mm(x, a) + mm(y, a),
        'prologue': lambda x, a, y, b: mm(x + y, a),
        'batched_scaled': lambda x, a, y, b: mm(x, a) * 0.25}[case]
  assert cpu_matmuls.unsupported_fusions(_hlo(fn, x, a, y, b))
  step, onednn = cpu_matmuls.checked_jit(lambda o: jax.jit(fn, compiler_options=o), ONEDNN, x, a, y, b)
  assert not onednn
  assert '__onednn_fusion' not in step.lower(x, a, y, b).compile().as_text()
  np.testing.assert_allclose(step(x, a, y, b), fn(*(np.asarray(t) for t in (x, a, y, b))), rtol=1e-5, atol=1e-5)


def test_without_options_nothing_is_compiled():
  made = []
  step, onednn = cpu_matmuls.checked_jit(lambda o: made.append(o) or jax.jit(jnp.sin), {}, jnp.ones(3))
  assert made == [None] and not onednn


@x86
def test_train_step_runs_on_onednn_and_matches_xla_matmuls():
  # The real training step of a tiny SigLIP: accepted by the check (jmm's layers keep each dot alone in its
  # fusion) and numerically the same as with XLA's default matmul library.
  from benchmarks import common
  config = common.load_config('configs/siglip.py:res=32,batch=4')
  # MAP pooling (the ViT variants'): with the tiny towers' mean pooling XLA:CPU's oneDNN rewriter claims no dot
  # of the step at all (benchmarks/NOTES.md 2026-12-03), so there would be nothing to check.
  config.model.image.update(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=(8, 8), pool_type='map')
  config.model.text.update(width=32, depth=2, mlp_dim=64, num_heads=2)
  config.model.out_dim = 16
  losses = {}
  for mode in ('onednn', 'xla'):
    config.cpu_matmuls = mode
    step, state, batch, _ = common.build_train_step(config, 64, 4)
    hlo = step.lower(state, batch).compile().as_text()
    assert ('__onednn_fusion' in hlo) == (mode == 'onednn')
    losses[mode] = []
    for _ in range(3):
      state, metrics = step(state, batch)
      losses[mode].append(float(metrics['loss']))
  assert losses['onednn'][-1] < losses['onednn'][0]
  np.testing.assert_allclose(losses['onednn'], losses['xla'], rtol=1e-5)


@pytest.mark.parametrize('shapes', [((50, 24), (50, 8)), ((50, 8), (50, 24)), ((2, 3, 20, 16), (2, 3, 20, 4))])
def test_row_contraction_matches_einsum(shapes):
  a, b = _args(*shapes)
  np.testing.assert_allclose(cpu_matmuls.row_contraction(a, b), jnp.einsum('...mp,...mq->...pq', a, b),
                             rtol=1e-5, atol=1e-5)


def _dot_shapes(hlo):
  return sorted(line.split(' = ')[1].split('{')[0] for line in hlo.splitlines() if ' dot(' in line)


@x86
def test_weight_gradient_transposes_the_narrower_operand():
  # fc_out's weight gradient h^T dy with h [tokens, 48] wider than dy [tokens, 16]: on a CPU the dot computes the
  # [16, 48] dW^T (oneDNN copies the narrow dy transposed, not h), and the swap back is not folded into it.
  from jmm.models import layers
  h, w, b, g = _args((4, 25, 48), (48, 16), (16,), (4, 25, 16))
  loss = lambda w, h: jnp.vdot(layers.token_matmul(h, w, b), g)  # noqa: E731
  dots = _dot_shapes(_hlo(jax.grad(loss), w, h))
  assert 'f32[16,48]' in dots and 'f32[48,16]' not in dots, dots
  dw = jax.jit(jax.grad(loss))(w, h)
  np.testing.assert_allclose(dw, jnp.einsum('btp,btq->pq', h, g), rtol=1e-5, atol=1e-5)
  # The other way round (x narrower than dy, as fc_in) is left as XLA writes it: x^T dy.
  x, w_in = _args((4, 25, 16), (16, 48))
  g_in = _args((4, 25, 48))[0]
  loss_in = lambda w, x: jnp.vdot(layers.token_matmul(x, w, jnp.zeros(48)), g_in)  # noqa: E731
  assert 'f32[16,48]' in _dot_shapes(_hlo(jax.grad(loss_in), w_in, x))
