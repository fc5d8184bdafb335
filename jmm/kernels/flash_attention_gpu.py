"""Flash attention for NVIDIA GPUs in Pallas (Triton lowering), forward and backward, with a `jax.custom_vjp`.

Layout as everywhere in `jmm.kernels.attention`: q [batch, q_len, heads, head_dim], k and v [batch, kv_len, heads,
head_dim]; the BlockSpecs squeeze batch and heads, so no transposes are needed around the kernels.

Grid and loops (FlashAttention-2, Dao 2023, arXiv:2307.08691):
  forward  grid (q blocks, batch, heads); each program loops over key blocks with an online softmax and writes
           its output block and its rows' softmax statistics (max m and 1 / sum l).
  dk, dv   grid (kv blocks, batch, heads); each program loops over query blocks and accumulates dk and dv.
  dq       grid (q blocks, batch, heads); each program loops over key blocks and accumulates dq.
Two backward kernels instead of one with atomic dq adds: deterministic, and no float32 dq buffer in HBM.
With `causal`, loops stop at (forward, dq) or start from (dk/dv) the diagonal block, halving the work.

Ragged lengths (ViT's 197 / 257 / 577 tokens) are padded up to the block size by the wrapper; padded keys are
masked to -inf inside the kernels and padded query rows are sliced off (their cotangent is zero, so they add
nothing to dk / dv). Inputs bf16 / fp16 / fp32; every matmul accumulates in float32 and the softmax statistics
are float32. Triton needs power-of-two block shapes, so other head dims are zero-padded up to the next power
of two (So400m's 72 -> 128: correct, but 44% of the matmul work is padding; 64 and 128 run unpadded).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jmm.kernels import flash_common as common

try:  # Present in every jax with Pallas; guarded so a jax without the Triton backend still imports this file.
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
  plgpu = None

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
_MIN_BLOCK = 16  # tl.dot needs every dimension >= 16.


def supports(q_shape, kv_shape, dtype) -> bool:
  """True if the kernel handles these shapes and dtype (head_dim <= 256, padded to a power of two; float inputs)."""
  del kv_shape
  return (q_shape[-1] <= 256
          and jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def _block(requested: int, length: int) -> int:
  """A power-of-two block <= requested, shrunk for short sequences (text: 16 tokens -> one 16-row block)."""
  return int(max(_MIN_BLOCK, min(requested, pl.next_power_of_2(length))))


def _fwd_kernel(*refs, scale, causal, kv_len, block_q, block_k, num_kv_blocks, has_segments, precision):
  """One (q block, batch, head): o = softmax(q k^T * scale) v over all key blocks, and the rows' m, 1 / l."""
  if has_segments:
    q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, m_ref, linv_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref, m_ref, linv_ref = refs
  i = pl.program_id(0)
  q = q_ref[...]  # [block_q, D]
  q_pos = common.positions(i * block_q, block_q, 0)
  q_seg = qseg_ref[...][:, None] if has_segments else None  # [block_q, 1]
  head_dim = q.shape[-1]

  def body(j, carry):
    acc, m, l = carry
    start = j * block_k
    k = k_ref[pl.ds(start, block_k), :]  # [block_k, D]
    v = v_ref[pl.ds(start, block_k), :]
    s = common.dot(q, k, (1, 1), precision) * scale  # [block_q, block_k] fp32
    k_seg = kseg_ref[pl.ds(start, block_k)][None, :] if has_segments else None
    s, _ = common.mask_logits(s, q_pos, common.positions(start, block_k, 1), kv_len=kv_len, causal=causal,
                              q_seg=q_seg, k_seg=k_seg)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [block_q]
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + common.dot(p.astype(v.dtype), v, (1, 0), precision)
    return acc, m_new, l

  acc = jnp.zeros((block_q, head_dim), jnp.float32)
  m = jnp.full((block_q,), -jnp.inf, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  upper = num_kv_blocks
  if causal:  # Key blocks past this q block's last row are fully masked: skip them.
    upper = jnp.minimum(num_kv_blocks, lax.div((i + 1) * block_q + block_k - 1, block_k))
  acc, m, l = lax.fori_loop(0, upper, body, (acc, m, l))
  l_inv = 1.0 / l
  o_ref[...] = (acc * l_inv[:, None]).astype(o_ref.dtype)
  m_ref[...] = m
  linv_ref[...] = l_inv


def _probs_and_dlogits(q, k, v, do, m, l_inv, delta, q_pos, k_pos, q_seg, k_seg, *, scale, causal, kv_len,
                       precision):
  """Recomputes p [block_q, block_k] from the saved row statistics; returns (p, dlogits w.r.t. q k^T)."""
  s = common.dot(q, k, (1, 1), precision) * scale
  s, allowed = common.mask_logits(s, q_pos, k_pos, kv_len=kv_len, causal=causal, q_seg=q_seg, k_seg=k_seg)
  p = jnp.exp(s - m[:, None]) * l_inv[:, None]  # [block_q, block_k]; m and 1/l, see flash_common
  dp = common.dot(do, v, (1, 1), precision)  # [block_q, block_k]
  ds = p * (dp - delta[:, None])
  if allowed is not None:  # Masked logits are constants: no gradient (matters only for fully masked rows).
    ds = jnp.where(allowed, ds, 0.0)
  return p, ds * scale


def _dkdv_kernel(*refs, scale, causal, kv_len, block_q, block_k, num_q_blocks, has_segments, precision):
  """One (kv block, batch, head): dk = sum_i ds_i^T q_i, dv = sum_i p_i^T do_i over query blocks i."""
  if has_segments:
    q_ref, k_ref, v_ref, do_ref, m_ref, linv_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref = refs
  else:
    q_ref, k_ref, v_ref, do_ref, m_ref, linv_ref, delta_ref, dk_ref, dv_ref = refs
  j = pl.program_id(0)
  k = k_ref[...]  # [block_k, D]
  v = v_ref[...]
  k_pos = common.positions(j * block_k, block_k, 1)
  k_seg = kseg_ref[...][None, :] if has_segments else None

  def body(i, carry):
    dk, dv = carry
    start = i * block_q
    rows = pl.ds(start, block_q)
    q, do = q_ref[rows, :], do_ref[rows, :]
    q_seg = qseg_ref[rows][:, None] if has_segments else None
    p, ds = _probs_and_dlogits(q, k, v, do, m_ref[rows], linv_ref[rows], delta_ref[rows],
                               common.positions(start, block_q, 0), k_pos, q_seg, k_seg, scale=scale,
                               causal=causal, kv_len=kv_len, precision=precision)
    dv = dv + common.dot(p.astype(do.dtype), do, (0, 0), precision)  # [block_k, D]
    dk = dk + common.dot(ds.astype(q.dtype), q, (0, 0), precision)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  lower = lax.div(j * block_k, block_q) if causal else 0  # Query blocks wholly before this key block see none of it.
  dk, dv = lax.fori_loop(lower, num_q_blocks, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, scale, causal, kv_len, block_q, block_k, num_kv_blocks, has_segments, precision):
  """One (q block, batch, head): dq = sum_j ds_j k_j over key blocks j."""
  if has_segments:
    q_ref, k_ref, v_ref, do_ref, m_ref, linv_ref, delta_ref, qseg_ref, kseg_ref, dq_ref = refs
  else:
    q_ref, k_ref, v_ref, do_ref, m_ref, linv_ref, delta_ref, dq_ref = refs
  i = pl.program_id(0)
  q, do, m, l_inv, delta = q_ref[...], do_ref[...], m_ref[...], linv_ref[...], delta_ref[...]
  q_pos = common.positions(i * block_q, block_q, 0)
  q_seg = qseg_ref[...][:, None] if has_segments else None

  def body(j, dq):
    start = j * block_k
    cols = pl.ds(start, block_k)
    k, v = k_ref[cols, :], v_ref[cols, :]
    k_seg = kseg_ref[cols][None, :] if has_segments else None
    _, ds = _probs_and_dlogits(q, k, v, do, m, l_inv, delta, q_pos, common.positions(start, block_k, 1), q_seg, k_seg,
                               scale=scale, causal=causal, kv_len=kv_len, precision=precision)
    return dq + common.dot(ds.astype(k.dtype), k, (1, 0), precision)

  upper = num_kv_blocks
  if causal:
    upper = jnp.minimum(num_kv_blocks, lax.div((i + 1) * block_q + block_k - 1, block_k))
  dq = lax.fori_loop(0, upper, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _compiler_params(head_dim: int):
  """num_warps / num_stages as the FlashAttention-2 Triton tutorial uses for these head dims (to be tuned)."""
  if plgpu is None:
    return None
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _call_forward(q, k, v, q_seg, kv_seg, *, scale, causal, kv_len, block_q, block_k, interpret):
  """Runs the forward kernel on padded inputs; returns (o [B, Tq, H, D], m, 1 / l), the last two [B, H, Tq]."""
  batch, q_len, heads, head_dim = q.shape
  kv_pad = k.shape[1]
  has_segments = q_seg is not None
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None  # IEEE fp32, not TF32, for fp32 inputs.
  kernel = functools.partial(
      _fwd_kernel, scale=scale, causal=causal, kv_len=kv_len, block_q=block_q,
      block_k=block_k, num_kv_blocks=kv_pad // block_k, has_segments=has_segments, precision=precision)
  q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, kv_pad, None, head_dim), lambda i, b, h: (b, 0, h, 0))
  in_specs = [q_spec, kv_spec, kv_spec]
  args = [q, k, v]
  if has_segments:
    in_specs += [pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
                 pl.BlockSpec((None, kv_pad), lambda i, b, h: (b, 0))]
    args += [q_seg, kv_seg]
  return pl.pallas_call(
      kernel, grid=(q_len // block_q, batch, heads), in_specs=in_specs,
      out_specs=[q_spec] + 2 * [pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + 2 * [jax.ShapeDtypeStruct((batch, heads, q_len),
                                                                                     jnp.float32)],
      compiler_params=None if interpret else _compiler_params(head_dim), interpret=interpret,
      name='jmm_flash_attention_fwd')(*args)


def _call_backward(q, k, v, q_seg, kv_seg, o, stats, do, *, scale, causal, kv_len, block_q, block_k, interpret):
  """Runs the dk/dv and dq kernels on padded inputs; returns (dq, dk, dv) in the input dtype."""
  batch, q_len, heads, head_dim = q.shape
  kv_pad = k.shape[1]
  has_segments = q_seg is not None
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  # delta_i = rowsum(o_i * do_i) = sum_j p_ij dp_ij: one fused elementwise+reduce, left to XLA.
  delta = jnp.einsum('bqhd,bqhd->bhq', o.astype(jnp.float32), do.astype(jnp.float32))  # [B, H, Tq]
  kw = dict(scale=scale, causal=causal, kv_len=kv_len, block_q=block_q, block_k=block_k,
            has_segments=has_segments, precision=precision)
  params = None if interpret else _compiler_params(head_dim)

  # dk, dv: grid over key blocks; q, do, row statistics and delta whole.
  k_block = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, h: (b, j, h, 0))
  q_whole = pl.BlockSpec((None, q_len, None, head_dim), lambda j, b, h: (b, 0, h, 0))
  stat_whole = pl.BlockSpec((None, None, q_len), lambda j, b, h: (b, h, 0))
  in_specs = [q_whole, k_block, k_block, q_whole, stat_whole, stat_whole, stat_whole]
  args = [q, k, v, do, *stats, delta]
  if has_segments:
    in_specs += [pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0)),
                 pl.BlockSpec((None, block_k), lambda j, b, h: (b, j))]
    args += [q_seg, kv_seg]
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, num_q_blocks=q_len // block_q, **kw),
      grid=(kv_pad // block_k, batch, heads), in_specs=in_specs, out_specs=[k_block, k_block],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=interpret, name='jmm_flash_attention_dkdv')(*args)

  # dq: grid over query blocks; k, v whole.
  q_block = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_whole = pl.BlockSpec((None, kv_pad, None, head_dim), lambda i, b, h: (b, 0, h, 0))
  stat_block = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
  in_specs = [q_block, kv_whole, kv_whole, q_block, stat_block, stat_block, stat_block]
  args = [q, k, v, do, *stats, delta]
  if has_segments:
    in_specs += [pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
                 pl.BlockSpec((None, kv_pad), lambda i, b, h: (b, 0))]
    args += [q_seg, kv_seg]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, num_kv_blocks=kv_pad // block_k, **kw),
      grid=(q_len // block_q, batch, heads), in_specs=in_specs, out_specs=q_block,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=interpret, name='jmm_flash_attention_dq')(*args)
  return dq, dk, dv


_flash = common.flash_with_vjp(_call_forward, _call_backward)


def flash_attention(q, k, v, *, causal: bool = False, segment_ids=None, block_q: int = DEFAULT_BLOCK_Q,
                    block_k: int = DEFAULT_BLOCK_K, interpret: bool | None = None):
  """softmax(q k^T / sqrt(D)) v by the Pallas Triton kernels; q [B, Tq, H, D], k/v [B, Tk, H, D] -> [B, Tq, H, D].

  causal: query i sees keys j <= i. segment_ids: int [B, T] (self-attention) or a pair (q_ids [B, Tq],
  kv_ids [B, Tk]); a query sees only keys of its own segment. Lengths need not be block multiples (padded
  here). interpret: run the kernels through Pallas' interpreter (default: only on CPU).
  Differentiable (custom_vjp; the backward recomputes probabilities from the saved m and 1 / l).
  """
  common.check_qkv(q, k, v, 'flash_attention_gpu')
  batch, q_len, _, head_dim = q.shape
  kv_len = k.shape[1]
  if not supports(q.shape, k.shape, q.dtype):
    raise ValueError(f'flash_attention_gpu: head_dim must be <= 256 and dtype float32/bf16/fp16; got '
                     f'head_dim={head_dim}, dtype={q.dtype}')
  if interpret is None:
    interpret = common.default_interpret()
  q_seg, kv_seg = common.split_segment_ids(segment_ids, q_len, kv_len, batch)
  block_q, block_k = _block(block_q, q_len), _block(block_k, kv_len)
  q_pad, kv_pad = common.round_up(q_len, block_q), common.round_up(kv_len, block_k)
  dim_pad = int(max(_MIN_BLOCK, pl.next_power_of_2(head_dim)))  # Zero columns change no q.k and no output.
  qp = common.pad_axis(common.pad_axis(q, 1, q_pad), 3, dim_pad)
  kp, vp = (common.pad_axis(common.pad_axis(x, 1, kv_pad), 3, dim_pad) for x in (k, v))
  if q_seg is not None:
    q_seg, kv_seg = common.pad_axis(q_seg, 1, q_pad, -1), common.pad_axis(kv_seg, 1, kv_pad, -2)
  static = (('scale', float(1 / np.sqrt(head_dim))), ('causal', bool(causal)),
            ('kv_len', kv_len if kv_pad != kv_len else None), ('block_q', block_q), ('block_k', block_k),
            ('interpret', interpret))
  out = _flash(qp, kp, vp, q_seg, kv_seg, static)
  return out[:, :q_len, :, :head_dim]
