"""Config parsing and validation: bad input fails fast with a message naming the field."""
import os

import ml_collections
import pytest

from jmm import config as config_lib
from jmm import validation
from jmm.errors import ConfigError

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


@pytest.mark.parametrize('name', ['siglip', 'clip', 'clip_up', 'hybrid'])
def test_shipped_configs_validate(name):
  config = _load(name)
  terms = validation.validate(config)
  want = {'siglip': ['sigmoid'], 'clip': ['softmax'], 'clip_up': ['sigmoid', 'moe'], 'hybrid': ['sigmoid']}[name]
  assert sorted(t.config.get('loss', t.name) for t in terms) == sorted(want)
  big = _load(name, 'img=B/16,txt=B,res=224')
  validation.validate(big)
  assert big.model.image.variant == 'B/16'


def test_configs_import_only_jmm():
  """A recipe file works from any folder: it reaches its shared parts through the installed package."""
  for name in os.listdir(os.path.join(ROOT, 'configs')):
    if name.endswith('.py') and name != '__init__.py':
      text = open(os.path.join(ROOT, 'configs', name)).read()
      assert 'sys.path' not in text and 'from configs' not in text, name


def test_validate_names_the_bad_field():
  config = _load('siglip')
  with config.unlocked():
    config.model.image = ml_collections.ConfigDict({'variant': 'Q/16'})
  with pytest.raises(ConfigError, match=r"config.model.image.variant.*'Q/16'"):
    validation.validate(config)

  for field, value, pattern in [
      ('objectives.sigmoid.loss', 'hinge', r"config.objectives.sigmoid: loss='hinge'"),
      ('objectives.sigmoid.impl', 'ring9', r"config.objectives.sigmoid: impl='ring9'"),
      ('objectives.sigmoid.type', 'nonexistent', "unknown objectives name 'nonexistent'"),
      ('objectives.sigmoid.weight', -1.0, 'config.objectives.sigmoid.weight'),
      ('optim.name', 'sgd9', 'config.optim.name'),
      ('optim.schedule', 'step9', 'config.optim.schedule'),
      ('attention_impl', 'flash9', 'config.attention_impl'),
      ('total_steps', 0, 'config.total_steps'),
      ('max_nonfinite_steps', 0, 'config.max_nonfinite_steps'),
      ('data.resolution', 50, 'not divisible by the patch size'),
      ('data.name', 'parquet9', 'config.data.name'),
      ('data.negative_captions', 'colour', 'config.data.negative_captions'),
      ('data.short_caption_prob', 1.5, 'config.data.short_caption_prob'),
      ('model.name', 'nonexistent', "unknown models name 'nonexistent'"),
      ('evals.zeroshot.type', 'nonexistent', "unknown evaluators name 'nonexistent'"),
      ('evals.zeroshot.every', -5, 'config.evals.zeroshot.every'),
  ]:
    config = _load('siglip')
    *path, last = field.split('.')
    node = config
    for part in path:
      node = node[part]
    with config.unlocked():
      node[last] = value
    with pytest.raises(ConfigError, match=pattern):
      validation.validate(config)


def test_caption_augmentations_are_synthetic_only_and_hard_negatives_dense_only():
  config = _load('siglip')
  config.data.negative_captions = 'shape'
  config.objectives.sigmoid.hard_negatives = True
  validation.validate(config)
  config.objectives.sigmoid.impl = 'ring'
  with pytest.raises(ConfigError, match="hard_negatives=True needs impl='dense'"):
    validation.validate(config)
  config.objectives.sigmoid.impl = 'dense'
  config.data.name = 'webdataset'
  with pytest.raises(ConfigError, match=r'synthetic-data caption augmentations.*configs/siglip.py:data=webdataset'):
    validation.validate(config)


def test_old_loss_fields_get_a_pointer_to_objectives():
  config = _load('siglip')
  with config.unlocked():
    del config['objectives']
    config.loss = dict(name='sigmoid')
  with pytest.raises(ConfigError, match='config.objectives'):
    validation.validate(config)


def test_moe_needs_its_auxiliary_objective():
  config = _load('clip_up')
  with config.unlocked():
    del config.objectives['moe']
  with pytest.raises(ConfigError, match="config.objectives.moe = dict\\(type='moe'"):
    validation.validate(config)


def test_objective_batch_fields_are_checked_against_the_data(tmp_path, monkeypatch):
  """An objective that needs a field the pipeline does not yield fails before training, naming both."""
  (tmp_path / 'my_objectives').mkdir()
  (tmp_path / 'my_objectives' / '__init__.py').write_text('')
  module = tmp_path / 'my_objectives' / 'needs_masks.py'
  module.write_text('def batch_fields(config):\n  return ("patch_masks",)\n\n'
                    'def loss(outputs, batch, config):\n  return 0.0, {}\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  config = _load('siglip')
  with config.unlocked():
    config.objectives.extra = dict(type='my_objectives.needs_masks', weight=1.0)
  with pytest.raises(ConfigError, match=r"config.objectives.extra needs batch fields \['patch_masks'\]"):
    validation.validate(config)
  with config.unlocked():
    config.objectives.extra.type = 'my_objectives.boxes'
  (tmp_path / 'my_objectives' / 'boxes.py').write_text('def batch_fields(config):\n  return ("boxes",)\n\n'
                                                       'def loss(outputs, batch, config):\n  return 0.0, {}\n')
  validation.validate(config)  # The synthetic data yields per-object boxes.
