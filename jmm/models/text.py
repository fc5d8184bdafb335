"""Transformer text tower (as SigLIP's: bidirectional encoder, 'last' token pooling, linear head)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jmm.models import layers

POOL_TYPES = ('last', 'first', 'gap', 'map')


class TextTransformer(nn.Module):
  """Token + learned position embeddings, pre-LN encoder, pooling, optional linear head.

  __call__(text int32 [B, L], train=False) -> (emb [B, out_dim or width], extras) with extras 'encoded'
  [B, L, width] and 'pre_logits' [B, width]. The position table is sized from L at init.
  Padding is not masked (as SigLIP): with 'last' pooling the final position attends to the whole sequence, so
  it sees every token; `causal=True` gives a decoder-style mask instead. No dropout; `train` is accepted for
  a uniform tower signature.
  """
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  out_dim: int | None = None
  pool_type: str = 'last'
  causal: bool = False
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, text, train: bool = False):
    del train
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f'unknown text pool_type {self.pool_type!r}; known: {", ".join(POOL_TYPES)}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    length = text.shape[1]
    embed_init = nn.initializers.normal(1 / np.sqrt(self.width))
    table = self.param('token_embedding', layers.partitioned(embed_init, ('vocab', 'embed')),
                       (self.vocab_size, self.width), self.param_dtype)
    x = jnp.take(table.astype(self.dtype), text, axis=0)  # [B, L, D]
    posemb = self.param('pos_embedding', layers.partitioned(embed_init, ('length', 'embed')),
                        (length, self.width), self.param_dtype)
    x = x + posemb.astype(self.dtype)[None]
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None] if self.causal else None  # [1, 1, L, L]
    x = layers.Encoder(self.depth, self.mlp_dim, self.num_heads, attention_impl=self.attention_impl,
                       remat=self.remat, scan=self.scan, name='encoder', **kw)(x, mask)
    emb, pooled = layers.pool_and_project(
        x, self.pool_type, POOL_TYPES, num_heads=self.num_heads, mlp_dim=self.mlp_dim, out_dim=self.out_dim,
        attention_impl=self.attention_impl, **kw)  # [B, out_dim], [B, D]
    return emb, {'encoded': x, 'pre_logits': pooled}
