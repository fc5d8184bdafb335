"""Start from released weights: the model, loss, input sizes and preprocessing of a converted checkpoint.

  python -m jmm.convert.import_weights --format=hf --src=siglip-base-patch16-224 --out=/tmp/siglip.npz
  python -m jmm.main --config=configs/pretrained.py:weights=/tmp/siglip.npz,tokenizer=DIR/spiece.model \
      --workdir=/tmp/ft

Everything else (optimizer, data, evaluators) is jmm/recipes.py's; override as usual. The tokenizer must be
the one the weights were trained with (its vocabulary size has to match the embedding table).
"""
from jmm import recipes
from jmm.config import ConfigError, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, weights='', tokenizer='', data='synthetic', batch=64, steps=2000, img='tiny', txt='tiny',
                  res=0)
  if not arg.weights:
    raise ConfigError('configs/pretrained.py needs weights=FILE.npz (from python -m jmm.convert.import_weights)')
  from jmm import convert  # pylint: disable=g-import-not-at-top
  arg.res = convert.read_spec(arg.weights)['resolution']
  return recipes.from_weights(recipes.base_config(arg), arg.weights, arg.tokenizer)
