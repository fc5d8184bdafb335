"""Flash attention for TPUs in Pallas (Mosaic lowering), forward and backward, with a `jax.custom_vjp`.

Mosaic tiles the last two dims of every block by (8 sublanes, 128 lanes), so the wrapper transposes q, k, v to
[batch, heads, length, head_dim]: a block is then [block, head_dim] with head_dim whole. Blocks along the
length are multiples of 8 (q) and 128 (k, whose segment ids lie along lanes), or the whole padded length.

Unlike the Triton kernel, the key (or query) loop is the last grid axis ('arbitrary' semantics) rather than a
loop in the kernel: Mosaic's pipeline then double-buffers the next block's DMA behind the current block's
matmuls, and the running statistics live in VMEM scratch across grid steps (FlashAttention-2, Dao 2023,
arXiv:2307.08691; the grid layout of the TPU kernels that ship with JAX):
  forward  grid (batch, heads, q blocks, kv blocks); m, l [block_q, 1] and acc [block_q, D] in float32 scratch.
  dk, dv   grid (batch, heads, kv blocks, q blocks); dk, dv accumulate in float32 scratch.
  dq       grid (batch, heads, q blocks, kv blocks); dq accumulates in float32 scratch.
With `causal`, blocks above the diagonal are skipped (`pl.when`) and their index maps are clamped to the last
useful block, so no DMA is issued for them either.

On CPU the kernels run in the TPU interpreter (`pltpu.InterpretParams`), which is how the tests check them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jmm.kernels import flash_common as common

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 128


def supports(q_shape, kv_shape, dtype) -> bool:
  """True if the kernel handles these shapes and dtype (any head_dim; float inputs)."""
  del q_shape, kv_shape
  return jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _block(requested: int, length: int) -> int:
  """`requested`, or the whole length rounded up to 8 sublanes when the sequence is shorter than one block."""
  return int(min(requested, common.round_up(length, 8)))


def _fwd_kernel(*refs, scale, causal, kv_len, block_q, block_k, has_segments, precision):
  """Grid step (b, h, i, j): folds key block j into the online softmax of query block i."""
  if has_segments:
    q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, m_ref, linv_ref, m_sc, l_sc, acc_sc = refs
  else:
    q_ref, k_ref, v_ref, o_ref, m_ref, linv_ref, m_sc, l_sc, acc_sc = refs
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def _step():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [block_q, D], [block_k, D], [block_k, D]
    s = common.dot(q, k, (1, 1), precision) * scale  # [block_q, block_k]
    s, _ = common.mask_logits(
        s, common.positions(i * block_q, block_q, 0), common.positions(j * block_k, block_k, 1), kv_len=kv_len,
        causal=causal, q_seg=qseg_ref[...] if has_segments else None,
        k_seg=kseg_ref[...] if has_segments else None)
    m_prev = m_sc[...]  # [block_q, 1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + common.dot(p.astype(v.dtype), v, (1, 0), precision)
    m_sc[...] = m_new

  if causal:  # Key block j is needed iff its first key is <= the block's last query.
    pl.when(j * block_k <= (i + 1) * block_q - 1)(_step)
  else:
    _step()

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l_inv = 1.0 / l_sc[...]
    o_ref[...] = (acc_sc[...] * l_inv).astype(o_ref.dtype)
    m_ref[...] = m_sc[...]
    linv_ref[...] = l_inv


def _dlogits(q, k, v, do, m, l_inv, delta, i, j, qseg_ref, kseg_ref, *, scale, causal, kv_len, block_q, block_k,
             has_segments, precision):
  """(p, dlogits) [block_q, block_k] for query block i and key block j, from the saved m and 1 / l."""
  s = common.dot(q, k, (1, 1), precision) * scale
  s, allowed = common.mask_logits(
      s, common.positions(i * block_q, block_q, 0), common.positions(j * block_k, block_k, 1), kv_len=kv_len,
      causal=causal, q_seg=qseg_ref[...] if has_segments else None, k_seg=kseg_ref[...] if has_segments else None)
  p = jnp.exp(s - m) * l_inv  # m, l_inv [block_q, 1]; see flash_common on why not a logsumexp
  dp = common.dot(do, v, (1, 1), precision)
  ds = p * (dp - delta)
  if allowed is not None:  # Masked logits are constants: no gradient (matters only for fully masked rows).
    ds = jnp.where(allowed, ds, 0.0)
  return p, ds * scale


def _dkdv_kernel(*refs, causal, block_q, block_k, **kw):
  """Grid step (b, h, j, i): adds query block i's share to dk, dv of key block j."""
  if kw['has_segments']:
    q_ref, k_ref, v_ref, do_ref, m_ref, linv_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
  else:
    q_ref, k_ref, v_ref, do_ref, m_ref, linv_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    qseg_ref = kseg_ref = None
  j, i = pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def _step():
    q, do = q_ref[...], do_ref[...]
    p, ds = _dlogits(q, k_ref[...], v_ref[...], do, m_ref[...], linv_ref[...], delta_ref[...], i, j, qseg_ref,
                     kseg_ref,
                     causal=causal, block_q=block_q, block_k=block_k, **kw)
    dv_sc[...] += common.dot(p.astype(do.dtype).T, do, (1, 0), kw['precision'])  # [block_k, D]
    dk_sc[...] += common.dot(ds.astype(q.dtype).T, q, (1, 0), kw['precision'])

  if causal:
    pl.when(j * block_k <= (i + 1) * block_q - 1)(_step)
  else:
    _step()

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, causal, block_q, block_k, **kw):
  """Grid step (b, h, i, j): adds key block j's share to dq of query block i."""
  if kw['has_segments']:
    q_ref, k_ref, v_ref, do_ref, m_ref, linv_ref, delta_ref, qseg_ref, kseg_ref, dq_ref, dq_sc = refs
  else:
    q_ref, k_ref, v_ref, do_ref, m_ref, linv_ref, delta_ref, dq_ref, dq_sc = refs
    qseg_ref = kseg_ref = None
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def _step():
    k = k_ref[...]
    _, ds = _dlogits(q_ref[...], k, v_ref[...], do_ref[...], m_ref[...], linv_ref[...], delta_ref[...], i, j, qseg_ref,
                     kseg_ref, causal=causal, block_q=block_q, block_k=block_k, **kw)
    dq_sc[...] += common.dot(ds.astype(k.dtype), k, (1, 0), kw['precision'])

  if causal:
    pl.when(j * block_k <= (i + 1) * block_q - 1)(_step)
  else:
    _step()

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _index_maps(causal: bool, block_q: int, block_k: int, num_q_blocks: int):
  """(q_row_block(i, j), kv_row_block(i, j)): block indices, clamped under `causal` so skipped steps fetch nothing.

  In a forward / dq grid (i outer, j inner) the last useful key block of query block i is
  ((i + 1) * block_q - 1) // block_k; in a dk/dv grid (j outer, i inner) the first useful query block of key
  block j is j * block_k // block_q (at most the last query block: with Tk > Tq, key blocks past the last query
  are skipped entirely). Re-using the previous block index makes Mosaic skip the copy.
  """
  if not causal:
    return (lambda i, j: i), (lambda i, j: j)
  # lax.div (truncating; the operands are >= 0) rather than //, whose sign fix-ups index maps need not carry.
  last_k = lambda i, j: jnp.minimum(j, lax.div((i + 1) * block_q - 1, block_k))
  first_q = lambda i, j: jnp.minimum(jnp.maximum(i, lax.div(j * block_k, block_q)), num_q_blocks - 1)
  return first_q, last_k


def _compiler_params():
  return pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary'))


def _interpret_arg(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _call_forward(q, k, v, q_seg, kv_seg, *, causal, kv_len, block_q, block_k, interpret):
  """Forward kernel on padded [B, H, T, D] inputs; returns (o [B, H, Tq, D], m, 1 / l), the last two float32
  [B, H, Tq, 1]."""
  batch, heads, q_len, head_dim = q.shape
  has_segments = q_seg is not None
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  q_row, kv_row = _index_maps(causal, block_q, block_k, q_len // block_q)
  q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j: (b, h, q_row(i, j), 0))
  kv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, i, j: (b, h, kv_row(i, j), 0))
  stat_spec = pl.BlockSpec((None, None, block_q, 1), lambda b, h, i, j: (b, h, i, 0))
  out_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j: (b, h, i, 0))
  in_specs, args = [q_spec, kv_spec, kv_spec], [q, k, v]
  if has_segments:
    in_specs += [pl.BlockSpec((None, block_q, 1), lambda b, h, i, j: (b, i, 0)),
                 pl.BlockSpec((None, 1, block_k), lambda b, h, i, j: (b, 0, kv_row(i, j)))]
    args += [q_seg, kv_seg]
  kernel = functools.partial(_fwd_kernel, scale=float(1 / np.sqrt(head_dim)), causal=causal, kv_len=kv_len,
                             block_q=block_q, block_k=block_k, has_segments=has_segments, precision=precision)
  return pl.pallas_call(
      kernel, grid=(batch, heads, q_len // block_q, k.shape[2] // block_k), in_specs=in_specs,
      out_specs=[out_spec, stat_spec, stat_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + 2 * [jax.ShapeDtypeStruct((batch, heads, q_len, 1),
                                                                                     jnp.float32)],
      scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32), pltpu.VMEM((block_q, 1), jnp.float32),
                      pltpu.VMEM((block_q, head_dim), jnp.float32)],
      compiler_params=_compiler_params(), interpret=_interpret_arg(interpret),
      name='jmm_flash_attention_fwd_tpu')(*args)


def _call_backward(q, k, v, q_seg, kv_seg, o, stats, do, *, causal, kv_len, block_q, block_k, interpret):
  """dk/dv and dq kernels on padded [B, H, T, D] inputs; returns (dq, dk, dv)."""
  batch, heads, q_len, head_dim = q.shape
  kv_pad = k.shape[2]
  has_segments = q_seg is not None
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)  # [B, H, Tq, 1]
  kw = dict(scale=float(1 / np.sqrt(head_dim)), causal=causal, kv_len=kv_len, block_q=block_q, block_k=block_k,
            has_segments=has_segments, precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)
  q_row, kv_row = _index_maps(causal, block_q, block_k, q_len // block_q)
  args = [q, k, v, do, *stats, delta] + ([q_seg, kv_seg] if has_segments else [])

  def specs(qi, kj):
    """In specs for (q, k, v, do, m, 1 / l, delta[, segs]) given q / kv block-index functions of the grid indices."""
    q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, x, y: (b, h, qi(x, y), 0))
    kv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, x, y: (b, h, kj(x, y), 0))
    stat = pl.BlockSpec((None, None, block_q, 1), lambda b, h, x, y: (b, h, qi(x, y), 0))
    out = [q_spec, kv_spec, kv_spec, q_spec, stat, stat, stat]
    if has_segments:
      out += [pl.BlockSpec((None, block_q, 1), lambda b, h, x, y: (b, qi(x, y), 0)),
              pl.BlockSpec((None, 1, block_k), lambda b, h, x, y: (b, 0, kj(x, y)))]
    return out

  # dk, dv: grid (b, h, j, i); the query block index is clamped up to the first useful one.
  dkv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, j, i: (b, h, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, **kw), grid=(batch, heads, kv_pad // block_k, q_len // block_q),
      in_specs=specs(lambda j, i: q_row(i, j), lambda j, i: j), out_specs=[dkv_spec, dkv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32), pltpu.VMEM((block_k, head_dim), jnp.float32)],
      compiler_params=_compiler_params(), interpret=_interpret_arg(interpret),
      name='jmm_flash_attention_dkdv_tpu')(*args)

  # dq: grid (b, h, i, j); the key block index is clamped down to the last useful one.
  dq_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j: (b, h, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **kw), grid=(batch, heads, q_len // block_q, kv_pad // block_k),
      in_specs=specs(lambda i, j: i, kv_row), out_specs=dq_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)],
      compiler_params=_compiler_params(), interpret=_interpret_arg(interpret),
      name='jmm_flash_attention_dq_tpu')(*args)
  return dq, dk, dv


_flash = common.flash_with_vjp(_call_forward, _call_backward)


def flash_attention(q, k, v, *, causal: bool = False, segment_ids=None, block_q: int = DEFAULT_BLOCK_Q,
                    block_k: int = DEFAULT_BLOCK_K, interpret: bool | None = None):
  """softmax(q k^T / sqrt(D)) v by the Pallas Mosaic TPU kernels; q [B, Tq, H, D], k/v [B, Tk, H, D].

  Same arguments and result as `flash_attention_gpu.flash_attention`. Block sizes: multiples of 8 (block_q)
  and 128 (block_k) on a real TPU unless one block covers the whole (padded) sequence. interpret: run in the
  TPU interpreter (default: only on CPU).
  """
  common.check_qkv(q, k, v, 'flash_attention_tpu')
  batch, q_len, _, head_dim = q.shape
  kv_len = k.shape[1]
  if not supports(q.shape, k.shape, q.dtype):
    raise ValueError(f'flash_attention_tpu: dtype must be float32 or bfloat16, got {q.dtype}')
  if interpret is None:
    interpret = common.default_interpret()
  q_seg, kv_seg = common.split_segment_ids(segment_ids, q_len, kv_len, batch)
  block_q, block_k = _block(block_q, q_len), _block(block_k, kv_len)
  q_pad, kv_pad = common.round_up(q_len, block_q), common.round_up(kv_len, block_k)
  to_bhtd = lambda x, length: common.pad_axis(x, 1, length).transpose(0, 2, 1, 3)  # [B, H, T, D]
  qp, kp, vp = to_bhtd(q, q_pad), to_bhtd(k, kv_pad), to_bhtd(v, kv_pad)
  if q_seg is not None:
    q_seg = common.pad_axis(q_seg, 1, q_pad, -1)[:, :, None]  # [B, Tq, 1]: queries along sublanes
    kv_seg = common.pad_axis(kv_seg, 1, kv_pad, -2)[:, None, :]  # [B, 1, Tk]: keys along lanes
  static = (('causal', bool(causal)), ('kv_len', kv_len if kv_pad != kv_len else None), ('block_q', block_q),
            ('block_k', block_k), ('interpret', interpret))
  out = _flash(qp, kp, vp, q_seg, kv_seg, static)  # [B, H, Tq_pad, D]
  return out.transpose(0, 2, 1, 3)[:, :q_len]
