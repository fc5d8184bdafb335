"""CLIP two-tower training (softmax contrastive loss, Radford et al. 2021): the SigLIP recipe, other loss.

  python -m jmm.main --config=configs/clip.py --workdir=/tmp/clip
  python -m jmm.main --config=configs/clip.py:img=B/16,txt=B,res=224,batch=1024 --workdir=DIR
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402
from jmm.config import parse_arg  # noqa: E402


def get_config(arg=None):
  arg = parse_arg(arg, img='tiny', txt='tiny', res=48, data='synthetic', batch=64, steps=2000)
  config = common.base_config(arg)
  config.loss = dict(name='softmax', impl='dense')  # impl: dense | gather (across devices).
  config.model.temperature_init = math.log(1 / 0.07)  # CLIP paper: logit scale initialised to 1/0.07.
  config.model.bias_init = 0.0  # The softmax loss ignores the bias.
  return config
