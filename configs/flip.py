"""FLIP (Li et al. 2023): SigLIP training on a random subset of each image's patches; evaluation sees them all.

The default recipe's data and towers (configs/siglip.py) with half of every image's patches dropped before the
image encoder, about 6 minutes on a 2-core CPU:

  python -m jmm.main --config=configs/flip.py --workdir=/tmp/flip

mask: the fraction of patches dropped (0.5; 0.75 as in the paper's fastest setting; 0 = plain SigLIP);
unmasked: the last N steps see every patch (the paper's unmasked tuning), e.g.

  python -m jmm.main --config=configs/flip.py:mask=0.75,unmasked=200 --workdir=/tmp/flip75

Sizes and data as configs/siglip.py: img, txt, res, data, batch, steps.
"""
from jmm import recipes
from jmm.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, img='tiny', txt='tiny', res=48, data='synthetic', batch=64, steps=2000, mask=0.5, unmasked=0)
  config = recipes.base_config(arg)
  # As configs/siglip.py: hard-negative captions on the embedded data (without them some seeds never learn shape).
  synthetic = arg.data == 'synthetic'
  config.data.negative_captions = 'shape' if synthetic else ''
  config.objectives = dict(flip=recipes.flip(config, mask_ratio=arg.mask, unmasked_steps=arg.unmasked,
                                             loss='sigmoid', impl='dense', hard_negatives=synthetic))
  return config
