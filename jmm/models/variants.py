"""Transformer sizes by their short names ('Ti' ... 'g', optionally '/patch'), for both towers and config checks.

A leaf of jmm.models (no jmm imports): `vit` re-exports it, and `moe.validate` reads tower depths from it without
importing the towers.
"""
from __future__ import annotations

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
