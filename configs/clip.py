"""CLIP two-tower training (softmax contrastive loss, Radford et al. 2021): the SigLIP recipe, other loss.

  python -m jmm.main --config=configs/clip.py --workdir=/tmp/clip
  python -m jmm.main --config=configs/clip.py:img=B/16,txt=B,res=224,batch=1024 --workdir=DIR
"""
import math
from jmm import recipes
from jmm.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, img='tiny', txt='tiny', res=48, data='synthetic', batch=64, steps=2000)
  config = recipes.base_config(arg)
  config.objectives = dict(softmax=recipes.contrastive('softmax', impl='dense'))  # impl: dense | gather.
  config.model.temperature_init = math.log(1 / 0.07)  # CLIP paper: logit scale initialised to 1/0.07.
  config.model.bias_init = 0.0  # The softmax loss ignores the bias.
  return config
