"""MAE's light decoder: the pixels of every patch from the image tower's visible tokens (He et al., CVPR 2022,
"Masked Autoencoders Are Scalable Vision Learners", Sec. 3).

A head (`config.model.heads = {'mae': {'type': 'mae_decoder', 'patch_size': (8, 8)}}`, see `jmm.models.build`).
The image tower encodes only the visible patches (`jmm.models.vit.ViT`'s `keep`, drawn by
`jmm/objectives/mae.py`); the decoder then

  1. maps the tower's final tokens ('encoded' [B, K (+1), W], after its final LayerNorm) to the decoder width,
  2. puts each visible token back at its grid position and a learned mask token at every other one (the tokens
     arrive in `keep` order, which need not be sorted; MAE's "unshuffle"),
  3. adds position embeddings (fixed 2D sin-cos, MAE's, or learned) to the N grid tokens,
  4. runs `depth` pre-LN transformer blocks (`jmm.models.encoder.Encoder`, with its final LayerNorm) over the
     grid and any extra leading tokens (the class token with pool_type='tok': MAE keeps it, with no position),
  5. predicts each grid position's pixels with one linear map.

  outputs['mae'] = {'pred': float32 [B, N, ph * pw * C]}: patch n (row-major over the grid, as the ViT numbers
  them) flattened in `patchify`'s (ph, pw, C) order, so the loss compares it with `patchify(image)` directly.

The tokens of a pool_type 'gap' / 'map' tower are all patch tokens; with 'tok' the class token leads. Without
'image_keep' in the batch (evaluation: nothing masked, nothing to reconstruct) the head returns {} and costs
nothing; at initialisation it decodes every patch as visible, so all of its parameters exist.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jmm.models import encoder
from jmm.models import layers

POSEMBS = ('sincos2d', 'learn')
KEEP = 'image_keep'  # The batch field of visible positions (`jmm.objectives.flip.KEEP`; models do not import it).


def patchify(images, patch_size: Sequence[int]):
  """images [B, H, W, C] -> [B, N, ph * pw * C]: patch n = (row, col) row-major, pixels in (ph, pw, C) order.

  The ViT's patch numbering (`vit.PatchEmbedding`), so position n of a `keep` list is patch n here.
  """
  b, h, w, c = images.shape
  ph, pw = patch_size
  x = images.reshape(b, h // ph, ph, w // pw, pw, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // ph) * (w // pw), ph * pw * c)


def unpatchify(patches, grid: Sequence[int], patch_size: Sequence[int]):
  """[B, N, ph * pw * C] -> images [B, H, W, C]: `patchify`'s inverse (to look at reconstructions)."""
  b, _, p = patches.shape
  (gh, gw), (ph, pw) = grid, patch_size
  c = p // (ph * pw)
  return patches.reshape(b, gh, gw, ph, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * ph, gw * pw, c)


def sincos_2d(grid: Sequence[int], width: int) -> np.ndarray:
  """MAE's fixed position table [gh * gw, width] (float32): half the features encode the row, half the column.

  Each half is 1D sin-cos of the coordinate (sin of width / 4 frequencies 1 / 10000^(i / (width / 4)), then cos),
  MAE's get_2d_sincos_pos_embed without the class-token row. width must be a multiple of 4.
  """
  if width % 4:
    raise ValueError(f'sin-cos position embeddings need a width divisible by 4, got {width}')
  gh, gw = grid
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))  # [width / 4]
  rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing='ij')

  def one_d(pos):  # [N] -> [N, width / 2]
    angles = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([one_d(rows), one_d(cols)], axis=1).astype(np.float32)  # [N, width]


class Head(nn.Module):
  """MAE's decoder (module docstring).

  patch_size: the image tower's [ph, pw] (`jmm.recipes.mae` fills it in). width / depth / num_heads / mlp_dim
  (0 = 4 x width): the decoder's transformer. posemb: 'sincos2d' (fixed, MAE's) or 'learn'.
  """
  patch_size: Sequence[int] = (16, 16)
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 0
  posemb: str = 'sincos2d'
  attention_impl: str = 'xla'
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, outputs, batch, train: bool = False):
    del train
    keep = batch.get(KEEP)
    if 'img' not in outputs or (keep is None and not self.is_initializing()):
      return {}
    if self.posemb not in POSEMBS:
      raise ValueError(f'mae_decoder posemb={self.posemb!r} is not one of {POSEMBS}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, height, width, channels = batch['image'].shape
    ph, pw = self.patch_size
    grid = (height // ph, width // pw)
    n = grid[0] * grid[1]
    if keep is None:  # Initialisation: every patch visible, in order.
      keep = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    tokens = outputs['img']['encoded']  # [B, extra + K, W]
    extra = tokens.shape[1] - keep.shape[1]
    if extra not in (0, 1):
      raise ValueError(f'mae_decoder: the image tower encoded {tokens.shape[1]} tokens for {keep.shape[1]} visible '
                       'patches; expected those patches, after at most one class token')

    x = layers.dense(self.width, (None, 'embed'), ('embed',), name='decoder_embed', **kw)(tokens)  # [B, e + K, Wd]
    lead, visible = x[:, :extra], x[:, extra:]
    mask_token = self.param('mask_token', layers.partitioned(nn.initializers.normal(0.02), ('embed',)),
                            (self.width,), self.param_dtype).astype(self.dtype)
    # MAE's unshuffle as a gather: grid position p reads visible token j where keep[:, j] = p, else the mask token
    # (index K of [visible; mask]). Scattering the small int map keeps the float path a gather, whose gradient
    # is one scatter-add into the visible tokens.
    k = keep.shape[1]
    rows = jnp.arange(b)[:, None]
    source = jnp.full((b, n), k, jnp.int32).at[rows, keep].set(jnp.arange(k, dtype=jnp.int32)[None])  # [B, N]
    pool = jnp.concatenate([visible, jnp.broadcast_to(mask_token, (b, 1, self.width))], axis=1)  # [B, K + 1, Wd]
    x = jnp.take_along_axis(pool, source[:, :, None], axis=1)  # [B, N, Wd]

    if self.posemb == 'sincos2d':
      pos = jnp.asarray(sincos_2d(grid, self.width), self.dtype)
    else:
      pos = self.param('pos_embedding', layers.partitioned(nn.initializers.normal(0.02), ('length', 'embed')),
                       (n, self.width), self.param_dtype).astype(self.dtype)
    x = jnp.concatenate([lead, layers.add_position_embedding(x, pos)], axis=1)  # [B, e + N, Wd]
    x = encoder.Encoder(self.depth, self.mlp_dim or 4 * self.width, self.num_heads,
                        attention_impl=self.attention_impl, name='decoder', **kw)(x)
    pred = layers.dense(ph * pw * channels, ('embed', None), (None,), name='decoder_pred', **kw)(x[:, extra:])
    return {'pred': pred.astype(jnp.float32)}  # [B, N, ph * pw * C]
