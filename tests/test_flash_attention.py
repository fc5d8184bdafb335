"""Pallas flash-attention kernels (Triton-style GPU and Mosaic TPU, both interpreted on CPU) vs the reference.

Every case checks the forward output and the gradients w.r.t. q, k and v (one VJP with a random cotangent, so
every output element matters) against `attention.reference_attention`, at tiny shapes chosen so that the block
logic is exercised: ragged lengths padded inside the wrapper, several key and query blocks, block_q != block_k,
causal block skipping, segment ids, q length != kv length (the MAP head's single query), fully masked rows.
The last test trains a tiny two-tower model a few SGD steps with attention_impl 'xla' and 'pallas'.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmm.kernels import attention
from jmm.kernels import flash_attention_gpu
from jmm.kernels import flash_attention_tpu
from jmm.models import two_tower
from jmm.objectives import contrastive

KERNELS = {'gpu': flash_attention_gpu.flash_attention, 'tpu': flash_attention_tpu.flash_attention}
TOL = {jnp.float32: dict(out=1e-5, grad=1e-4), jnp.bfloat16: dict(out=3e-2, grad=6e-2)}


def _inputs(b, tq, tk, h, d, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v, cot = (jnp.asarray(rng.standard_normal(s), dtype) for s in
                  ((b, tq, h, d), (b, tk, h, d), (b, tk, h, d), (b, tq, h, d)))
  return q, k, v, cot


def _segments(b, t, seed, num=3):
  """Sorted ids in [0, num): contiguous packed segments, as a packing data loader would make."""
  return jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, num, (b, t)), axis=1), jnp.int32)


def _check(kernel, shape, *, causal=False, segment_ids=None, dtype=jnp.float32, **blocks):
  """Kernel output and VJP vs the reference (computed in float32 from the same inputs)."""
  b, tq, tk, h, d = shape
  q, k, v, cot = _inputs(b, tq, tk, h, d, dtype)

  @jax.jit
  def run(q, k, v, cot):
    fn = lambda q, k, v: KERNELS[kernel](q, k, v, causal=causal, segment_ids=segment_ids, **blocks)
    ref = lambda q, k, v: attention.reference_attention(q, k, v, causal=causal, segment_ids=segment_ids)
    out, vjp = jax.vjp(fn, q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    want, ref_vjp = jax.vjp(ref, f32(q), f32(k), f32(v))
    return (out, *vjp(cot)), (want, *ref_vjp(f32(cot)))

  got, want = run(q, k, v, cot)
  assert got[0].shape == q.shape and got[0].dtype == q.dtype
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    tol = TOL[dtype]['out' if name == 'out' else 'grad']
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol, rtol=tol,
                               err_msg=f'{kernel} {name} {shape} causal={causal}')


# (B, Tq, Tk, H, D), causal, segment ids, blocks. Block sizes are small so that every case spans several blocks.
GPU_CASES = [
    ((2, 16, 16, 2, 16), False, False, {}),                            # text-like: one 16-row block
    ((1, 70, 70, 2, 32), True, False, dict(block_q=32, block_k=32)),   # ragged (70 -> 96), causal skipping
    ((2, 33, 33, 1, 16), False, True, dict(block_q=16, block_k=16)),   # segment ids, ragged
    ((1, 70, 70, 1, 16), True, True, dict(block_q=32, block_k=16)),    # causal + segments, block_q != block_k
    ((2, 1, 23, 2, 24), False, False, dict(block_k=16)),               # MAP head: one query; head_dim 24 -> 32
    ((1, 40, 70, 1, 16), True, False, dict(block_q=16, block_k=32)),   # causal cross-attention, Tq < Tk
]


@pytest.mark.parametrize('shape,causal,segments,blocks', GPU_CASES)
def test_gpu_kernel_matches_reference(shape, causal, segments, blocks):
  seg = _segments(shape[0], shape[1], seed=3) if segments else None
  _check('gpu', shape, causal=causal, segment_ids=seg, **blocks)


def test_gpu_kernel_bfloat16():
  _check('gpu', (1, 33, 33, 2, 32), causal=True, dtype=jnp.bfloat16, block_q=16, block_k=16)


def test_gpu_kernel_fully_masked_rows():
  """Queries whose segment has no key get uniform weights over the real keys (never the padding) and no dq."""
  q_ids = jnp.array([[0, 0, 5, 1, 1, 5]], jnp.int32)  # Segment 5 has no key.
  kv_ids = jnp.asarray(np.repeat([[0, 1]], [11, 12], axis=1), jnp.int32)  # 23 keys: padded to 32.
  _check('gpu', (1, 6, 23, 1, 16), segment_ids=(q_ids, kv_ids), block_k=16)


TPU_CASES = [
    ((1, 70, 70, 1, 16), True, True, dict(block_q=32, block_k=32)),    # ragged, causal + segments, 3x3 blocks
    ((2, 1, 23, 1, 16), False, False, {}),                             # MAP head: one query (8-row block)
]


@pytest.mark.parametrize('shape,causal,segments,blocks', TPU_CASES)
def test_tpu_kernel_matches_reference(shape, causal, segments, blocks):
  seg = _segments(shape[0], shape[1], seed=4) if segments else None
  _check('tpu', shape, causal=causal, segment_ids=seg, **blocks)


@pytest.mark.slow
@pytest.mark.parametrize('shape,causal,segments,blocks', [
    ((2, 33, 33, 2, 16), False, True, dict(block_q=16, block_k=16)),
    ((1, 40, 70, 1, 16), True, False, dict(block_q=16, block_k=32)),
])
def test_tpu_kernel_more_shapes(shape, causal, segments, blocks):
  seg = _segments(shape[0], shape[1], seed=5) if segments else None
  _check('tpu', shape, causal=causal, segment_ids=seg, **blocks)


@pytest.mark.slow
def test_tpu_kernel_bfloat16():
  _check('tpu', (1, 33, 33, 2, 32), causal=True, dtype=jnp.bfloat16, block_q=16, block_k=16)


def test_kernels_reject_unsupported_shapes():
  q = jnp.zeros((1, 8, 1, 320))  # head_dim 320: over Triton's 256.
  with pytest.raises(ValueError, match='head_dim'):
    flash_attention_gpu.flash_attention(q, q, q)
  with pytest.raises(ValueError, match='segment_ids'):
    flash_attention_gpu.flash_attention(jnp.zeros((1, 8, 1, 16)), jnp.zeros((1, 8, 1, 16)),
                                        jnp.zeros((1, 8, 1, 16)), segment_ids=jnp.zeros((1, 7), jnp.int32))


# ---------------------------------------------------------------------------------------------------------
# Issue 4, point 3: switching attention_impl changes no loss value beyond bf16 tolerance.

VIT = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=(4, 4), pool_type='map')  # 16 tokens + MAP
TXT = dict(vocab_size=50, width=32, depth=1, mlp_dim=64, num_heads=2, causal=True)  # causal text tower


def _sgd_run(impl: str, params, images, texts, steps: int = 3, lr: float = 0.5):
  """Losses of `steps` SGD steps of the sigmoid loss, and the final parameters."""
  model = two_tower.TwoTower(image={**VIT, 'attention_impl': impl}, text={**TXT, 'attention_impl': impl},
                             out_dim=16)

  @jax.jit
  def step(params):
    def loss_fn(p):
      ex = model.apply({'params': p}, {'image': images, 'text': texts})
      return contrastive.sigmoid_loss(ex['zimg'], ex['ztxt'], ex['t'], ex['b'])
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, jax.tree.map(lambda p, g: p - lr * g, params, grads)

  losses = []
  for _ in range(steps):
    loss, params = step(params)
    losses.append(float(loss))
  return np.array(losses), params


def test_training_loss_same_with_pallas_and_xla():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  texts = jnp.asarray(rng.integers(0, 50, (4, 7)), jnp.int32)
  # Random parameters in the model's tree: no init to compile, and every bias / scale matters.
  shapes = nn.unbox(jax.eval_shape(two_tower.TwoTower(image=VIT, text=TXT, out_dim=16).init, jax.random.key(0),
                                   {'image': images, 'text': texts})['params'])
  params = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), shapes)
  xla_losses, xla_params = _sgd_run('xla', params, images, texts)
  pallas_losses, pallas_params = _sgd_run('pallas', params, images, texts)
  assert xla_losses[-1] < xla_losses[0]  # The steps train, so parameters (and attention) really change.
  np.testing.assert_allclose(pallas_losses, xla_losses, rtol=1e-2)  # bf16 tolerance, as the issue asks...
  for a, b in zip(jax.tree.leaves(pallas_params), jax.tree.leaves(xla_params)):  # ...and in fact far closer.
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kernel,platform', [('gpu', 'cuda'), ('tpu', 'tpu')])
def test_kernels_lower_for_their_hardware(kernel, platform):
  """Cross-platform lowering (no GPU / TPU needed): the compiled, not interpreted, kernels pass Pallas' Triton and
  Mosaic lowering rules (block shapes, ops, index maps) at a ViT-like ragged bf16 shape, causal, with segments."""
  q = jax.ShapeDtypeStruct((2, 197, 4, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 197), jnp.int32)

  def fwd_bwd(q, k, v, seg):
    fn = lambda q, k, v: KERNELS[kernel](q, k, v, causal=True, segment_ids=seg, interpret=False)
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(out)

  text = jax.jit(fwd_bwd).trace(q, q, q, seg).lower(lowering_platforms=(platform,)).as_text()
  assert text.count('jmm_flash_attention') >= 3  # The forward, dk/dv and dq kernels are all in the program.


@pytest.mark.parametrize('mesh_shape,heads', [((2, 2, 2), 4), ((2, 1, 4), 2)])
def test_pallas_runs_per_shard_under_a_mesh(mesh_shape, heads, monkeypatch):
  """Under a mesh the kernel runs on each device's examples and heads (XLA cannot partition a pallas_call: it
  would gather the whole batch onto every device); results and gradients equal the reference. With 4-way tensor
  and 2 heads, the head axis does not divide and is left out (batch-only sharding)."""
  seen = []
  kernel = flash_attention_gpu.flash_attention
  monkeypatch.setattr(flash_attention_gpu, 'flash_attention', lambda q, *a, **kw: (seen.append(q.shape),
                                                                                   kernel(q, *a, **kw))[1])
  q, k, v, cot = _inputs(8, 17, 17, heads, 16, jnp.float32)
  seg = _segments(8, 17, seed=1)
  mesh = jax.make_mesh(mesh_shape, ('data', 'fsdp', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))

  def run(impl, q, k, v, cot):
    fn = lambda q, k, v: attention.dot_product_attention(q, k, v, causal=True, segment_ids=seg, impl=impl)
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cot))

  with jax.set_mesh(mesh):
    args = [jax.device_put(x, shard) for x in (q, k, v, cot)]
    got = jax.jit(functools.partial(run, 'pallas'))(*args)
    want = jax.jit(functools.partial(run, 'reference'))(*args)
  batch_shards = mesh_shape[0] * mesh_shape[1]
  local_heads = heads // mesh_shape[2] if heads % mesh_shape[2] == 0 else heads
  assert seen and all(s == (8 // batch_shards, 17, local_heads, 16) for s in seen), seen
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4, err_msg=name)
