"""Few-shot probe: k training images per class, closed-form regularised least squares on frozen image embeddings.

The convention of big_vision's few-shot evaluator (google-research/big_vision, big_vision/evaluators/
fewshot_lsr.py, with the defaults of big_vision/configs/common_fewshot.py), which the ViT / LiT / SigLIP papers
report, so numbers read alike:
- shots (1, 5, 10, 25): each class's training indices are permuted once with a generator seeded by `seed`, and
  the first k of them taken, so the 5-shot set holds the 1-shot set (same draws as big_vision's for the same
  labels in the same order);
- features standardised with the mean and standard deviation (+1e-5) of the k * C sampled examples;
- a constant feature of 100 appended as the bias (so it is barely regularised), targets 2 * one-hot - 1;
- W = (X^T X + l2 I)^-1 X^T Y, solved in the dual X^T (X X^T + l2 I)^-1 Y when there are fewer examples than
  features; the prediction is the argmax of the scores; the metric is top-1 accuracy on the test set.
- L2: big_vision does not select it. Its solver is written to sweep strengths cheaply, but the evaluator uses
  one fixed l2_reg (2^10 in common_fewshot.py) for every data set and shot count. So does this one: picking it
  on the test set would leak, and a 1-shot training set has no examples to hold out.
- big_vision repeats seeds 0, 1, 2 and logs each; here num_seeds (1) draws with seed, seed + 1, ... and reports
  the mean.

A class with no training example at all (the synthetic data's unseen colour x shape pairs never occur in its
'train' split) is left out of the fit, as in big_vision, and can then never be predicted; a class with some
examples but fewer than k is an error, since the '{k}shot' number would not be k-shot.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from absl import logging

from jmm.errors import ConfigError
from jmm.evaluators import common, linear_probe

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2_REG = 2.0 ** 10  # big_vision's common_fewshot.py.
BIAS_FEATURE = 100.0  # The constant feature that carries the bias; large, so l2 barely shrinks the bias.
STD_EPS = 1e-5  # Added to each feature's standard deviation: a constant feature would divide by zero.
LINEAR_PROBE_FIELDS = ('l2', 'l2_grid', 'holdout_fraction')  # linear_probe's, silently unused here.


def sample_shots(labels, num_classes: int, shots: Sequence[int], seed: int) -> dict[int, np.ndarray]:
  """Training indices for each shot count k: the first k of each class's indices, permuted with `seed`.

  Returns {k: int [k * present classes]}, class-major. Classes absent from `labels` are skipped; a class with
  fewer than k examples raises ValueError.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
  out = {}
  for k in shots:
    short = {c: len(idx) for c, idx in enumerate(per_class) if 0 < len(idx) < k}
    if short:
      raise ValueError(f'fewshot: {len(short)} classes have fewer than {k} training examples (class: count '
                       f'{dict(list(short.items())[:8])}); give train_data more examples or drop {k} from shots')
    out[int(k)] = np.concatenate([idx[:k] for idx in per_class if len(idx)]).astype(np.int64)
  return out


def fit_lsr(features, labels, num_classes: int, l2: float):
  """Regularised least squares onto 2 * one-hot - 1 of standardised features [N, D] plus a bias feature.

  Returns (mean [D], std [D], w [D, C], b [C]): scores of new features x are ((x - mean) / std) @ w + b.
  """
  x = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  if x.ndim != 2 or labels.shape != x.shape[:1] or not len(labels):
    raise ValueError(f'features must be [N, D] and labels [N] with N > 0; got {x.shape} and {labels.shape}')
  if l2 <= 0:
    raise ValueError(f'l2 must be > 0, got {l2}')
  mean, std = x.mean(axis=0), x.std(axis=0) + STD_EPS
  x = np.concatenate([(x - mean) / std, np.full((len(x), 1), BIAS_FEATURE)], axis=1)  # [N, D + 1]
  y = 2.0 * np.eye(num_classes)[labels] - 1.0  # [N, C]
  n, d = x.shape
  if n >= d:
    w = np.linalg.solve(x.T @ x + l2 * np.eye(d), x.T @ y)  # [D + 1, C]
  else:  # The dual: an [N, N] system, far smaller with few shots and wide embeddings.
    w = x.T @ np.linalg.solve(x @ x.T + l2 * np.eye(n), y)
  return mean, std, w[:-1], BIAS_FEATURE * w[-1]


def fewshot_accuracy(x_train, y_train, x_test, y_test, num_classes: int, l2: float) -> float:
  """Top-1 accuracy on (x_test, y_test) of the probe `fit_lsr` fits on (x_train, y_train)."""
  mean, std, w, b = fit_lsr(x_train, y_train, num_classes, l2)
  pred = linear_probe.ridge_predict(w, b, (np.asarray(x_test, np.float64) - mean) / std)
  return float(np.mean(pred == np.asarray(y_test)))


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def validate(config, prefix: str = '') -> None:
  """Checks the eval's fields without reading data; raises ConfigError naming the field (after `prefix`)."""
  linear_probe.validate_train_and_test_data(config, prefix)
  common.check_positive_ints(config, ('num_seeds',), prefix)
  shots = common.get(config, 'shots', DEFAULT_SHOTS)
  if (not isinstance(shots, (list, tuple)) or not shots or not all(_is_int(k) and k > 0 for k in shots)
      or len(set(shots)) != len(shots)):
    raise ConfigError(f'{prefix}shots must be a non-empty list of distinct positive integers (examples per '
                      f'class), got {shots!r}')
  l2 = common.get(config, 'l2_reg', DEFAULT_L2_REG)
  if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 > 0:
    raise ConfigError(f'{prefix}l2_reg must be a number > 0 (default 2**10, as big_vision), got {l2!r}')
  seed = common.get(config, 'seed', 0)
  if not _is_int(seed) or seed < 0:
    raise ConfigError(f'{prefix}seed must be an integer >= 0, got {seed!r}')
  for name in LINEAR_PROBE_FIELDS:
    if common.get(config, name, None) is not None:
      raise ConfigError(f'{prefix}{name} is a linear_probe field; fewshot fits with one fixed l2_reg (as '
                        'big_vision) and would ignore it')


def evaluate(embed_images, embed_texts, tokenizer, config) -> dict[str, float]:
  """Few-shot top-1 accuracy for each shot count: fit on k images per class of train_data, score on data.

  Reads config fields: data (a data dict, see `common.data_with_defaults`; required: the test examples),
  train_data (a data dict; default: data with split='train' and num_examples=train_examples (2000)),
  label_key ('label'), num_classes (the data set's own class count if it has one, else max label + 1 over
  train and test), shots (DEFAULT_SHOTS), l2_reg (DEFAULT_L2_REG), seed (0), num_seeds (1), batch_size (256).
  Returns {'1shot', '5shot', ...} (one '{k}shot' per k, the mean over seeds), unprefixed. Only the sampled
  training images are embedded. The text tower and tokenizer are not used.
  """
  del embed_texts, tokenizer  # The probe reads image embeddings only.
  shots = tuple(int(k) for k in common.get(config, 'shots', DEFAULT_SHOTS))
  l2 = float(common.get(config, 'l2_reg', DEFAULT_L2_REG))
  seed = int(common.get(config, 'seed', 0))
  seeds = range(seed, seed + int(common.get(config, 'num_seeds', 1)))
  batch_size = int(common.get(config, 'batch_size', 256))
  train_images, y_train, test_images, y_test, num_classes = linear_probe.load_train_and_test(config, 'fewshot')
  absent = num_classes - len(np.unique(y_train))
  if absent:
    logging.warning('fewshot: %d of %d classes have no training example; the probe cannot predict them',
                    absent, num_classes)

  samples = {s: sample_shots(y_train, num_classes, shots, s) for s in seeds}
  needed = np.unique(np.concatenate([idx for per_shot in samples.values() for idx in per_shot.values()]))
  x_needed = common.embed_images_in_batches(embed_images, train_images[needed], batch_size)  # [N_needed, D]
  x_test = common.embed_images_in_batches(embed_images, test_images, batch_size)  # [N_test, D]
  accs = {k: [] for k in shots}
  for per_shot in samples.values():
    for k, idx in per_shot.items():
      rows = np.searchsorted(needed, idx)  # Positions of the sampled examples among the embedded ones.
      accs[k].append(fewshot_accuracy(x_needed[rows], y_train[idx], x_test, y_test, num_classes, l2))
  return {f'{k}shot': float(np.mean(v)) for k, v in accs.items()}
