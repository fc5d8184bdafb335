"""Zero-shot ImageNet-1k of converted released weights: the 1,000 class names and prompt templates of the CLIP
paper (Radford et al. 2021), top-1 / top-5 on the 50,000 validation images.

  python -m jmm.convert.import_weights --format=hf --src=DIR/siglip-base-patch16-224 --out=/tmp/siglip.npz
  python -m jmm.evaluate --out=/tmp/imagenet.json --config=configs/eval/imagenet.py:weights=/tmp/siglip.npz,\
tokenizer=DIR/siglip-base-patch16-224/spiece.model,data=/data/imagenet/val

data=: the validation images sorted into their 1,000 synset folders (ROOT/n01440764/*.JPEG ...; the sorted folder
names give the usual class ids), or data=tfds to read TFDS's prepared imagenet2012 (tfds_dir= its data_dir).
templates= 'clip80' (the paper's 80), 'clip_short' (its 7-template subset) or a text file, one per line;
classes= 'imagenet' or a text file. Images are preprocessed as the weights were trained (their .npz says how:
SigLIP squashes to the resolution, CLIP resizes the shorter side and centre-crops). n= evaluates only the first n;
scores=FILE.npz also writes every image's class scores ('scores' [N, classes]) and label ('labels').
"""
from jmm import recipes
from jmm.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, weights='', tokenizer='', data='', tfds_dir='', templates='clip80', classes='imagenet',
                  batch=256, n=0, scores='')
  if arg.data == 'tfds':
    data = dict(name='tfds', tfds_name='imagenet2012', split='validation', data_dir=arg.tfds_dir)
  else:
    data = dict(name='folder', path=arg.data)
  data['num_examples'] = arg.n or None
  evals = dict(imagenet=dict(type='zeroshot', every=0, batch_size=arg.batch, data=data, class_names=arg.classes,
                             templates=arg.templates, label_key='label', ks=(1, 5),
                             scores_path=arg.scores))
  return recipes.eval_config(arg.weights, arg.tokenizer, evals)
