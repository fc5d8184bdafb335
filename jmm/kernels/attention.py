"""Scaled dot-product attention: a plain-jnp reference and one dispatch over implementations.

Layout everywhere is q, k, v: [batch, length, heads, head_dim], the layout of `jax.nn.dot_product_attention`, so
the projections in `jmm.models.layers` can feed a kernel without transposes. `mask` is boolean, True = attend,
broadcastable to [batch, heads, q_length, kv_length].

Besides a dense `mask`, every implementation takes `causal` (query i sees keys j <= i, top-left aligned as
`jnp.tril` and jax.nn's `is_causal`) and `segment_ids` (int [batch, length], or a (q_ids, kv_ids) pair for
cross-attention: a query sees only keys with its id, for packed sequences). The dense paths turn them into a
mask; the Pallas flash kernels apply them blockwise and skip fully masked causal blocks.

Implementations (`config.attention_impl`):
  'xla'        plain XLA ops with a hand-written VJP (the default; materialises [B, H, Tq, Tk] logits and
               saves the probabilities for the backward; `_softmax_attention`). Any backend and dtype.
  'cudnn'      cuDNN fused attention via jax.nn.dot_product_attention; NVIDIA GPUs, bf16 / fp16.
  'pallas'     the Pallas flash kernel for `jax.default_backend()`: Triton on GPU, Mosaic on TPU, and on CPU
               the Triton kernel in interpret mode (exact but slow: for tests). No dense `mask`.
  'pallas_gpu', 'pallas_tpu'  one kernel explicitly (interpret mode on CPU).
  'reference'  `reference_attention`, the float32 plain-jnp oracle.
  'auto'       per call, the first implementation in `AUTO_ORDER[platform]` that supports the call.

Kernels live in their own files beside this one (`flash_attention_gpu.py`, `flash_attention_tpu.py`), keep
`reference_attention` as their test oracle, and add one entry to `_IMPLS`. This module imports nothing from jmm
outside `jmm.kernels` (kernels sit below the models).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jmm.kernels import flash_attention_gpu
from jmm.kernels import flash_attention_tpu
from jmm.kernels import flash_common
from jmm.kernels import matmul
from jmm.kernels.mesh_axes import BATCH_AXES


def _large_negative() -> jnp.ndarray:
  """The logit given to masked positions: finite, so fully masked rows give uniform (not NaN) weights."""
  # Same value as jax.nn.dot_product_attention ('xla'), so the two agree even on fully masked rows.
  return jnp.asarray(-0.7 * np.finfo(np.float32).max, jnp.float32)


def _mask_4d(mask):
  """Returns `mask` as a bool array with leading unit dims added up to rank 4 ([batch, heads, q, kv])."""
  mask = jnp.asarray(mask, dtype=bool)
  if mask.ndim > 4:
    raise ValueError(f'attention mask must have rank <= 4 ([batch, heads, q, kv]), got shape {mask.shape}')
  return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def _with_causal_and_segments(mask, q_len: int, kv_len: int, batch: int, causal: bool, segment_ids):
  """`mask` (or None) AND the causal mask AND the segment-id mask, as one bool mask of rank <= 4 (or None)."""
  parts = [] if mask is None else [_mask_4d(mask)]
  if causal:
    parts.append(flash_common.causal_mask(q_len, kv_len)[None, None])  # [1, 1, Tq, Tk]
  q_ids, kv_ids = flash_common.split_segment_ids(segment_ids, q_len, kv_len, batch)
  if q_ids is not None:
    parts.append(flash_common.segment_mask(q_ids, kv_ids))  # [B, 1, Tq, Tk]
  if not parts:
    return None
  out = parts[0]
  for part in parts[1:]:
    out = jnp.logical_and(out, part)
  return out


def reference_attention(q, k, v, mask=None, *, causal: bool = False, segment_ids=None):
  """softmax(q k^T / sqrt(head_dim)) v in plain jnp; the oracle every other implementation is tested against.

  Logits, softmax and the weighted sum are computed in float32 whatever the input dtype, so the reference is at
  least as accurate as any kernel; the result is cast back to `q.dtype`. `causal` / `segment_ids` become a mask.
  """
  mask = _with_causal_and_segments(mask, q.shape[1], k.shape[1], q.shape[0], causal, segment_ids)
  head_dim = q.shape[-1]
  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
  logits = jnp.einsum('bqhd,bkhd->bhqk', qf, kf) / np.sqrt(head_dim).astype(np.float32)  # [B, H, Tq, Tk]
  if mask is not None:
    logits = jnp.where(_mask_4d(mask), logits, _large_negative())
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bhqk,bkhd->bqhd', probs, vf)  # [B, Tq, H, D]
  return out.astype(q.dtype)


def _xla_attention(q, k, v, mask=None, *, causal: bool = False, segment_ids=None):
  """Plain XLA ops in heads-major layout with a hand-written VJP (see `_softmax_attention`); runs everywhere."""
  mask = _with_causal_and_segments(mask, q.shape[1], k.shape[1], q.shape[0], causal, segment_ids)
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, H, D] <-> [B, H, T, D]  # noqa: E731
  out = _softmax_attention(heads_major(q), heads_major(k), heads_major(v), None if mask is None else _mask_4d(mask))
  return heads_major(out)


@jax.custom_vjp
def _softmax_attention(q, k, v, mask):
  """softmax(q k^T / sqrt(D)) v on heads-major q [B, H, Tq, D], k, v [B, H, Tk, D]; mask bool ~[B, H, Tq, Tk].

  Logits and softmax in float32 (as `reference_attention` and jax.nn.dot_product_attention). The VJP is written
  out rather than left to autodiff: the forward saves the probabilities P once, and the backward takes the
  softmax correction from rowsum(dO * O) ([B, H, Tq, D], as flash attention does) instead of rowsum(dP * P)
  ([B, H, Tq, Tk]), so it makes fewer passes over the [Tq, Tk] tensors. Heads-major operands keep every matmul a
  plain batched matmul with no layout copies between them. Per ViT-S/16 layer (batch 16, fwd + bwd) on the
  2-core CPU: 35-47 ms against 46-60 ms for jax.nn.dot_product_attention's XLA path (PyTorch's fused CPU
  kernel: 31-37 ms); same matmul FLOPs.
  """
  return _softmax_attention_fwd(q, k, v, mask)[0]


def _logit_scale(head_dim: int) -> np.float32:
  return np.float32(1.0 / np.sqrt(head_dim))


def _softmax_attention_fwd(q, k, v, mask):
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)  # Unscaled.
  if mask is not None:
    logits = jnp.where(mask, logits, _large_negative())
  # softmax(scale * logits) with the scale applied after the row max (scale > 0): the raw logits feed two ops, so
  # XLA:CPU fuses no element-wise op into the dot (oneDNN matmuls take fusions of one dot only; cpu_matmuls.py).
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  unnormalised = jnp.exp((logits - row_max) * _logit_scale(q.shape[-1]))
  probs = unnormalised / jnp.sum(unnormalised, axis=-1, keepdims=True)  # float32 [B, H, Tq, Tk]
  out = jnp.einsum('bhqk,bhkd->bhqd', probs.astype(v.dtype), v)
  return out, (q, k, v, mask, probs, out)


def _softmax_attention_bwd(residuals, d_out):
  q, k, v, mask, probs, out = residuals
  scale = _logit_scale(q.shape[-1])
  d_v = matmul.row_contraction(probs.astype(d_out.dtype), d_out)  # P^T dO [B, H, Tk, D]
  d_probs = jnp.einsum('bhqd,bhkd->bhqk', d_out, v, preferred_element_type=jnp.float32)
  # rowsum(P * dP) = rowsum(dO * O), since O = P V: the same correction from a D-wide instead of a Tk-wide sum.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = probs * (d_probs - delta)
  if mask is not None:  # Masked logits get no gradient (matters only for fully masked rows, where P is uniform).
    d_logits = jnp.where(mask, d_logits, 0.0)
  d_logits = (d_logits * scale).astype(q.dtype)
  d_q = jnp.einsum('bhqk,bhkd->bhqd', d_logits, k)
  d_k = matmul.row_contraction(d_logits, q)  # Contracts the queries: dS^T Q, oriented for oneDNN on a CPU.
  return d_q, d_k, d_v.astype(v.dtype), None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _cudnn_attention(q, k, v, mask=None, *, causal: bool = False, segment_ids=None, implementation='cudnn'):
  """cuDNN fused (flash) attention via jax.nn.dot_product_attention; NVIDIA GPUs, fp16/bf16 inputs only.

  jax's cuDNN path refuses odd lengths for training (jax 0.10-0.11: its check counts the placeholder in the
  unused bias slot as a bias, and a bias needs even lengths), which ViT's 197 tokens and the MAP head's single
  query are. So an odd q or kv length is padded by one: the padded key is masked out (by the key sequence
  lengths, cuDNN's padding mask, so no [B, H, Tq, Tk] bias is built; or in the dense mask when there is one), the
  padded query attends like any other (no fully masked row, so no NaN to leak into the backward) and its output
  row is dropped. `implementation` is for tests: 'xla' runs the same padding through jax's XLA path on a CPU.
  """
  mask = _with_causal_and_segments(mask, q.shape[1], k.shape[1], q.shape[0], False, segment_ids)
  tq, tk = q.shape[1], k.shape[1]
  even_q, even_k = flash_common.round_up(tq, 2), flash_common.round_up(tk, 2)
  if (even_q, even_k) == (tq, tk):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=implementation)
  q = flash_common.pad_axis(q, 1, even_q)
  k, v = (flash_common.pad_axis(x, 1, even_k) for x in (k, v))
  lengths = {}
  if mask is not None:
    mask = _mask_4d(mask)
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (tq, tk))
    mask = flash_common.pad_axis(flash_common.pad_axis(mask, 2, even_q, True), 3, even_k, False)
  else:
    batch = q.shape[0]
    lengths = dict(query_seq_lengths=jnp.full((batch,), even_q, jnp.int32),
                   key_value_seq_lengths=jnp.full((batch,), tk, jnp.int32))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=implementation,
                                     **lengths)
  return out[:, :tq]


def _no_dense_mask(name: str, mask):
  """Raises a ValueError naming `name` if a dense mask was given: the flash kernels mask blockwise only."""
  if mask is not None:
    raise ValueError(f'attention impl {name!r} does not take a dense mask (got shape {jnp.shape(mask)}); express '
                     "it as causal=True / segment_ids, or use attention_impl 'xla' (or 'auto', which falls back)")


def _pallas_gpu_attention(q, k, v, mask=None, *, causal: bool = False, segment_ids=None):
  """The Pallas Triton flash kernel (interpret mode on CPU)."""
  _no_dense_mask('pallas_gpu', mask)
  return flash_attention_gpu.flash_attention(q, k, v, causal=causal, segment_ids=segment_ids)


def _pallas_tpu_attention(q, k, v, mask=None, *, causal: bool = False, segment_ids=None):
  """The Pallas Mosaic TPU flash kernel (TPU interpreter on CPU)."""
  _no_dense_mask('pallas_tpu', mask)
  return flash_attention_tpu.flash_attention(q, k, v, causal=causal, segment_ids=segment_ids)


def _pallas_impl_name() -> str:
  """The Pallas kernel for this backend: Mosaic on TPU, Triton on GPU and (interpreted) on CPU."""
  return 'pallas_tpu' if jax.default_backend() == 'tpu' else 'pallas_gpu'


def _pallas_attention(q, k, v, mask=None, *, causal: bool = False, segment_ids=None):
  """The Pallas flash kernel for `jax.default_backend()`."""
  _no_dense_mask('pallas', mask)
  return _IMPLS[_pallas_impl_name()](q, k, v, causal=causal, segment_ids=segment_ids)


# name -> fn(q, k, v, mask=None, *, causal=False, segment_ids=None) -> [B, Tq, H, D].
_IMPLS: dict[str, Callable] = {
    'xla': _xla_attention,
    'reference': reference_attention,
    'cudnn': _cudnn_attention,
    'pallas': _pallas_attention,
    'pallas_gpu': _pallas_gpu_attention,
    'pallas_tpu': _pallas_tpu_attention,
}

IMPLEMENTATIONS = tuple(_IMPLS) + ('auto',)

# What 'auto' tries, in order, per platform; the first implementation that `supports` the call wins.
# Why this order (H200, jax 0.11.2, benchmarks/attention.py; README "Performance"):
#   gpu: cuDNN's fused kernel is NVIDIA's own flash attention where jax's cuDNN path accepts the call (bf16 /
#        fp16, head_dim % 8 == 0, and the sequence lengths its version takes: jax 0.11.2 refuses ViT's 197 and
#        MAP pooling's single query, so whether it applies is asked of jax itself, `_cudnn_traces`; the 'cudnn'
#        impl pads such odd lengths to even, but that is not yet timed on a GPU, so 'auto' asks about the
#        unpadded call and leaves odd lengths to the Triton kernel); else the
#        Pallas Triton kernel for bf16 / fp16 (B/16 shapes: fwd+bwd 1.45 ms against XLA's 2.06); else XLA.
#        Not the Pallas kernel for float32 on GPU: 3-80x slower than XLA there (L/14: 88 ms against 3.9 ms).
#   tpu: the Pallas kernel streams keys through VMEM where XLA materialises [B, H, Tq, Tk] logits in HBM.
#   cpu: XLA; the kernels only run interpreted there.
AUTO_ORDER = {
    'gpu': ('cudnn', 'pallas', 'xla'),
    'tpu': ('pallas', 'xla'),
    'cpu': ('xla',),
}
# (platform, implementation) pairs 'auto' passes over for float32 inputs although they run (see above).
_AUTO_SKIPS_FLOAT32 = {('gpu', 'pallas')}


@functools.lru_cache(maxsize=256)
def _cudnn_traces_cached(q_shape, k_shape, dtype, mask_shape, causal) -> bool:
  q = jax.ShapeDtypeStruct(q_shape, dtype)
  k = jax.ShapeDtypeStruct(k_shape, dtype)
  mask = None if mask_shape is None else jax.ShapeDtypeStruct(mask_shape, jnp.bool_)

  def fwd_and_vjp(q, k, v, mask):
    out, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, implementation='cudnn'), q, k, v)
    return out, vjp(out)

  try:
    jax.eval_shape(fwd_and_vjp, q, k, k, mask)
  except Exception:  # pylint: disable=broad-except  (any refusal means "not cuDNN"; the probe must never fail the step)
    return False
  return True


def _cudnn_traces(q_shape, k_shape, dtype, mask_shape, causal) -> bool:
  """Whether jax's cuDNN attention accepts this call, forward and backward, asked of jax itself: its checks
  (sequence lengths, head dims, cuDNN version, compute capability) change between versions and raise while
  tracing. Shapes only (`jax.eval_shape`), cached per signature. Off a GPU backend nothing can be asked, and
  `supports`' static checks stand."""
  if jax.default_backend() != 'gpu':
    return True
  return _cudnn_traces_cached(tuple(q_shape), tuple(k_shape), jnp.dtype(dtype), mask_shape, bool(causal))


def supports(impl: str, q, k, mask=None, *, causal: bool = False, segment_ids=None, platform: str | None = None):
  """Whether implementation `impl` can run this call on `platform` (default: jax.default_backend()).

  Used by 'auto' to fall back to XLA instead of failing; shapes only, so it is free under jit.
  """
  platform = platform or jax.default_backend()
  dtype, head_dim = jnp.dtype(q.dtype), q.shape[-1]
  if impl in ('xla', 'reference'):
    return True
  if impl == 'cudnn':
    # jax's cuDNN checks: fp16/bf16, head_dim <= 128 (256 on Hopper) and % 8; a mask becomes a bias, whose
    # backward needs even lengths. jax 0.10-0.11 demand even lengths for training even without a mask (see
    # `_cudnn_attention`); `_cudnn_traces` asks jax, about the unpadded call, which is what 'auto' picks on.
    dense = mask is not None or segment_ids is not None
    if not (platform == 'gpu' and dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim <= 128 and head_dim % 8 == 0
            and (not dense or (q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0))):
      return False
    mask_shape = (q.shape[0], 1, q.shape[1], k.shape[1]) if dense else None  # As _cudnn_attention builds it.
    return _cudnn_traces(q.shape, k.shape, dtype, mask_shape, causal)
  if impl in ('pallas', 'pallas_gpu', 'pallas_tpu'):
    if mask is not None:
      return False
    if impl == 'pallas':
      impl = 'pallas_tpu' if platform == 'tpu' else 'pallas_gpu'
    kernel = flash_attention_tpu if impl == 'pallas_tpu' else flash_attention_gpu
    return kernel.supports(q.shape, k.shape, dtype)
  return False


def choose_impl(q, k, mask=None, *, causal: bool = False, segment_ids=None, platform: str | None = None) -> str:
  """The implementation 'auto' runs for this call: the first in AUTO_ORDER[platform] that `supports` it."""
  platform = platform or jax.default_backend()
  float32 = jnp.dtype(q.dtype) == jnp.dtype(jnp.float32)
  for impl in AUTO_ORDER.get(platform, ('xla',)):
    if float32 and (platform, impl) in _AUTO_SKIPS_FLOAT32:
      continue
    if supports(impl, q, k, mask, causal=causal, segment_ids=segment_ids, platform=platform):
      return impl
  return 'xla'


def dot_product_attention(q, k, v, mask=None, *, causal: bool = False, segment_ids=None, impl: str = 'xla'):
  """Multi-head attention on q, k, v [batch, length, heads, head_dim] by the implementation named `impl`.

  The one entry point the models call, so switching kernels is a config change (`config.attention_impl`).
  mask: bool, broadcastable to [B, H, Tq, Tk] (not for the Pallas kernels). causal: query i sees keys j <= i.
  segment_ids: int [B, T] (or a (q_ids, kv_ids) pair); queries see only keys of their own segment.
  """
  if impl == 'auto':
    impl = choose_impl(q, k, mask, causal=causal, segment_ids=segment_ids)
  try:
    fn = _IMPLS[impl]
  except KeyError:
    raise ValueError(f'unknown attention impl {impl!r}; known: {", ".join(IMPLEMENTATIONS)}') from None
  if impl.startswith('pallas'):
    sharded = _per_shard(fn, q, causal, segment_ids)
    if sharded is not None:
      return sharded(q, k, v, segment_ids)
  if not causal and segment_ids is None:
    return fn(q, k, v, mask)  # Exactly the call of before causal / segment_ids existed.
  return fn(q, k, v, mask, causal=causal, segment_ids=segment_ids)


# The mesh axis that splits the heads (BATCH_AXES split the batch). Attention is independent per example and per
# head, so a kernel runs per shard as is.
HEAD_AXIS = 'tensor'


def _per_shard(fn, q, causal: bool, segment_ids):
  """`fn` wrapped in a `jax.shard_map` over the current mesh's batch and head axes, or None (no such axes).

  XLA does not partition a `pallas_call`: under a sharded jit it would gather q, k and v onto every device and
  run the whole batch there. Per shard, each device runs the kernel on its own examples and heads. Axes that do
  not divide the batch / heads (and axes already manual, inside another shard_map) are left out.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  free = [a for a in mesh.axis_names if a not in set(mesh.manual_axes) and sizes[a] > 1]
  batch = tuple(a for a in BATCH_AXES if a in free)
  if batch and q.shape[0] % int(np.prod([sizes[a] for a in batch])):
    batch = ()
  head = HEAD_AXIS if HEAD_AXIS in free and q.shape[2] % sizes[HEAD_AXIS] == 0 else None
  if not batch and head is None:
    return None
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  qkv = P(batch or None, None, head, None)
  ids = P(batch or None, None)
  ids_spec = None if segment_ids is None else (
      (ids, ids) if isinstance(segment_ids, (tuple, list)) else ids)

  def body(q, k, v, segment_ids):
    if not causal and segment_ids is None:
      return fn(q, k, v)
    return fn(q, k, v, causal=causal, segment_ids=segment_ids)

  return jax.shard_map(body, in_specs=(qkv, qkv, qkv, ids_spec), out_specs=qkv,
                       axis_names=set(batch) | ({head} if head else set()), check_vma=False)
