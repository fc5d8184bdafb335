"""EViT (Liang et al., ICLR 2022): SigLIP training whose image tower keeps only its most attended tokens in later
blocks, fusing the rest into one token (jmm/models/evit.py); evaluation runs the same reorganisation.

The default recipe's data and towers (configs/siglip.py), with 70% of the image tokens kept in each
reorganisation block:

  python -m jmm.main --config=configs/evit.py --workdir=/tmp/evit

keep: the fraction of candidate tokens each reorganisation block keeps (0.7, the paper's DeiT-S setting; 1 = plain
SigLIP, bit for bit). layers: the reorganisation blocks, 0-based and '+'-separated (the argument string splits on
commas), or 'quarters' (the default: blocks depth/4, depth/2, 3 depth/4; the paper's 4th, 7th and 10th of 12
blocks, here 1, 2 and 3 of the tiny tower's 4), e.g.

  python -m jmm.main --config=configs/evit.py:keep=0.5,layers=1+2 --workdir=/tmp/evit50

Sizes and data as configs/siglip.py: img, txt, res, data, batch, steps. Attentiveness: the class token's attention
with pool_type 'tok'; the mean attention each token receives with 'gap' (the tiny tower) and 'map' (the variants).
"""
from jmm import recipes
from jmm.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, img='tiny', txt='tiny', res=48, data='synthetic', batch=64, steps=2000, keep=0.7,
                  layers='quarters')
  config = recipes.base_config(arg)
  # As configs/siglip.py: hard-negative captions on the embedded data (without them some seeds never learn shape).
  synthetic = arg.data == 'synthetic'
  config.data.negative_captions = 'shape' if synthetic else ''
  config.objectives = dict(sigmoid=recipes.contrastive('sigmoid', impl='dense', hard_negatives=synthetic))
  config.model.image.evit = dict(layers=arg.layers.replace('+', ','), keep_rate=arg.keep)
  return config
