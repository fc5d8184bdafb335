"""SigLIP two-tower training (sigmoid loss, Zhai et al. 2023).

Default: a tiny model on the embedded synthetic data set, about 6 minutes on a 2-core CPU:

  python -m jmm.main --config=configs/siglip.py --workdir=/tmp/siglip

Variants pick sizes and data: img/txt are 'tiny' or a ViT variant ('S', 'B/16', 'L/14', 'So400m/14'), e.g.

  python -m jmm.main --config=configs/siglip.py:img=B/16,txt=B,res=224,batch=1024,steps=100000 --workdir=DIR

and any field can be overridden: --config.optim.lr=3e-4 --config.total_steps=200.
"""
from jmm import recipes
from jmm.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, img='tiny', txt='tiny', res=48, data='synthetic', batch=64, steps=2000)
  config = recipes.base_config(arg)
  # impl: how the loss is computed across devices, dense | ring | bidir | gather (jmm/objectives/contrastive.py).
  # On the embedded data, each caption also comes with a hard negative (its shape swapped) that the loss scores
  # against every image (NegCLIP): without it some seeds never learn shape (benchmarks/NOTES.md 2026-12-03).
  synthetic = arg.data == 'synthetic'
  config.data.negative_captions = 'shape' if synthetic else ''
  config.objectives = dict(sigmoid=recipes.contrastive('sigmoid', impl='dense', hard_negatives=synthetic))
  return config
