"""Vision Transformer image tower (Dosovitskiy et al. 2021) with SigLIP's MAP pooling (Zhai et al. 2023)."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jmm.models import encoder
from jmm.models import evit as evit_lib
from jmm.models import layers
from jmm.models.variants import VARIANTS  # noqa: F401  (re-exported)
from jmm.models.variants import decode_variant  # noqa: F401  (re-exported)

POOL_TYPES = ('map', 'gap', 'tok')


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

  __call__(image [B, H, W, 3], train=False, keep=None) -> (emb [B, out_dim or width], extras) where extras holds
  'encoded' [B, tokens, width] (after the final LayerNorm) and 'pre_logits' [B, width] (pooled, before the head).
  `train` is accepted for a uniform tower signature; there is no dropout.
  keep: int32 [B, K], per example the patch positions (row-major, 0 <= i < h * w) to encode, the rest dropped
  (FLIP, Li et al. 2023: `jmm/objectives/flip.py` draws them). Tokens are gathered after the position embedding,
  so each keeps its position; the encoder and the pooling ('gap', 'map', the 'tok' class token) see only the K
  visible ones, and 'encoded' is [B, K (+1), width]. None (evaluation): every patch.
  Options for imported peers (defaults are big_vision's SigLIP ViT): activation / norm_eps (see
  `layers.ACTIVATIONS`; CLIP: 'quick_gelu' or 'gelu', 1e-5), patch_bias (CLIP: False), cls_posemb (the position
  table has a first row for the 'tok' class token, as CLIP; default: the class token gets no position),
  ln_pre (CLIP's LayerNorm before the encoder), head_bias (CLIP: False), out_dim=0 (no head).
  pixel_mean / pixel_std (per channel, on [0, 1] pixels): the input normalisation the weights were trained
  with when it is not jmm's [-1, 1] (CLIP: OpenAI's mean / std). Images always arrive in [-1, 1]; the tower
  maps them, so training, evaluation and benchmarks feed every model the same way.
  evit: EViT token reorganisation (Liang et al. 2022; `jmm.models.evit`), dict(layers=..., keep_rate=...): the
  blocks in `layers` keep ceil(keep_rate * candidates) of their tokens, ranked by the class token's attention
  ('tok') or the mean attention each token receives ('gap', 'map'), and fuse the rest into one; training and
  evaluation alike. 'encoded' is then the last block's [B, (1 +) kept + 1, width]. None / {}: off, no change.
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
  remat_policy: str = 'none'  # encoder.REMAT_POLICIES: 'full', 'dots', 'dots_no_batch'.
  scan: bool = False
  activation: str = 'gelu_tanh'
  norm_eps: float = 1e-6
  patch_bias: bool = True
  cls_posemb: bool = False
  ln_pre: bool = False
  head_bias: bool = True
  moe: Any = None  # config.model.moe fields (jmm.models.moe): mixture-of-experts MLPs in some blocks.
  pixel_mean: Sequence[float] | None = None
  pixel_std: Sequence[float] | None = None
  evit: Any = None

  @nn.compact
  def __call__(self, image, train: bool = False, keep=None):
    del train
    if (self.pixel_mean is None) != (self.pixel_std is None):
      raise ValueError('ViT pixel_mean and pixel_std must be set together (or neither)')
    if self.pixel_mean is not None:
      mean = jnp.asarray(self.pixel_mean, jnp.float32)
      std = jnp.asarray(self.pixel_std, jnp.float32)
      image = (((image.astype(jnp.float32) + 1) / 2 - mean) / std).astype(image.dtype)
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
    elif keep is not None:  # The patches' positions before they are dropped; the class token's below.
      x = layers.add_position_embedding(x, posemb[1:].astype(self.dtype))
    if keep is not None:
      if keep.ndim != 2 or keep.shape[0] != batch or keep.shape[1] > h * w:
        raise ValueError(f'ViT keep must be [batch={batch}, K <= {h * w} patches], got {keep.shape}')
      # Indices come from the objective's prepare, drawn in [0, h * w): no bounds handling in the gather.
      x = jnp.take_along_axis(x, keep.astype(jnp.int32)[:, :, None], axis=1, mode='promise_in_bounds')  # [B, K, D]
    if self.pool_type == 'tok':
      cls = self.param('cls', layers.partitioned(layers.zeros, ('embed',)), (width,), self.param_dtype)
      cls = cls.astype(self.dtype)
      if self.cls_posemb and keep is not None:
        cls = cls + posemb[0].astype(self.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)), x], axis=1)
    if self.cls_posemb and keep is None:
      x = layers.add_position_embedding(x, posemb.astype(self.dtype))  # [B, 1 + tokens, D]
    if self.ln_pre:
      x = layers.layer_norm(name='ln_pre', epsilon=self.norm_eps, **kw)(x)
    evit_layers, keep_rate = evit_lib.parse(self.evit, self.depth)  # ((), 1.0) when off.
    x = encoder.Encoder(self.depth, self.mlp_dim, self.num_heads, attention_impl=self.attention_impl,
                        remat=self.remat, remat_policy=self.remat_policy, scan=self.scan, activation=self.activation,
                        norm_eps=self.norm_eps, moe=self.moe, evit_layers=evit_layers, evit_keep_rate=keep_rate,
                        evit_cls_token=self.pool_type == 'tok', name='encoder', **kw)(x)
    emb, pooled = layers.pool_and_project(
        x, self.pool_type, POOL_TYPES, num_heads=self.num_heads, mlp_dim=self.mlp_dim, out_dim=self.out_dim,
        attention_impl=self.attention_impl, activation=self.activation, norm_eps=self.norm_eps,
        head_bias=self.head_bias, **kw)  # [B, out_dim], [B, D]
    return emb, {'encoded': x, 'pre_logits': pooled}
