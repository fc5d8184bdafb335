"""FILIP's token embeddings and late-interaction similarity (Yao et al., ICLR 2022, "FILIP: Fine-grained
Interactive Language-Image Pre-Training").

A head (`config.model.heads = {'filip': {'type': 'filip_head'}}`, see `jmm.models.build`): after the towers it
projects every token of each tower's 'encoded' output into the shared space and L2-normalises it:

  outputs['filip'] = {'zimg_tokens': [B, T, D], 'ztxt_tokens': [B, L, D] float32 unit vectors,
                      'txt_mask': bool [B, L], True at the text's real tokens}

for the modalities in the batch. T is every token the image tower encoded (its patches, plus the class token
with pool_type='tok'; FLIP's kept patches when masked); L is the text length. The mask is `text != pad_id`:
jmm pads with 0 and eos (1) is a real token. With pad_id=1 (released SigLIP weights pad with eos) the eos counts
as padding too, which leaves the content tokens.

Own projections (`img_proj`, `txt_proj`, [width, D] + bias), not the towers' heads: a tower's head maps its
POOLED feature (SigLIP's MAP output, the text's last position), whose distribution differs from a single
token's; and with 'last' pooling the text head is trained on a padding position, which FILIP masks out. Separate
kernels leave the global embeddings 'zimg' / 'ztxt' and their losses untouched, so a run can train both.

`late_interaction` is the one implementation of the token-wise similarity, shared by the objective
(`jmm/objectives/filip.py`) and the evaluators (`jmm.evaluators.common.similarities`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmm.models import layers
from jmm.models.two_tower import l2_normalize

# The score a padding token gets before the max over a text's tokens: below any cosine similarity of unit
# vectors (>= -1), so it never wins while the text has a real token; finite, so a text of padding only (no real
# token) scores a finite -1e4 instead of -inf / NaN.
MASKED = -1e4


class Head(nn.Module):
  """Token embeddings for FILIP. out_dim: the shared space's width (0 = the global embeddings' width)."""
  out_dim: int = 0
  pad_id: int = 0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, outputs, batch, train: bool = False):
    del train
    out = {}
    for tower, key, z in (('img', 'zimg_tokens', 'zimg'), ('txt', 'ztxt_tokens', 'ztxt')):
      if tower not in outputs:
        continue
      x = outputs[tower]['encoded']  # [B, tokens, width]
      dim = self.out_dim or outputs[z].shape[-1]
      kernel, bias = layers.DenseParams((x.shape[-1],), (dim,), ('embed', 'out'), ('out',), self.param_dtype,
                                        name=f'{tower}_proj')()
      out[key] = l2_normalize(layers.token_matmul(x, kernel, bias, dtype=self.dtype))  # [B, tokens, D]
    if 'txt' in outputs:
      out['txt_mask'] = batch['text'] != self.pad_id  # [B, L]
    return out


def _block(x, y, mask):
  """(i2t, t2i) [I, J] of images x [I, T, D] against texts y [J, L, D] with mask [J, L]."""
  sims = jnp.einsum('itd,jld->ijtl', x, y)  # [I, J, T, L] every token pair's cosine similarity.
  i2t = jnp.mean(jnp.max(jnp.where(mask[None, :, None, :], sims, MASKED), axis=3), axis=2)  # [I, J]
  best = jnp.max(sims, axis=2)  # [I, J, L] each text token's best image token.
  count = jnp.maximum(jnp.sum(mask, axis=1), 1).astype(jnp.float32)  # [J]
  t2i = jnp.sum(jnp.where(mask[None], best, 0.0), axis=2) / count[None]  # [I, J]
  return i2t, t2i


def late_interaction(zimg_tokens, ztxt_tokens, txt_mask, chunk: int = 0):
  """FILIP's token-wise similarities (i2t, t2i), float32 [I, J] each:

    i2t[i, j] = 1/T sum_t max_{l real} x_it . y_jl        (each image token's best text token, averaged)
    t2i[i, j] = 1/|real l| sum_{l real} max_t x_it . y_jl  (each real text token's best image token, averaged)

  zimg_tokens [I, T, D], ztxt_tokens [J, L, D] (unit vectors), txt_mask bool [J, L] (True: a real token).
  Cost: the [I, J, T, L] token-pair similarities are one einsum, held as float32; chunk > 0 scores `chunk`
  texts at a time (`lax.map`), holding [I, chunk, T, L], and recomputes each chunk's block in the backward pass
  (`jax.checkpoint`), so autodiff keeps only the inputs, not every block. chunk = 0: all J texts at once.
  """
  x = zimg_tokens.astype(jnp.float32)
  y = ztxt_tokens.astype(jnp.float32)
  mask = txt_mask.astype(bool)
  j = y.shape[0]
  if not chunk or chunk >= j:
    return _block(x, y, mask)
  pad = -j % chunk  # Padding texts (no real token) fill the last chunk; their columns are dropped.
  y = jnp.pad(y, ((0, pad), (0, 0), (0, 0)))
  mask = jnp.pad(mask, ((0, pad), (0, 0)))
  blocks = (y.reshape(-1, chunk, *y.shape[1:]), mask.reshape(-1, chunk, mask.shape[1]))
  i2t, t2i = jax.lax.map(jax.checkpoint(lambda b: _block(x, *b)), blocks)  # [J / chunk, I, chunk] each
  unchunk = lambda s: jnp.moveaxis(s, 0, 1).reshape(x.shape[0], -1)[:, :j]  # noqa: E731
  return unchunk(i2t), unchunk(t2i)
