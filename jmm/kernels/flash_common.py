"""Pieces shared by the Pallas flash-attention kernels (GPU / Triton and TPU / Mosaic): masking, padding, checks.

Both kernels follow FlashAttention-2 (Dao 2023, arXiv:2307.08691): the forward pass walks the keys block by block
with an online softmax (running max m, running sum l, float32 accumulator) and saves per query row only m and
1 / l; the backward pass recomputes the probabilities p = exp(s - m) / l from them, with delta = rowsum(o * do).
Two statistics, not FlashAttention's single logsumexp m + log(l): in a fully masked row m is MASK_VALUE
(~-2.4e38), which absorbs log(l) in float32, so exp(s - lse) would give weights of 1 instead of 1 / l.

Masked logits. A position hidden by the causal mask or by segment ids gets `MASK_VALUE`, the finite large
negative that `jax.nn.dot_product_attention` (and `attention.reference_attention`) use, so a query that sees no
key at all gets uniform weights over the real keys, exactly as the reference does. Keys that exist only because
the wrapper padded the length up to a block multiple get -inf instead: they never get any weight, not even in
such a fully masked row.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MASK_VALUE = float(-0.7 * np.finfo(np.float32).max)  # As jax.nn.dot_product_attention's XLA path.


def round_up(n: int, multiple: int) -> int:
  """Smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


def pad_axis(x, axis: int, length: int, value=0):
  """`x` padded with `value` at the end of `axis` up to `length` (unchanged if already that long)."""
  extra = length - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def check_qkv(q, k, v, name: str):
  """Raises a ValueError naming the kernel unless q, k, v are [batch, length, heads, head_dim] and agree."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f'{name}: q, k, v must be [batch, length, heads, head_dim]; got shapes '
                     f'{q.shape}, {k.shape}, {v.shape}')
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f'{name}: q {q.shape} and k/v {k.shape}/{v.shape} must share batch, heads and head_dim, '
                     'and k and v must have the same shape')
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f'{name}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}')


def split_segment_ids(segment_ids, q_len: int, kv_len: int, batch: int):
  """(q_segment_ids [B, Tq], kv_segment_ids [B, Tk]) int32 from `segment_ids`, or (None, None).

  `segment_ids` is either one int [batch, length] array (self-attention: Tq == Tk) or a pair (q_ids, kv_ids)
  for cross-attention. A query attends to a key only where their ids are equal (packed sequences).
  """
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    q_ids, kv_ids = segment_ids
  else:
    if q_len != kv_len:
      raise ValueError(f'segment_ids [batch, length] needs q length == kv length (got {q_len} and {kv_len}); '
                       'pass a pair (q_segment_ids, kv_segment_ids) for cross-attention')
    q_ids = kv_ids = segment_ids
  q_ids, kv_ids = jnp.asarray(q_ids), jnp.asarray(kv_ids)
  for ids, length, what in ((q_ids, q_len, 'q'), (kv_ids, kv_len, 'kv')):
    if ids.shape != (batch, length) or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f'{what} segment_ids must be an integer array of shape {(batch, length)}, '
                       f'got {ids.dtype} {ids.shape}')
  return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def segment_mask(q_segment_ids, kv_segment_ids):
  """Bool [batch, 1, Tq, Tk]: True where the query and key segment ids are equal."""
  return (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]


def causal_mask(q_len: int, kv_len: int):
  """Bool [Tq, Tk] lower-triangular mask (query i sees keys j <= i), as `jnp.tril` and jax.nn's `is_causal`."""
  return jnp.tril(jnp.ones((q_len, kv_len), bool))


def mask_logits(s, q_pos, k_pos, *, kv_len: int, causal: bool, q_seg=None, k_seg=None):
  """Logits `s` [block_q, block_k] float32 with masked positions replaced (see the module docstring).

  q_pos [block_q, 1] / k_pos [1, block_k] are absolute positions; q_seg [block_q, 1] / k_seg [1, block_k] the
  segment ids or None. Only elementwise ops, so this lowers in Triton, Mosaic and interpret mode alike.
  Returns (masked s, allowed) where `allowed` [block_q, block_k] (or None when nothing is masked by causal /
  segment ids) also zeroes the logit gradients of masked positions in the backward pass.
  """
  allowed = None
  if causal:
    allowed = k_pos <= q_pos
  if q_seg is not None:
    same = q_seg == k_seg
    allowed = same if allowed is None else jnp.logical_and(allowed, same)
  if allowed is not None:
    s = jnp.where(allowed, s, MASK_VALUE)
  if k_pos is not None and kv_len is not None:
    s = jnp.where(k_pos < kv_len, s, -jnp.inf)
  return s, allowed


def dot(a, b, contract, precision=None):
  """a @ b contracting a's axis contract[0] with b's axis contract[1], accumulated and returned in float32."""
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def positions(start, size: int, axis: int):
  """Absolute positions start + [0, size) as a [size, 1] (axis 0) or [1, size] (axis 1) int32 column / row."""
  shape = (size, 1) if axis == 0 else (1, size)
  return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def is_power_of_two(n: int) -> bool:
  """True for 1, 2, 4, ..."""
  return n > 0 and (n & (n - 1)) == 0


def default_interpret() -> bool:
  """Kernels run in interpret mode where no GPU / TPU compiler exists (CPU): slow, but exact and testable."""
  return jax.default_backend() == 'cpu'


def flash_with_vjp(call_forward, call_backward):
  """A backend's flash attention `fn(q, k, v, q_seg, kv_seg, static)` with its custom VJP.

  call_forward(q, k, v, q_seg, kv_seg, **static) -> (o, m, l_inv); call_backward(q, k, v, q_seg, kv_seg, o,
  (m, l_inv), do, **static) -> (dq, dk, dv). `static` is a hashable tuple of (name, value) pairs. The forward
  saves o and the row statistics; the backward recomputes the probabilities from them.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
  def flash(q, k, v, q_seg, kv_seg, static):
    return call_forward(q, k, v, q_seg, kv_seg, **dict(static))[0]

  def fwd(q, k, v, q_seg, kv_seg, static):
    o, m, l_inv = call_forward(q, k, v, q_seg, kv_seg, **dict(static))
    return o, (q, k, v, q_seg, kv_seg, o, (m, l_inv))

  def bwd(static, residuals, do):
    q, k, v, q_seg, kv_seg, o, stats = residuals
    dq, dk, dv = call_backward(q, k, v, q_seg, kv_seg, o, stats, do, **dict(static))
    return dq, dk, dv, None, None  # Segment ids are integers: no cotangent.

  flash.defvjp(fwd, bwd)
  return flash
