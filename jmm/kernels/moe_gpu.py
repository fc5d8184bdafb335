"""Mixture-of-experts kernels for NVIDIA GPUs in Pallas (Triton lowering): top-k routing, expert positions, and the
grouped matmuls (forward `gmm`, weight-gradient `tgmm`).

These are the raw kernels on padded inputs; `jmm.kernels.moe` pads, builds the group tables, picks blocks and wires
the custom VJP. Triton has no sequential grid and no scalar prefetch, so the group structure reaches the kernels as
ordinary int32 inputs that each program reads with scalar loads, and data-dependent work is a `fori_loop` with
dynamic bounds inside a program:
  gmm      grid (M tiles, N tiles); a program loops over the groups overlapping its M tile (first / last group per
           tile, from the table), runs the K loop against that group's weights, and keeps the rows of that group
           (`where`). Every output row belongs to at most one group, so no program shares an output tile and rows
           past sum(group_sizes) stay 0. A tile straddling g groups costs g K loops; empty groups cost nothing
           beyond the loop bound (their row range is empty).
  tgmm     grid (experts, K tiles, N tiles); a program loops over the M tiles of its group's rows, masks the rows
           of other groups to 0 and accumulates x_tile^T dy_tile. An empty group runs no useful tile: dw[e] = 0.
  topk     grid (token blocks,); k rounds of (max, lowest index reaching it, mark taken) over the expert axis.
  positions  grid (1,): one program walks the flat (token, slot) expert ids block by block; a block's rank within
           its expert is an inclusive cumsum over rows, done as a lower-triangular 0/1 matmul (exact in fp32
           accumulation), plus the running count of the earlier blocks. A single program because the ranks need
           every earlier block and Triton programs cannot wait for each other; the work is O(N * E) tiny matmuls.
Every matmul accumulates in float32. Triton needs power-of-two block shapes (>= 16 for `tl.dot`), so the wrapper
pads K, N and the expert axis of the routing kernels to powers of two or block multiples.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Guarded so a jax without the Triton backend still imports this file.
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
  plgpu = None

MIN_BLOCK = 16  # tl.dot needs every dimension >= 16.


def _dot(a, b, contract, precision):
  """a @ b contracting a's axis contract[0] with b's axis contract[1], in float32."""
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def out_struct(shape, dtype, *inputs):
  """A pallas_call output type that varies over every mesh axis any input varies over, so the kernels also run
  inside `jax.shard_map` with check_vma=True (which needs each output's manual-axis type spelled out)."""
  varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in inputs))
  mat = jax.typeof(inputs[0]).manual_axis_type.update(varying=varying, unreduced=frozenset(), reduced=frozenset())
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def _params(num_warps: int = 4, num_stages: int = 2):
  return None if plgpu is None else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _precision(dtype):
  """IEEE fp32 (not TF32) for fp32 inputs, so the kernel matches the XLA references; default for bf16 / fp16."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ---------------------------------------------------------------------------------------------------------------
# Routing.

def topk_block(x, k: int, num_experts: int, k_out: int):
  """Top-k over the last axis of one block x [rows, E_pad] float32 -> (values, indices) [rows, k_out].

  Round s takes the largest not-yet-taken value and, among equal ones, the lowest column (lax.top_k's order);
  columns >= num_experts (padding) are never taken. Slots >= k stay 0. Only elementwise ops and lane reductions,
  so the same body lowers in Triton and Mosaic.
  """
  rows, width = x.shape
  col = lax.broadcasted_iota(jnp.int32, (rows, width), 1).astype(jnp.float32)  # float: min-reductions on floats
  taken = col >= num_experts
  slot = lax.broadcasted_iota(jnp.int32, (rows, k_out), 1)
  values = jnp.zeros((rows, k_out), jnp.float32)
  indices = jnp.zeros((rows, k_out), jnp.int32)
  for s in range(k):
    avail = jnp.where(taken, -jnp.inf, x)
    best = jnp.max(avail, axis=1, keepdims=True)  # [rows, 1]
    hit = jnp.logical_and(avail == best, jnp.logical_not(taken))
    pick = jnp.min(jnp.where(hit, col, float(width)), axis=1, keepdims=True)  # lowest index among the ties
    taken = jnp.logical_or(taken, col == pick)
    values = jnp.where(slot == s, best, values)
    indices = jnp.where(slot == s, pick.astype(jnp.int32), indices)
  return values, indices


def _topk_kernel(x_ref, values_ref, indices_ref, *, k, num_experts):
  values, indices = topk_block(x_ref[...].astype(jnp.float32), k, num_experts, values_ref.shape[-1])
  values_ref[...] = values
  indices_ref[...] = indices


def topk(logits, k: int, num_experts: int, *, block_t: int, interpret: bool):
  """logits [T_pad, E_pad] (T_pad % block_t == 0, powers of two) -> (values f32, indices i32) [T_pad, k_pad]."""
  t_pad, e_pad = logits.shape
  k_pad = int(pl.next_power_of_2(k))
  spec = lambda width: pl.BlockSpec((block_t, width), lambda i: (i, 0))
  return pl.pallas_call(
      functools.partial(_topk_kernel, k=k, num_experts=num_experts), grid=(t_pad // block_t,),
      in_specs=[spec(e_pad)], out_specs=[spec(k_pad), spec(k_pad)],
      out_shape=[out_struct((t_pad, k_pad), jnp.float32, logits), out_struct((t_pad, k_pad), jnp.int32, logits)],
      compiler_params=None if interpret else _params(), interpret=interpret, name='jmm_moe_topk')(logits)


def rank_block(ids, running, less_than_acc, block: int, width: int):
  """For one block of expert ids [block, 1]: (rank within its expert counting earlier blocks [block, 1] f32,
  onehot [block, width] f32). `running` [1, width] is the per-expert count of earlier blocks."""
  col = lax.broadcasted_iota(jnp.int32, (block, width), 1)
  onehot = (ids == col).astype(jnp.float32)  # [block, width]
  row = lax.broadcasted_iota(jnp.int32, (block, block), 0)
  tril = (lax.broadcasted_iota(jnp.int32, (block, block), 1) <= row).astype(jnp.float32)
  cum = _dot(tril, onehot, (1, 0), lax.Precision.HIGHEST)  # [block, width]: inclusive count within the block
  rank = jnp.sum(onehot * (cum - 1.0 + running + less_than_acc), axis=1, keepdims=True)
  return rank, onehot


def _positions_kernel(ids_ref, pos_ref, counts_ref, *, block, width, num_blocks):
  """Position of every flat (token, slot) in the expert-sorted order, and the per-expert counts."""
  col = lax.broadcasted_iota(jnp.int32, (block, width), 1)

  def histogram(b, carry):  # counts[e] and less[e] = #ids < e (the exclusive cumsum of counts: group offsets)
    counts, less = carry
    ids = ids_ref[pl.ds(b * block, block)][:, None]
    counts = counts + jnp.sum((ids == col).astype(jnp.float32), axis=0, keepdims=True)
    less = less + jnp.sum((ids < col).astype(jnp.float32), axis=0, keepdims=True)
    return counts, less

  zeros = jnp.zeros((1, width), jnp.float32)
  counts, less = lax.fori_loop(0, num_blocks, histogram, (zeros, zeros))

  def place(b, running):
    ids = ids_ref[pl.ds(b * block, block)][:, None]
    rank, onehot = rank_block(ids, running, less, block, width)
    pos_ref[pl.ds(b * block, block)] = rank[:, 0].astype(jnp.int32)
    return running + jnp.sum(onehot, axis=0, keepdims=True)

  lax.fori_loop(0, num_blocks, place, zeros)
  counts_ref[...] = counts.astype(jnp.int32)


def expert_positions(ids, width: int, *, block: int, interpret: bool):
  """ids int32 [N_pad] (N_pad % block == 0; values < width, a power of two) -> (positions [N_pad], counts [1, width]).

  positions[i] = (number of ids < ids[i]) + (number of j < i with ids[j] == ids[i]): where flat entry i lands
  when the ids are stably sorted.
  """
  n_pad = ids.shape[0]
  return pl.pallas_call(
      functools.partial(_positions_kernel, block=block, width=width, num_blocks=n_pad // block), grid=(1,),
      in_specs=[pl.BlockSpec((n_pad,), lambda i: (0,))],
      out_specs=[pl.BlockSpec((n_pad,), lambda i: (0,)), pl.BlockSpec((1, width), lambda i: (0, 0))],
      out_shape=[out_struct((n_pad,), jnp.int32, ids), out_struct((1, width), jnp.int32, ids)],
      compiler_params=None if interpret else _params(), interpret=interpret, name='jmm_moe_positions')(ids)


# ---------------------------------------------------------------------------------------------------------------
# Grouped matmuls.

def _gmm_kernel(first_ref, last_ref, starts_ref, ends_ref, x_ref, w_ref, o_ref, *, tm, tk, num_k, precision):
  """Program (i, j): output tile [tm, tn] of M tile i; each overlapping group's rows from x_i @ w[group]."""
  i = pl.program_id(0)
  tn = o_ref.shape[-1]
  rows = i * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)

  def group(g, out):
    def k_step(kk, acc):
      x = x_ref[:, pl.ds(kk * tk, tk)]  # [tm, tk]
      w = w_ref[g, pl.ds(kk * tk, tk), :]  # [tk, tn]
      return acc + _dot(x, w, (1, 0), precision)

    acc = lax.fori_loop(0, num_k, k_step, jnp.zeros((tm, tn), jnp.float32))
    mine = jnp.logical_and(rows >= starts_ref[g], rows < ends_ref[g])
    return jnp.where(mine, acc, out)

  out = lax.fori_loop(first_ref[i], last_ref[i] + 1, group, jnp.zeros((tm, tn), jnp.float32))
  o_ref[...] = out.astype(o_ref.dtype)


def gmm(x, w, tables, *, tm: int, tk: int, tn: int, out_dtype, interpret: bool):
  """x [M_pad, K_pad] @ w[group of row] ([E, K_pad, N_pad]) -> [M_pad, N_pad]; dims are multiples of the blocks.

  tables: (first group [M tiles], last group [M tiles], group starts [E], group ends [E]), int32.
  """
  m_pad, k_pad = x.shape
  num_experts, _, n_pad = w.shape
  table_spec = lambda n: pl.BlockSpec((n,), lambda i, j: (0,))
  num_tiles = m_pad // tm
  return pl.pallas_call(
      functools.partial(_gmm_kernel, tm=tm, tk=tk, num_k=k_pad // tk, precision=_precision(x.dtype)),
      grid=(num_tiles, n_pad // tn),
      in_specs=[table_spec(num_tiles), table_spec(num_tiles), table_spec(num_experts), table_spec(num_experts),
                pl.BlockSpec((tm, k_pad), lambda i, j: (i, 0)),
                pl.BlockSpec((num_experts, k_pad, tn), lambda i, j: (0, 0, j))],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      out_shape=out_struct((m_pad, n_pad), out_dtype, x, w, *tables),
      compiler_params=None if interpret else _params(), interpret=interpret, name='jmm_moe_gmm')(*tables, x, w)


def _tgmm_kernel(starts_ref, ends_ref, x_ref, dy_ref, o_ref, *, tm, precision):
  """Program (e, a, b): dw[e] tile [tk, tn] = sum over group e's M tiles of x_tile^T dy_tile (other rows masked)."""
  e = pl.program_id(0)
  lo, hi = starts_ref[e], ends_ref[e]
  tk, tn = o_ref.shape

  def m_step(t, acc):
    x = x_ref[pl.ds(t * tm, tm), :]  # [tm, tk]
    dy = dy_ref[pl.ds(t * tm, tm), :]  # [tm, tn]
    rows = t * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    x = jnp.where(jnp.logical_and(rows >= lo, rows < hi), x, jnp.zeros_like(x))
    return acc + _dot(x, dy, (0, 0), precision)

  first = lax.div(lo, tm)
  last = jnp.where(hi > lo, lax.div(hi + tm - 1, tm), first)  # Empty group: no tile.
  acc = lax.fori_loop(first, last, m_step, jnp.zeros((tk, tn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def tgmm(x, dy, starts, ends, num_experts: int, *, tm: int, tk: int, tn: int, out_dtype, interpret: bool):
  """dw[e] = x[rows of e]^T dy[rows of e]: x [M_pad, K_pad], dy [M_pad, N_pad] -> [E, K_pad, N_pad]."""
  m_pad, k_pad = x.shape
  n_pad = dy.shape[1]
  table_spec = pl.BlockSpec((num_experts,), lambda e, a, b: (0,))
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm, precision=_precision(x.dtype)),
      grid=(num_experts, k_pad // tk, n_pad // tn),
      in_specs=[table_spec, table_spec, pl.BlockSpec((m_pad, tk), lambda e, a, b: (0, a)),
                pl.BlockSpec((m_pad, tn), lambda e, a, b: (0, b))],
      out_specs=pl.BlockSpec((None, tk, tn), lambda e, a, b: (e, a, b)),
      out_shape=out_struct((num_experts, k_pad, n_pad), out_dtype, x, dy, starts, ends),
      compiler_params=None if interpret else _params(), interpret=interpret,
      name='jmm_moe_tgmm')(starts, ends, x, dy)
