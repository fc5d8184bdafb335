"""CLOC's Prompter: region embeddings from the image tower's tokens and a box, and boxes from a phrase (Chen et
al. 2024, "Contrastive Localized Language-Image Pre-Training", arXiv 2410.02746, Sec. 3).

A head (`config.model.heads = {'cloc': {'type': 'cloc_head'}}`, see `jmm.models.build`). The Prompter is a light
transformer over the image tower's encoded tokens ('encoded' [B, T, W]) with a prompt token prepended. Two kinds
of prompt share it:

  box prompt   the box (ymin, xmin, ymax, xmax) in [0, 1] of the image, as Fourier features (sin / cos of
               2^k pi c for each coordinate, k < num_freqs) -> a dense layer to the tower width, plus a learned
               'box' type embedding. The prompt token's output -> LayerNorm -> projection -> L2 norm is the
               region embedding 'zregion' [B, R, D], compared with the phrase's text embedding (CLOC's
               region-text contrastive loss, `jmm/objectives/cloc.py`).
  text prompt  the phrase's text embedding ('ztxt_regions' [B, R, D], which the two-tower model embeds because
               this head lists 'text_regions' in TEXT_FIELDS) -> dense to the width, plus a 'text' type
               embedding. The prompt's output -> an MLP -> 'box_pred' [B, R, 4], the phrase's box (CLOC's
               grounding loss), predicted as centre and size through a sigmoid, returned as corners.

One prompt token per sequence, as in the paper; only its output is read, so each block updates the prompt token
alone: its self-attention over [prompt; image tokens] is computed as the prompt's attention to itself and to
the tokens, and the tokens' own updates (which nothing reads) are skipped. For one block (the default, the
paper's "lightweight" Prompter) this is exactly a transformer layer over the prepended sequence; deeper
Prompters keep the image tokens fixed between blocks. The R prompts of an image run in one call: each attends
to itself and the T tokens (a [R, R + T] mask), so the tokens are not copied R times.

Outputs, for the modalities present: 'zregion' [B, R, D] (needs the image; the batch's 'boxes' [B, R, 4], or one
whole-image box when it has none, so the parameters exist after `init`), 'box_pred' [B, R, 4] (needs the image
and the phrases' embeddings, or, at init, the captions'), and the region loss's own scale 't' and bias 'b'
(SigLIP's initialisation; regions are scored among B * R candidates, not B).
"""
from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmm.models import layers
from jmm.models.two_tower import l2_normalize


def box_features(boxes, num_freqs: int):
  """Fourier features of boxes [..., 4] in [0, 1] -> [..., 8 * num_freqs]: sin and cos of 2^k pi c."""
  freqs = (2.0 ** jnp.arange(num_freqs, dtype=jnp.float32)) * math.pi  # [F]
  angles = boxes.astype(jnp.float32)[..., None] * freqs  # [..., 4, F]
  feats = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., 4, 2F]
  return feats.reshape(*boxes.shape[:-1], 8 * num_freqs)


def centre_size_to_corners(x):
  """(cy, cx, h, w) [..., 4] -> (ymin, xmin, ymax, xmax)."""
  centre, size = x[..., :2], x[..., 2:]
  return jnp.concatenate([centre - size / 2, centre + size / 2], axis=-1)


class PromptBlock(nn.Module):
  """A pre-LN transformer block that updates prompt tokens [B, R, W] reading image tokens [B, T, W].

  Prompt r attends to itself and to the T tokens (never to the other prompts): the self-attention of the
  sequence [prompt_r; tokens] at the prompt's position.
  """
  num_heads: int
  mlp_dim: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, prompts, tokens):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = layers.layer_norm(name='ln_attn', epsilon=self.norm_eps, **kw)
    q = ln(prompts)  # [B, R, W]
    kv = jnp.concatenate([q, ln(tokens)], axis=1)  # [B, R + T, W]
    r, t = prompts.shape[1], tokens.shape[1]
    mask = jnp.concatenate([jnp.eye(r, dtype=bool), jnp.ones((r, t), bool)], axis=1)[None, None]  # [1, 1, R, R+T]
    prompts = prompts + layers.MultiHeadAttention(self.num_heads, name='attn', **kw)(q, kv, mask)
    y = layers.layer_norm(name='ln_mlp', epsilon=self.norm_eps, **kw)(prompts)
    return prompts + layers.MlpBlock(self.mlp_dim, name='mlp', **kw)(y)


class Prompter(nn.Module):
  """`depth` PromptBlocks and a final LayerNorm: prompts [B, R, W], tokens [B, T, W] -> [B, R, W]."""
  depth: int = 1
  num_heads: int = 4
  mlp_dim: int = 0  # 0: 4 * width.
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, prompts, tokens):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.depth):
      prompts = PromptBlock(self.num_heads, self.mlp_dim or 4 * tokens.shape[-1], name=f'block_{i}', **kw)(
          prompts, tokens)
    return layers.layer_norm(name='norm', **kw)(prompts)


class Head(nn.Module):
  """CLOC's Prompter with its region projection and box regressor (module docstring).

  depth / num_heads / mlp_dim: the Prompter's size (mlp_dim 0 = 4 x the image tower's width); out_dim: the
  region embeddings' width (0 = the global embeddings'); num_freqs: Fourier frequencies per box coordinate.
  """
  TEXT_FIELDS: ClassVar[tuple[str, ...]] = ('text_regions',)
  depth: int = 1
  num_heads: int = 4
  mlp_dim: int = 0
  out_dim: int = 0
  num_freqs: int = 8
  temperature_init: float = math.log(10.0)
  bias_init: float = -10.0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, outputs, batch, train: bool = False):
    del train
    out = {}
    t = self.param('t', layers.partitioned(nn.initializers.constant(self.temperature_init), ()), (), jnp.float32)
    b = self.param('b', layers.partitioned(nn.initializers.constant(self.bias_init), ()), (), jnp.float32)
    out['t'], out['b'] = jnp.exp(t), b
    if 'img' not in outputs:
      return out
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = outputs['img']['encoded']  # [B, T, W]
    n, width = tokens.shape[0], tokens.shape[-1]
    prompter = Prompter(self.depth, self.num_heads, self.mlp_dim, name='prompter', **kw)
    kinds = self.param('prompt_type', layers.partitioned(nn.initializers.normal(0.02), (None, 'embed')),
                       (2, width), self.param_dtype).astype(self.dtype)  # [box, text] type embeddings

    boxes = batch.get('boxes')
    if boxes is None:  # init / image-only calls: one whole-image box, so every parameter is created.
      boxes = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32), (n, 1, 4))
    prompts = [layers.dense(width, (None, 'embed'), ('embed',), name='box_embed', **kw)(
        box_features(boxes, self.num_freqs)) + kinds[0]]  # [B, R, W]
    phrases = outputs.get('ztxt_regions')
    if phrases is None and 'ztxt' in outputs:
      phrases = outputs['ztxt'][:, None]  # init: the captions stand in, so the regressor's parameters exist.
    if phrases is not None:
      # The phrase embeddings' gradient from this path reaches the text tower through a barrier: XLA would
      # otherwise fuse its matmul with the region loss's into one two-dot fusion that oneDNN cannot run
      # (jmm.cpu_matmuls), and the whole step would fall back to slower matmuls.
      prompts.append(layers.dense(width, (None, 'embed'), ('embed',), name='text_embed', **kw)(
          _barrier_grad(phrases)) + kinds[1])
    # Box and text prompts in one Prompter call (each attends to itself and the tokens only), so the shared
    # weights' gradients are one matmul each, not a sum of two.
    y = prompter(jnp.concatenate(prompts, axis=1), tokens)  # [B, R (+ R), W]
    r = boxes.shape[1]
    dim = self.out_dim or outputs['zimg'].shape[-1]
    out['zregion'] = l2_normalize(layers.dense(dim, ('embed', 'out'), ('out',), name='region_proj', **kw)(y[:, :r]))
    if phrases is not None:
      y = nn.gelu(layers.dense(width, ('embed', 'mlp'), ('mlp',), name='box_mlp', **kw)(y[:, r:]))
      y = layers.dense(4, ('mlp', None), (None,), name='box_out', **kw)(y)
      out['box_pred'] = centre_size_to_corners(jax.nn.sigmoid(y.astype(jnp.float32)))  # [B, R, 4]
    return out


@jax.custom_vjp
def _barrier_grad(x):
  """Identity whose cotangent passes through an optimization barrier (see Head.__call__)."""
  return x


def _barrier_fwd(x):
  return x, None


def _barrier_bwd(_, g):
  return (jax.lax.optimization_barrier(g),)


_barrier_grad.defvjp(_barrier_fwd, _barrier_bwd)
