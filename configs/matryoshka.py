"""Matryoshka SigLIP (Kusupati et al., NeurIPS 2022): the sigmoid loss on nested prefixes of the embeddings.

The default SigLIP recipe (configs/siglip.py) with the loss averaged over the first 16, 32, 64 and all 128
coordinates of each embedding, and every evaluator also run on embeddings cut to 16, 32 and 64 coordinates
('zeroshot/top1@16', ...):

  python -m jmm.main --config=configs/matryoshka.py --workdir=/tmp/matryoshka

The baseline it is compared with, plain SigLIP (configs/siglip.py's recipe) evaluated at the same prefixes
(mrl=False): trained, or a finished configs/siglip.py run evaluated again:

  python -m jmm.main --config=configs/matryoshka.py:mrl=False --workdir=/tmp/siglip_prefixes
  python -m jmm.evaluate --config=configs/matryoshka.py:mrl=False --workdir=/tmp/siglip

Other arguments as configs/siglip.py (img, txt, res, data, batch, steps); fields as usual, e.g.
--config.objectives.matryoshka.weights=2,1,1,1.
"""
from jmm import recipes
from jmm.config import parse_arg

EVAL_DIMS = (16, 32, 64)


def get_config(arg=None):
  arg = parse_arg(arg, img='tiny', txt='tiny', res=48, data='synthetic', batch=64, steps=2000, mrl=True)
  config = recipes.base_config(arg)
  synthetic = arg.data == 'synthetic'
  config.data.negative_captions = 'shape' if synthetic else ''  # As configs/siglip.py: NegCLIP hard negatives.
  sigmoid = recipes.contrastive('sigmoid', impl='dense', hard_negatives=synthetic)
  if arg.mrl:
    # dims: prefix widths, 0 = the full out_dim; weights: one per prefix, the loss is their weighted mean.
    config.objectives = dict(matryoshka=dict(sigmoid, type='matryoshka', dims=(*EVAL_DIMS, 0),
                                             weights=(1.0,) * (len(EVAL_DIMS) + 1)))
  else:
    config.objectives = dict(sigmoid=sigmoid)
  for ev in config.evals.values():
    ev.dims = EVAL_DIMS
  return config
