"""Mixture-of-experts building blocks: top-k routing, sorting (token, slot) pairs by expert, and the grouped matmul.

The dropless MoE layer of `jmm.models.moe` is
    gates, experts = topk_route(router_logits, k)             # [T, k] each
    perm, group_sizes = sort_by_expert(experts, E)            # [T * k], [E]
    xs = permute(x, perm, k)                                  # [T * k, D], rows grouped by expert
    h = grouped_matmul(xs, w_in, group_sizes) ... grouped_matmul(h, w_out, group_sizes)
    y = unpermute(ys, perm, weights)                          # [T, D]
Every shape is static (T * k rows whatever the routing), so all of it runs under jit, grad and shard_map.

Implementations (`impl=`):
  topk_route      'xla' (jax.lax.top_k) | 'pallas' | 'pallas_gpu' | 'pallas_tpu' | 'auto' (= 'xla').
  sort_by_expert  'xla' (stable argsort + bincount) | 'pallas' | 'pallas_gpu' | 'pallas_tpu' | 'auto' (= 'xla').
  grouped_matmul  'ragged_dot' (jax.lax.ragged_dot) | 'einsum' (one-hot dispatch, the oracle) | 'pallas' |
                  'pallas_gpu' | 'pallas_tpu' | 'auto' (`AUTO_GMM[platform]`).
'pallas' is the kernel for `jax.default_backend()`: Triton on GPU (`moe_gpu.py`), Mosaic on TPU (`moe_tpu.py`),
and on CPU the Mosaic kernels in the TPU interpreter (exact, slow: for tests). Not the Triton ones on CPU, as
`attention` does: JAX's interpreter for them cannot type an in-kernel loop inside `jax.shard_map` with
check_vma=True (jax 0.10.2: "Scan carry input and output got mismatched varying manual axes"), so
'pallas_gpu' on CPU inside shard_map needs check_vma=False (compiled kernels do not go through that interpreter).
The kernel files hold only the raw kernels; this file pads, builds the group tables and defines the custom VJP of
the Pallas grouped matmul:
dx = grouped_matmul(dy, w^T) (the same kernel) and dw[e] = x_e^T dy_e (the transposed kernel `tgmm`).

The routing kernels compute what the XLA paths compute, exactly: the top-k values / indices (ties to the lower
expert), and for the sort the expert histogram, offsets and every pair's position in the sorted order. The
inverse of the positions (the permutation itself) is one int32 scatter done by XLA: Mosaic has no vector
scatter, and it is O(T * k). This module imports nothing from jmm outside `jmm.kernels`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jmm.kernels import moe_gpu
from jmm.kernels import moe_tpu

ROUTE_IMPLS = ('xla', 'pallas', 'pallas_gpu', 'pallas_tpu', 'auto')
GMM_IMPLS = ('ragged_dot', 'einsum', 'pallas', 'pallas_gpu', 'pallas_tpu', 'auto')

# What grouped_matmul's 'auto' runs per platform. CPU: XLA's ragged_dot (the kernels only run interpreted there).
# GPU / TPU: the Pallas kernels (XLA's ragged_dot is a reference lowering on some backends); a prior that has not
# been timed on hardware yet (no accelerator was available): run benchmarks/moe.py there and adjust.
AUTO_GMM = {'cpu': 'ragged_dot', 'gpu': 'pallas', 'tpu': 'pallas'}


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_to(x, shape, value=0):
  """`x` padded at the end of every axis up to `shape` with `value`."""
  widths = [(0, s - d) for d, s in zip(x.shape, shape)]
  return x if all(w == (0, 0) for w in widths) else jnp.pad(x, widths, constant_values=value)


def _interpret(interpret) -> bool:
  """Kernels run in Pallas' interpreter where no GPU / TPU compiler exists (CPU) unless told otherwise."""
  return jax.default_backend() == 'cpu' if interpret is None else bool(interpret)


def _pallas_backend(impl: str, what: str, allowed) -> str:
  """'gpu' | 'tpu' for a Pallas impl name; raises a ValueError naming `impl` for unknown names."""
  if impl not in allowed:
    raise ValueError(f'{what}: impl must be one of {allowed}, got {impl!r}')
  if impl == 'pallas':  # CPU: the Mosaic kernels in the TPU interpreter, which also runs inside shard_map (below).
    return 'gpu' if jax.default_backend() == 'gpu' else 'tpu'
  return impl.split('_')[1]


# ---------------------------------------------------------------------------------------------------------------
# Routing.

@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _topk_pallas(logits, k, backend, interpret):
  return _topk_pallas_fwd(logits, k, backend, interpret)[0]


def _topk_pallas_fwd(logits, k, backend, interpret):
  tokens, num_experts = logits.shape
  x = logits.astype(jnp.float32)
  if backend == 'gpu':  # Triton: power-of-two blocks; padded experts are never taken (masked in the kernel).
    block = min(64, int(moe_gpu.pl.next_power_of_2(tokens)))
    width = int(moe_gpu.pl.next_power_of_2(num_experts))
    x = _pad_to(x, (_round_up(tokens, block), width))
    values, indices = moe_gpu.topk(x, k, num_experts, block_t=block, interpret=interpret)
  else:  # Mosaic: blocks of 8-multiple rows, the expert axis whole.
    block = min(256, _round_up(tokens, 8))
    x = _pad_to(x, (_round_up(tokens, block), num_experts))
    values, indices = moe_tpu.topk(x, k, block_t=block, interpret=interpret)
  experts = indices[:tokens, :k]
  return (values[:tokens, :k], experts), (experts, num_experts)


def _topk_pallas_bwd(k, backend, interpret, residuals, cotangents):
  """The gates are the selected logits: their cotangent goes back to those entries, every other entry gets 0."""
  del k, backend, interpret
  experts, num_experts = residuals
  dgates = cotangents[0]
  onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [T, k, E]
  return (jnp.einsum('tk,tke->te', dgates.astype(jnp.float32), onehot),)


_topk_pallas.defvjp(_topk_pallas_fwd, _topk_pallas_bwd)


def topk_route(logits, k: int, *, impl: str = 'xla', interpret: bool | None = None):
  """The k largest router logits per token: logits [T, E] -> (gates [T, k] float32, descending; experts [T, k] int32).

  Ties go to the lower expert index (as jax.lax.top_k). Differentiable w.r.t. logits: the gates' cotangent flows
  to the selected entries only. NaN logits give unspecified experts. interpret: run a Pallas kernel in the
  interpreter (default: only on CPU).
  """
  if logits.ndim != 2:
    raise ValueError(f'topk_route: logits must be [tokens, experts], got shape {logits.shape}')
  num_experts = logits.shape[1]
  if not 1 <= k <= num_experts:
    raise ValueError(f'topk_route: k must be in [1, num_experts={num_experts}], got k={k}')
  if impl in ('xla', 'auto'):
    gates, experts = lax.top_k(logits.astype(jnp.float32), k)
    return gates, experts.astype(jnp.int32)
  backend = _pallas_backend(impl, 'topk_route', ROUTE_IMPLS)
  return _topk_pallas(logits.astype(jnp.float32), k, backend, _interpret(interpret))


def _check_experts(experts, num_experts: int, what: str):
  if experts.ndim != 2 or not jnp.issubdtype(experts.dtype, jnp.integer):
    raise ValueError(f'{what}: experts must be an integer array [tokens, k], got {experts.dtype} {experts.shape}')
  if num_experts < 1:
    raise ValueError(f'{what}: num_experts must be >= 1, got {num_experts}')


def expert_positions(experts, num_experts: int, *, impl: str = 'xla', interpret: bool | None = None):
  """(positions [T * k] int32, group_sizes [E] int32): where each flat (token * k + slot) lands when the pairs are
  stably sorted by expert, and how many pairs each expert got. The inverse of `positions` is `sort_by_expert`'s
  perm. Expert ids outside [0, E) are not counted and their positions are unspecified."""
  _check_experts(experts, num_experts, 'expert_positions')
  flat = experts.reshape(-1).astype(jnp.int32)
  n = flat.shape[0]
  if impl in ('xla', 'auto'):
    perm = jnp.argsort(flat, stable=True).astype(jnp.int32)
    return _inverse(perm), jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  backend = _pallas_backend(impl, 'expert_positions', ROUTE_IMPLS)
  # Padding entries get id num_experts: a dummy expert after the real ones, so they move no real position.
  if backend == 'gpu':
    width = int(moe_gpu.pl.next_power_of_2(num_experts + 1))
    block = min(128, max(moe_gpu.MIN_BLOCK, int(moe_gpu.pl.next_power_of_2(n))))
    ids = _pad_to(flat, (_round_up(n, block),), num_experts)
    positions, counts = moe_gpu.expert_positions(ids, width, block=block, interpret=_interpret(interpret))
  else:
    width = _round_up(num_experts + 1, 128)
    block = min(256, _round_up(n, 8))
    ids = _pad_to(flat, (_round_up(n, block),), num_experts)
    positions, counts = moe_tpu.expert_positions(ids, width, block=block, interpret=_interpret(interpret))
  return positions[:n], counts[0, :num_experts]


def _inverse(permutation):
  """The inverse of a permutation of [0, n): one int32 scatter."""
  n = permutation.shape[0]
  return jnp.zeros((n,), jnp.int32).at[permutation].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True)


def sort_by_expert(experts, num_experts: int, *, impl: str = 'xla', interpret: bool | None = None):
  """Groups the (token, slot) pairs by expert: experts [T, k] int32 -> (perm [T * k] int32, group_sizes [E] int32).

  perm lists the flat indices token * k + slot ordered by expert, stable (token order) within an expert; rows
  [sum(group_sizes[:e]), sum(group_sizes[:e + 1])) of `permute(x, perm, k)` go to expert e.
  'pallas' computes the histogram, offsets and positions in a kernel (counting sort) and inverts them in XLA.
  """
  _check_experts(experts, num_experts, 'sort_by_expert')
  if impl in ('xla', 'auto'):
    flat = experts.reshape(-1).astype(jnp.int32)
    perm = jnp.argsort(flat, stable=True).astype(jnp.int32)
    return perm, jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  positions, group_sizes = expert_positions(experts, num_experts, impl=impl, interpret=interpret)
  return _inverse(positions), group_sizes


def permute(x, perm, k: int):
  """x [T, D] -> [T * k, D] with row i = x[perm[i] // k]: each token copied once per slot, grouped by expert."""
  if x.ndim != 2 or perm.ndim != 1 or perm.shape[0] != x.shape[0] * k:
    raise ValueError(f'permute: need x [T, D] and perm [T * k]; got x {x.shape}, perm {perm.shape}, k={k}')
  return jnp.take(x, perm // k, axis=0)


def unpermute(y, perm, weights):
  """y [T * k, D] (rows in perm order), weights [T, k] -> [T, D]: out[t] = sum_s weights[t, s] * y[pos(t * k + s)],
  where pos inverts perm. A gather (not a scatter-add), so its gradient w.r.t. y is a permutation, deterministic."""
  tokens, k = weights.shape
  if y.ndim != 2 or perm.shape != (tokens * k,) or y.shape[0] != tokens * k:
    raise ValueError(f'unpermute: need y [T * k, D], perm [T * k], weights [T, k]; got y {y.shape}, '
                     f'perm {perm.shape}, weights {weights.shape}')
  rows = jnp.take(y, _inverse(perm), axis=0).reshape(tokens, k, y.shape[1])  # [T, k, D]
  out = jnp.einsum('tkd,tk->td', rows.astype(jnp.float32), weights.astype(jnp.float32))
  return out.astype(jnp.result_type(y.dtype, weights.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Grouped matmul.

def _group_bounds(group_sizes, rows: int):
  """(starts, ends) [E] int32 of each group's rows, clipped to `rows` (sum(group_sizes) > M is not supported)."""
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), rows)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def _einsum_gmm(x, w, group_sizes, preferred_element_type):
  """The oracle: every row's expert as a one-hot [M, E], then x @ w[e] for all e and a one-hot contraction."""
  rows = jnp.arange(x.shape[0], dtype=jnp.int32)[:, None]
  starts, ends = _group_bounds(group_sizes, x.shape[0])
  onehot = jnp.logical_and(rows >= starts[None], rows < ends[None]).astype(jnp.float32)  # [M, E]; 0 past the sum
  out = jnp.einsum('me,mk,ekn->mn', onehot, x.astype(jnp.float32), w.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
  return out.astype(preferred_element_type)


def _gpu_blocks(m, k, n, tm, tk, tn):
  """Power-of-two blocks (>= 16 for tl.dot), shrunk for small dims, and the padded dims."""
  p2 = lambda v: int(max(moe_gpu.MIN_BLOCK, moe_gpu.pl.next_power_of_2(v)))
  tm, tk, tn = min(tm, p2(m)), min(tk, p2(k)), min(tn, p2(n))
  return (tm, tk, tn), (_round_up(m, tm), _round_up(k, tk), _round_up(n, tn))


def _tpu_blocks(m, k, n, tm, tk, tn):
  """Mosaic blocks: rows a multiple of 16 (bf16 sublane packing), K / N the whole dim when it fits in one block."""
  tm = min(tm, _round_up(m, 16))
  tk = k if k <= tk else tk
  tn = n if n <= tn else tn
  return (tm, tk, tn), (_round_up(m, tm), _round_up(k, tk), _round_up(n, tn))


DEFAULT_BLOCKS = {'gpu': (64, 64, 64), 'tpu': (128, 512, 512)}  # (tm, tk, tn); to be tuned on hardware


def _gmm_padded(x, w, starts, ends, backend, blocks, out_dtype, interpret):
  """Forward kernel on unpadded x [M, K], w [E, K, N] -> [M, N]; pads to the blocks here."""
  m, kdim = x.shape
  num_experts, _, n = w.shape
  tm, tk, tn = blocks[backend]
  if backend == 'gpu':
    (tm, tk, tn), (mp, kp, np_) = _gpu_blocks(m, kdim, n, tm, tk, tn)
  else:
    (tm, tk, tn), (mp, kp, np_) = _tpu_blocks(m, kdim, n, tm, tk, tn)
  xp, wp = _pad_to(x, (mp, kp)), _pad_to(w, (num_experts, kp, np_))
  if backend == 'gpu':
    tile_starts = jnp.arange(mp // tm, dtype=jnp.int32) * tm
    first = jnp.searchsorted(ends, tile_starts, side='right').astype(jnp.int32)  # first group ending past the start
    last = jnp.minimum(jnp.searchsorted(ends, tile_starts + tm - 1, side='right'), num_experts - 1).astype(jnp.int32)
    out = moe_gpu.gmm(xp, wp, (first, last, starts, ends), tm=tm, tk=tk, tn=tn, out_dtype=out_dtype,
                      interpret=interpret)
  else:
    table = work_items(starts, ends, mp // tm, tm)
    out = moe_tpu.gmm(xp, wp, table, tm=tm, tk=tk, tn=tn, out_dtype=out_dtype, interpret=interpret)
  return out[:m, :n]


def _tgmm_padded(x, dy, starts, ends, num_experts, backend, blocks, out_dtype, interpret):
  """dw [E, K, N] = per-group x^T dy on unpadded x [M, K], dy [M, N]."""
  m, kdim = x.shape
  n = dy.shape[1]
  tm, tk, tn = blocks[backend]
  if backend == 'gpu':
    (tm, tk, tn), (mp, kp, np_) = _gpu_blocks(m, kdim, n, tm, tk, tn)
  else:
    (tm, tk, tn), (mp, kp, np_) = _tpu_blocks(m, kdim, n, tm, tk, tn)
  xp, dyp = _pad_to(x, (mp, kp)), _pad_to(dy, (mp, np_))
  if backend == 'gpu':
    dw = moe_gpu.tgmm(xp, dyp, starts, ends, num_experts, tm=tm, tk=tk, tn=tn, out_dtype=out_dtype,
                      interpret=interpret)
  else:
    table = work_items(starts, ends, mp // tm, tm)
    dw = moe_tpu.tgmm(xp, dyp, table, num_experts, tm=tm, tk=tk, tn=tn, out_dtype=out_dtype, interpret=interpret)
    # Experts with no rows are never visited by the TPU kernel: their blocks are unwritten memory.
    dw = jnp.where((ends > starts)[:, None, None], dw, jnp.zeros((), dw.dtype))
  return dw[:, :kdim, :n]


def work_items(starts, ends, num_tiles: int, tm: int):
  """The (M tile, group) pairs the TPU kernels visit, in order, as int32 arrays of a static length
  num_tiles + E - 1: (tile, group, row_lo, row_hi); rows [row_lo, row_hi) of the tile belong to the group.

  Order: by group, each group's tiles ascending; since groups are consecutive rows, tiles are non-decreasing
  too, so an output tile (gmm) or an expert's dw block (tgmm) stays resident across its consecutive items. A tile
  shared by g groups appears g times. Tiles past sum(group_sizes) follow with an empty row range (gmm writes
  their zeros); leftover items repeat the last tile and the last non-empty group with an empty range (no work,
  no new DMA). Empty groups have no item.
  """
  num_experts = starts.shape[0]
  size = num_tiles + num_experts - 1
  nonempty = ends > starts
  first_tile = lax.div(starts, tm)
  counts = jnp.where(nonempty, lax.div(jnp.maximum(ends - 1, 0), tm) - first_tile + 1, 0)
  item_ends = jnp.cumsum(counts)
  item_starts = item_ends - counts
  used = item_ends[-1]
  w = jnp.arange(size, dtype=jnp.int32)
  group = jnp.minimum(jnp.searchsorted(item_ends, w, side='right'), num_experts - 1).astype(jnp.int32)
  in_group = w < used
  covered = lax.div(ends[-1] + tm - 1, tm)  # tiles holding at least one grouped row
  tile = jnp.where(in_group, first_tile[group] + w - item_starts[group], jnp.minimum(covered + w - used, num_tiles - 1))
  last_group = jnp.max(jnp.where(nonempty, jnp.arange(num_experts, dtype=jnp.int32), 0))
  group = jnp.where(in_group, group, last_group)
  lo = jnp.where(in_group, starts[group], 0)
  hi = jnp.where(in_group, ends[group], 0)
  return tile.astype(jnp.int32), group, lo.astype(jnp.int32), hi.astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm_pallas(x, w, group_sizes, backend, blocks, out_dtype, interpret):
  starts, ends = _group_bounds(group_sizes, x.shape[0])
  return _gmm_padded(x, w, starts, ends, backend, dict(blocks), out_dtype, interpret)


def _gmm_pallas_fwd(x, w, group_sizes, backend, blocks, out_dtype, interpret):
  return _gmm_pallas(x, w, group_sizes, backend, blocks, out_dtype, interpret), (x, w, group_sizes)


def _gmm_pallas_bwd(backend, blocks, out_dtype, interpret, residuals, dy):
  """dx = dy @ w[group]^T (the forward kernel on w^T), dw[e] = x_e^T dy_e (the transposed kernel)."""
  del out_dtype
  x, w, group_sizes = residuals
  starts, ends = _group_bounds(group_sizes, x.shape[0])
  dy = dy.astype(x.dtype) if jnp.dtype(x.dtype).itemsize < jnp.dtype(dy.dtype).itemsize else dy
  dx = _gmm_padded(dy, jnp.swapaxes(w, 1, 2), starts, ends, backend, dict(blocks), x.dtype, interpret)  # [M, K]
  dw = _tgmm_padded(x, dy, starts, ends, w.shape[0], backend, dict(blocks), w.dtype, interpret)  # [E, K, N]
  return dx, dw, None


_gmm_pallas.defvjp(_gmm_pallas_fwd, _gmm_pallas_bwd)


def grouped_matmul(x, w, group_sizes, *, impl: str = 'auto', preferred_element_type=None, blocks=None,
                   interpret: bool | None = None):
  """Per-group matmul: x [M, K] (rows grouped consecutively by expert) @ w [E, K, N] -> [M, N].

  Rows [sum(group_sizes[:e]), sum(group_sizes[:e + 1])) use w[e]; rows past sum(group_sizes) (<= M) give 0.
  Accumulates in float32; the result has `preferred_element_type` (default x.dtype). `blocks`: optional
  {'gpu' | 'tpu': (tm, tk, tn)} overriding `DEFAULT_BLOCKS` for the Pallas kernels. interpret: run a Pallas
  kernel in the interpreter (default: only on CPU). The Pallas path's gradient runs the kernels too (custom VJP).
  """
  if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
    raise ValueError(f'grouped_matmul: need x [M, K] and w [E, K, N] with the same K; got x {x.shape}, w {w.shape}')
  if group_sizes.shape != (w.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f'grouped_matmul: group_sizes must be an integer array of shape ({w.shape[0]},) (one per '
                     f'expert of w), got {group_sizes.dtype} {group_sizes.shape}')
  if impl not in GMM_IMPLS:
    raise ValueError(f'grouped_matmul: impl must be one of {GMM_IMPLS}, got {impl!r}')
  out_dtype = jnp.dtype(preferred_element_type or x.dtype)
  group_sizes = group_sizes.astype(jnp.int32)
  if impl == 'auto':
    impl = AUTO_GMM.get(jax.default_backend(), 'ragged_dot')
  if impl == 'ragged_dot':
    return lax.ragged_dot(x, w, group_sizes, preferred_element_type=out_dtype)
  if impl == 'einsum':
    return _einsum_gmm(x, w, group_sizes, out_dtype)
  backend = _pallas_backend(impl, 'grouped_matmul', GMM_IMPLS)
  if x.dtype != w.dtype:  # The kernels multiply one dtype (Triton's dot wants matching operands).
    dtype = jnp.promote_types(x.dtype, w.dtype)
    x, w = x.astype(dtype), w.astype(dtype)
  merged = {**DEFAULT_BLOCKS, **(blocks or {})}
  return _gmm_pallas(x, w, group_sizes, backend, tuple(sorted(merged.items())), out_dtype, _interpret(interpret))
