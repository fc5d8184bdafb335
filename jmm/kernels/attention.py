"""Scaled dot-product attention: a plain-jnp reference and one dispatch over implementations.

Layout everywhere is q, k, v: [batch, length, heads, head_dim], the layout of `jax.nn.dot_product_attention`, so
the projections in `jmm.models.layers` can feed a kernel without transposes. `mask` is boolean, True = attend,
broadcastable to [batch, heads, q_length, kv_length].

This module imports nothing from jmm (kernels sit below the models). New kernels (Pallas flash attention for
TPU / GPU, ...) go in their own file beside this one, keep `reference_attention` as their test oracle, and add
one entry to `_IMPLS`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


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


def reference_attention(q, k, v, mask=None):
  """softmax(q k^T / sqrt(head_dim)) v in plain jnp; the oracle every other implementation is tested against.

  Logits, softmax and the weighted sum are computed in float32 whatever the input dtype, so the reference is at
  least as accurate as any kernel; the result is cast back to `q.dtype`.
  """
  head_dim = q.shape[-1]
  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
  logits = jnp.einsum('bqhd,bkhd->bhqk', qf, kf) / np.sqrt(head_dim).astype(np.float32)  # [B, H, Tq, Tk]
  if mask is not None:
    logits = jnp.where(_mask_4d(mask), logits, _large_negative())
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bhqk,bkhd->bqhd', probs, vf)  # [B, Tq, H, D]
  return out.astype(q.dtype)


def _xla_attention(q, k, v, mask=None):
  """jax.nn.dot_product_attention's XLA path: one einsum each side of an fp32 softmax; fuses well on CPU/TPU."""
  mask = None if mask is None else _mask_4d(mask)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')


def _cudnn_attention(q, k, v, mask=None):
  """cuDNN fused (flash) attention via jax.nn.dot_product_attention; NVIDIA GPUs, fp16/bf16 inputs only."""
  mask = None if mask is None else _mask_4d(mask)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='cudnn')


# name -> fn(q, k, v, mask) -> [B, Tq, H, D]. Pallas kernels (e.g. 'pallas_tpu', 'pallas_gpu') register here.
_IMPLS: dict[str, Callable] = {
    'xla': _xla_attention,
    'reference': reference_attention,
    'cudnn': _cudnn_attention,
}

IMPLEMENTATIONS = tuple(_IMPLS)


def dot_product_attention(q, k, v, mask=None, impl: str = 'xla'):
  """Multi-head attention on q, k, v [batch, length, heads, head_dim] by the implementation named `impl`.

  The one entry point the models call, so switching kernels is a config change (`config.attention_impl`).
  """
  try:
    fn = _IMPLS[impl]
  except KeyError:
    raise ValueError(f'unknown attention impl {impl!r}; known: {", ".join(IMPLEMENTATIONS)}') from None
  return fn(q, k, v, mask)
