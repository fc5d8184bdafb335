"""Tests for the procedurally generated shapes data set (jmm.data.synthetic)."""
import colorsys
import pickle

import numpy as np
import pytest

from jmm.data import synthetic as S


def _parse(caption):
  """'a small red triangle in the top left and ...' -> [(colour, shape, size, position)] as indices."""
  objects = []
  for part in caption.split(' and '):
    words = part.split(' ')
    assert words[0] == 'a' and words[4:6] == ['in', 'the'], part
    objects.append((S.COLOURS.index(words[2]), S.SHAPES.index(words[3]), S.SIZES.index(words[1]),
                    S.POSITIONS.index(' '.join(words[6:]))))
  return objects


def test_vocabulary_and_class_ids():
  assert len(S.COLOURS) >= 8 and len(set(S.COLOURS)) == len(S.COLOURS)
  assert len(S.SHAPES) >= 6 and len(S.POSITIONS) == 9 and S.SIZES == ('small', 'large')
  assert S.CLASS_NAMES[S.class_id(2, 3)] == f'{S.COLOURS[2]} {S.SHAPES[3]}'
  assert len(S.CLASS_NAMES) == len(S.COLOURS) * len(S.SHAPES)


def test_unseen_pairs_are_a_quarter_and_leave_every_colour_and_shape_seen():
  unseen = np.array([[S.is_unseen(c, s) for s in range(len(S.SHAPES))] for c in range(len(S.COLOURS))])
  assert 0.2 <= unseen.mean() <= 0.3
  assert (~unseen).any(axis=0).all() and (~unseen).any(axis=1).all()  # Each shape / colour has seen partners.
  assert unseen.any(axis=0).all()  # Every shape has an unseen colour: the test is compositional for all.


def test_same_index_same_example_different_index_different():
  a = S.SyntheticCaptions('train', resolution=32, max_objects=3)
  b = S.SyntheticCaptions('train', resolution=32, max_objects=3)
  for i in (0, 7, 123_456):
    ea, eb = a[i], b[i]
    assert np.array_equal(ea['image'], eb['image']) and ea['caption'] == eb['caption']
    assert np.array_equal(ea['boxes'], eb['boxes']) and ea['phrases'] == eb['phrases']
  assert not np.array_equal(a[0]['image'], a[1]['image'])
  other_seed = S.SyntheticCaptions('train', resolution=32, seed=1, max_objects=3)
  assert not np.array_equal(a[0]['image'], other_seed[0]['image'])
  test_split = S.SyntheticCaptions('test', resolution=32, max_objects=3)
  assert not np.array_equal(a[0]['image'], test_split[0]['image'])
  assert np.array_equal(pickle.loads(pickle.dumps(a))[5]['image'], a[5]['image'])


def test_fields_shapes_and_types():
  ds = S.SyntheticCaptions('test', resolution=40, max_objects=3)
  assert len(ds) == 2000 and len(S.SyntheticCaptions('train')) == 1_000_000
  counts = set()
  for i in range(40):
    ex = ds[i]
    assert ex['image'].shape == (40, 40, 3) and ex['image'].dtype == np.uint8
    assert ex['boxes'].shape == (3, 4) and ex['boxes'].dtype == np.float32
    k = ex['num_objects']
    counts.add(k)
    assert 1 <= k <= 3 and len(ex['phrases']) == 3
    assert all(ex['phrases'][:k]) and ex['phrases'][k:] == ('',) * (3 - k)
    assert not ex['boxes'][k:].any()
  assert counts == {1, 2, 3}
  with pytest.raises(IndexError):
    ds[2000]


def test_caption_matches_attributes():
  ds = S.SyntheticCaptions('test', resolution=32, max_objects=3)
  for i in range(60):
    ex = ds[i]
    objects = _parse(ex['caption'])
    assert len(objects) == ex['num_objects']
    assert objects[0] == (ex['colour'], ex['shape'], ex['size'], ex['position'])
    assert ex['label'] == ex['colour'] * len(S.SHAPES) + ex['shape']
    assert ex['seen'] == (not S.is_unseen(ex['colour'], ex['shape']))
    assert len({o[3] for o in objects}) == len(objects)  # Distinct cells.
    for (c, s, z, _), phrase in zip(objects, ex['phrases']):
      assert phrase == f'a {S.SIZES[z]} {S.COLOURS[c]} {S.SHAPES[s]}'
  assert ds.captions(25) == [ds[i]['caption'] for i in range(25)]


def test_boxes_cover_the_object_and_image_shows_its_colour():
  res = 48
  ds = S.SyntheticCaptions('test', resolution=res)
  for i in range(40):
    ex = ds[i]
    image = ex['image'].astype(np.float32)
    # Objects are saturated colours, the background a near-neutral grey: chroma separates them.
    mask = (image.max(-1) - image.min(-1)) > 60  # [H, W]
    ymin, xmin, ymax, xmax = ex['boxes'][0] * res
    assert 0 <= ymin < ymax <= res and 0 <= xmin < xmax <= res
    assert (ymax - ymin) >= 5 and (xmax - xmin) >= 5  # Even small shapes span several pixels.
    ys, xs = np.nonzero(mask)
    assert ys.min() >= ymin - 1.5 and ys.max() <= ymax + 0.5  # Pixel i spans [i, i + 1).
    assert xs.min() >= xmin - 1.5 and xs.max() <= xmax + 0.5
    # The mask's own box fills the stated box (tight boxes).
    mask_area = (ys.max() + 1 - ys.min()) * (xs.max() + 1 - xs.min())
    assert mask_area >= 0.6 * (ymax - ymin) * (xmax - xmin)
    row, col = divmod(ex['position'], 3)
    assert row == int((ys.mean() + 0.5) / res * 3) and col == int((xs.mean() + 0.5) / res * 3)
    hue = colorsys.rgb_to_hsv(*(image[mask].mean(0) / 255.0))[0] * 360
    diff = abs((hue - S._HUES[ex['colour']] + 180) % 360 - 180)
    assert diff < 15, (ex['caption'], hue)


def test_multi_object_boxes_do_not_overlap():
  ds = S.SyntheticCaptions('train', resolution=32, max_objects=5)
  for i in range(30):
    ex = ds[i]
    boxes = ex['boxes'][:ex['num_objects']]
    assert ((boxes >= 0) & (boxes <= 1)).all()
    for a in range(len(boxes)):
      for b in range(a + 1, len(boxes)):
        inter_h = min(boxes[a, 2], boxes[b, 2]) - max(boxes[a, 0], boxes[b, 0])
        inter_w = min(boxes[a, 3], boxes[b, 3]) - max(boxes[a, 1], boxes[b, 1])
        assert inter_h <= 0 or inter_w <= 0


def test_train_never_shows_unseen_pairs_and_test_covers_them():
  train = [o for c in S.SyntheticCaptions('train', max_objects=3).captions(1500) for o in _parse(c)]
  assert not any(S.is_unseen(c, s) for c, s, _, _ in train)
  assert len({(c, s) for c, s, _, _ in train}) == sum(
      not S.is_unseen(c, s) for c in range(len(S.COLOURS)) for s in range(len(S.SHAPES)))
  test = [_parse(c)[0] for c in S.SyntheticCaptions('test').captions(1500)]
  unseen = np.mean([S.is_unseen(c, s) for c, s, _, _ in test])
  assert 0.18 < unseen < 0.32  # Uniform over all pairs: ~25% unseen.
  assert len({(c, s) for c, s, _, _ in test}) == len(S.CLASS_NAMES)
  assert {z for _, _, z, _ in test} == {0, 1} and {p for _, _, _, p in test} == set(range(9))


def test_short_caption_augmentation_changes_only_the_caption():
  """short_caption_prob: that fraction of captions is the colour + shape phrases alone; images, labels and boxes
  are those of the plain source, and the choice is a pure function of the index (same on every call)."""
  plain = S.SyntheticCaptions('train', resolution=24, num_examples=400, seed=3, max_objects=2)
  aug = S.SyntheticCaptions('train', resolution=24, num_examples=400, seed=3, max_objects=2, short_caption_prob=0.5)
  short = 0
  for i in range(0, 400, 4):
    a, b = plain[i], aug[i]
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['boxes'], b['boxes'])
    assert (a['label'], a['phrases']) == (b['label'], b['phrases'])
    assert b['caption'] == aug[i]['caption']
    objects = [(p.split()[2], p.split()[3]) for p in a['phrases'] if p]  # 'a small red triangle'
    if b['caption'] != a['caption']:
      short += 1
      assert b['caption'] == ' and '.join(f'a {c} {s}' for c, s in objects)
  assert 35 <= short <= 65, short  # ~50 of 100.
  with pytest.raises(ValueError, match='short_caption_prob'):
    S.SyntheticCaptions('train', short_caption_prob=1.5)


def test_negative_captions_swap_one_attribute_of_object_0():
  """negative_captions: the caption with object 0's shape replaced by another shape that 'train' shows with that
  colour, or its position by another free cell; every other field is the plain source's."""
  plain = S.SyntheticCaptions('train', resolution=24, num_examples=300, seed=5, max_objects=2)
  neg = S.SyntheticCaptions('train', resolution=24, num_examples=300, seed=5, max_objects=2,
                            negative_captions=('shape', 'position'))
  shapes, swaps = set(), {'shape': 0, 'position': 0}
  for i in range(0, 300, 3):
    a, b = plain[i], neg[i]
    assert set(b) == set(a) | {'negative_caption'}
    np.testing.assert_array_equal(a['image'], b['image'])
    assert a['caption'] == b['caption'] and b['negative_caption'] == neg[i]['negative_caption']
    (c, s, z, p), *rest = _parse(a['caption'])
    (nc, ns, nz, np_), *neg_rest = _parse(b['negative_caption'])
    assert neg_rest == rest and (nc, nz) == (c, z) and (ns != s) != (np_ != p)  # Exactly one of the two.
    if ns != s:
      swaps['shape'] += 1
      assert not S.is_unseen(c, ns)
      shapes.add(ns)
    else:
      swaps['position'] += 1
      assert np_ not in {o[3] for o in rest}  # A free cell.
  assert len(shapes) >= len(S.SHAPES) - 1 and min(swaps.values()) > 30, (shapes, swaps)
  with pytest.raises(ValueError, match='negative_captions'):
    S.SyntheticCaptions('train', negative_captions=('colour',))


def test_negative_captions_shape_only():
  plain = S.SyntheticCaptions('train', resolution=24, num_examples=300, seed=5, max_objects=2)
  neg = S.SyntheticCaptions('train', resolution=24, num_examples=300, seed=5, max_objects=2, negative_captions='shape')
  shapes = set()
  for i in range(0, 300, 3):
    a, b = plain[i], neg[i]
    assert set(b) == set(a) | {'negative_caption'}
    np.testing.assert_array_equal(a['image'], b['image'])
    assert a['caption'] == b['caption'] and b['negative_caption'] == neg[i]['negative_caption']
    first, *rest = a['caption'].split(' and ')
    neg_first, *neg_rest = b['negative_caption'].split(' and ')
    assert neg_rest == rest
    words, neg_words = first.split(), neg_first.split()
    assert words[:3] + words[4:] == neg_words[:3] + neg_words[4:] and words[3] != neg_words[3]
    new_shape = S.SHAPES.index(neg_words[3])
    assert not S.is_unseen(a['colour'], new_shape)
    shapes.add(new_shape)
  assert len(shapes) == len(S.SHAPES)
