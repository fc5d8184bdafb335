"""The few-shot probe (jmm.evaluators.fewshot) against a closed-form numpy reference, its shot sampling, and
evaluate() end to end on tiny synthetic data with a hand-made colour embedding."""
import numpy as np
import pytest

from jmm.errors import ConfigError
from jmm.evaluators import common, fewshot


def reference_scores(x_train, y_train, x_test, num_classes, l2):
  """big_vision's recipe written out: standardise with the training mean / std (+1e-5), append a constant 100,
  targets 2 * one-hot - 1, and solve (X^T X + l2 I) W = X^T Y in the primal, whatever the shapes."""
  mean, std = x_train.mean(0), x_train.std(0) + 1e-5

  def design(x):
    return np.concatenate([(x - mean) / std, np.full((len(x), 1), 100.0)], axis=1)

  a = design(x_train)
  y = 2.0 * np.eye(num_classes)[y_train] - 1.0
  w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ y)
  return design(x_test) @ w


@pytest.mark.parametrize('n, d', [(30, 4), (6, 12)])  # Primal (N >= D + 1) and dual (N < D + 1) solves.
def test_fit_matches_closed_form_reference(n, d):
  rng = np.random.default_rng(n)
  num_classes = 3
  centres = rng.normal(size=(num_classes, d))
  y_train = np.arange(n) % num_classes
  x_train = centres[y_train] + 0.8 * rng.normal(size=(n, d))
  y_test = rng.integers(0, num_classes, 40)
  x_test = centres[y_test] + 0.8 * rng.normal(size=(40, d))
  for l2 in (0.5, 2.0 ** 10):
    scores = reference_scores(x_train, y_train, x_test, num_classes, l2)
    mean, std, w, b = fewshot.fit_lsr(x_train, y_train, num_classes, l2)
    np.testing.assert_allclose((x_test - mean) / std @ w + b, scores, rtol=1e-9, atol=1e-9)
    expected = np.mean(np.argmax(scores, axis=1) == y_test)
    assert fewshot.fewshot_accuracy(x_train, y_train, x_test, y_test, num_classes, l2) == expected
    assert expected > 0.5  # The reference itself is a working classifier here, not a tie at chance.


def test_sample_shots_exactly_k_per_class_nested_and_seeded():
  labels = np.array([0] * 7 + [2] * 5 + [3] * 9)[np.random.default_rng(0).permutation(21)]  # Class 1 absent.
  a = fewshot.sample_shots(labels, 4, (1, 5), seed=3)
  for k, idx in a.items():
    assert len(set(idx.tolist())) == len(idx) == 3 * k  # Three present classes; class 1 is skipped.
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=4), [k, 0, k, k])
    np.testing.assert_array_equal(labels[idx], np.repeat([0, 2, 3], k))  # Class-major.
  assert set(a[1].tolist()) <= set(a[5].tolist())  # The 5-shot set holds the 1-shot one, as in big_vision.
  b = fewshot.sample_shots(labels, 4, (1, 5), seed=3)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  # The draw is big_vision's: one permutation of each class's indices from default_rng(seed), in class order.
  rng = np.random.default_rng(3)
  perms = [rng.permutation(np.flatnonzero(labels == c)) for c in range(4)]
  np.testing.assert_array_equal(a[5], np.concatenate([perms[0][:5], perms[2][:5], perms[3][:5]]))
  others = [fewshot.sample_shots(labels, 4, (5,), seed=s)[5] for s in range(4, 8)]
  assert any(not np.array_equal(o, a[5]) for o in others)
  with pytest.raises(ValueError, match=r'fewer than 6 training examples .*\{2: 5\}'):
    fewshot.sample_shots(labels, 4, (6,), seed=0)


ANCHORS = np.random.default_rng(0).normal(size=(32, 3))


def colour_embedding(images):
  """An oracle-ish image embedding for the synthetic data's colour: the object's chroma (its 4 pixels furthest
  from the image's median colour, which is the background), as a unit vector, through 32 fixed random RBF-like
  features so that a linear probe can cut the colour circle into classes."""
  pixels = np.asarray(images).reshape(len(images), -1, 3)
  dev = pixels - np.median(pixels, axis=1, keepdims=True)
  top = np.argsort(-np.linalg.norm(dev, axis=-1), axis=1)[:, :4]
  chroma = common.l2_normalise(np.take_along_axis(dev, top[..., None], axis=1).mean(axis=1))
  return np.exp(4.0 * chroma @ (ANCHORS / np.linalg.norm(ANCHORS, axis=1, keepdims=True)).T)


def test_evaluate_on_synthetic_colours_matches_reference():
  config = dict(type='fewshot', batch_size=16, label_key='colour', num_classes=8, shots=(1, 5), num_seeds=2,
                data=dict(name='synthetic', split='test', num_examples=64, resolution=16, seed=1),
                train_data=dict(name='synthetic', split='train', num_examples=120, resolution=16, seed=2))
  fewshot.validate(config)
  metrics = fewshot.evaluate(colour_embedding, None, None, config)
  assert set(metrics) == {'1shot', '5shot'}

  train = common.load_data(config['train_data'], fields=('image', 'label'), label_key='colour')
  test = common.load_data(config['data'], fields=('image', 'label'), label_key='colour')
  x_train = colour_embedding(common.images_to_float(train['image']))
  x_test = colour_embedding(common.images_to_float(test['image']))
  for k in (1, 5):
    accs = []
    for seed in (0, 1):
      idx = fewshot.sample_shots(train['label'], 8, (k,), seed)[k]
      scores = reference_scores(x_train[idx], train['label'][idx], x_test, 8, 2.0 ** 10)
      accs.append(np.mean(np.argmax(scores, axis=1) == test['label']))
    assert metrics[f'{k}shot'] == pytest.approx(np.mean(accs), abs=1e-12)
  assert metrics['1shot'] > 0.5 and metrics['5shot'] > 0.85  # Chance is 1/8.


@pytest.mark.parametrize('field, value, message', [
    ('shots', (0, 5), 'shots must be'),
    ('shots', (5, 5), 'shots must be'),
    ('shots', 5, 'shots must be'),
    ('l2_reg', 0.0, 'l2_reg must be a number > 0'),
    ('l2_reg', 'big', 'l2_reg must be a number > 0'),
    ('seed', -1, 'seed must be an integer >= 0'),
    ('num_seeds', 0, 'num_seeds must be a positive integer'),
    ('batch_size', 0, 'batch_size must be a positive integer'),
    ('l2', 1.0, 'l2 is a linear_probe field'),
    ('train_examples', 10, 'train_examples is set beside train_data'),
])
def test_validate_names_the_field(field, value, message):
  prefix = 'config.evals.fewshot.'
  config = dict(data=dict(name='synthetic', split='test'), train_data=dict(name='synthetic', split='train'))
  fewshot.validate(config, prefix)
  with pytest.raises(ConfigError, match=f'^{prefix}{message}'):
    fewshot.validate(dict(config, **{field: value}), prefix)
  with pytest.raises(ConfigError, match=f'^{prefix}data is not set'):
    fewshot.validate({}, prefix)
