"""Start from released weights: the model, loss and input sizes of a converted checkpoint.

  python -m jmm.convert.import_weights --format=hf --src=siglip-base-patch16-224 --out=/tmp/siglip.npz
  python -m jmm.main --config=configs/pretrained.py:weights=/tmp/siglip.npz,tokenizer=DIR/spiece.model \
      --workdir=/tmp/ft

Everything else (optimizer, data, evaluators) is jmm/recipes.py's; override as usual. The tokenizer must be
the one the weights were trained with (its vocabulary size has to match the embedding table).
"""
import ml_collections

from jmm import convert
from jmm import recipes
from jmm.config import ConfigError, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, weights='', tokenizer='', data='synthetic', batch=64, steps=2000, img='tiny', txt='tiny',
                  res=0)
  if not arg.weights:
    raise ConfigError('configs/pretrained.py needs weights=FILE.npz (from python -m jmm.convert.import_weights)')
  spec = convert.read_spec(arg.weights)
  arg.res = spec['resolution']
  config = recipes.base_config(arg)
  config.model = ml_collections.ConfigDict({'name': 'two_tower', **spec['model']})
  config.data.resolution = spec['resolution']
  config.data.text_len = spec['text_len']
  for ev in config.evals.values():
    ev.text_len = spec['text_len']
    for data in (ev.get('data'), ev.get('train_data')):
      if data is not None:
        data.resolution = spec['resolution']
  config.objectives = {spec['loss']: recipes.contrastive(spec['loss'])}
  config.init_from = arg.weights
  config.tokenizer.path = arg.tokenizer
  # Released SigLIP texts are padded with eos (big_vision pad_value=1; HF SiglipTokenizer pads with '</s>').
  config.tokenizer.pad_id = 1 if spec['format'] in ('hf_siglip', 'big_vision') else 0
  return config
