"""Region embeddings of a two-tower model, for region evaluators: the CLOC Prompter's, or pooled patch tokens.

  prompter  `jmm/models/cloc_head.py`: the box as a prompt over the image tower's tokens -> 'zregion'.
  pooled    the baseline any dual encoder has (no region training): the image tower's encoded patch tokens
            averaged inside the box (each patch weighted by the fraction of its area the box covers), then the
            tower's own head (its linear projection to the joint space) and L2 normalisation: how the image
            embedding is made from all patches with mean pooling ('gap'), restricted to the box. For a tower
            pooled otherwise ('map', 'tok') the head was trained on another pooling's output, so the baseline is
            refused rather than silently weak.
"""
from __future__ import annotations

import jax.numpy as jnp

from jmm.errors import ConfigError
from jmm.models import build as model_build
from jmm.models.two_tower import l2_normalize


def box_patch_weights(boxes, grid: int):
  """Per box [..., 4] (ymin, xmin, ymax, xmax in [0, 1]) the fraction of each patch of a grid x grid image
  (row-major) the box covers -> [..., grid * grid]."""
  edges = jnp.arange(grid + 1, dtype=jnp.float32) / grid
  lo, hi = edges[:-1], edges[1:]  # [grid] each

  def overlap(a, b):  # a, b [...]: the covered fraction of each cell along one axis -> [..., grid]
    return jnp.clip(jnp.minimum(b[..., None], hi) - jnp.maximum(a[..., None], lo), 0.0, None) * grid
  rows = overlap(boxes[..., 0], boxes[..., 2])  # [..., grid]
  cols = overlap(boxes[..., 1], boxes[..., 3])
  return (rows[..., :, None] * cols[..., None, :]).reshape(*boxes.shape[:-1], grid * grid)


def pool_in_boxes(tokens, boxes):
  """Patch tokens [N, T, W] (T = grid^2) averaged inside boxes [N, R, 4] with `box_patch_weights` -> [N, R, W]."""
  grid = round(tokens.shape[1] ** 0.5)
  if grid * grid != tokens.shape[1]:
    raise ValueError(f'pooling in boxes needs a square patch grid, got {tokens.shape[1]} tokens')
  w = box_patch_weights(boxes.astype(jnp.float32), grid)  # [N, R, T]
  w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-9)
  return jnp.einsum('nrt,ntw->nrw', w, tokens.astype(jnp.float32))


def pooled_region_fn(model):
  """(params, images, boxes) -> [N, R, D] pooled-patch region embeddings of `model` (a TwoTower)."""
  pool_type = dict(model.image).get('pool_type', 'map')

  def fn(params, images, boxes):
    if pool_type != 'gap':
      raise ConfigError(f"region method='pooled' needs an image tower with pool_type='gap' (its head then maps "
                        f'mean-pooled patch tokens), got {pool_type!r}')
    outputs = model_build.apply(model, params, {'image': images})
    pooled = pool_in_boxes(outputs['img']['encoded'], boxes)  # [N, R, W]
    head = params['img'].get('head')
    if head is not None:  # The tower's linear head (no head: the pooled width is the embedding).
      pooled = pooled @ head['kernel'] + (head['bias'] if 'bias' in head else 0.0)
    return l2_normalize(pooled)
  return fn


def prompter_region_fn(model, head: str):
  """(params, images, boxes) -> [N, R, D]: the CLOC head `head`'s region embeddings."""
  def fn(params, images, boxes):
    return model_build.apply(model, params, {'image': images, 'boxes': boxes})[head]['zregion']
  return fn


def region_method(config, available) -> str:
  """The eval's `method`: as set, else the model's first CLOC head, else 'pooled'."""
  method = config.get('method') or ''
  if method:
    return method
  heads = sorted(k for k in available if k != 'pooled')
  return heads[0] if heads else 'pooled'
