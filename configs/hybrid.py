"""Hybrid captions (Lai et al. 2024, "Revisit Large-Scale Image-Caption Data in Pre-training Multimodal
Foundation Models", arXiv 2410.02740): each example's caption drawn from its AltText and a synthetic caption.

The default SigLIP recipe (configs/siglip.py: towers, steps, hard-negative captions) with the synthetic data's
captions drawn per example: half AltText-like web text ('red triangle clipart', 'img star red'), half the
descriptive caption ('a small red triangle in the top left'). About 6 minutes on a 2-core CPU:

  python -m jmm.main --config=configs/hybrid.py --workdir=/tmp/hybrid

captions: the mix, 'mix' (alt_text 0.5, caption 0.5), 'alt_text' (AltText alone, the web-data baseline) or
'descriptive' (the synthetic caption alone: configs/siglip.py's run), e.g.

  python -m jmm.main --config=configs/hybrid.py:captions=alt_text --workdir=/tmp/hybrid_alt

Any other mix is a field: --config.data.captions=alt_text=0.3,caption=0.5,short=0.2. Evaluation stays on the
descriptive captions of the held-out split, so the three runs are compared on the same test. On your own data
name the record fields: data=webdataset with --config.data.captions=json/alt=0.5,json/synthetic_caption=0.5
(the mix argument then does not apply). Sizes and data as configs/siglip.py: img, txt, res, data, batch, steps.
"""
from jmm import recipes
from jmm.config import ConfigError, parse_arg

MIXES = {'mix': 'alt_text=0.5,caption=0.5', 'alt_text': 'alt_text=1', 'descriptive': ''}


def get_config(arg=None):
  arg = parse_arg(arg, img='tiny', txt='tiny', res=48, data='synthetic', batch=64, steps=2000, captions='mix')
  if arg.captions not in MIXES:
    raise ConfigError(f'config argument captions={arg.captions!r}: expected one of {sorted(MIXES)}')
  config = recipes.base_config(arg)
  # As configs/siglip.py: NegCLIP hard negatives on the embedded data (each follows its caption's style).
  synthetic = arg.data == 'synthetic'
  config.data.negative_captions = 'shape' if synthetic else ''
  config.data.captions = MIXES[arg.captions] if synthetic else ''
  config.objectives = dict(sigmoid=recipes.contrastive('sigmoid', impl='dense', hard_negatives=synthetic))
  return config
