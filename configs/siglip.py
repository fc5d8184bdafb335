"""SigLIP two-tower training (sigmoid loss, Zhai et al. 2023).

Default: a tiny model on the embedded synthetic data set, about 8 minutes on a 2-core CPU:

  python -m jmm.main --config=configs/siglip.py --workdir=/tmp/siglip

Variants pick sizes and data: img/txt are 'tiny' or a ViT variant ('S', 'B/16', 'L/14', 'So400m/14'), e.g.

  python -m jmm.main --config=configs/siglip.py:img=B/16,txt=B,res=224,batch=1024,steps=100000 --workdir=DIR

and any field can be overridden: --config.optim.lr=3e-4 --config.total_steps=200.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402
from jmm.config import parse_arg  # noqa: E402


def get_config(arg=None):
  arg = parse_arg(arg, img='tiny', txt='tiny', res=48, data='synthetic', batch=64, steps=2000)
  config = common.base_config(arg)
  config.loss = dict(name='sigmoid', impl='dense')  # impl: dense | ring | bidir | gather (across devices).
  return config
