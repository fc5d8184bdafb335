"""Transformer text tower (as SigLIP's: bidirectional encoder, 'last' token pooling, linear head)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jmm.models import encoder
from jmm.models import layers

POOL_TYPES = ('last', 'first', 'gap', 'map', 'eos', 'argmax')


class TextTransformer(nn.Module):
  """Token + learned position embeddings, pre-LN encoder, pooling, optional linear head.

  __call__(text int32 [B, L], train=False) -> (emb [B, out_dim or width], extras) with extras 'encoded'
  [B, L, width] and 'pre_logits' [B, width]. The position table is sized from L at init.
  Padding is not masked (as SigLIP): with 'last' pooling the final position attends to the whole sequence, so
  it sees every token; `causal=True` gives a decoder-style mask instead. No dropout; `train` is accepted for
  a uniform tower signature.
  CLIP pooling: 'eos' takes the first position holding `eos_id` (the last position if a row has none, e.g.
  truncated); 'argmax' the position of the largest id (OpenAI CLIP / open_clip: end-of-text is the largest id).
  Options for imported peers: activation / norm_eps (see `layers.ACTIVATIONS`), head_bias (CLIP: False).
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
  remat_policy: str = 'none'  # encoder.REMAT_POLICIES: 'full', 'dots', 'dots_no_batch'.
  scan: bool = False
  activation: str = 'gelu_tanh'
  norm_eps: float = 1e-6
  head_bias: bool = True
  eos_id: int = 1  # jmm's SentencePiece convention (jmm.data.tokenizer.EOS_ID); read by pool_type='eos'.
  moe: Any = None  # config.model.moe fields (jmm.models.moe): mixture-of-experts MLPs in some blocks.

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
    x = layers.add_position_embedding(x, posemb.astype(self.dtype))
    # causal: passed as such (not as a dense [L, L] mask) so flash kernels can skip the masked blocks.
    x = encoder.Encoder(self.depth, self.mlp_dim, self.num_heads, attention_impl=self.attention_impl,
                        remat=self.remat, remat_policy=self.remat_policy, scan=self.scan, activation=self.activation,
                        norm_eps=self.norm_eps, moe=self.moe, name='encoder', **kw)(x, causal=self.causal)
    pool_type, tokens = self.pool_type, x
    if pool_type in ('eos', 'argmax'):  # Gather the one pooled position, then pool it as 'first'.
      if pool_type == 'eos':
        is_eos = text == self.eos_id  # [B, L]
        index = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), length - 1)  # [B]
      else:
        index = jnp.argmax(text, axis=1)  # [B]
      tokens = jnp.take_along_axis(x, index[:, None, None], axis=1)  # [B, 1, D]
      pool_type = 'first'
    emb, pooled = layers.pool_and_project(
        tokens, pool_type, POOL_TYPES, num_heads=self.num_heads, mlp_dim=self.mlp_dim, out_dim=self.out_dim,
        attention_impl=self.attention_impl, activation=self.activation, norm_eps=self.norm_eps,
        head_bias=self.head_bias, **kw)  # [B, out_dim], [B, D]
    return emb, {'encoded': x, 'pre_logits': pooled}
