"""Region recognition on the synthetic data: classify each labelled box's object by its phrase.

Every object of a held-out multi-object image has a box and a phrase ('a small red triangle'); its region
embedding (`method`: a CLOC head's Prompter, or 'pooled' patch tokens of the image tower, the baseline any dual
encoder has; `region_embeddings`) is scored against the text embeddings of all 96 phrases the data can name
(8 colours x 6 shapes x 2 sizes), and the best one is the prediction.

Config fields: data (a synthetic data dict; default split 'test', max_objects 3, num_examples 500), method
('': the model's CLOC head if it has one, else 'pooled'), batch_size (256), text_len (16). Metrics: top1 (the
exact phrase), object_top1 (colour and shape right, size ignored), colour_top1, shape_top1, size_top1, regions
(how many boxes were scored).

Called by `run.run_evaluators` with `embed_images` replaced by the region function (EMBEDS = 'regions'):
embed_regions(images float32 [N, H, W, 3] in [-1, 1], boxes float32 [N, R, 4]) -> [N, R, D].
"""
from __future__ import annotations

import numpy as np

from jmm.errors import ConfigError
from jmm.evaluators import common

EMBEDS = 'regions'
DEFAULT_DATA = dict(name='synthetic', split='test', max_objects=3, num_examples=500)


def _phrases():
  """[(phrase, colour, shape, size)] for every phrase the synthetic data can give a box."""
  from jmm.data import synthetic  # Local import: evaluators must import without the data code built.
  return [(synthetic.phrase(c, s, z), c, s, z) for c in range(len(synthetic.COLOURS))
          for s in range(len(synthetic.SHAPES)) for z in range(len(synthetic.SIZES))]


def validate(config, prefix: str = '') -> None:
  """The data is synthetic (it has boxes and phrases), no `dims`, positive batch_size / text_len."""
  data = common.eval_data(config, prefix, DEFAULT_DATA)
  if data['name'] != 'synthetic':
    raise ConfigError(f'{prefix}data.name={data["name"]!r}: region recognition runs on the synthetic data, whose '
                      'objects have boxes and phrases')
  common.validate_data(data, 'data', prefix)
  if common.get(config, 'dims', ()):
    raise ConfigError(f'{prefix}dims: prefix widths are not supported for region embeddings')
  common.check_positive_ints(config, ('batch_size', 'text_len'), prefix)


def evaluate(embed_regions, embed_texts, tokenizer, config) -> dict[str, float]:
  """Region recognition accuracy (module docstring)."""
  from jmm.data import synthetic  # pylint: disable=g-import-not-at-top
  data = common.eval_data(config, default=DEFAULT_DATA)
  if data['name'] != 'synthetic':
    raise ConfigError(f'data.name={data["name"]!r}: region recognition needs the synthetic data')
  batch_size = int(common.get(config, 'batch_size', 256))
  text_len = int(common.get(config, 'text_len', 16))
  source = synthetic.SyntheticCaptions(data['split'], resolution=int(data['resolution']),
                                       num_examples=int(data['num_examples']), seed=int(data['seed']),
                                       max_objects=int(data['max_objects']))
  split = common.load_split(source, len(source), fields=('image', 'boxes', 'phrases'))
  images, boxes = split['image'], np.asarray(split['boxes'], np.float32)  # [N, H, W, 3] uint8, [N, R, 4]
  phrases = np.asarray(split['phrases'])  # [N, R] str, '' past the image's last object

  candidates = _phrases()
  index = {p: i for i, (p, *_) in enumerate(candidates)}
  text_emb = common.embed_texts_in_batches(embed_texts, tokenizer, [p for p, *_ in candidates], text_len,
                                           batch_size)  # [96, D]
  region_emb = []
  for start in range(0, len(images), batch_size):
    x, b = images[start:start + batch_size], boxes[start:start + batch_size]
    valid = len(x)
    if valid < batch_size:  # A jitted function sees one shape: pad with copies of the last row.
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - valid, axis=0)])
      b = np.concatenate([b, np.repeat(b[-1:], batch_size - valid, axis=0)])
    region_emb.append(np.asarray(embed_regions(common.images_to_float(x), b))[:valid])
  region_emb = np.concatenate(region_emb)  # [N, R, D]

  mask = phrases != ''
  scores = region_emb[mask] @ text_emb.T  # [regions, 96]
  pred = np.argmax(scores, axis=1)
  truth = np.array([index[p] for p in phrases[mask]])
  attrs = np.array([(c, s, z) for _, c, s, z in candidates])  # [96, 3]
  right = attrs[pred] == attrs[truth]  # [regions, 3] colour, shape, size
  return {'top1': float(np.mean(pred == truth)), 'object_top1': float(np.mean(right[:, 0] & right[:, 1])),
          'colour_top1': float(np.mean(right[:, 0])), 'shape_top1': float(np.mean(right[:, 1])),
          'size_top1': float(np.mean(right[:, 2])), 'regions': float(mask.sum())}
