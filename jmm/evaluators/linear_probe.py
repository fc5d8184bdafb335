"""Linear probe: closed-form ridge regression on frozen image embeddings, scored by top-1 accuracy.

A least-squares classifier onto one-hot targets is solved exactly (no optimiser, no learning-rate schedule to
tune), so the probe measures the embedding, not the probe's training. The L2 strength is either given
(config.l2) or picked from a small grid on a held-out slice of the probe's training examples.

On the synthetic data the probe trains on the 'train' split, where the unseen colour x shape pairs never
occur, so it cannot predict those classes: `top1` on the 'test' split is capped near the fraction of seen pairs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from absl import logging

from jmm.errors import ConfigError
from jmm.evaluators import common

DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def _ridge_solutions(features, labels, num_classes: int, l2s: Sequence[float]):
  """Yields (w [D, C], b [C]) for each L2 strength, sharing one Gram matrix of the centred features.

  The bias is not penalised, so centring X and Y removes it: w = (Xc^T Xc + l2 I)^-1 Xc^T Yc and
  b = mean(Y) - mean(X) w. With fewer examples than dimensions the same w is solved in the dual,
  Xc^T (Xc Xc^T + l2 I)^-1 Yc, an [N, N] system. For l2 = 0 it is numpy's lstsq (minimum norm if X is rank
  deficient). Linear solves on the Gram matrix are several times cheaper than an SVD of X, on a busy host.
  """
  x = np.asarray(features, np.float64)  # [N, D]
  labels = np.asarray(labels)
  if x.ndim != 2 or labels.shape != x.shape[:1] or not len(labels):
    raise ValueError(f'features must be [N, D] and labels [N] with N > 0; got {x.shape} and {labels.shape}')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'labels must lie in [0, {num_classes})')
  y = np.eye(num_classes)[labels]  # [N, C] one-hot targets
  x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
  xc, yc = x - x_mean, y - y_mean
  n, d = xc.shape
  primal = n >= d
  gram = xc.T @ xc if primal else xc @ xc.T  # [D, D] or [N, N]
  rhs = xc.T @ yc if primal else yc  # [D, C] or [N, C]
  for l2 in l2s:
    if l2 < 0:
      raise ValueError(f'l2 must be >= 0, got {l2}')
    if l2 == 0:
      w = np.linalg.lstsq(xc, yc, rcond=None)[0]
    else:
      solution = np.linalg.solve(gram + l2 * np.eye(gram.shape[0]), rhs)
      w = solution if primal else xc.T @ solution
    yield w, y_mean - x_mean @ w


def fit_ridge(features, labels, num_classes: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
  """Ridge regression of one-hot labels on features [N, D] with an unpenalised bias -> (w [D, C], b [C]).

  Minimises ||X w + b - Y||^2 + l2 ||w||^2. With l2 = 0 it equals numpy's lstsq on [X, 1] (minimum norm when
  X is rank deficient).
  """
  return next(_ridge_solutions(features, labels, num_classes, [float(l2)]))


def ridge_predict(w, b, features) -> np.ndarray:
  """Predicted class [N] (int32): argmax of the probe's scores features [N, D] @ w [D, C] + b [C]."""
  return np.argmax(np.asarray(features, np.float64) @ w + b, axis=1).astype(np.int32)


def select_l2(features, labels, num_classes: int, grid: Sequence[float] = DEFAULT_L2_GRID,
              holdout_fraction: float = 0.2, seed: int = 0) -> float:
  """Picks the L2 strength from `grid` with the best accuracy on a random held-out slice of the examples.

  Ties go to the larger strength: with separable data many values score the same, and the more regularised
  probe is the one that generalises. The slice is random (fixed by `seed`) so ordered sources stay fair.
  """
  features = np.asarray(features)
  labels = np.asarray(labels)
  n = features.shape[0]
  num_holdout = int(round(n * holdout_fraction))
  if not 0 < num_holdout < n:
    raise ValueError(f'holdout_fraction={holdout_fraction} of {n} examples leaves an empty fit or held-out set')
  perm = np.random.default_rng(seed).permutation(n)
  fit_idx, val_idx = perm[num_holdout:], perm[:num_holdout]
  grid = sorted((float(g) for g in grid), reverse=True)
  best_l2, best_acc = grid[0], -1.0
  for l2, (w, b) in zip(grid, _ridge_solutions(features[fit_idx], labels[fit_idx], num_classes, grid)):
    acc = float(np.mean(ridge_predict(w, b, features[val_idx]) == labels[val_idx]))
    if acc > best_acc:
      best_l2, best_acc = l2, acc
  return best_l2


def _train_data(config) -> dict:
  """config.train_data, or config.data with split='train' and num_examples=train_examples (2000)."""
  train_data = common.get(config, 'train_data', None)
  if train_data is not None:
    return common.data_with_defaults(train_data)
  return common.data_with_defaults(common.eval_data(config), split='train',
                                   num_examples=int(common.get(config, 'train_examples', 2000)))


def load_train_and_test(config, evaluator: str):
  """A probe's examples: (train_images, y_train [N], test_images, y_test [M], num_classes); images uint8.

  Reads config.data (the test examples), train_data (see `_train_data`), label_key ('label') and num_classes
  (the test data's own class count if it has one, else max label + 1 over train and test). Shared with
  `fewshot`, which embeds only the training images it samples.
  """
  label_key = common.get(config, 'label_key', 'label')
  train = common.load_data(_train_data(config), fields=('image', 'label'), label_key=label_key)
  test_config = common.eval_data(config)
  test = common.load_data(test_config, fields=('image', 'label'), label_key=label_key)
  y_train, y_test = np.asarray(train['label']), np.asarray(test['label'])
  known = common.known_class_names(test_config) if label_key == 'label' else None
  num_classes = int(common.get(config, 'num_classes',
                               len(known) if known else max(y_train.max(), y_test.max()) + 1))
  if min(y_train.min(), y_test.min()) < 0 or max(y_train.max(), y_test.max()) >= num_classes:
    raise ValueError(f'{evaluator}: labels must lie in [0, num_classes={num_classes})')
  return train['image'], y_train, test['image'], y_test, num_classes


def validate_train_and_test_data(config, prefix: str = '') -> None:
  """Checks `data` and `train_data` (or its default) of a probe, the linear one or `fewshot`; ConfigError."""
  data = common.eval_data(config, prefix)
  common.validate_data(data, 'data', prefix)
  if common.get(config, 'train_data', None) is None and data['name'] not in ('synthetic', 'tfds'):
    raise ConfigError(f'{prefix}train_data is not set: for data.name={data.get("name")!r} the split does not '
                      'choose files, so the probe would train on its test files; give train_data=dict(...)')
  if common.get(config, 'train_data', None) is not None and common.get(config, 'train_examples', None) is not None:
    raise ConfigError(f'{prefix}train_examples is set beside train_data, where it would be ignored: set '
                      f'{prefix}train_data.num_examples instead')
  common.validate_data(_train_data(config), 'train_data', prefix)
  common.check_positive_ints(config, ('batch_size', 'train_examples', 'num_classes'), prefix)


def validate(config, prefix: str = '') -> None:
  """Checks the eval's fields without reading data; raises ConfigError naming the field (after `prefix`)."""
  validate_train_and_test_data(config, prefix)
  l2 = common.get(config, 'l2', None)
  if l2 is not None and (not isinstance(l2, (int, float)) or l2 < 0):
    raise ConfigError(f'{prefix}l2 must be a number >= 0 (or None: choose from l2_grid), got {l2!r}')
  grid = common.get(config, 'l2_grid', DEFAULT_L2_GRID)
  if not isinstance(grid, (list, tuple)) or not grid or not all(
      isinstance(g, (int, float)) and g >= 0 for g in grid):
    raise ConfigError(f'{prefix}l2_grid must be a non-empty list of numbers >= 0, got {grid!r}')
  fraction = common.get(config, 'holdout_fraction', 0.2)
  if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
    raise ConfigError(f'{prefix}holdout_fraction must lie in (0, 1), got {fraction!r}')


def evaluate(embed_images, embed_texts, tokenizer, config) -> dict[str, float]:
  """Linear-probe top-1 accuracy: fit on the images of config.train_data, score on those of config.data.

  Reads config fields: data (a data dict, see `common.data_with_defaults`; required: the test examples),
  train_data (a data dict; default: data with split='train' and num_examples=train_examples (2000)),
  label_key ('label'), num_classes (the data set's own class count if it has one, else max label + 1 over
  train and test), batch_size (256), l2 (None: choose from l2_grid (DEFAULT_L2_GRID) on holdout_fraction (0.2)
  of the training examples, a random slice drawn with seed (default: train_data.seed)). Returns {'top1'},
  unprefixed. The text tower and tokenizer are not used.
  """
  del embed_texts, tokenizer  # The probe reads image embeddings only.
  seed = int(common.get(config, 'seed', _train_data(config).get('seed', 0)))
  train_images, y_train, test_images, y_test, num_classes = load_train_and_test(config, 'linear_probe')
  batch_size = int(common.get(config, 'batch_size', 256))
  x_train = common.embed_images_in_batches(embed_images, train_images, batch_size)  # [N_train, D]
  x_test = common.embed_images_in_batches(embed_images, test_images, batch_size)  # [N_test, D]
  l2 = common.get(config, 'l2', None)
  if l2 is None:
    l2 = select_l2(x_train, y_train, num_classes, common.get(config, 'l2_grid', DEFAULT_L2_GRID),
                   float(common.get(config, 'holdout_fraction', 0.2)), seed)
    logging.info('linear_probe: chose l2=%g on a held-out slice of %d training examples', l2, len(x_train))
  w, b = fit_ridge(x_train, y_train, num_classes, float(l2))
  return {'top1': float(np.mean(ridge_predict(w, b, x_test) == y_test))}
