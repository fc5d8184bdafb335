"""MoE kernels (jmm.kernels.moe): Pallas routing and grouped matmul, GPU (Triton) and TPU (Mosaic) versions run in
interpret mode on CPU, against the XLA references (lax.top_k, stable argsort, lax.ragged_dot, one-hot einsum).

Shapes are tiny but chosen to exercise the block logic: token counts that are not a block multiple, groups that
straddle M tiles, empty experts (first, middle, last, all), sum(group_sizes) < M, K / N not block multiples, ties
in the router logits, k = 1 and k = E. Every gradient check is one VJP with a random cotangent, so every output
element matters.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from jmm.kernels import moe

PALLAS = ('pallas_gpu', 'pallas_tpu')
SMALL_BLOCKS = {'gpu': (16, 16, 16), 'tpu': (16, 128, 128)}  # several M tiles at tiny M


def _assert_close(got, want, tol, what):
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol,
                             err_msg=what)


# ---------------------------------------------------------------------------------------------------------------
# topk_route

def _logits(tokens, experts, seed, ties):
  rng = np.random.default_rng(seed)
  if ties:  # few distinct values: many ties, which must go to the lower expert index
    return jnp.asarray(rng.integers(0, 3, (tokens, experts)), jnp.float32)
  return jnp.asarray(rng.standard_normal((tokens, experts)), jnp.float32)


ROUTE_CASES = [  # (impl, T, E, k, ties)
    ('pallas_gpu', 37, 5, 1, False),    # T not a block multiple, E not a power of two, top-1
    ('pallas_gpu', 37, 5, 2, True),     # ties
    ('pallas_gpu', 8, 4, 4, True),      # k = E
    ('pallas_gpu', 70, 32, 2, False),   # two token blocks, 32 experts
    ('pallas_tpu', 37, 5, 2, True),
    ('pallas_tpu', 9, 3, 3, False),     # k = E
]


@pytest.mark.parametrize('impl,tokens,experts,k,ties', ROUTE_CASES)
def test_topk_route_matches_xla(impl, tokens, experts, k, ties):
  logits = _logits(tokens, experts, seed=tokens + k, ties=ties)
  cot = jnp.asarray(np.random.default_rng(1).standard_normal((tokens, k)), jnp.float32)

  def run(impl):
    (gates, idx), vjp = jax.vjp(lambda l: moe.topk_route(l, k, impl=impl), logits, has_aux=False)
    return gates, idx, vjp((cot, np.zeros(idx.shape, jax.dtypes.float0)))[0]

  gates, idx, grad = jax.jit(run, static_argnums=0)(impl)
  want_gates, want_idx, want_grad = jax.jit(run, static_argnums=0)('xla')
  assert gates.dtype == jnp.float32 and idx.dtype == jnp.int32 and idx.shape == (tokens, k)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(gates, want_gates)
  np.testing.assert_array_equal(grad, want_grad)
  assert np.count_nonzero(np.asarray(grad)) == np.count_nonzero(np.asarray(cot))  # only the selected entries


def test_topk_route_ties_go_to_lower_index():
  logits = jnp.array([[1., 3., 3., 0., 3.], [2., 2., 2., 2., 2.]])
  for impl in ('xla', 'pallas_gpu'):
    _, idx = moe.topk_route(logits, 3, impl=impl)
    np.testing.assert_array_equal(idx, [[1, 2, 4], [0, 1, 2]])


def test_topk_route_rejects_bad_k():
  with pytest.raises(ValueError, match='k must be in'):
    moe.topk_route(jnp.zeros((4, 3)), 4)
  with pytest.raises(ValueError, match='logits must be'):
    moe.topk_route(jnp.zeros((4,)), 1)
  with pytest.raises(ValueError, match='impl'):
    moe.topk_route(jnp.zeros((4, 3)), 1, impl='cuda')


# ---------------------------------------------------------------------------------------------------------------
# sort_by_expert, permute, unpermute

SORT_CASES = [  # (impl, T, k, E, experts actually used)
    ('pallas_gpu', 37, 2, 7, [0, 2, 3, 5]),     # empty experts 1, 4, 6 (last); 74 pairs: not a block multiple
    ('pallas_gpu', 150, 1, 4, [1, 2, 3]),       # expert 0 empty; two blocks of 128
    ('pallas_gpu', 5, 3, 3, [2]),               # one expert gets everything
    ('pallas_tpu', 37, 2, 7, [0, 2, 3, 5]),
    ('pallas_tpu', 150, 2, 4, [1, 2, 3]),       # 300 pairs: two blocks of 256
]


@pytest.mark.parametrize('impl,tokens,k,num_experts,used', SORT_CASES)
def test_sort_by_expert_matches_stable_argsort(impl, tokens, k, num_experts, used):
  experts = jnp.asarray(np.random.default_rng(tokens).choice(used, (tokens, k)), jnp.int32)
  perm, sizes = jax.jit(functools.partial(moe.sort_by_expert, num_experts=num_experts, impl=impl))(experts)
  flat = np.asarray(experts).reshape(-1)
  np.testing.assert_array_equal(perm, np.argsort(flat, kind='stable'))
  np.testing.assert_array_equal(sizes, np.bincount(flat, minlength=num_experts))
  assert perm.dtype == jnp.int32 and sizes.dtype == jnp.int32
  positions, _ = moe.expert_positions(experts, num_experts, impl=impl)
  np.testing.assert_array_equal(np.asarray(perm)[np.asarray(positions)], np.arange(tokens * k))


def test_permute_unpermute_roundtrip():
  rng = np.random.default_rng(0)
  tokens, k, num_experts, dim = 11, 2, 4, 6
  x = jnp.asarray(rng.standard_normal((tokens, dim)), jnp.float32)
  _, experts = moe.topk_route(jnp.asarray(rng.standard_normal((tokens, num_experts)), jnp.float32), k)
  perm, sizes = moe.sort_by_expert(experts, num_experts)
  xs = moe.permute(x, perm, k)
  assert xs.shape == (tokens * k, dim)
  # Row i holds token perm[i] // k, and rows are grouped by expert.
  np.testing.assert_array_equal(xs, np.asarray(x)[np.asarray(perm) // k])
  np.testing.assert_array_equal(np.asarray(experts).reshape(-1)[np.asarray(perm)],
                                np.repeat(np.arange(num_experts), np.asarray(sizes)))
  weights = jnp.asarray(rng.uniform(size=(tokens, k)), jnp.float32)
  np.testing.assert_allclose(moe.unpermute(xs, perm, weights), x * weights.sum(1, keepdims=True), rtol=1e-6)


def test_unpermute_gradient_matches_dense_combine():
  """unpermute == a dense [T, T*k] combine matrix built from perm; values and gradients w.r.t. y and weights."""
  rng = np.random.default_rng(1)
  tokens, k, dim = 9, 3, 5
  experts = jnp.asarray(rng.integers(0, 4, (tokens, k)), jnp.int32)
  perm, _ = moe.sort_by_expert(experts, 4)
  y = jnp.asarray(rng.standard_normal((tokens * k, dim)), jnp.float32)
  weights = jnp.asarray(rng.standard_normal((tokens, k)), jnp.float32)
  cot = jnp.asarray(rng.standard_normal((tokens, dim)), jnp.float32)

  def dense(y, weights):
    src = np.asarray(perm)  # sorted row i comes from flat pair src[i] = t * k + s
    onehot = jax.nn.one_hot(src, tokens * k, dtype=jnp.float32)  # [T*k (sorted row), T*k (pair)]
    combine = (onehot * weights.reshape(-1)[None, :]).reshape(tokens * k, tokens, k).sum(-1).T  # [T, T*k]
    return combine @ y

  out, vjp = jax.vjp(lambda y, w: moe.unpermute(y, perm, w), y, weights)
  want, want_vjp = jax.vjp(dense, y, weights)
  _assert_close(out, want, 1e-5, 'unpermute')
  for name, g, w in zip(('dy', 'dweights'), vjp(cot), want_vjp(cot)):
    _assert_close(g, w, 1e-5, name)


def test_permute_rejects_bad_shapes():
  with pytest.raises(ValueError, match='perm'):
    moe.permute(jnp.zeros((4, 2)), jnp.zeros((7,), jnp.int32), 2)
  with pytest.raises(ValueError, match='experts'):
    moe.sort_by_expert(jnp.zeros((4,), jnp.int32), 3)


# ---------------------------------------------------------------------------------------------------------------
# grouped_matmul

GMM_CASES = [  # (M, K, N, group sizes)
    (50, 24, 40, [7, 0, 20, 13]),          # empty middle expert, groups straddle 16-row tiles, sum 40 < M = 50
    (48, 16, 16, [0, 16, 16, 16]),         # empty first expert, boundaries on tile edges
    (33, 20, 8, [3, 2, 1, 0, 27, 0]),      # several groups inside one tile, empty last expert, M not a multiple
    (20, 8, 24, [0, 0, 0]),                # no rows at all: zeros and zero gradients
]


def _gmm_inputs(m, kdim, n, sizes, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, kdim)), dtype)
  w = jnp.asarray(rng.standard_normal((len(sizes), kdim, n)) / np.sqrt(kdim), dtype)
  cot = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
  return x, w, jnp.asarray(sizes, jnp.int32), cot


def _gmm_and_grads(impl, x, w, sizes, cot, out_dtype=None):
  def run(x, w):
    f = lambda x, w: moe.grouped_matmul(x, w, sizes, impl=impl, preferred_element_type=out_dtype,
                                        blocks=SMALL_BLOCKS)
    out, vjp = jax.vjp(f, x, w)
    return (out, *vjp(cot.astype(out.dtype)))
  return jax.jit(run)(x, w)


# Every case for the Triton kernels and the einsum oracle; the TPU interpreter (the slow one) skips case 2.
GMM_PARAMS = [(impl, *case) for impl in ('pallas_gpu', 'einsum') for case in GMM_CASES] + [
    ('pallas_tpu', *case) for i, case in enumerate(GMM_CASES) if i != 1]


@pytest.mark.parametrize('impl,m,kdim,n,sizes', GMM_PARAMS)
def test_grouped_matmul_matches_ragged_dot(impl, m, kdim, n, sizes):
  x, w, gs, cot = _gmm_inputs(m, kdim, n, sizes, jnp.float32)
  got = _gmm_and_grads(impl, x, w, gs, cot)
  want = _gmm_and_grads('ragged_dot', x, w, gs, cot)
  total = sum(sizes)
  assert got[0].shape == (m, n) and got[0].dtype == jnp.float32
  assert not np.any(np.asarray(got[0])[total:]) and not np.any(np.asarray(got[1])[total:])  # rows past the sum
  for name, g, wv in zip(('out', 'dx', 'dw'), got, want):
    _assert_close(g, wv, 2e-5, f'{impl} {name} sizes={sizes}')
  for e, size in enumerate(sizes):  # empty experts get exactly zero weight gradient
    if size == 0:
      assert not np.any(np.asarray(got[2][e]))


@pytest.mark.parametrize('impl', PALLAS)
def test_grouped_matmul_bf16_inputs_fp32_accumulation(impl):
  x, w, gs, cot = _gmm_inputs(50, 24, 40, [7, 0, 20, 13], jnp.bfloat16, seed=3)
  got = _gmm_and_grads(impl, x, w, gs, cot, out_dtype=jnp.float32)
  assert got[0].dtype == jnp.float32 and got[1].dtype == jnp.bfloat16 and got[2].dtype == jnp.bfloat16
  # Float32 oracle from the same bf16 values: the forward differs only by fp32 summation order.
  f32 = lambda a: a.astype(jnp.float32)
  want = _gmm_and_grads('einsum', f32(x), f32(w), gs, cot)
  _assert_close(got[0], want[0], 1e-4, f'{impl} out')
  for name, g, wv in zip(('dx', 'dw'), got[1:], want[1:]):  # bf16 results (dy rounded to bf16 too)
    _assert_close(g, wv, 3e-2, f'{impl} {name}')
  # With bf16 output the kernel rounds once, from its fp32 accumulator (one backend is enough: same epilogue).
  if impl == 'pallas_tpu':
    return
  out_bf16 = moe.grouped_matmul(x, w, gs, impl=impl, blocks=SMALL_BLOCKS)
  assert out_bf16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out_bf16, got[0].astype(jnp.bfloat16))


def test_grouped_matmul_default_blocks_and_auto():
  """The default (larger) blocks, and 'auto' (ragged_dot on CPU), on a shape spanning several tiles."""
  x, w, gs, _ = _gmm_inputs(130, 64, 72, [40, 0, 66, 20, 0], jnp.float32, seed=5)
  want = moe.grouped_matmul(x, w, gs, impl='einsum')
  _assert_close(moe.grouped_matmul(x, w, gs), want, 2e-5, 'auto')
  _assert_close(moe.grouped_matmul(x, w, gs, impl='pallas'), want, 2e-5, 'pallas default blocks')


def test_work_items_cover_every_row_once():
  """The TPU kernels' (tile, group, rows) table: static length, tiles non-decreasing, each grouped row once."""
  rng = np.random.default_rng(0)
  tm, num_tiles = 8, 6
  for _ in range(20):
    sizes = rng.integers(0, 14, 5) * (rng.uniform(size=5) < 0.7)
    if sizes.sum() > tm * num_tiles:
      continue
    starts, ends = moe._group_bounds(jnp.asarray(sizes, jnp.int32), tm * num_tiles)
    tile, group, lo, hi = (np.asarray(a) for a in moe.work_items(starts, ends, num_tiles, tm))
    assert tile.shape == (num_tiles + 4,)
    assert np.all(np.diff(tile) >= 0) and np.all(np.diff(group) >= 0) and tile.max() < num_tiles
    assert set(tile) == set(range(num_tiles))  # every tile visited (gmm zero-fills the ungrouped ones)
    owner = np.full(tm * num_tiles, -1)
    for t, g, a, b in zip(tile, group, lo, hi):
      rows = np.arange(t * tm, (t + 1) * tm)
      rows = rows[(rows >= a) & (rows < b)]
      assert np.all(owner[rows] == -1)
      owner[rows] = g
    np.testing.assert_array_equal(owner[:sizes.sum()], np.repeat(np.arange(5), sizes))
    assert np.all(owner[sizes.sum():] == -1)


def test_grouped_matmul_rejects_bad_inputs():
  x, w = jnp.zeros((8, 4)), jnp.zeros((3, 4, 5))
  with pytest.raises(ValueError, match='group_sizes'):
    moe.grouped_matmul(x, w, jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match='group_sizes'):
    moe.grouped_matmul(x, w, jnp.zeros((3,), jnp.float32))
  with pytest.raises(ValueError, match='same K'):
    moe.grouped_matmul(jnp.zeros((8, 5)), w, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match='impl'):
    moe.grouped_matmul(x, w, jnp.zeros((3,), jnp.int32), impl='triton')


# ---------------------------------------------------------------------------------------------------------------
# The whole dropless layer, and shard_map.

def _moe_layer(x, router, w, *, k, route_impl, gmm_impl):
  """route -> sort -> permute -> grouped matmul -> unpermute, as jmm.models.moe composes them."""
  gates, experts = moe.topk_route(x @ router, k, impl=route_impl)
  perm, sizes = moe.sort_by_expert(experts, w.shape[0], impl=route_impl)
  ys = moe.grouped_matmul(moe.permute(x, perm, k), w, sizes, impl=gmm_impl, blocks=SMALL_BLOCKS)
  return moe.unpermute(ys, perm, jax.nn.softmax(gates, axis=-1))


def test_moe_layer_pallas_matches_xla_with_gradients():
  rng = np.random.default_rng(2)
  tokens, dim, num_experts, k = 21, 16, 4, 2
  x = jnp.asarray(rng.standard_normal((tokens, dim)), jnp.float32)
  router = jnp.asarray(rng.standard_normal((dim, num_experts)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((num_experts, dim, dim)) / 4, jnp.float32)

  def loss_and_grads(route_impl, gmm_impl):
    loss = lambda *a: jnp.sum(_moe_layer(*a, k=k, route_impl=route_impl, gmm_impl=gmm_impl) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, router, w)

  got, want = loss_and_grads('pallas', 'pallas'), loss_and_grads('xla', 'ragged_dot')
  _assert_close(got[0], want[0], 1e-5, 'loss')
  for name, g, wv in zip(('dx', 'drouter', 'dw'), got[1], want[1]):
    _assert_close(g, wv, 1e-4, name)
  assert np.any(np.asarray(got[1][1]))  # the router gets a gradient through the gates


@pytest.mark.parametrize('impl', PALLAS)
def test_kernels_inside_shard_map(impl):
  """Each device routes and runs its own tokens (no global state): 4 CPU devices, pallas == xla per shard, with
  shard_map's default check_vma=True (the kernels' outputs carry the inputs' varying mesh axes). The Triton kernels
  in JAX's CPU interpreter need check_vma=False there (see jmm.kernels.moe); compiled they do not."""
  devices = np.array(jax.devices()[:4])
  mesh = Mesh(devices, ('data',))
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((4 * 12, 16)), jnp.float32)
  router = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((4, 16, 16)) / 4, jnp.float32)

  def sharded(route_impl, gmm_impl):
    fn = functools.partial(_moe_layer, k=2, route_impl=route_impl, gmm_impl=gmm_impl)
    check_vma = not (route_impl == 'pallas_gpu' and jax.default_backend() == 'cpu')
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P('data'), P(), P()), out_specs=P('data'),
                                 check_vma=check_vma))(x, router, w)

  _assert_close(sharded(impl, impl), sharded('xla', 'ragged_dot'), 1e-5, 'shard_map')


# ---------------------------------------------------------------------------------------------------------------
# Lowering for the hardware, from CPU.

@pytest.mark.parametrize('backend,platform', [('gpu', 'cuda'), ('tpu', 'tpu')])
def test_kernels_lower_for_their_hardware(backend, platform):
  """Cross-platform lowering (no GPU / TPU needed): the compiled (not interpreted) routing and grouped-matmul
  kernels, forward and backward, pass Pallas' Triton / Mosaic lowering rules at a ViT-like bf16 shape (394 rows
  = 197 tokens x top-2, not a block multiple; 8 experts). Not checked here: Triton / Mosaic compilation to
  machine code, which needs the hardware."""
  impl = f'pallas_{backend}'

  def layer_grads(x, router, w):
    def loss(x, router, w):
      gates, experts = moe.topk_route((x @ router).astype(jnp.float32), 2, impl=impl, interpret=False)
      perm, sizes = moe.sort_by_expert(experts, w.shape[0], impl=impl, interpret=False)
      ys = moe.grouped_matmul(moe.permute(x, perm, 2), w, sizes, impl=impl, interpret=False)
      return moe.unpermute(ys, perm, gates).astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(x, router, w)

  args = (jax.ShapeDtypeStruct((197, 256), jnp.bfloat16), jax.ShapeDtypeStruct((256, 8), jnp.bfloat16),
          jax.ShapeDtypeStruct((8, 256, 512), jnp.bfloat16))
  text = jax.jit(layer_grads).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  suffix = '_tpu' if backend == 'tpu' else ''
  for kernel in ('topk', 'positions', 'gmm', 'tgmm'):
    assert f'jmm_moe_{kernel}{suffix}' in text, kernel
