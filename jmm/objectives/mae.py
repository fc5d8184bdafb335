"""MAE: reconstruct the pixels of masked patches from the visible ones (He et al., CVPR 2022, "Masked Autoencoders
Are Scalable Vision Learners").

Each step hides a random `mask_ratio` of every image's patches (75% in the paper), drawn in `prepare` from the
step's key as FLIP draws them (`jmm.objectives.flip.keep_indices`), so a resumed run masks the same patches. The
image tower encodes only the visible ones (`jmm.models.vit.ViT`'s `keep`), the decoder head
(`jmm/models/mae_decoder.py`) predicts every patch's pixels, and the loss is the mean squared error over the
masked patches only:

  loss = sum_{b, n masked} mean_p (pred[b, n, p] - target[b, n, p])^2 / #masked

With `norm_pix` (the paper's norm_pix_loss, default on) each target patch is normalised by its own pixels' mean
and variance, (x - mean) / sqrt(var + 1e-6); var is the unbiased estimate (divided by P - 1) as in the reference
code (`target.var(dim=-1)` in PyTorch), which the paper reports improves representations (Table 1d).

Fields:
  mask_ratio  fraction of patches hidden, in (0, 1); K = round((1 - mask_ratio) * patches) visible (at least 1).
  norm_pix    normalise each target patch (default True).
  head        the decoder head's name in config.model.heads (default 'mae').
  patch_size  the image tower's [ph, pw] (checked against config.model; `jmm.recipes.mae` fills it in).
"""
from __future__ import annotations

import jax.numpy as jnp

from jmm.errors import ConfigError
from jmm.models import mae_decoder
from jmm.objectives import flip

KEEP = flip.KEEP
NORM_EPS = 1e-6  # The reference code's.


def validate(config) -> None:
  """mask_ratio in (0, 1), norm_pix a bool, head a name, patch_size [ph, pw] > 0."""
  ratio = config.get('mask_ratio', 0.75)
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
    raise ConfigError(f'mask_ratio must be a number in (0, 1) (the fraction of patches hidden), got {ratio!r}')
  if not isinstance(config.get('norm_pix', True), bool):
    raise ConfigError(f'norm_pix must be True or False, got {config.get("norm_pix")!r}')
  head = config.get('head', 'mae')
  if not isinstance(head, str) or not head:
    raise ConfigError(f'head must name the decoder head in config.model.heads, got {head!r}')
  flip.validate_patch_size(config)


def check_model(model_config, config) -> None:
  """The decoder head exists, is an MAE decoder, and it and the masks share the image tower's patch grid."""
  flip.check_model(model_config, config)
  name = config.get('head', 'mae')
  heads = model_config.get('heads') or {}
  if name not in heads or not str(heads[name].get('type', '')).endswith('mae_decoder'):
    raise ConfigError(f"head={name!r}: config.model.heads has no mae_decoder head of that name (heads: "
                      f"{sorted(heads)}); add {{'{name}': {{'type': 'mae_decoder', ...}}}} (jmm.recipes.mae)")
  tower = flip.tower_patch_size(model_config)
  head_patch = tuple(heads[name].get('patch_size') or ())
  if head_patch != tower:
    raise ConfigError(f'config.model.heads.{name}.patch_size={head_patch} differs from the image tower\'s {tower}: '
                      'the decoder would predict patches of the wrong size')


def prepare(step, key, batch, config) -> dict:
  """{'image_keep': int32 [B, K]}: per example K distinct visible positions, sorted, drawn from the step's key."""
  del step  # The key already differs per step.
  batch_size, height, width, _ = batch['image'].shape
  ph, pw = flip.patch_size_of(config)
  n = (height // ph) * (width // pw)
  return {KEEP: flip.keep_indices(key, batch_size, n, flip.num_kept(n, config.get('mask_ratio', 0.75)))}


def targets(images, patch_size, norm_pix: bool = True):
  """[B, N, ph * pw * C] float32: each patch's pixels, normalised per patch when `norm_pix`."""
  x = mae_decoder.patchify(images.astype(jnp.float32), patch_size)
  if not norm_pix:
    return x
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True, ddof=1)
  return (x - mean) * jnp.reciprocal(jnp.sqrt(var + NORM_EPS))


def masked_mse(pred, target, keep):
  """(the mean over masked patches of each patch's mean squared error, the masked fraction).

  pred, target [B, N, P]; keep int32 [B, K], the visible positions (every other one is masked).
  """
  b, n, _ = pred.shape
  masked = jnp.ones((b, n), jnp.float32).at[jnp.arange(b)[:, None], keep].set(0.0)  # [B, N]
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)  # [B, N]
  count = jnp.sum(masked)
  return jnp.sum(per_patch * masked) / jnp.maximum(count, 1.0), count / (b * n)


def loss(outputs, batch, config):
  """The masked patches' reconstruction error; metric 'masked', the fraction of patches hidden."""
  pred = outputs[config.get('head', 'mae')]['pred']  # [B, N, P]
  target = targets(batch['image'], flip.patch_size_of(config), config.get('norm_pix', True))
  value, masked = masked_mse(pred, target, batch[KEEP])
  return value, {'masked': masked}
