"""FILIP (Yao et al., ICLR 2022): token-wise late interaction beside SigLIP's global loss.

The default recipe's data and towers (configs/siglip.py) plus the FILIP head (jmm/models/filip_head.py: per-token
projections of both towers, L2-normalised) and the FILIP objective (jmm/objectives/filip.py) on its token
embeddings:

  python -m jmm.main --config=configs/filip.py --workdir=/tmp/filip

Two terms: 'sigmoid', SigLIP's loss on the global embeddings (with the synthetic data's hard negatives, as
configs/siglip.py; FILIP's term cannot score them: the head sees only the positive captions' tokens), and
'filip', the token-wise loss in its sigmoid form (the recipe's t / b initialisation, log 10 and -10, is SigLIP's;
loss=softmax is the paper's form). They share t and b. --config.objectives.sigmoid.weight=0 trains FILIP alone
(the global embeddings then drift untrained). Evaluation reports both scorings: 'zeroshot' / 'retrieval' on the
global embeddings, 'zeroshot_filip' / 'retrieval_filip' token-wise (similarity='filip').

Sizes and data as configs/siglip.py: img, txt, res, data, batch, steps; loss: FILIP's form (sigmoid | softmax).
"""
from jmm import recipes
from jmm.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, img='tiny', txt='tiny', res=48, data='synthetic', batch=64, steps=2000, loss='sigmoid')
  config = recipes.base_config(arg)
  synthetic = arg.data == 'synthetic'
  config.data.negative_captions = 'shape' if synthetic else ''
  # out_dim 0: the token space is as wide as the global embeddings (config.model.out_dim). pad_id: the
  # tokenizer's (jmm pads with 0; eos is a real token).
  config.model.heads = dict(filip=dict(type='filip_head', out_dim=0, pad_id=config.tokenizer.get('pad_id', 0)))
  # impl='gather': on several devices each scores its images against the all-gathered text tokens (one device:
  # the dense computation). text_chunk: texts scored at a time (0 = all; bounds the [b, chunk, T, L] block).
  config.objectives = dict(
      sigmoid=recipes.contrastive('sigmoid', impl='dense', hard_negatives=synthetic),
      filip=dict(type='filip', weight=1.0, loss=arg.loss, impl='gather', head='filip', text_chunk=0),
  )
  for name in ('zeroshot', 'retrieval'):
    config.evals[f'{name}_filip'] = dict(config.evals[name].to_dict(), similarity='filip', head='filip')
  return config
