"""Tests for the Grain input pipeline (jmm.data.pipeline): batches, determinism, sharding, exact resumption."""
import json

import numpy as np
import pytest

from jmm.data import pipeline
from jmm.data import synthetic
from jmm.data import tokenizer as T

TEXT_LEN = 12


@pytest.fixture(scope='module')
def source():
  return synthetic.SyntheticCaptions('train', resolution=16, num_examples=50)


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  sentences = synthetic.SyntheticCaptions('train').captions(1000)
  return T.train_tokenizer(sentences, str(tmp_path_factory.mktemp('tok') / 'sp.model'), 128)


class _IndexSource:
  """A tiny source whose label is the example's own index: shows which examples a batch holds."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return dict(image=np.full((2, 2, 3), i % 256, np.uint8), caption='a small red circle in the top', label=i,
                seen=True)


def _iterator(source, tok, **kw):
  kw = {'batch_size': 8, 'text_len': TEXT_LEN, 'seed': 3, **kw}
  return pipeline.train_iterator(source, tok, **kw)


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_batch_shapes_types_and_content(source, tok):
  batch = next(_iterator(source, tok))
  assert batch['image'].shape == (8, 16, 16, 3) and batch['image'].dtype == np.float32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0 and batch['image'].std() > 0.05
  assert batch['text'].shape == (8, TEXT_LEN) and batch['text'].dtype == np.int32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert batch['seen'].dtype == np.bool_ and batch['seen'].all()  # The train split is all seen pairs.
  assert batch['boxes'].shape == (8, 1, 4) and batch['boxes'].dtype == np.float32
  for k in ('colour', 'shape', 'size', 'position', 'num_objects'):
    assert batch[k].shape == (8,) and batch[k].dtype == np.int32
  assert 'caption' not in batch and 'phrases' not in batch  # Strings never reach the model.
  # Each row's tokens say the row's own attributes (the fields were not shuffled apart).
  for text, colour, shape in zip(tok.decode(batch['text']), batch['colour'], batch['shape']):
    assert f'{synthetic.COLOURS[colour]} {synthetic.SHAPES[shape]}' in text
  # The image is the source's, mapped to [-1, 1].
  position = int(np.argmax([np.array_equal(
      source[i]['image'].astype(np.float32) / 127.5 - 1.0, batch['image'][0]) for i in range(len(source))]))
  assert np.array_equal(source[position]['image'].astype(np.float32) / 127.5 - 1.0, batch['image'][0])


def test_same_seed_same_batches_other_seed_other_order(source, tok):
  a, b = _iterator(source, tok), _iterator(source, tok)
  for _ in range(3):
    _assert_same(next(a), next(b))
  c = _iterator(source, tok, seed=4)
  assert not np.array_equal(next(_iterator(source, tok))['label'], next(c)['label'])


def test_resume_from_state_is_exact(source, tok):
  it = _iterator(source, tok)
  for _ in range(4):  # 32 examples: the 7 batches below cross the end of the 50-example epoch.
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # Must survive JSON (the checkpoint stores it so).
  expected = [next(it) for _ in range(7)]
  fresh = _iterator(source, tok)
  fresh.set_state(state)
  for want in expected:
    _assert_same(next(fresh), want)


def test_epochs_shuffle_differently_and_cover_every_example(tok):
  source = _IndexSource(40)
  it = _iterator(source, tok, batch_size=10, num_epochs=2)
  labels = np.concatenate([b['label'] for b in it])
  assert labels.shape == (80,)
  assert sorted(labels[:40]) == list(range(40)) and sorted(labels[40:]) == list(range(40))
  assert not np.array_equal(labels[:40], labels[40:]) and not np.array_equal(labels[:40], np.arange(40))
  ordered = np.concatenate([b['label'] for b in _iterator(source, tok, batch_size=10, num_epochs=1,
                                                          shuffle=False)])
  assert np.array_equal(ordered, np.arange(40))


def test_shards_are_disjoint_and_complete(tok):
  source = _IndexSource(30)
  seen = []
  for shard in range(3):
    it = _iterator(source, tok, batch_size=5, num_epochs=1, shard_index=shard, shard_count=3)
    seen.append(np.concatenate([b['label'] for b in it]))
  assert all(len(s) == 10 for s in seen)
  assert sorted(np.concatenate(seen)) == list(range(30))


def test_drop_remainder_and_bad_arguments(tok):
  source = _IndexSource(23)
  assert len(list(_iterator(source, tok, batch_size=5, num_epochs=1))) == 4
  sizes = [len(b['label']) for b in _iterator(source, tok, batch_size=5, num_epochs=1, drop_remainder=False)]
  assert sizes == [5, 5, 5, 5, 3]
  with pytest.raises(ValueError, match='shard_index'):
    pipeline.make_dataset(source, tok, batch_size=5, text_len=4, seed=0, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match='batch_size'):
    pipeline.make_dataset(source, tok, batch_size=0, text_len=4, seed=0)


def test_two_worker_processes_give_the_same_batches_and_resume(tok):
  """Fails if Grain worker processes change the batches or their order, or their state does not resume exactly."""
  source = _IndexSource(30)  # Labels name the examples; 7 batches of 5 cross the end of the first epoch.
  kw = dict(batch_size=5, shard_index=1, shard_count=2, split_batches=True)  # This process's rows, as trained.
  expected = [next(it) for it in [_iterator(source, tok, **kw)] for _ in range(7)]
  it = _iterator(source, tok, worker_count=2, **kw)
  try:
    got = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))  # Per-worker state; must survive JSON too.
  finally:
    it.close()
  resumed = _iterator(source, tok, worker_count=2, **kw)
  try:
    resumed.set_state(state)
    got += [next(resumed) for _ in range(4)]
  finally:
    resumed.close()
  for want, batch in zip(expected, got):
    _assert_same(batch, want)
