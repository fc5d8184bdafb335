"""Attention dispatch: every implementation against the plain-jnp reference, forward and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmm.kernels import attention


def _naive(q, k, v, mask=None):
  """Loop-free numpy float64 attention, independent of the jnp reference."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(np.asarray(mask), logits, -1e30)
  logits -= logits.max(-1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', probs, v)


def _qkv(shape_q, shape_kv, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in (shape_q, shape_kv, shape_kv))


def _random_mask(b, tq, tk, seed=1):
  """[b, 1, tq, tk] bool with roughly half the keys masked but at least one visible key per query."""
  mask = np.random.default_rng(seed).random((b, 1, tq, tk)) < 0.5
  mask[..., 0] = True
  return jnp.asarray(mask)


# (q shape [B, Tq, H, D], kv length): ragged lengths, one-token queries (MAP pooling), ViT-B-like 197 tokens.
CASES = [((2, 17, 2, 8), 17), ((1, 197, 3, 16), 197), ((3, 1, 4, 8), 23)]


@pytest.mark.parametrize('q_shape,tk', CASES)
@pytest.mark.parametrize('use_mask', [False, True])
def test_reference_matches_naive(q_shape, tk, use_mask):
  b, tq, h, d = q_shape
  q, k, v = _qkv(q_shape, (b, tk, h, d))
  mask = _random_mask(b, tq, tk) if use_mask else None
  np.testing.assert_allclose(jax.jit(attention.reference_attention)(q, k, v, mask), _naive(q, k, v, mask),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('impl', ['xla'])  # cudnn: GPU-only test below; Pallas kernels: test_flash_attention.py.
@pytest.mark.parametrize('q_shape,tk', CASES)
@pytest.mark.parametrize('use_mask', [False, True])
def test_dispatch_forward_and_grads(impl, q_shape, tk, use_mask):
  b, tq, h, d = q_shape
  q, k, v = _qkv(q_shape, (b, tk, h, d))
  mask = _random_mask(b, tq, tk) if use_mask else None
  # A random cotangent, so every output element matters to the gradients.
  cot = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32)

  @jax.jit
  def fwd_and_grads(q, k, v, mask):
    fn = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, impl=impl)
    ref = lambda q, k, v: attention.reference_attention(q, k, v, mask)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cot)
    return (fn(q, k, v), ref(q, k, v), jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v),
            jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v))

  out, want, grads, ref_grads = fwd_and_grads(q, k, v, mask)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


def test_low_rank_masks_broadcast():
  """A causal [Tq, Tk] mask and a [B, 1, 1, Tk] padding mask both broadcast to [B, H, Tq, Tk]."""
  q, k, v = _qkv((2, 6, 2, 8), (2, 6, 2, 8))
  causal = jnp.tril(jnp.ones((6, 6), bool))
  padding = jnp.arange(6)[None, None, None, :] < jnp.array([4, 6])[:, None, None, None]
  for mask in (causal, padding):
    full = jnp.broadcast_to(mask, (2, 2, 6, 6))
    want = _naive(q, k, v, full)
    for impl in ('xla', 'reference'):
      out = jax.jit(attention.dot_product_attention, static_argnames='impl')(q, k, v, mask, impl=impl)
      np.testing.assert_allclose(out, want,
                                 atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_reference():
  q, k, v = _qkv((2, 17, 2, 16), (2, 17, 2, 16), jnp.bfloat16)
  out = attention.dot_product_attention(q, k, v, impl='xla')
  assert out.dtype == jnp.bfloat16
  want = _naive(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2, rtol=3e-2)


def test_reference_impl_is_the_reference():
  q, k, v = _qkv((2, 5, 2, 8), (2, 9, 2, 8))
  mask = _random_mask(2, 5, 9)
  np.testing.assert_array_equal(attention.dot_product_attention(q, k, v, mask, impl='reference'),
                                attention.reference_attention(q, k, v, mask))


def test_unknown_impl_is_named():
  q, k, v = _qkv((1, 4, 1, 8), (1, 4, 1, 8))
  with pytest.raises(ValueError, match="'flash9000'.*xla"):
    attention.dot_product_attention(q, k, v, impl='flash9000')


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs an NVIDIA GPU')
def test_cudnn_matches_reference():
  q, k, v = _qkv((2, 197, 4, 64), (2, 197, 4, 64), jnp.bfloat16)
  out = attention.dot_product_attention(q, k, v, impl='cudnn')
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(attention.reference_attention(q, k, v), np.float32), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize('tq, tk, causal, masked', [
    (7, 7, False, False), (1, 6, False, False), (6, 7, False, False), (7, 7, True, False), (7, 5, False, True),
    (8, 8, False, False)])
def test_cudnn_pads_odd_lengths_to_even(tq, tk, causal, masked):
  """The cuDNN wrapper's padding of odd lengths (jax's cuDNN path refuses them for training), run through jax's
  XLA path on the CPU: same output and q / k / v gradients as the reference, at ViT-like odd lengths, one query,
  causal, with a dense mask, and unpadded at even lengths."""
  q, k, v = _qkv((2, tq, 2, 8), (2, tk, 2, 8))
  mask = _random_mask(2, tq, tk) if masked else None
  cot = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)

  def grads(fn):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cot), argnums=(0, 1, 2)))(q, k, v)

  padded = grads(lambda q, k, v: attention._cudnn_attention(q, k, v, mask, causal=causal, implementation='xla'))
  ref = grads(lambda q, k, v: attention.reference_attention(q, k, v, mask, causal=causal))
  np.testing.assert_allclose(padded[0], ref[0], rtol=1e-5)
  for g, r in zip(padded[1], ref[1]):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# causal / segment_ids through the dispatch, 'pallas' and 'auto'.

def test_causal_and_segment_ids_match_explicit_masks():
  """causal=True and segment_ids give exactly what the equivalent dense mask gives, on every dense path."""
  q, k, v = _qkv((2, 9, 2, 8), (2, 9, 2, 8))
  seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
  causal = np.tril(np.ones((9, 9), bool))
  same = np.asarray(seg)[:, None, :, None] == np.asarray(seg)[:, None, None, :]  # [B, 1, T, T]
  for impl in ('xla', 'reference'):
    run = lambda **kw: attention.dot_product_attention(q, k, v, impl=impl, **kw)
    np.testing.assert_allclose(run(causal=True), _naive(q, k, v, causal), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(run(segment_ids=seg), _naive(q, k, v, same), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(run(causal=True, segment_ids=seg), _naive(q, k, v, same & causal),
                               atol=1e-5, rtol=1e-5)
    # A dense mask is ANDed with both.
    mask = _random_mask(2, 9, 9)
    np.testing.assert_allclose(run(mask=mask, causal=True), _naive(q, k, v, np.asarray(mask) & causal),
                               atol=1e-5, rtol=1e-5)


def test_cross_attention_segment_pair():
  q, k, v = _qkv((1, 3, 1, 8), (1, 5, 1, 8))
  q_ids, kv_ids = jnp.asarray([[0, 1, 1]]), jnp.asarray([[0, 0, 1, 1, 1]])
  want = _naive(q, k, v, np.asarray(q_ids)[:, None, :, None] == np.asarray(kv_ids)[:, None, None, :])
  out = attention.dot_product_attention(q, k, v, segment_ids=(q_ids, kv_ids), impl='xla')
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match='pair'):  # One [B, T] array only for self-attention.
    attention.dot_product_attention(q, k, v, segment_ids=q_ids, impl='xla')


def test_pallas_dispatch_matches_reference_on_cpu():
  """impl='pallas' on CPU runs the Triton kernel interpreted; same numbers as the reference."""
  q, k, v = _qkv((1, 20, 2, 16), (1, 20, 2, 16))
  out = attention.dot_product_attention(q, k, v, causal=True, impl='pallas')
  np.testing.assert_allclose(out, attention.reference_attention(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


def test_pallas_rejects_dense_mask_and_auto_falls_back():
  q, k, v = _qkv((1, 6, 1, 16), (1, 6, 1, 16))
  mask = _random_mask(1, 6, 6)
  with pytest.raises(ValueError, match='dense mask'):
    attention.dot_product_attention(q, k, v, mask, impl='pallas')
  assert attention.choose_impl(q, k, mask, platform='tpu') == 'xla'
  np.testing.assert_array_equal(attention.dot_product_attention(q, k, v, mask, impl='auto'),
                                attention.dot_product_attention(q, k, v, mask, impl='xla'))


def test_auto_table():
  """'auto' per platform: cuDNN for bf16 on GPU where it applies, Pallas otherwise; XLA on CPU."""
  bf16 = jnp.zeros((2, 197, 12, 64), jnp.bfloat16)
  f32 = jnp.zeros((2, 197, 12, 64), jnp.float32)
  big = jnp.zeros((2, 197, 1, 320), jnp.float32)  # head_dim 320: over what cuDNN and the Triton kernel take.
  seg = jnp.zeros((2, 197), jnp.int32)
  # cuDNN where jax's cuDNN path takes the call (`_cudnn_traces`: asked of jax on a GPU backend, where jax 0.11.2
  # refuses 197 tokens; elsewhere the static checks stand), else the Triton kernel.
  cudnn_takes = attention._cudnn_traces(bf16.shape, bf16.shape, bf16.dtype, None, False)
  assert attention.choose_impl(bf16, bf16, platform='gpu') == ('cudnn' if cudnn_takes else 'pallas')
  assert attention.choose_impl(f32, f32, platform='gpu') == 'xla'  # cuDNN: fp16 / bf16; Triton fp32 is slow.
  assert attention.choose_impl(f32, f32, platform='tpu') == 'pallas'
  assert attention.supports('pallas', f32, f32, platform='gpu')  # It runs; 'auto' only passes it over.
  assert attention.choose_impl(bf16, bf16, segment_ids=seg, platform='gpu') == 'pallas'  # odd length + mask
  assert attention.choose_impl(big, big, platform='gpu') == 'xla'
  assert attention.choose_impl(bf16, bf16, platform='tpu') == 'pallas'
  assert attention.choose_impl(bf16, bf16, platform='cpu') == 'xla'


def test_xla_vjp_fully_masked_rows_and_bf16():
  """The hand-written VJP of 'xla' where autodiff is subtle: rows that see no key (uniform weights, no gradient
  to q / k through the masked logits) and bfloat16 inputs (float32 softmax, grads cast back)."""
  b, t, h, d = 2, 9, 2, 8
  q, k, v = _qkv((b, t, h, d), (b, t, h, d))
  mask = np.array(_random_mask(b, t, t))
  mask[0, 0, 3, :] = False  # Query 3 of example 0 sees nothing.
  mask = jnp.asarray(mask)
  cot = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)

  def grads(fn, dtype):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(x.astype(dtype) for x in (q, k, v)))

  xla = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, impl='xla')  # noqa: E731
  ref = lambda q, k, v: attention.reference_attention(q, k, v, mask)  # noqa: E731
  for g, r in zip(grads(xla, jnp.float32), grads(ref, jnp.float32)):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(grads(xla, jnp.float32)[0][0, 3], 0.0)  # No gradient from a row with no keys.
  for g, r in zip(grads(xla, jnp.bfloat16), grads(ref, jnp.float32)):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=6e-2, rtol=6e-2)


def test_auto_asks_jax_whether_cudnn_takes_the_call(monkeypatch):
  """jax's cuDNN path refuses some shapes its static rules allow (jax 0.11.2 on an H200: ViT's 197 tokens, MAP
  pooling's single query), raising while tracing; 'auto' asks jax (eval_shape of forward and VJP) and falls back
  to the Pallas kernel instead of failing the step."""
  bf16 = jnp.zeros((2, 197, 12, 64), jnp.bfloat16)
  asked = []

  def refuse(q_shape, k_shape, dtype, mask_shape, causal):
    asked.append((q_shape, k_shape, mask_shape, causal))
    return False

  monkeypatch.setattr(attention, '_cudnn_traces', refuse)
  assert attention.choose_impl(bf16, bf16, causal=True, platform='gpu') == 'pallas'
  assert asked == [((2, 197, 12, 64), (2, 197, 12, 64), None, True)]
  # The real probe answers with a bool and never raises: off a GPU it refuses (no cuDNN), by catching jax's error.
  takes = attention._cudnn_traces_cached((2, 8, 2, 64), (2, 8, 2, 64), jnp.dtype(jnp.bfloat16), None, False)
  assert isinstance(takes, bool)
  if jax.default_backend() != 'gpu':
    assert takes is False
