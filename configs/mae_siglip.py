"""Staged MAE -> SigLIP (as Xray-Visual, 2025): the image tower pre-trained as a masked autoencoder, then
contrastive image-text training from it.

configs/siglip.py's recipe whose image tower starts from an MAE run's (configs/mae.py); the text tower, the
temperature and bias start fresh, and the MAE decoder's parameters are not read:

  python -m jmm.main --config=configs/mae.py --workdir=/tmp/mae
  python -m jmm.main --config=configs/mae_siglip.py:mae=/tmp/mae --workdir=/tmp/mae_siglip

mae: the MAE workdir (its latest checkpoint); it must have built the same image tower, so pass both runs the same
img / res arguments. The rest of the argument string is configs/siglip.py's: img, txt, res, data, batch, steps.
"""
from jmm import recipes
from jmm.config import ConfigError, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, img='tiny', txt='tiny', res=48, data='synthetic', batch=64, steps=2000, mae='/tmp/mae')
  if not arg.mae:
    raise ConfigError('configs/mae_siglip.py: mae= is empty; give the MAE workdir, e.g. mae=/tmp/mae')
  config = recipes.base_config(arg)
  synthetic = arg.data == 'synthetic'
  # configs/siglip.py's loss and hard-negative captions.
  config.data.negative_captions = 'shape' if synthetic else ''
  config.objectives = dict(sigmoid=recipes.contrastive('sigmoid', impl='dense', hard_negatives=synthetic))
  config.init_from = arg.mae
  config.init_from_towers = 'image'
  return config
