"""The transformer encoder both towers run: pre-LN blocks (dense or mixture-of-experts MLP), remat, scan.

Above `layers` (attention, MLP, LayerNorm), `moe` (MoeMlp) and `evit` (EViT's token reorganisation), so none of
those imports the encoder's users: the imports point down, layers <- moe <- evit <- encoder <- vit / text. Parameter
names are those the blocks have always had ('encoderblock_{i}' / 'encoderblock', 'attn', 'mlp' or 'moe', 'ln_attn',
'ln_mlp', 'encoder_norm').
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmm.models import evit as evit_lib
from jmm.models import layers
from jmm.models import moe as moe_lib

Dtype = layers.Dtype


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x)).

  causal is a field, not a call argument, so `nn.remat` / `nn.scan` never trace it (it picks kernel code paths).
  evit_keep > 0: an EViT reorganisation block (`jmm.models.evit`): after the attention residual, the `evit_keep`
  most attentive tokens are kept and the rest fused into one (a class token first if evit_cls_token), so the
  MLP and the blocks after run on evit_keep + 1 (+ 1) tokens. Static, like causal. 0: the plain block.
  """
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'xla'
  activation: str = 'gelu_tanh'
  norm_eps: float = 1e-6
  causal: bool = False  # Decoder-style self-attention: token i sees tokens j <= i.
  moe: Any = None  # A mixture-of-experts MLP ('moe', jmm.models.moe.MoeMlp's fields) instead of the MlpBlock.
  evit_keep: int = 0
  evit_cls_token: bool = False

  @nn.compact
  def __call__(self, x, mask=None, segment_ids=None):  # x: [batch, tokens, width]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.constrain(x)
    y = layers.layer_norm(name='ln_attn', epsilon=self.norm_eps, **kw)(x)
    attn = layers.MultiHeadAttention(self.num_heads, attention_impl=self.attention_impl, name='attn', **kw)
    if self.evit_keep:
      y, q, k = attn(y, y, mask, causal=self.causal, segment_ids=segment_ids, return_qk=True)
      x = evit_lib.reorganize(x + y, evit_lib.attentiveness(q, k, self.evit_cls_token), self.evit_keep,
                              self.evit_cls_token)
    else:
      y = attn(y, y, mask, causal=self.causal, segment_ids=segment_ids)
      x = x + y
    x = layers.constrain(x)
    y = layers.layer_norm(name='ln_mlp', epsilon=self.norm_eps, **kw)(x)
    if self.moe:
      y = moe_lib.MoeMlp(self.mlp_dim, activation=self.activation, name='moe', **dict(self.moe), **kw)(y)
    else:
      y = layers.MlpBlock(self.mlp_dim, activation=self.activation, name='mlp', **kw)(y)
    return layers.constrain(x + y)


class _ScanBlock(Encoder1DBlock):
  """Encoder1DBlock with the (carry, output) signature `nn.scan` needs."""

  def __call__(self, x, mask=None, segment_ids=None):
    return super().__call__(x, mask, segment_ids), None


# Activation checkpointing policies by name (jax.checkpoint_policies): what the backward pass may reuse from
# the forward instead of recomputing. 'full' keeps nothing (least memory, one extra forward); 'dots' keeps every
# matmul output (recomputes only elementwise ops: norms, GELU, softmax); 'dots_no_batch' keeps the projection and
# MLP matmuls but recomputes the attention matmuls (those have batch dimensions), whose [B, H, T, T] outputs
# are the largest activations at long sequence lengths.
REMAT_POLICIES = {
    'none': None,
    'full': None,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(remat: bool, name: str):
  """(whether to remat, the jax.checkpoint policy) for the `remat` bool and a REMAT_POLICIES name.

  'none' leaves the choice to the bool (True: 'full', today's behaviour); any other name turns remat on.
  """
  if name not in REMAT_POLICIES:
    raise ValueError(f'unknown remat_policy {name!r}; known: {", ".join(REMAT_POLICIES)}')
  return remat or name != 'none', REMAT_POLICIES[name]


class Encoder(nn.Module):
  """`depth` pre-LN blocks and a final LayerNorm.

  remat: recompute each block's activations in the backward pass (memory for ~1/3 more compute).
  remat_policy: what remat may keep (a key of REMAT_POLICIES); 'none' = `remat` decides ('full' if set).
  scan: one `nn.scan` over stacked layer params (leading 'layers' axis): compile time independent of depth.
  The param trees differ: `encoderblock_{i}/...` without scan, `encoderblock/...` with a leading depth axis.
  moe: `config.model.moe` fields (jmm.models.moe) incl. 'layers', the pattern of blocks whose MLP is a mixture of
  experts; None or num_experts=0: none.
  evit_layers: the blocks (0-based) that reorganise tokens by EViT (`jmm.models.evit`), each keeping
  `evit_keep_rate` of its candidates (every token but a class token, which evit_cls_token says the sequence starts
  with); () (the default): none, the plain encoder. Not with scan (the blocks' token counts differ) nor with a mask,
  segment_ids or causal attention (attentiveness assumes every token sees every token).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'xla'
  remat: bool = False
  scan: bool = False
  activation: str = 'gelu_tanh'
  norm_eps: float = 1e-6
  remat_policy: str = 'none'
  moe: Any = None
  evit_layers: tuple[int, ...] = ()
  evit_keep_rate: float = 1.0
  evit_cls_token: bool = False

  @nn.compact
  def __call__(self, x, mask=None, *, causal: bool = False, segment_ids=None):  # x: [batch, tokens, width]
    kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
              attention_impl=self.attention_impl, activation=self.activation, norm_eps=self.norm_eps)
    remat, policy = remat_policy(self.remat, self.remat_policy)
    moe_blocks = {}
    if self.moe and self.moe.get('num_experts'):
      moe_blocks = moe_lib.block_configs(self.moe, self.depth)  # {block index: MoeMlp fields}
      if self.scan:
        raise ValueError('model.moe with scan=True is not supported (the scanned blocks must be identical); '
                         'set the tower\'s scan=False')
    if self.evit_layers and (self.scan or causal or mask is not None or segment_ids is not None):
      raise ValueError('EViT (evit_layers) needs scan=False (token counts change between blocks) and full '
                       'self-attention (no mask, segment_ids or causal)')
    if self.scan:
      block = nn.remat(_ScanBlock, prevent_cse=False, policy=policy) if remat else _ScanBlock
      x, _ = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True}, in_axes=nn.broadcast,
                     length=self.depth, metadata_params={nn.PARTITION_NAME: 'layers'})(
                         name='encoderblock', causal=causal, **kw)(x, mask, segment_ids)
    else:
      block = nn.remat(Encoder1DBlock, policy=policy) if remat else Encoder1DBlock
      for i in range(self.depth):
        evit = {}
        if i in self.evit_layers:  # A static count from the current length; 0 (plain block) if none would go.
          keep = evit_lib.block_keep(x.shape[1], self.evit_keep_rate, self.evit_cls_token)
          evit = dict(evit_keep=keep, evit_cls_token=self.evit_cls_token) if keep else {}
        x = block(name=f'encoderblock_{i}', causal=causal, moe=moe_blocks.get(i), **evit, **kw)(
            x, mask, segment_ids)
    return layers.layer_norm(self.dtype, self.param_dtype, name='encoder_norm', epsilon=self.norm_eps)(x)
