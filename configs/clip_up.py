"""CLIP-UP (Wang et al. 2025): sparse upcycling of a trained dense two-tower model into a mixture of experts.

Train the dense parent, then upcycle its newest checkpoint and continue training the sparse model:

  python -m jmm.main --config=configs/siglip.py --workdir=/tmp/dense
  python -m jmm.main --config=configs/clip_up.py --workdir=/tmp/moe --config.init_from=/tmp/dense

With `init_from` a dense workdir (or converted .npz), every expert of an MoE block starts as a copy of that block's
dense MLP and each router is freshly initialised (jmm.models.moe.upcycle); the rest of the model is copied. A MoE
checkpoint of the same shape loads as is. The argument string is siglip.py's plus `experts`, `k`, `loss`
(`sigmoid` for the default SigLIP parent, `softmax` for a configs/clip.py parent):

  python -m jmm.main --config=configs/clip_up.py:experts=4,k=1,steps=500 --workdir=DIR --config.init_from=DENSE

Recipe, as in the paper: separate experts per tower ("separated backbone"), MoE in every other block, top-2
routing, a load-balance loss and a router z-loss, and a learning rate below the dense run's. The loss weights
(0.01 and 0.001) are ST-MoE's (Zoph et al. 2022) standard values, and the capacity factor 2 and lr 3e-4 our choice
for this tiny setting; we did not take them from the CLIP-UP paper.
Dropless routing: --config.model.moe.capacity_factor=0.
Expert parallelism: --config.mesh=data=-1,expert=4 (num_experts must be a multiple of the expert axis).
"""
import math
from jmm import recipes
from jmm.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, img='tiny', txt='tiny', res=48, data='synthetic', batch=64, steps=1000, experts=8, k=2,
                  loss='sigmoid')
  config = recipes.base_config(arg)
  # The contrastive loss and the MoE layers' load-balance and router z losses (jmm/objectives/moe.py).
  config.objectives = dict(contrastive=recipes.contrastive(arg.loss),
                           moe=dict(type='moe', weight=1.0, aux_loss_weight=0.01, z_loss_weight=1e-3))
  if arg.loss == 'softmax':  # A configs/clip.py parent: its temperature and bias initialisation.
    config.model.temperature_init, config.model.bias_init = math.log(1 / 0.07), 0.0
  config.model.moe.update(num_experts=arg.experts, k=arg.k, layers='every_other', towers='image,text',
                          capacity_factor=2.0, gating='softmax_topk', renormalize=True)
  # Continued training: a shorter warmup and a lower peak lr than the dense run (1e-3), as CLIP-UP lowers its lr.
  config.optim.update(lr=3e-4, warmup_steps=50)
  config.init_from = ''  # The dense parent: --config.init_from=DENSE_WORKDIR (empty: train the MoE from scratch).
  return config
