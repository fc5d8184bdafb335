"""LiT: locked-image text tuning (Zhai et al., CVPR 2022), with SigLIP's sigmoid loss (SigLiT, Zhai et al. 2023).

Train the default recipe first, then train a new text tower from scratch against its locked image tower:

  python -m jmm.main --config=configs/siglip.py --workdir=/tmp/siglip
  python -m jmm.main --config=configs/lit.py --workdir=/tmp/lit --config.init_from=/tmp/siglip

The reverse, a locked text tower and an image tower trained from scratch:

  python -m jmm.main --config=configs/lit.py:locked=text --workdir=/tmp/lit_text --config.init_from=/tmp/siglip

`init_from` (a jmm workdir or a converted .npz) must build the same towers; only the locked tower's parameters are
loaded (`init_from_towers`), the other tower and the temperature / bias start fresh. The locked tower gets no
gradient (its parameters are read through stop_gradient, so no backward pass runs through it) and no optimizer
state, and ends bit-identical to what was loaded. The argument string is siglip.py's plus `locked`.
A loaded text tower needs the tokenizer it was trained with: on the embedded data the tokenizer a run trains is the
parent's (same captions, deterministic); otherwise add --config.tokenizer.path=/tmp/siglip/tokenizer.model.
"""
from jmm import recipes
from jmm.config import ConfigError, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, img='tiny', txt='tiny', res=48, data='synthetic', batch=64, steps=2000, locked='image')
  if arg.locked not in ('image', 'text'):
    raise ConfigError(f'configs/lit.py: locked={arg.locked!r} is not one of image, text')
  config = recipes.base_config(arg)
  synthetic = arg.data == 'synthetic'
  # The default recipe's loss and hard negatives (configs/siglip.py), so the locked tower meets what it was
  # trained with.
  config.data.negative_captions = 'shape' if synthetic else ''
  config.objectives = dict(sigmoid=recipes.contrastive('sigmoid', impl='dense', hard_negatives=synthetic))
  config.model.locked = arg.locked
  config.init_from_towers = arg.locked  # The other tower and 't', 'b' keep their fresh initialisation.
  config.init_from = ''  # The trained parent: --config.init_from=WORKDIR (required: a locked tower must be loaded).
  return config
