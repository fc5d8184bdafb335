"""Zero-shot classification: classify images by their nearest class-prompt embedding (Radford et al. 2021).

Each class name is written into several prompt templates ('a photo of a {}.'), embedded by the text tower, and
the per-template embeddings are averaged into one class embedding (prompt ensembling). An image is assigned the
class whose embedding has the largest cosine similarity with its own.

Generic: the data set, class names and templates all come from the config (see `evaluate`). Label i of the
data is class_names[i]. Published lists ship with the package (jmm/evaluators/assets/, see its README) and are
named instead of a file: class_names='imagenet' (CLIP's 1000 ImageNet names), templates='clip80' (CLIP's 80
ImageNet templates) or 'clip_short' (the 7 of them OpenAI's forward selection kept).
"""
from __future__ import annotations

import importlib.resources
import os
from typing import Callable, Sequence

import jax
import numpy as np

from jmm.errors import ConfigError
from jmm.evaluators import common

DEFAULT_TEMPLATES = ('{}', 'a photo of a {}.')
DEFAULT_KS = (1, 5)
# Named lists: a `class_names` / `templates` string that is not an existing file and is one of these names reads
# the package's copy (jmm/evaluators/assets/), so a config need not point at a file on every machine.
NAMED_CLASS_NAMES = {'imagenet': 'imagenet_classes.txt'}
NAMED_TEMPLATES = {'clip80': 'clip_templates.txt', 'clip_short': 'clip_templates_short.txt'}


def asset_lines(filename: str) -> list[str]:
  """The non-empty lines of jmm/evaluators/assets/`filename`, read from the installed package."""
  text = importlib.resources.files('jmm.evaluators').joinpath('assets').joinpath(filename).read_text('utf-8')
  return [line for line in text.splitlines() if line.strip()]


def _lines(value, named: dict[str, str], field: str, prefix: str) -> list[str]:
  """A list, a text file (one entry per line) or, for a string that is no existing file, a named asset."""
  if isinstance(value, str) and not os.path.exists(value):
    if value in named:
      return asset_lines(named[value])
    if os.sep not in value and '.' not in value:  # A bare word: a mistyped name, not a missing file.
      raise ConfigError(f'{prefix}{field}={value!r} is neither a file nor a named list ({sorted(named)})')
  return common.read_lines(value, field, prefix)


def class_embeddings(text_emb) -> np.ndarray:
  """Averages prompt embeddings [classes, templates, D] into class embeddings [classes, D], L2-normalised.

  Each template's embedding is normalised before averaging so that no template outweighs the others by its
  norm, and the mean is renormalised so that scores against images are cosine similarities.
  """
  text_emb = np.asarray(text_emb, dtype=np.float32)
  if text_emb.ndim != 3:
    raise ValueError(f'text_emb must be [classes, templates, dim], got shape {text_emb.shape}')
  return common.l2_normalise(common.l2_normalise(text_emb).mean(axis=1))  # [classes, D]


def embed_classes(embed_texts: Callable, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                  text_len: int, batch_size: int) -> np.ndarray:
  """Class embeddings [classes, D]: every template filled with every class name, embedded and ensembled.

  Prompts are embedded class-major ([C * T] = class 0 with every template, then class 1, ...).
  Token embeddings (similarity='filip': [C * T, L, D]) cannot be averaged into one text: they come back as
  [C, T, L, D], and `zeroshot_logits` averages each class's late-interaction scores over its templates instead.
  """
  prompts = [t.format(name) for name in class_names for t in templates]  # class-major: [C * T]
  prompt_emb = common.embed_texts_in_batches(embed_texts, tokenizer, prompts, text_len, batch_size)
  if prompt_emb.ndim == 3:
    return prompt_emb.reshape(len(class_names), len(templates), *prompt_emb.shape[1:])  # [C, T, L, D]
  return class_embeddings(prompt_emb.reshape(len(class_names), len(templates), -1))  # [C, T, D] -> [C, D]


def zeroshot_logits(image_emb, class_emb) -> np.ndarray:
  """Cosine similarities [N, classes] between image embeddings [N, D] and class embeddings [classes, D].

  FILIP (token embeddings: images [N, T', D], prompts [classes, templates, L, D]): each class's score is the
  mean over its templates of FILIP's image->text late-interaction score (`common.similarities`' i2t).
  """
  if np.ndim(class_emb) == 4:
    classes, templates = class_emb.shape[:2]
    i2t, _ = common.similarities(image_emb, np.reshape(class_emb, (classes * templates, *class_emb.shape[2:])))
    return i2t.reshape(len(i2t), classes, templates).mean(axis=2)  # [N, classes]
  return np.asarray(image_emb, np.float32) @ np.asarray(class_emb, np.float32).T


def zeroshot_predictions(image_emb, class_emb) -> np.ndarray:
  """Predicted class id [N] (int32) of each image: argmax of its similarity to every class (ties: lower id)."""
  return np.argmax(zeroshot_logits(image_emb, class_emb), axis=1).astype(np.int32)


def topk_accuracy(logits, labels, k: int = 1) -> float:
  """Fraction of rows [N, classes] whose label [N] is among its k highest scores.

  Ties are broken towards the lower class id (a stable sort), the same rule as `np.argmax`, so top-1 here
  always agrees with `zeroshot_predictions`.
  """
  logits = np.asarray(logits)
  labels = np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f'logits must be [N, classes] and labels [N]; got {logits.shape} and {labels.shape}')
  topk = np.argsort(-logits, axis=1, kind='stable')[:, :k]  # [N, k]
  return float(np.mean(np.any(topk == labels[:, None], axis=1)))


def templates_from(config, default: Sequence[str] = DEFAULT_TEMPLATES, prefix: str = '') -> list[str]:
  """config.templates (a list, a text file with one per line, or a name in NAMED_TEMPLATES) or `default`; each
  must hold exactly one '{}'."""
  value = common.get(config, 'templates', None)
  templates = list(default) if value is None else _lines(value, NAMED_TEMPLATES, 'templates', prefix)
  for i, t in enumerate(templates):
    if t.count('{}') != 1:
      raise ConfigError(f"{prefix}templates[{i}]={t!r} must contain exactly one '{{}}' for the class name")
  return templates


def class_names_from(config, data, prefix: str = '') -> list[str]:
  """config.class_names (a list, a text file with one per line, or a name in NAMED_CLASS_NAMES), else the data
  set's own names if it has any."""
  value = common.get(config, 'class_names', None)
  if value is not None:
    return _lines(value, NAMED_CLASS_NAMES, 'class_names', prefix)
  names = common.known_class_names(data)
  if names is None:
    raise ConfigError(f'{prefix}class_names is not set: zero-shot on data.name={data.get("name")!r} needs the '
                      'class names (a list, or a text file with one per line; label i is class_names[i])')
  return names


def validate(config, prefix: str = '') -> None:
  """Checks the eval's fields without reading data; raises ConfigError naming the field (after `prefix`)."""
  data = common.eval_data(config, prefix)
  common.validate_data(data, 'data', prefix)
  common.check_positive_ints(config, ('batch_size', 'text_len'), prefix)
  common.check_ks(config, prefix)
  templates_from(config, prefix=prefix)
  class_names_from(config, data, prefix)


def evaluate(embed_images, embed_texts, tokenizer, config) -> dict[str, float]:
  """Zero-shot top-k accuracy over `class_names` on the images of config.data.

  Reads config fields: data (a data dict, see `common.data_with_defaults`; required), class_names (a list, a
  text file with one name per line, or 'imagenet'; label i names class_names[i]; optional only for data sets
  that name their classes themselves), templates (DEFAULT_TEMPLATES; a list, a text file with one per line, or
  'clip80' / 'clip_short'; each with one '{}'), label_key ('label'), ks ((1, 5)), batch_size (256), text_len
  (16), mean_per_class (False: also 'mean_per_class_top1', the mean of the per-class recalls, the convention
  of e.g. Oxford-IIIT Pets, Flowers-102 and FGVC-Aircraft), scores_path ('': when set, a .npz with every image's
  class scores 'scores' [N, C] (cosine similarities) and 'labels' [N]). Returns {'top1', 'top5'} (one 'top{k}'
  per k), unprefixed.
  """
  data_config = common.eval_data(config)
  batch_size = int(common.get(config, 'batch_size', 256))
  text_len = int(common.get(config, 'text_len', 16))
  ks = tuple(int(k) for k in common.get(config, 'ks', DEFAULT_KS))
  templates = templates_from(config)
  class_names = class_names_from(config, data_config)
  data = common.load_data(data_config, fields=('image', 'label'), label_key=common.get(config, 'label_key', 'label'))
  labels = np.asarray(data['label'])
  if labels.min() < 0 or labels.max() >= len(class_names):
    raise ValueError(f'zeroshot: labels lie in [{labels.min()}, {labels.max()}] but there are '
                     f'{len(class_names)} class_names')

  image_emb = common.embed_images_in_batches(embed_images, data['image'], batch_size)  # [N, D]
  class_emb = embed_classes(embed_texts, tokenizer, class_names, templates, text_len, batch_size)  # [C, D]
  logits = zeroshot_logits(image_emb, class_emb)  # [N, C]
  out = {f'top{k}': topk_accuracy(logits, labels, k) for k in ks}
  if common.get(config, 'mean_per_class', False):
    out['mean_per_class_top1'] = mean_per_class_accuracy(logits, labels)
  scores_path = common.get(config, 'scores_path', '')
  if scores_path and jax.process_index() == 0:
    save_scores(scores_path, logits, labels)
  return out


def mean_per_class_accuracy(logits, labels) -> float:
  """The mean over the classes present in `labels` of the fraction of their images predicted right."""
  hits = np.argmax(np.asarray(logits), axis=-1) == labels  # Ties: the lower class index.
  return float(np.mean([hits[labels == c].mean() for c in np.unique(labels)]))


def save_scores(path: str, logits, labels) -> None:
  """Writes {'scores': [N, C], 'labels': [N]} to `path` (a .npz), atomically."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp.npz'
  np.savez(tmp, scores=np.asarray(logits, np.float32), labels=np.asarray(labels))
  os.replace(tmp, path)
