"""Image decoding and augmentation for real data: encoded bytes -> a fixed-size uint8 [H, W, 3] image.

Runs inside the Grain map (in worker processes when `data.worker_count > 0`), once per example, with PIL.
Three ways to reach `resolution` x `resolution`:

  'resize'               squash the whole image (big_vision's SigLIP recipe: `decode|resize(224)`), no crop;
  'resize_crop'          resize the shorter side, then a centre crop (the usual evaluation transform);
  'random_resized_crop'  a random crop of `crop_scale` of the area and aspect ratio in [3/4, 4/3], resized
                         (Szegedy et al. 2015, "Going deeper with convolutions"; open_clip trains CLIP with
                         scale (0.9, 1.0)).

Randomness comes from a `np.random.Generator` the caller derives from (seed, position in the stream), so an
example's augmentation is a pure function of where it sits in the pipeline and resumption stays exact. The
value range ([-1, 1] by default) is applied per batch, in one vectorised op, by `to_value_range`.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

MODES = ('resize', 'resize_crop', 'random_resized_crop')
_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # Aspect-ratio range of the random crop (Szegedy et al. 2015).


class BadRecord(Exception):
  """A record that cannot become an example (corrupt image, missing caption, truncated member, empty shard).

  `kind` is 'record' for one bad example and 'shard' for a whole unreadable or empty shard; the pipeline skips
  the example and counts it per source and kind, it never crashes on one.
  """

  def __init__(self, message: str, kind: str = 'record'):
    super().__init__(message)
    self.kind = kind


def decode_image(data, draft: tuple[int, int] | None = None) -> Image.Image:
  """Encoded image bytes (JPEG, PNG, WebP...) or a uint8 array -> an RGB PIL image, fully loaded.

  `load()` forces the whole decode here, so a truncated or corrupt file raises now (PIL decodes lazily) and
  the caller can count it instead of failing later in the batch. `draft=(w, h)` lets a JPEG decode at 1/2,
  1/4 or 1/8 scale (its DCT scaling, much faster) when both sides stay >= (w, h).
  """
  if isinstance(data, np.ndarray):
    if data.dtype != np.uint8 or data.ndim not in (2, 3):
      raise BadRecord(f'image array must be uint8 [H, W(, C)], got {data.dtype} {data.shape}')
    if data.ndim == 3 and data.shape[-1] == 1:
      data = data[..., 0]
    return Image.fromarray(data).convert('RGB')
  if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
    raise BadRecord(f'image must be non-empty bytes, got {type(data).__name__} of length '
                    f'{len(data) if hasattr(data, "__len__") else "?"}')
  try:
    image = Image.open(io.BytesIO(data))
    if draft is not None and image.format == 'JPEG':
      image.draft('RGB', draft)
    image.load()
    return image.convert('RGB')
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise BadRecord(f'cannot decode image: {type(e).__name__}: {e}') from None


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
  # Bicubic with PIL's antialiasing on downscale, as CLIP's preprocessing does.
  return image.resize(size, Image.BICUBIC) if image.size != size else image


def random_crop_box(width: int, height: int, rng: np.random.Generator,
                    scale: Sequence[float]) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) of a crop covering a random `scale` of the area with aspect ratio in [3/4, 4/3].

  Ten tries at the sampled (area, ratio), then the largest centred crop of the clipped ratio, as torchvision's
  RandomResizedCrop does, so the result is always a valid box.
  """
  area = width * height
  log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < _RATIO[0]:
    w, h = width, min(height, int(round(width / _RATIO[0])))
  elif in_ratio > _RATIO[1]:
    w, h = min(width, int(round(height * _RATIO[1]))), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


class ImageTransform:
  """Picklable callable: (encoded image, rng) -> uint8 [resolution, resolution, 3]; see the module docstring."""

  def __init__(self, resolution: int, mode: str = 'resize', crop_scale: Sequence[float] = (0.9, 1.0),
               draft: bool = True):
    """draft: let JPEGs decode at a reduced scale first in the deterministic modes (faster; the pixels differ
    slightly from a full decode). Evaluation turns it off to see the pixels a peer's preprocessing sees."""
    if mode not in MODES:
      raise ValueError(f'image transform mode {mode!r} is not one of {list(MODES)}')
    if not (0 < crop_scale[0] <= crop_scale[1] <= 1):
      raise ValueError(f'crop_scale must satisfy 0 < low <= high <= 1, got {tuple(crop_scale)}')
    self.resolution = int(resolution)
    self.mode = mode
    self.crop_scale = tuple(float(s) for s in crop_scale)
    self.draft = bool(draft)

  def __call__(self, data, rng: np.random.Generator | None = None) -> np.ndarray:
    res = self.resolution
    # A random crop may be small, so only the deterministic modes decode at reduced scale.
    image = decode_image(data, draft=None if self.mode == 'random_resized_crop' or not self.draft else (res, res))
    width, height = image.size
    if self.mode == 'resize':
      image = _resize(image, (res, res))
    elif self.mode == 'resize_crop':
      # The longer side truncated, as torchvision's Resize, OpenAI's CLIP and HF's CLIPImageProcessor do.
      size = (res, int(res * height / width)) if width <= height else (int(res * width / height), res)
      image = _resize(image, size)
      left, top = (size[0] - res) // 2, (size[1] - res) // 2
      image = image.crop((left, top, left + res, top + res))
    else:
      if rng is None:
        raise ValueError('random_resized_crop needs an rng')
      box = random_crop_box(width, height, rng, self.crop_scale)
      image = image.resize((res, res), Image.BICUBIC, box=box)
    out = np.asarray(image, np.uint8)  # [res, res, 3]
    if out.shape != (res, res, 3):
      raise BadRecord(f'transformed image has shape {out.shape}, expected {(res, res, 3)}')
    return out


def to_value_range(images: np.ndarray, value_range: Sequence[float] = (-1.0, 1.0)) -> np.ndarray:
  """uint8 [..., 3] in 0..255 -> float32 in [low, high] (big_vision's `value_range(-1, 1)`)."""
  low, high = float(value_range[0]), float(value_range[1])
  if (low, high) == (-1.0, 1.0):
    return np.asarray(images, np.float32) / 127.5 - 1.0  # Bit-identical to the synthetic pipeline's map.
  return np.asarray(images, np.float32) * ((high - low) / 255.0) + low
