"""Vision Transformer image tower (Dosovitskiy et al. 2021) with SigLIP's MAP pooling (Zhai et al. 2023)."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jmm.models import layers

# Sizes from the ViT paper (Ti/S/B/L), "Scaling ViTs" (g) and SigLIP's shape-optimised So400m ("Getting ViT in
# Shape", Alabdulmohsin et al. 2023); M is big_vision's 512-wide model.
VARIANTS = {
    'Ti': dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    'S': dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    'M': dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    'B': dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    'L': dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    'So400m': dict(width=1152, depth=27, mlp_dim=4304, num_heads=16),
    'g': dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
}

POOL_TYPES = ('map', 'gap', 'tok')


def decode_variant(variant: str) -> dict:
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=(16, 16)); 'B' has no patch_size.

  The short names are how papers and configs name models; the same table sizes the text tower ('B' text).
  """
  if not isinstance(variant, str):
    raise ValueError(f'model variant must be a string like "B/16", got {variant!r}')
  name, _, patch = variant.partition('/')
  if name not in VARIANTS:
    raise ValueError(f'unknown model variant {variant!r}; known: {", ".join(VARIANTS)} '
                     f'(optionally with a patch size, e.g. "B/16")')
  out = dict(VARIANTS[name])
  if patch:
    if not patch.isdigit() or int(patch) <= 0:
      raise ValueError(f'model variant {variant!r}: patch size {patch!r} is not a positive integer')
    out['patch_size'] = (int(patch), int(patch))
  return out


class PatchEmbedding(nn.Module):
  """Non-overlapping patches -> width: a conv with kernel = stride = patch_size, done as reshape + einsum.

  The kernel has the conv layout [ph, pw, channels, width] (as big_vision's 'embedding'), but the einsum form is
  one plain matmul, which XLA's CPU backend runs faster than a strided convolution.
  """
  width: int
  patch_size: Sequence[int]
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  use_bias: bool = True  # CLIP's patch embedding has no bias.

  @nn.compact
  def __call__(self, image):  # image: [B, H, W, C]
    batch, height, width, channels = image.shape
    ph, pw = self.patch_size
    if height % ph or width % pw:
      raise ValueError(f'image size {height}x{width} is not divisible by the patch size {ph}x{pw}')
    names = ('patch_height', 'patch_width', 'conv_in', 'embed')
    kernel = self.param('kernel', layers.partitioned(layers.xavier, names), (ph, pw, channels, self.width),
                        self.param_dtype)
    x = image.astype(self.dtype).reshape(batch, height // ph, ph, width // pw, pw, channels)
    x = jnp.einsum('bhiwjc,ijcd->bhwd', x, kernel.astype(self.dtype))  # [B, h, w, width]
    if not self.use_bias:
      return x
    bias = self.param('bias', layers.partitioned(layers.zeros, ('embed',)), (self.width,), self.param_dtype)
    return x + bias.astype(self.dtype)


class ViT(nn.Module):
  """ViT image tower: patches + learned position embedding, pre-LN encoder, pooling, optional linear head.

  __call__(image [B, H, W, 3], train=False) -> (emb [B, out_dim or width], extras) where extras holds
  'encoded' [B, tokens, width] (after the final LayerNorm) and 'pre_logits' [B, width] (pooled, before the head).
  `train` is accepted for a uniform tower signature; there is no dropout.
  Options for imported peers (defaults are big_vision's SigLIP ViT): activation / norm_eps (see
  `layers.ACTIVATIONS`; CLIP: 'quick_gelu' or 'gelu', 1e-5), patch_bias (CLIP: False), cls_posemb (the position
  table has a first row for the 'tok' class token, as CLIP; default: the class token gets no position),
  ln_pre (CLIP's LayerNorm before the encoder), head_bias (CLIP: False), out_dim=0 (no head).
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: Sequence[int] = (16, 16)
  pool_type: str = 'map'
  out_dim: int | None = None
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str = 'xla'
  remat: bool = False
  remat_policy: str = 'none'  # layers.REMAT_POLICIES: 'full', 'dots', 'dots_no_batch'.
  scan: bool = False
  activation: str = 'gelu_tanh'
  norm_eps: float = 1e-6
  patch_bias: bool = True
  cls_posemb: bool = False
  ln_pre: bool = False
  head_bias: bool = True
  moe: Any = None  # config.model.moe fields (jmm.models.moe): mixture-of-experts MLPs in some blocks.

  @nn.compact
  def __call__(self, image, train: bool = False):
    del train
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f'unknown ViT pool_type {self.pool_type!r}; known: {", ".join(POOL_TYPES)}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.cls_posemb and self.pool_type != 'tok':
      raise ValueError(f'ViT cls_posemb=True needs pool_type="tok" (a class token), got {self.pool_type!r}')
    x = PatchEmbedding(self.width, tuple(self.patch_size), use_bias=self.patch_bias, name='embedding',
                       **kw)(image)  # [B, h, w, D]
    batch, h, w, width = x.shape
    x = x.reshape(batch, h * w, width)  # [B, tokens, D]
    num_pos = h * w + (1 if self.cls_posemb else 0)
    posemb = self.param('pos_embedding', layers.partitioned(nn.initializers.normal(1 / np.sqrt(width)),
                                                            ('length', 'embed')),
                        (num_pos, width), self.param_dtype)
    if not self.cls_posemb:
      x = layers.add_position_embedding(x, posemb.astype(self.dtype))
    if self.pool_type == 'tok':
      cls = self.param('cls', layers.partitioned(layers.zeros, ('embed',)), (width,), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, width)), x], axis=1)
    if self.cls_posemb:
      x = layers.add_position_embedding(x, posemb.astype(self.dtype))  # [B, 1 + tokens, D]
    if self.ln_pre:
      x = layers.layer_norm(name='ln_pre', epsilon=self.norm_eps, **kw)(x)
    x = layers.Encoder(self.depth, self.mlp_dim, self.num_heads, attention_impl=self.attention_impl,
                       remat=self.remat, remat_policy=self.remat_policy, scan=self.scan, activation=self.activation,
                       norm_eps=self.norm_eps, moe=self.moe, name='encoder', **kw)(x)
    emb, pooled = layers.pool_and_project(
        x, self.pool_type, POOL_TYPES, num_heads=self.num_heads, mlp_dim=self.mlp_dim, out_dim=self.out_dim,
        attention_impl=self.attention_impl, activation=self.activation, norm_eps=self.norm_eps,
        head_bias=self.head_bias, **kw)  # [B, out_dim], [B, D]
    return emb, {'encoded': x, 'pre_logits': pooled}
