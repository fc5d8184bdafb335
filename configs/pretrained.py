"""Start from released weights: the model, loss and input sizes of a converted checkpoint.

  python -m jmm.convert.import_weights --format=hf --src=siglip-base-patch16-224 --out=/tmp/siglip.npz
  python -m jmm.main --config=configs/pretrained.py:weights=/tmp/siglip.npz,tokenizer=DIR/spiece.model \
      --workdir=/tmp/ft

Everything else (optimizer, data, evaluators) is configs/common.py's; override as usual. The tokenizer must be
the one the weights were trained with (its vocabulary size has to match the embedding table).
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402
from jmm import convert  # noqa: E402
from jmm.config import ConfigError, parse_arg  # noqa: E402


def get_config(arg=None):
  arg = parse_arg(arg, weights='', tokenizer='', data='synthetic', batch=64, steps=2000, img='tiny', txt='tiny',
                  res=0)
  if not arg.weights:
    raise ConfigError('configs/pretrained.py needs weights=FILE.npz (from python -m jmm.convert.import_weights)')
  spec = convert.read_spec(arg.weights)
  arg.res = spec['resolution']
  config = common.base_config(arg)
  config.model = ml_collections.ConfigDict(spec['model'])
  config.data.resolution = spec['resolution']
  config.data.text_len = spec['text_len']
  for ev in config.evals.values():
    ev.resolution, ev.text_len = spec['resolution'], spec['text_len']
  config.loss = dict(name=spec['loss'], impl='dense')
  config.init_from = arg.weights
  config.tokenizer.path = arg.tokenizer
  # Released SigLIP texts are padded with eos (big_vision pad_value=1; HF SiglipTokenizer pads with '</s>').
  config.tokenizer.pad_id = 1 if spec['format'] in ('hf_siglip', 'big_vision') else 0
  return config
