"""Mixture-of-experts kernels for TPUs in Pallas (Mosaic lowering): top-k routing, expert positions, and the
grouped matmuls (forward `gmm`, weight-gradient `tgmm`).

Raw kernels on padded inputs; `jmm.kernels.moe` pads, builds the tables and wires the custom VJP. Unlike the
Triton kernels, the data-dependent structure lives in the grid: a table of work items (M tile, group, row range)
from `moe.work_items` is scalar-prefetched into SMEM (`pltpu.PrefetchScalarGridSpec`) and the BlockSpec index
maps read it, so Mosaic's pipeline DMAs the right x tile and the right expert's weight block for each step and
double-buffers them behind the matmuls:
  gmm   grid (N tiles, work items, K tiles): item w computes x[tile w] @ w[group w] over the K steps into a float32
        scratch, then writes the rows of its group into the output tile, which stays resident while consecutive
        items share the tile (a tile straddling g groups is visited g times; the first visit zero-fills it).
  tgmm  grid (K tiles, N tiles, work items): dw[group w] += x[tile w]^T dy[tile w] with the other groups' rows
        masked; the block stays resident while consecutive items share the group, starts at 0 on a group's first
        item and is written after its last. Empty groups have no item (the wrapper zeroes their dw).
  topk  grid (token blocks,): the routing body shared with the Triton kernel (`moe_gpu.topk_block`).
  positions  grid (2 phases, blocks), sequential: phase 0 builds the expert histogram and the offsets (#ids < e)
        in scratch, phase 1 walks the blocks again and writes offset + running rank (lower-triangular matmul).
Every matmul accumulates in float32. Block rows are multiples of 8 (16 for bf16); K / N blocks multiples of 128 or
the whole dim. On CPU the kernels run in the TPU interpreter (`pltpu.InterpretParams`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jmm.kernels import moe_gpu
from jmm.kernels.moe_gpu import out_struct


def _interpret_arg(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, precision):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# Routing.

def _topk_kernel(x_ref, values_ref, indices_ref, *, k):
  x = x_ref[...].astype(jnp.float32)
  values, indices = moe_gpu.topk_block(x, k, x.shape[-1], k)
  values_ref[...] = values
  indices_ref[...] = indices


def topk(logits, k: int, *, block_t: int, interpret: bool):
  """logits [T_pad, E] (T_pad % block_t == 0, block_t % 8 == 0) -> (values f32, indices int32) [T_pad, k]."""
  t_pad, num_experts = logits.shape
  spec = lambda width: pl.BlockSpec((block_t, width), lambda i: (i, 0))
  return pl.pallas_call(
      functools.partial(_topk_kernel, k=k), grid=(t_pad // block_t,),
      in_specs=[spec(num_experts)], out_specs=[spec(k), spec(k)],
      out_shape=[out_struct((t_pad, k), jnp.float32, logits), out_struct((t_pad, k), jnp.int32, logits)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel',)),
      interpret=_interpret_arg(interpret), name='jmm_moe_topk_tpu')(logits)


def _positions_kernel(ids_ref, pos_ref, counts_ref, counts_sc, less_sc, running_sc, *, block, width):
  phase, b = pl.program_id(0), pl.program_id(1)
  ids = ids_ref[...]  # [block, 1]
  col = lax.broadcasted_iota(jnp.int32, (block, width), 1)

  @pl.when(jnp.logical_and(phase == 0, b == 0))
  def _init():
    counts_sc[...] = jnp.zeros(counts_sc.shape, jnp.float32)
    less_sc[...] = jnp.zeros(less_sc.shape, jnp.float32)
    running_sc[...] = jnp.zeros(running_sc.shape, jnp.float32)

  @pl.when(phase == 0)
  def _histogram():
    counts_sc[...] += jnp.sum((ids == col).astype(jnp.float32), axis=0, keepdims=True)
    less_sc[...] += jnp.sum((ids < col).astype(jnp.float32), axis=0, keepdims=True)

  @pl.when(phase == 1)
  def _place():
    rank, onehot = moe_gpu.rank_block(ids, running_sc[...], less_sc[...], block, width)
    pos_ref[...] = rank.astype(jnp.int32)
    running_sc[...] += jnp.sum(onehot, axis=0, keepdims=True)
    counts_ref[...] = counts_sc[...].astype(jnp.int32)


def expert_positions(ids, width: int, *, block: int, interpret: bool):
  """ids int32 [N_pad] (values < width, width % 128 == 0) -> (positions [N_pad], counts [1, width]); see
  `moe_gpu.expert_positions`."""
  n_pad = ids.shape[0]
  num_blocks = n_pad // block
  positions, counts = pl.pallas_call(
      functools.partial(_positions_kernel, block=block, width=width), grid=(2, num_blocks),
      in_specs=[pl.BlockSpec((block, 1), lambda p, b: (b, 0))],
      # Phase 0 parks on output block 0 (written first thing in phase 1), so it writes nothing back of its own.
      out_specs=[pl.BlockSpec((block, 1), lambda p, b: (b * p, 0)), pl.BlockSpec((1, width), lambda p, b: (0, 0))],
      out_shape=[out_struct((n_pad, 1), jnp.int32, ids), out_struct((1, width), jnp.int32, ids)],
      scratch_shapes=[pltpu.VMEM((1, width), jnp.float32)] * 3,
      compiler_params=pltpu.CompilerParams(dimension_semantics=('arbitrary', 'arbitrary')),
      interpret=_interpret_arg(interpret), name='jmm_moe_positions_tpu')(ids[:, None])
  return positions[:, 0], counts


# ---------------------------------------------------------------------------------------------------------------
# Grouped matmuls.

def _gmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, x_ref, w_ref, o_ref, acc_ref, *, tm, precision):
  """Grid step (n, item, k)."""
  del group_ref
  item, kk = pl.program_id(1), pl.program_id(2)
  lo, hi = lo_ref[item], hi_ref[item]

  @pl.when(kk == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(lo < hi)  # Items with an empty row range (tail tiles, padding) do no matmul.
  def _accumulate():
    acc_ref[...] += _dot(x_ref[...], w_ref[...], precision)

  @pl.when(kk == pl.num_programs(2) - 1)
  def _write():
    tile = tile_ref[item]
    rows = tile * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    mine = jnp.logical_and(rows >= lo, rows < hi)
    first_visit = jnp.logical_or(item == 0, tile_ref[jnp.maximum(item - 1, 0)] != tile)

    @pl.when(first_visit)
    def _fresh():
      o_ref[...] = jnp.where(mine, acc_ref[...], 0.0).astype(o_ref.dtype)

    @pl.when(jnp.logical_not(first_visit))
    def _merge():
      o_ref[...] = jnp.where(mine, acc_ref[...].astype(o_ref.dtype), o_ref[...])


def gmm(x, w, table, *, tm: int, tk: int, tn: int, out_dtype, interpret: bool):
  """x [M_pad, K_pad] @ w[group of row] ([E, K_pad, N_pad]) -> [M_pad, N_pad]; table = moe.work_items(...)."""
  m_pad, k_pad = x.shape
  _, _, n_pad = w.shape
  num_items = table[0].shape[0]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(n_pad // tn, num_items, k_pad // tk),
      in_specs=[pl.BlockSpec((tm, tk), lambda n, i, k, tile, group, lo, hi: (tile[i], k)),
                pl.BlockSpec((None, tk, tn), lambda n, i, k, tile, group, lo, hi: (group[i], k, n))],
      out_specs=pl.BlockSpec((tm, tn), lambda n, i, k, tile, group, lo, hi: (tile[i], n)),
      scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_gmm_kernel, tm=tm, precision=_precision(x.dtype)), grid_spec=grid_spec,
      out_shape=out_struct((m_pad, n_pad), out_dtype, x, w, *table),
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'arbitrary', 'arbitrary')),
      interpret=_interpret_arg(interpret), name='jmm_moe_gmm_tpu')(*table, x, w)


def _tgmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, x_ref, dy_ref, o_ref, acc_ref, *, tm, precision):
  """Grid step (k, n, item)."""
  item = pl.program_id(2)
  last_item = pl.num_programs(2) - 1
  group, lo, hi = group_ref[item], lo_ref[item], hi_ref[item]

  @pl.when(jnp.logical_or(item == 0, group_ref[jnp.maximum(item - 1, 0)] != group))
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(lo < hi)
  def _accumulate():
    rows = tile_ref[item] * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    x = x_ref[...]
    x = jnp.where(jnp.logical_and(rows >= lo, rows < hi), x, jnp.zeros_like(x))
    acc_ref[...] += _dot(x.T, dy_ref[...], precision)  # [tk, tn]

  @pl.when(jnp.logical_or(item == last_item, group_ref[jnp.minimum(item + 1, last_item)] != group))
  def _write():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def tgmm(x, dy, table, num_experts: int, *, tm: int, tk: int, tn: int, out_dtype, interpret: bool):
  """dw[e] = x[rows of e]^T dy[rows of e]: x [M_pad, K_pad], dy [M_pad, N_pad] -> [E, K_pad, N_pad]; blocks of
  experts without rows are left unwritten (the caller masks them)."""
  m_pad, k_pad = x.shape
  n_pad = dy.shape[1]
  num_items = table[0].shape[0]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(k_pad // tk, n_pad // tn, num_items),
      in_specs=[pl.BlockSpec((tm, tk), lambda a, b, i, tile, group, lo, hi: (tile[i], a)),
                pl.BlockSpec((tm, tn), lambda a, b, i, tile, group, lo, hi: (tile[i], b))],
      out_specs=pl.BlockSpec((None, tk, tn), lambda a, b, i, tile, group, lo, hi: (group[i], a, b)),
      scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)])
  del m_pad
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm, precision=_precision(x.dtype)), grid_spec=grid_spec,
      out_shape=out_struct((num_experts, k_pad, n_pad), out_dtype, x, dy, *table),
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=_interpret_arg(interpret), name='jmm_moe_tgmm_tpu')(*table, x, dy)
