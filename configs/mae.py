"""MAE (He et al., CVPR 2022): masked-autoencoder pre-training of the image tower alone; no text, no captions.

configs/siglip.py's data and image tower (the text tower is not built: config.model.towers='image'). Each step
hides 75% of every image's patches; the tower encodes the visible quarter and a light decoder head
(jmm/models/mae_decoder.py) reconstructs the hidden patches' pixels (jmm/objectives/mae.py), 2,000 steps:

  python -m jmm.main --config=configs/mae.py --workdir=/tmp/mae

Without a trained text tower there is no zero-shot or retrieval; the evaluators are the linear and few-shot
probes on the image embeddings (the tower's pooled output through its head, which MAE leaves untrained: a fixed
random projection). The trained tower then starts a SigLIP run: configs/mae_siglip.py.

mask: the fraction of patches hidden (0.75, the paper's); norm_pix: per-patch normalised targets (the paper's
default, True); dec_width / dec_depth: the decoder's size. Sizes and data as configs/siglip.py: img, res, data,
batch, steps (txt is accepted so that an MAE run and its SigLIP follow-up take the same argument string).
"""
from jmm import recipes
from jmm.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, img='tiny', txt='tiny', res=48, data='synthetic', batch=64, steps=2000, mask=0.75,
                  norm_pix=True, dec_width=128, dec_depth=2)
  config = recipes.base_config(arg)
  config.model.towers = 'image'
  # The paper's AdamW (Sec. A.1: betas 0.9 / 0.95, the base config's; weight decay 0.05) at the base config's lr.
  config.optim.wd = 0.05
  config.model.heads = dict(mae=recipes.mae_decoder(config, width=arg.dec_width, depth=arg.dec_depth))
  config.objectives = dict(mae=recipes.mae(config, mask_ratio=arg.mask, norm_pix=arg.norm_pix))
  probe = config.evals.linear_probe
  config.evals = dict(
      linear_probe=dict(probe.to_dict(), every=1000),
      fewshot=dict(type='fewshot', every=0, batch_size=250, data=probe.data.to_dict(),
                   train_data=probe.train_data.to_dict(), shots=(1, 5, 10)),
  )
  return config
