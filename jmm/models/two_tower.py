"""The image-text dual encoder of CLIP / SigLIP: two towers, L2-normalised outputs, learned scale and bias."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmm.models import layers
from jmm.models import text as text_lib
from jmm.models import vit

# Dataclass fields every flax module has; not settable from a tower dict.
_MODULE_FIELDS = ('parent', 'name')


def tower_kwargs(config: Mapping[str, Any], module_cls, **defaults) -> dict:
  """A tower's constructor kwargs: `defaults`, then the sizes of config['variant'], then the explicit keys.

  Lets a config say {'variant': 'B/16', 'pool_type': 'gap'}; explicit keys win over the variant's values. The
  text tower ignores a variant's patch size. Unknown keys raise a ValueError naming them (not a bare TypeError).
  """
  config = dict(config)
  variant = config.pop('variant', None)
  sizes = vit.decode_variant(variant) if variant else {}
  fields = {f.name for f in dataclasses.fields(module_cls)} - set(_MODULE_FIELDS)
  if 'patch_size' not in fields:
    sizes.pop('patch_size', None)
  unknown = sorted(set(config) - fields)
  if unknown:
    raise ValueError(f'{module_cls.__name__} has no field(s) {unknown}; known: {sorted(fields)}')
  kwargs = {**{k: v for k, v in defaults.items() if k in fields}, **sizes, **config}
  if kwargs.get('patch_size') is not None:
    kwargs['patch_size'] = tuple(kwargs['patch_size'])
  return kwargs


def l2_normalize(x, eps: float = 1e-12):
  """x / ||x|| over the last axis, in float32 (bf16 sums of squares lose the precision the loss needs)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class TwoTower(nn.Module):
  """ViT image tower + text transformer tower (Radford et al. 2021; Zhai et al. 2023).

  image / text: kwargs of `vit.ViT` / `text.TextTransformer`, optionally with a 'variant' ('B/16', 'S', ...).
  Each tower's head projects to `out_dim` unless its dict sets its own out_dim. dtype / param_dtype apply to
  both towers unless a tower dict overrides them.
  Params 't' (log-temperature, init `temperature_init` = log 10 as in SigLIP; CLIP uses log(1/0.07)) and 'b'
  (bias, init -10) are float32 scalars; extras['t'] = exp(t), extras['b'] = b.

  __call__(image [B, H, W, 3] or None, text int32 [B, L] or None, train=False) ->
    (zimg [B, out_dim] float32 L2-normalised or None, ztxt likewise or None, extras).
  Either modality may be None (evaluators embed one at a time); only that tower runs.
  """
  image: Mapping[str, Any]
  text: Mapping[str, Any]
  out_dim: int
  temperature_init: float = math.log(10.0)
  bias_init: float = -10.0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, image, text, train: bool = False):
    defaults = dict(out_dim=self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype)
    extras = {}
    zimg = ztxt = None
    if image is not None:
      img_tower = vit.ViT(**tower_kwargs(self.image, vit.ViT, **defaults), name='img')
      emb, extras['img'] = img_tower(image, train=train)
      zimg = l2_normalize(emb)  # [B, out_dim]
    if text is not None:
      txt_tower = text_lib.TextTransformer(**tower_kwargs(self.text, text_lib.TextTransformer, **defaults),
                                           name='txt')
      emb, extras['txt'] = txt_tower(text, train=train)
      ztxt = l2_normalize(emb)  # [B, out_dim]
    # Scalars stay float32 whatever param_dtype is: the logits scale is too sensitive for bf16.
    t = self.param('t', layers.partitioned(nn.initializers.constant(self.temperature_init), ()), (), jnp.float32)
    b = self.param('b', layers.partitioned(nn.initializers.constant(self.bias_init), ()), (), jnp.float32)
    extras['t'] = jnp.exp(t)
    extras['b'] = b
    return zimg, ztxt, extras
