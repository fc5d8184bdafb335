"""Procedurally generated image-caption data: coloured shapes on a grey background, captioned from attributes.

An embedded data set (no files, no downloads) that a dual encoder can learn in minutes on one machine and that
still asks a real question: colour x shape pairs listed by `is_unseen` never occur in the 'train' split, so the
'test' split (all pairs, uniformly) measures compositional generalisation separately from the pairs seen.

Every example is a pure function of (seed, split, index): a per-example `np.random.Generator` is built from a
`SeedSequence` of those three numbers, never from global state, so any worker can render any index and two
instances agree bit for bit. Attributes are drawn first and rendering jitter after, so `captions()` draws the
attributes alone (no rasterising) and still gets exactly the captions `__getitem__` would give.

Rendering is vectorised numpy on the object's own crop: each shape is a signed-distance function (SDF, in
pixels) of the rotated pixel-centre grid, and coverage = clip(0.5 - sdf, 0, 1) is analytic anti-aliasing (one
evaluation per pixel, smoother than 2x supersampling at a quarter of its cost).
"""
from __future__ import annotations

import colorsys
import math
from typing import Sequence

import numpy as np

from jmm.data import hybrid_captions

COLOURS = ('red', 'orange', 'yellow', 'green', 'cyan', 'blue', 'purple', 'pink')
# Hue in degrees of each colour; at least 25 degrees apart, so the +-6 degree jitter keeps them distinct.
_HUES = (0.0, 28.0, 55.0, 120.0, 180.0, 225.0, 275.0, 320.0)
SHAPES = ('circle', 'square', 'triangle', 'diamond', 'star', 'cross')
SIZES = ('small', 'large')
POSITIONS = ('top left', 'top', 'top right', 'left', 'centre', 'right', 'bottom left', 'bottom', 'bottom right')
CLASS_NAMES: list[str] = [f'{c} {s}' for c in COLOURS for s in SHAPES]
SPLITS = ('train', 'test')
NEGATIVE_SWAPS = ('shape', 'position')  # Attributes a hard-negative caption may swap (negative_captions).
DEFAULT_NUM_EXAMPLES = {'train': 1_000_000, 'test': 2_000}
# Caption styles a `captions` mix may name: the descriptive caption, AltText-like web text, the short phrases.
CAPTION_STYLES = ('caption', 'alt_text', 'short')

# AltText-like captions (`alt_text`): what web alt text says of such an image. It names the salient object, rarely
# its size and never where it is; it drops words and mixes up their order; a good part of it is page or file
# boilerplate. The rates are plausible guesses, not measured on a corpus: noisy enough that alt text alone
# describes an image worse than the descriptive caption, as in the paper, yet mostly about the right object.
_ALT_SIZE = 0.25           # P(size word kept): sizes are relative, and alt text seldom bothers with them.
_ALT_DROP_COLOUR = 0.2     # P(colour word dropped).
_ALT_DROP_SHAPE = 0.15     # P(shape word dropped); object 0 keeps its shape when its colour is dropped too.
_ALT_SWAP = 0.2            # P(noun first: 'triangle red'), as in keyword lists and file names.
_ALT_OTHER_OBJECT = 0.3    # P(an object beyond the first named at all): alt text is about the main subject.
_ALT_PREFIX = 0.2          # P('image of ...'-style boilerplate first).
_ALT_SUFFIX = 0.35         # P('... clipart'-style boilerplate last).
_ALT_NUMBER = 0.15         # P(a number last, as file names and sizes leave them).
# Few and short: the default tokenizer (128 pieces) then gives each a piece or two, so 98.5% of alt texts fit
# text_len=12 (a longer one loses its trailing noise); with twice as many fillers 4% did not fit.
_ALT_PREFIXES = ('image of', 'free', 'img')
_ALT_SUFFIXES = ('icon', 'clipart', 'jpg', 'png', 'stock photo', 'free', 'img')
_ALT_NUMBERS = ('1', '2', '3', '10', '2020')
_ALT_JOINERS = (' ', ', ', ' and ')
_ALT_GLOBAL_DRAWS = 7      # Uniforms an alt text draws for itself, then _ALT_OBJECT_DRAWS per object slot.
_ALT_OBJECT_DRAWS = 5

# Nominal extent (fraction of the image side) of each size, and the relative jitter around it. Small objects
# still span ~10 px at 48 px; large ones (rotated, jittered) still fit inside one cell of the 3x3 grid, which
# is what keeps objects of a multi-object image from overlapping.
_SIZE_EXTENT = (0.22, 0.30)
_SIZE_JITTER = 0.06
_MAX_ROTATION = math.radians(15.0)  # Small enough that a square never becomes a diamond, nor a cross an x.
_HUE_JITTER = 6.0  # degrees
_SATURATION = (0.6, 1.0)
_VALUE = (0.65, 1.0)
_BACKGROUND_GREY = (0.08, 0.45)  # Dark-to-mid grey; objects (value >= 0.65, saturated) stand out from it.
_BACKGROUND_TINT = 0.03
_NOISE_STD = 3.0  # In uint8 levels.
_CELL = 1.0 / 3.0

# Shape geometry, in units of the nominal extent s (see `_sdf`).
_SQUARE_HALF = 0.45
_TRIANGLE_RADIUS = 0.58  # Circumradius.
_TRIANGLE_SHIFT = 0.25 * _TRIANGLE_RADIUS  # Moves the circumcentre down so the triangle's box is centred.
_DIAMOND_HALF = (0.36, 0.55)  # (half width, half height): elongated, so a rotated square is never a diamond.
_STAR_RADIUS, _STAR_INNER = 0.55, 0.45  # Outer radius; inner radius / outer (a regular star has 0.38).
_CROSS_HALF = (0.5, 0.18)  # (half length, half width) of each bar.


def _polygon(n: int, radius: float) -> list[tuple[float, float]]:
  """Vertices (x, y with y down) of a regular n-gon of circumradius `radius` with a vertex pointing up."""
  angles = [-math.pi / 2 + 2 * math.pi * i / n for i in range(n)]
  return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


# Convex-hull vertices (x, y with y down) of each unrotated shape at s = 1; they give exact rotated extents.
_HULLS = {
    'square': [(sx * _SQUARE_HALF, sy * _SQUARE_HALF) for sx in (-1, 1) for sy in (-1, 1)],
    'triangle': [(x, y + _TRIANGLE_SHIFT) for x, y in _polygon(3, _TRIANGLE_RADIUS)],
    'diamond': [(0.0, -_DIAMOND_HALF[1]), (_DIAMOND_HALF[0], 0.0), (0.0, _DIAMOND_HALF[1]),
                (-_DIAMOND_HALF[0], 0.0)],
    'star': _polygon(5, _STAR_RADIUS),
    'cross': [(sx * a, sy * b) for a, b in (_CROSS_HALF, _CROSS_HALF[::-1])
              for sx in (-1, 1) for sy in (-1, 1)],
}


def is_unseen(colour_idx: int, shape_idx: int) -> bool:
  """True for the colour x shape pairs that never appear, in any object, in the 'train' split.

  (c + s) % 4 == 0 holds out 12 of the 48 pairs (25%): every shape loses exactly 2 of its 8 colours and every
  colour 1 or 2 of its 6 shapes, so each colour and each shape is still learnt from other partners.
  """
  return (int(colour_idx) + int(shape_idx)) % 4 == 0


def class_id(colour_idx: int, shape_idx: int) -> int:
  """The class id of a colour x shape pair: colour_idx * len(SHAPES) + shape_idx (the order of CLASS_NAMES)."""
  return int(colour_idx) * len(SHAPES) + int(shape_idx)


_ALL_COMBOS = tuple((c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES)))
_SEEN_COMBOS = tuple(cs for cs in _ALL_COMBOS if not is_unseen(*cs))


def phrase(colour: int, shape: int, size: int) -> str:
  """The noun phrase of one object, e.g. 'a small red triangle' (also the per-box phrase)."""
  return f'a {SIZES[size]} {COLOURS[colour]} {SHAPES[shape]}'


def short_phrase(colour: int, shape: int) -> str:
  """The short noun phrase of one object, e.g. 'a red triangle': the caption augmentation's (see SyntheticCaptions)."""
  return f'a {COLOURS[colour]} {SHAPES[shape]}'


def object_caption(colour: int, shape: int, size: int, position: int) -> str:
  """The caption of one object, e.g. 'a small red triangle in the top left'."""
  return f'{phrase(colour, shape, size)} in the {POSITIONS[position]}'


def _caption(objects, short: bool = False) -> str:
  """The caption of [(colour, shape, size, position)]: every object's caption (or short phrase) joined by 'and'."""
  if short:
    return ' and '.join(short_phrase(c, s) for c, s, _, _ in objects)
  return ' and '.join(object_caption(*o) for o in objects)


def alt_text(objects, u: Sequence[float]) -> str:
  """The AltText-like caption of [(colour, shape, size, position)] from uniforms `u` (see the _ALT_ constants).

  `u` holds _ALT_GLOBAL_DRAWS + _ALT_OBJECT_DRAWS * len(objects) (or more) numbers in [0, 1): the same `u`
  with other objects gives the same noise around other words, which is how a hard negative is made.
  """
  pick = lambda options, x: options[int(x * len(options))]
  names = []
  for j, (colour, shape, size, _) in enumerate(objects):  # Position: never named.
    v = u[_ALT_GLOBAL_DRAWS + _ALT_OBJECT_DRAWS * j:]
    if j and v[0] >= _ALT_OTHER_OBJECT:
      continue
    keep_colour, keep_shape = v[2] >= _ALT_DROP_COLOUR, v[3] >= _ALT_DROP_SHAPE
    if j == 0 and not keep_colour:
      keep_shape = True  # The main subject is always named by something.
    adjectives = [SIZES[size]] * (v[1] < _ALT_SIZE) + [COLOURS[colour]] * keep_colour
    noun = [SHAPES[shape]] * keep_shape
    words = noun + adjectives if v[4] < _ALT_SWAP else adjectives + noun
    if words:
      names.append(' '.join(words))
  parts = [pick(_ALT_PREFIXES, u[1])] * (u[0] < _ALT_PREFIX) + [pick(_ALT_JOINERS, u[6]).join(names)]
  parts += [pick(_ALT_SUFFIXES, u[3])] * (u[2] < _ALT_SUFFIX) + [pick(_ALT_NUMBERS, u[5])] * (u[4] < _ALT_NUMBER)
  return ' '.join(parts)


def alt_names_shape(u: Sequence[float]) -> bool:
  """Whether the alt text drawn from `u` names object 0's shape (else it names its colour)."""
  return u[_ALT_GLOBAL_DRAWS + 3] >= _ALT_DROP_SHAPE or u[_ALT_GLOBAL_DRAWS + 2] < _ALT_DROP_COLOUR


def _sdf(shape: str, u: np.ndarray, v: np.ndarray, s: float) -> np.ndarray:
  """Signed distance (negative inside, units of u/v) of `shape` of extent `s` at shape-frame coordinates.

  Polygon SDFs are the max over edge half-planes: exact inside and along the edges (all that anti-aliasing
  needs), approximate only beyond the corners.
  """
  if shape == 'circle':
    return np.sqrt(u * u + v * v) - 0.5 * s
  if shape == 'square':
    return np.maximum(np.abs(u), np.abs(v)) - _SQUARE_HALF * s
  if shape == 'triangle':  # Apex up (-v); edge normals (0, 1) and (+-cos 30, -sin 30); apothem = R / 2.
    v = v - _TRIANGLE_SHIFT * s  # Back to the circumcentre frame.
    return np.maximum(v, 0.8660254 * np.abs(u) - 0.5 * v) - 0.5 * _TRIANGLE_RADIUS * s
  if shape == 'diamond':
    a, b = _DIAMOND_HALF[0] * s, _DIAMOND_HALF[1] * s
    return (np.abs(u) * b + np.abs(v) * a - a * b) / math.hypot(a, b)
  if shape == 'cross':
    length, width = _CROSS_HALF[0] * s, _CROSS_HALF[1] * s
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - length, av - width), np.maximum(au - width, av - length))
  if shape == 'star':
    # Fold the angle (from the upward tip) into [0, pi/5]; there the star is the triangle origin-tip-inner
    # vertex, and the edge tip -> inner vertex is the only one that matters.
    radius = _STAR_RADIUS * s
    r = np.sqrt(u * u + v * v)
    sector = 2 * math.pi / 5
    phi = np.abs(np.mod(np.arctan2(u, -v) + sector / 2, sector) - sector / 2)
    px, py = r * np.cos(phi), r * np.sin(phi)
    ex = _STAR_INNER * radius * math.cos(sector / 2) - radius
    ey = _STAR_INNER * radius * math.sin(sector / 2)
    return ((px - radius) * ey - py * ex) / math.hypot(ex, ey)
  raise ValueError(f'unknown shape {shape!r}; known: {SHAPES}')


def _extents(shape: str, s: float, angle: float) -> tuple[float, float, float, float]:
  """Exact (xmin, xmax, ymin, ymax) about its centre of `shape` of extent `s` rotated by `angle`."""
  if shape == 'circle':
    return -0.5 * s, 0.5 * s, -0.5 * s, 0.5 * s
  c, si = math.cos(angle), math.sin(angle)
  hull = _HULLS[shape]  # Pure Python: numpy's per-call overhead would dominate on 4-12 points.
  xs = [(x * c - y * si) * s for x, y in hull]
  ys = [(x * si + y * c) * s for x, y in hull]
  return min(xs), max(xs), min(ys), max(ys)


def parse_swaps(value) -> tuple[str, ...]:
  """'shape,position' (or a sequence of names) -> ('shape', 'position'); ValueError for anything else."""
  swaps = tuple(a.strip() for a in value.split(',') if a.strip()) if isinstance(value, str) else value
  if not isinstance(swaps, (tuple, list)) or not set(swaps) <= set(NEGATIVE_SWAPS):
    raise ValueError(f'negative_captions={value!r}: expected a comma-separated subset of {list(NEGATIVE_SWAPS)} '
                     '(or empty)')
  return tuple(swaps)


class SyntheticCaptions:
  """Coloured shapes with attribute captions: a deterministic, picklable Grain random-access data source.

  Each example has 1..max_objects objects (uniformly many) at distinct cells of a 3x3 grid. Object 0 carries
  the example's label / colour / shape / size / position; the caption lists all objects joined by ' and '.
  'train' never draws a pair with `is_unseen`; 'test' draws every pair uniformly, from another seed stream.

  negative_captions: attributes ('shape', 'position') whose swap makes a hard-negative caption: each example then
  also carries 'negative_caption', its caption with one of them (drawn uniformly) of object 0 swapped for another
  value: a shape seen with that colour in 'train' (never an unseen pair), or another free cell. A hard negative for
  the contrastive loss (NegCLIP, Yuksekgonul et al. 2023). A short caption swaps its shape (it names no position).
  Drawn after everything else: the other fields do not change.

  short_caption_prob: the fraction of examples whose caption is only the short phrases ('a red triangle'), the
  size and position dropped: a caption augmentation in the spirit of hybrid captions (Lai et al. 2024, several
  captions of one image at different detail). With full captions two examples of a batch rarely share colour,
  size and position, so few in-batch negatives differ by shape alone; a short caption makes every same-colour
  object of the batch such a negative. The choice is drawn after rendering: images do not change.

  captions: hybrid captions (Lai et al. 2024; jmm.data.hybrid_captions), a mapping (or 'name=ratio,...' string)
  of CAPTION_STYLES to sampling ratios: 'caption' the descriptive caption (short_caption_prob still applies to
  it), 'alt_text' AltText-like web text ('red triangle clipart', `alt_text`), 'short' the short phrases. Each
  example's 'caption' is drawn among them by ratio, and it then also carries 'caption_style' (the style drawn)
  and, when the mix names 'alt_text', 'alt_text'. The hard negative follows the style drawn: for alt text, the
  same alt text with object 0's shape swapped (its colour when the alt text names no shape); for a short caption,
  its shape. The style and the alt text come from a stream of their own, a function of (seed, split, index)
  alone, so images and every other field match the default (None: {'caption': 1}, the descriptive caption
  alone, which draws no such stream).
  """

  def __init__(self, split: str = 'train', *, resolution: int = 32, num_examples: int | None = None,
               seed: int = 0, max_objects: int = 1, short_caption_prob: float = 0.0,
               negative_captions: tuple[str, ...] = (), captions: dict[str, float] | str | None = None):
    if split not in SPLITS:
      raise ValueError(f'split={split!r}: expected one of {SPLITS}')
    if resolution < 8:
      raise ValueError(f'resolution={resolution}: need at least 8 pixels for shapes to be drawable')
    if not 1 <= max_objects <= len(POSITIONS):
      raise ValueError(f'max_objects={max_objects}: must be in [1, {len(POSITIONS)}] (one object per cell)')
    if seed < 0:
      raise ValueError(f'seed={seed}: must be non-negative')
    if not 0.0 <= short_caption_prob <= 1.0:
      raise ValueError(f'short_caption_prob={short_caption_prob}: must be in [0, 1]')
    self.short_caption_prob = float(short_caption_prob)
    self.negative_captions = parse_swaps(negative_captions)
    try:
      self.caption_mix = hybrid_captions.parse(captions) or {'caption': 1.0}
    except ValueError as e:
      raise ValueError(f'captions={captions!r}: {e}') from None
    unknown = sorted(set(self.caption_mix) - set(CAPTION_STYLES))
    if unknown:
      raise ValueError(f'captions={captions!r}: unknown caption field(s) {unknown} of the synthetic data; known: '
                       f'{list(CAPTION_STYLES)}')
    styles = [(name, ratio) for name, ratio in self.caption_mix.items() if ratio > 0]
    # The descriptive caption alone (the default) draws nothing more: not even the style stream's generator,
    # which would cost ~10% of an example's render time.
    self._plain = [name for name, _ in styles] == ['caption'] and 'alt_text' not in self.caption_mix
    total = sum(ratio for _, ratio in styles)
    self._styles = [(name, ratio / total) for name, ratio in styles]
    self.split = split
    self.resolution = int(resolution)
    self.num_examples = DEFAULT_NUM_EXAMPLES[split] if num_examples is None else int(num_examples)
    if self.num_examples <= 0:
      raise ValueError(f'num_examples={num_examples}: must be positive')
    self.seed = int(seed)
    self.max_objects = int(max_objects)
    self._split_id = SPLITS.index(split)
    self._combos = _SEEN_COMBOS if split == 'train' else _ALL_COMBOS
    self._noise = None  # Lazily built noise tile, dropped when pickled.

  def __repr__(self) -> str:
    return (f'SyntheticCaptions({self.split!r}, resolution={self.resolution}, '
            f'num_examples={self.num_examples}, seed={self.seed}, max_objects={self.max_objects}, '
            f'short_caption_prob={self.short_caption_prob}, negative_captions={self.negative_captions}'
            + ('' if self._plain else f', captions={self.caption_mix}') + ')')

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_noise'] = None
    return state

  def __len__(self) -> int:
    return self.num_examples

  def _rng(self, index: int) -> np.random.Generator:
    # The per-example stream: (seed, split, index) hashed by SeedSequence; no global state.
    return np.random.default_rng((self.seed, self._split_id, index))

  def _style_draws(self, index: int) -> tuple[str, list[float]]:
    """(the caption style of example `index`, the uniforms of its alt text) from their own stream."""
    u = hybrid_captions.stream(self.seed, self._split_id, index).random(
        1 + _ALT_GLOBAL_DRAWS + _ALT_OBJECT_DRAWS * self.max_objects).tolist()
    style, x = self._styles[-1][0], u[0]
    for name, p in self._styles:
      if x < p:
        style = name
        break
      x -= p
    return style, u[1:]

  def _check_index(self, index) -> int:
    index = int(index)
    if index < 0:
      index += self.num_examples
    if not 0 <= index < self.num_examples:
      raise IndexError(f'index {index} out of range for {self!r}')
    return index

  def _attributes(self, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Draws [(colour, shape, size, position)] for each object; the first draws of the example's stream."""
    # Uniform floats floored to categories: one generator call (rng.integers(size=k) costs ~10 us a call).
    u = rng.random(1 + 3 * self.max_objects).tolist()
    k = 1 + int(u[0] * self.max_objects)
    if k == 1:
      positions = [int(u[1] * len(POSITIONS))]
    else:  # Distinct cells, so the objects never overlap.
      positions = rng.permutation(len(POSITIONS))[:k].tolist()
    return [(*self._combos[int(u[2 + 3 * j] * len(self._combos))], int(u[3 + 3 * j] * len(SIZES)), positions[j])
            for j in range(k)]

  def _noise_tile(self) -> np.ndarray:
    # A fixed noise texture [2 res, 2 res, 3] from which each image takes a random window: per-pixel noise at
    # a fraction of the cost of drawing it afresh (which would dominate the render time).
    if self._noise is None:
      side = 2 * self.resolution
      tile = np.random.default_rng(0x5EED).normal(0.0, _NOISE_STD, (side, side, 3))
      self._noise = tile.astype(np.float32)
    return self._noise

  def _render(self, objects, rng: np.random.Generator):
    """Rasterises `objects` -> (uint8 image [res, res, 3], float32 boxes [k, 4] of (ymin, xmin, ymax, xmax))."""
    res = self.resolution
    # Python floats throughout the scalar maths: numpy scalars are several times slower per operation.
    bg = rng.random(4).tolist()
    grey = _BACKGROUND_GREY[0] + (_BACKGROUND_GREY[1] - _BACKGROUND_GREY[0]) * bg[0]
    image = np.empty((res, res, 3), np.float32)  # [H, W, 3] in [0, 255]
    image[:] = [255.0 * (grey + _BACKGROUND_TINT * (2.0 * t - 1.0)) for t in bg[1:]]
    boxes = np.zeros((len(objects), 4), np.float32)
    margin = 0.5 / res  # Keep half a pixel between an object and its cell border.
    for j, (colour, shape_idx, size, position) in enumerate(objects):
      shape = SHAPES[shape_idx]
      u = rng.random(7).tolist()
      s = _SIZE_EXTENT[size] * (1.0 + _SIZE_JITTER * (2.0 * u[0] - 1.0))
      angle = _MAX_ROTATION * (2.0 * u[1] - 1.0)
      ext = _extents(shape, s, angle)  # (xmin, xmax, ymin, ymax) about the centre
      hx, hy = max(-ext[0], ext[1]), max(-ext[2], ext[3])
      fit = (0.5 * _CELL - margin) / max(hx, hy)
      if fit < 1.0:  # The largest rotated shapes: shrink slightly so the object stays inside its cell.
        s, hx, hy, ext = s * fit, hx * fit, hy * fit, tuple(e * fit for e in ext)
      row, col = divmod(position, 3)
      cx = (col + 0.5) * _CELL + (2.0 * u[2] - 1.0) * max(0.0, 0.5 * _CELL - margin - hx)
      cy = (row + 0.5) * _CELL + (2.0 * u[3] - 1.0) * max(0.0, 0.5 * _CELL - margin - hy)
      boxes[j] = (cy + ext[2], cx + ext[0], cy + ext[3], cx + ext[1])
      hue = (_HUES[colour] + _HUE_JITTER * (2.0 * u[4] - 1.0)) / 360.0 % 1.0
      sat = _SATURATION[0] + (_SATURATION[1] - _SATURATION[0]) * u[5]
      val = _VALUE[0] + (_VALUE[1] - _VALUE[0]) * u[6]
      rgb = np.array(colorsys.hsv_to_rgb(hue, sat, val), np.float32) * 255.0  # [3]

      # The object's crop, in pixels, one pixel wider than its box for the anti-aliased rim.
      y0, y1 = max(0, int((cy + ext[2]) * res) - 1), min(res, int(math.ceil((cy + ext[3]) * res)) + 1)
      x0, x1 = max(0, int((cx + ext[0]) * res) - 1), min(res, int(math.ceil((cx + ext[1]) * res)) + 1)
      ys = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy * res)[:, None]  # [h, 1]
      xs = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx * res)[None, :]  # [1, w]
      c, si = math.cos(angle), math.sin(angle)
      # Shape frame: rotate the pixel offsets by -angle (the shape is rotated by +angle).
      uu, vv = xs * c + ys * si, ys * c - xs * si  # [h, w]
      # np.minimum/np.maximum: np.clip's dispatch overhead is several times theirs on arrays this small.
      coverage = np.minimum(np.maximum(0.5 - _sdf(shape, uu, vv, s * res), 0.0), 1.0)[..., None]  # [h, w, 1]
      crop = image[y0:y1, x0:x1]
      crop += coverage * (rgb - crop)
    oy, ox = (int(v * res) for v in rng.random(2).tolist())
    image += self._noise_tile()[oy:oy + res, ox:ox + res]
    np.maximum(image, 0.0, out=image)
    np.minimum(image, 255.0, out=image)
    return np.rint(image).astype(np.uint8), np.minimum(np.maximum(boxes, 0.0), 1.0)

  def __getitem__(self, index) -> dict:
    """Renders example `index`: image, caption, object-0 attributes, and per-object boxes and phrases."""
    index = self._check_index(index)
    rng = self._rng(index)
    objects = self._attributes(rng)
    image, boxes = self._render(objects, rng)
    padded_boxes = np.zeros((self.max_objects, 4), np.float32)  # [max_objects, 4]
    padded_boxes[:len(objects)] = boxes
    phrases = tuple(phrase(c, s, z) for c, s, z, _ in objects) + ('',) * (self.max_objects - len(objects))
    colour, shape, size, position = objects[0]
    # Drawn last (and only when asked for), so images and every other field match short_caption_prob=0.
    short = self.short_caption_prob > 0 and rng.random() < self.short_caption_prob
    extra = {}
    style, alt_u = ('caption', None) if self._plain else self._style_draws(index)
    if not self._plain:
      extra['caption_style'] = style
      if 'alt_text' in self.caption_mix:
        extra['alt_text'] = alt_text(objects, alt_u)
    short = short or style == 'short'
    render = (lambda objs: alt_text(objs, alt_u)) if style == 'alt_text' else (lambda objs: _caption(objs, short))
    caption = render(objects)
    if self.negative_captions:
      u = rng.random(2).tolist()  # Drawn whatever the style, so the main stream stays as it is.
      if style == 'alt_text':  # Alt text names no position: swap what it names of object 0.
        swap = 'shape' if alt_names_shape(alt_u) else 'colour'
      else:
        swap = 'shape' if short else self.negative_captions[int(u[0] * len(self.negative_captions))]
      if swap == 'shape':
        others = [s for s in range(len(SHAPES)) if s != shape and (colour, s) in self._combos]
        first = (colour, others[int(u[1] * len(others))], size, position)
      elif swap == 'colour':  # A colour seen with this shape in 'train', as the shape swap keeps to seen pairs.
        others = [c for c in range(len(COLOURS)) if c != colour and (c, shape) in self._combos]
        first = (others[int(u[1] * len(others))], shape, size, position)
      else:
        taken = {o[3] for o in objects}
        others = [p for p in range(len(POSITIONS)) if p not in taken]
        first = (colour, shape, size, others[int(u[1] * len(others))])
      extra['negative_caption'] = render([first, *objects[1:]])
    return dict(**extra,
        image=image,
        caption=caption,
        label=class_id(colour, shape),
        seen=not is_unseen(colour, shape),
        colour=colour, shape=shape, size=size, position=position,
        num_objects=len(objects),
        boxes=padded_boxes,
        phrases=phrases,
    )

  def captions(self, n: int) -> list[str]:
    """The first `n` captions (all if n > len), drawn without rendering: text to train a tokenizer on.

    In the `captions` mix's styles, as `__getitem__` draws them (alt text too, so a tokenizer learns its words);
    short_caption_prob is drawn after rendering, so these are the captions it would leave whole.
    """
    out = []
    for i in range(min(int(n), self.num_examples)):
      objects = self._attributes(self._rng(i))
      style, alt_u = ('caption', None) if self._plain else self._style_draws(i)
      out.append(alt_text(objects, alt_u) if style == 'alt_text' else _caption(objects, style == 'short'))
    return out
