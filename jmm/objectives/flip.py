"""FLIP: contrastive image-text training on a random subset of each image's patches (Li et al., CVPR 2023,
"Scaling Language-Image Pre-training via Masking").

Each step drops a random `mask_ratio` of every image's patches before the image tower's encoder; the tower
encodes and pools only the visible ones (`jmm.models.vit.ViT`'s `keep`), so at 50% / 75% the image encoder does
about 1/2 / 1/4 of the work (the paper: ~2x / ~3-4x less image-encoder compute, and a bigger batch or more
epochs in the same time). Evaluation always sees every patch: evaluators never pass `image_keep`. The last
`unmasked_steps` steps may train unmasked (the paper's "unmasked tuning"), closing the gap between masked
training and unmasked inference.

The loss is the contrastive objective's (`jmm/objectives/contrastive.py`) on the masked embeddings, with its
fields: `loss` ('sigmoid' | 'softmax'), `impl`, `hard_negatives`. FLIP's own fields:
  mask_ratio      fraction of patches dropped, in [0, 1); K = round((1 - mask_ratio) * patches) are kept.
                  0: no masking at all (the plain contrastive objective, the same program).
  unmasked_steps  the last N steps see every patch (0: none).
  patch_size      the image tower's patch size [ph, pw]: the grid the positions are drawn on (checked against
                  config.model; `jmm.recipes.flip` fills it in).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jmm.errors import ConfigError
from jmm.models import vit
from jmm.objectives import contrastive

KEEP = 'image_keep'  # The batch field the image tower reads (`jmm.models.two_tower`).


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """K: patches kept of `num_patches` at `mask_ratio`, at least one."""
  return max(1, int(round((1.0 - mask_ratio) * num_patches)))


def tower_patch_size(model_config) -> tuple[int, int]:
  """The image tower's patch size from config.model: its patch_size, else its variant's, else the ViT default."""
  image = model_config.image
  patch = image.get('patch_size')
  if patch is None and image.get('variant'):
    patch = vit.decode_variant(image.variant).get('patch_size')
  if patch is None:
    patch = vit.ViT.patch_size  # The dataclass default.
  return tuple(int(p) for p in patch)


def patch_size_of(config) -> tuple[int, int]:
  """The objective section's patch_size as (ph, pw) (an int means a square patch)."""
  patch = config.get('patch_size')
  if isinstance(patch, int):
    patch = (patch, patch)
  return tuple(patch)


def validate(config) -> None:
  """The contrastive fields, then mask_ratio in [0, 1), unmasked_steps an int >= 0, patch_size [ph, pw] > 0."""
  contrastive.validate(config)
  ratio = config.get('mask_ratio', 0.5)
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
    raise ConfigError(f'mask_ratio must be a number in [0, 1) (the fraction of patches dropped), got {ratio!r}')
  steps = config.get('unmasked_steps', 0)
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise ConfigError(f'unmasked_steps must be an integer >= 0, got {steps!r}')
  validate_patch_size(config)


def validate_patch_size(config) -> None:
  """patch_size: the image tower's [ph, pw], positive integers (the recipe helpers fill it in)."""
  patch = config.get('patch_size')
  if patch is None:
    raise ConfigError('patch_size is missing: the image tower\'s [ph, pw] (jmm.recipes fills it in)')
  patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
  if len(patch) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch):
    raise ConfigError(f'patch_size must be two positive integers [ph, pw], got {config.get("patch_size")!r}')


def check_model(model_config, config) -> None:
  """The positions are drawn on the image tower's patch grid: patch_size must be the tower's."""
  tower = tower_patch_size(model_config)
  if patch_size_of(config) != tower:
    raise ConfigError(f'patch_size={tuple(patch_size_of(config))} differs from the image tower\'s patch size {tower} '
                      '(config.model.image): masks would be drawn on the wrong grid; set it to the tower\'s')


def batch_fields(config) -> tuple[str, ...]:
  return contrastive.batch_fields(config)


def phases(config, total_steps: int) -> tuple[int, ...]:
  """One boundary, total_steps - unmasked_steps, when there is an unmasked phase (phase 1: every patch)."""
  steps = config.get('unmasked_steps', 0)
  return (max(0, total_steps - steps),) if steps else ()


def keep_indices(key, batch_size: int, num_patches: int, k: int):
  """int32 [batch_size, k]: per example the first k of a random permutation of the patches, sorted ascending.

  Each example ranks its patches by uniform noise (MAE's and FLIP's shuffle) and keeps the k best: distinct
  positions, a different subset per example. Sorted because the encoder and the pooling do not depend on the
  order (positions travel with the tokens), and in order the gather reads memory monotonically; keeping all
  patches then is the identity, bit for bit the unmasked model.
  """
  noise = jax.random.uniform(key, (batch_size, num_patches))  # [B, N]
  _, idx = jax.lax.top_k(noise, k)  # [B, k] distinct positions.
  return jnp.sort(idx, axis=1).astype(jnp.int32)


def prepare(step, key, batch, config, phase: int = 0) -> dict:
  """{'image_keep': int32 [B, K]} drawn from `key` (the step's key), or {} (unmasked) in phase 1 or at ratio 0."""
  del step  # The key already differs per step (fold_in(rng, step)).
  ratio = config.get('mask_ratio', 0.5)
  if phase or not ratio:
    return {}
  batch_size, height, width, _ = batch['image'].shape
  ph, pw = patch_size_of(config)
  n = (height // ph) * (width // pw)
  return {KEEP: keep_indices(key, batch_size, n, num_kept(n, ratio))}


def loss(outputs, batch, config):
  """The contrastive loss on the (masked) embeddings, plus 'visible': the fraction of patches the tower saw."""
  value, metrics = contrastive.loss(outputs, batch, config)
  visible = 1.0
  if batch.get(KEEP) is not None:
    _, height, width, _ = batch['image'].shape
    ph, pw = patch_size_of(config)
    visible = batch[KEEP].shape[1] / ((height // ph) * (width // pw))
  return value, {**metrics, 'visible': jnp.asarray(visible, jnp.float32)}
