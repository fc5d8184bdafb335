"""CLOC (Chen et al. 2024, "Contrastive Localized Language-Image Pre-Training"): SigLIP plus region-text losses.

The default recipe's towers (configs/siglip.py) on multi-object images of the embedded data (1 to `objects`
objects each, every one with its box and phrase), plus the CLOC head (jmm/models/cloc_head.py: the Prompter over
the image tower's patch tokens) and the CLOC objective (jmm/objectives/cloc.py: region-text sigmoid loss and box
grounding), added to SigLIP's image-level loss:

  python -m jmm.main --config=configs/cloc.py --workdir=/tmp/cloc

Evaluation adds region recognition on held-out multi-object images (jmm/evaluators/region.py): 'region' (each box
classified by its phrase through the Prompter) and 'region_pooled' (the baseline any dual encoder has: the patch
tokens pooled inside the box, through the image head). --config.objectives.cloc.weight=0 leaves the image-level
SigLIP run on the same data (the head still runs; its outputs go unused).

Arguments as configs/siglip.py (img, txt, res, data, batch, steps) plus objects (the most objects an image has,
also the regions per image, default 2) and region_weight / grounding_weight (the CLOC terms' weights, 1.0).
"""
from jmm import recipes
from jmm.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, img='tiny', txt='tiny', res=48, data='synthetic', batch=64, steps=2000, objects=2,
                  region_weight=1.0, grounding_weight=1.0)
  config = recipes.base_config(arg)
  # No hard-negative captions (configs/siglip.py has them): the phrases already double the text tower's work, and
  # the region loss has its own shape negatives (same colour, other shape, in the batch's phrases).
  config.data.max_objects = arg.objects
  # A caption names every object (at most 9 tokens each with its 'and'); phrases reuse the caption length.
  config.data.text_len = 10 * arg.objects
  config.model.heads = dict(cloc=dict(type='cloc_head', depth=1, num_heads=4))
  config.objectives = dict(
      sigmoid=recipes.contrastive('sigmoid', impl='dense'),
      cloc=dict(type='cloc', weight=1.0, head='cloc', region_weight=arg.region_weight,
                grounding_weight=arg.grounding_weight, l1_weight=1.0, giou_weight=1.0, same_text_positive=True),
  )
  heldout = dict(config.evals.zeroshot.data.to_dict(), max_objects=arg.objects, num_examples=500)
  config.evals.region = dict(type='region', every=0, batch_size=250, data=heldout, method='cloc')
  config.evals.region_pooled = dict(type='region', every=0, batch_size=250, data=heldout, method='pooled')
  for ev in config.evals.values():
    ev.text_len = config.data.text_len  # The text tower's length (its position table).
  return config
