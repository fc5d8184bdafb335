"""Config parsing and validation: bad input fails fast with a message naming the field."""
import os

import ml_collections
import pytest

from jmm import config as config_lib
from jmm.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, arg=None):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_parse_arg_types_and_errors():
  c = config_lib.parse_arg('img=B/16,res=224,flag=true', img='tiny', res=32, flag=False, lr=0.1)
  assert c.img == 'B/16' and c.res == 224 and c.flag is True and c.lr == 0.1
  with pytest.raises(ConfigError, match="unknown config argument 'imgs'"):
    config_lib.parse_arg('imgs=B', img='tiny')
  with pytest.raises(ConfigError, match='res=.*expected int'):
    config_lib.parse_arg('res=big', res=32)
  with pytest.raises(ConfigError, match='key=value'):
    config_lib.parse_arg('B/16', img='tiny')


@pytest.mark.parametrize('name', ['siglip', 'clip'])
def test_shipped_configs_validate(name):
  config = _load(name)
  config_lib.validate(config)
  assert config.loss.name == {'siglip': 'sigmoid', 'clip': 'softmax'}[name]
  big = _load(name, 'img=B/16,txt=B,res=224')
  config_lib.validate(big)
  assert big.model.image.variant == 'B/16'


def test_validate_names_the_bad_field():
  config = _load('siglip')
  with config.unlocked():
    config.model.image = ml_collections.ConfigDict({'variant': 'Q/16'})
  with pytest.raises(ConfigError, match=r"config.model.image.variant.*'Q/16'"):
    config_lib.validate(config)

  for field, value, pattern in [
      ('loss.name', 'hinge', 'config.loss.name'),
      ('optim.name', 'sgd9', 'config.optim.name'),
      ('attention_impl', 'flash9', 'config.attention_impl'),
      ('total_steps', 0, 'config.total_steps'),
      ('data.resolution', 50, 'not divisible by the patch size'),
      ('objective', 'nonexistent', "unknown objectives name 'nonexistent'"),
  ]:
    config = _load('siglip')
    node, *rest = field.split('.')
    if rest:
      config[node][rest[0]] = value
    else:
      config[node] = value
    with pytest.raises(ConfigError, match=pattern):
      config_lib.validate(config)
