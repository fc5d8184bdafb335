"""Image <-> text retrieval of converted released weights on COCO (Karpathy 5k test) or Flickr30k (1k test):
recall@1/5/10 both ways, five captions per image (an image query hits when any of its captions is in the top k).

  python -m jmm.convert.import_weights --format=hf --src=DIR/siglip-base-patch16-224 --out=/tmp/siglip.npz
  python -m jmm.evaluate --out=/tmp/coco.json --config=configs/eval/coco.py:weights=/tmp/siglip.npz,\
tokenizer=DIR/siglip-base-patch16-224/spiece.model,data=/data/coco/karpathy_test.jsonl

data=: a CSV or JSONL listing of the test images and their captions (jmm/data/captions_file.py: JSONL lines
{"image": "val2014/COCO_val2014_000000391895.jpg", "captions": [...]}, paths relative to the listing's folder), or
data=tfds to read TFDS's coco_captions (its 'test' split is Karpathy's 5k; tfds_dir= its data_dir). Flickr30k:
the same with its 1k-test listing. Images are preprocessed as the weights were trained; n= only the first n.
"""
from jmm import recipes
from jmm.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, weights='', tokenizer='', data='', tfds_dir='', batch=256, n=0)
  if arg.data == 'tfds':
    data = dict(name='tfds', tfds_name='coco_captions', split='test', data_dir=arg.tfds_dir,
                captions_key='captions/text')
  else:
    data = dict(name='captions_file', path=arg.data)
  data['num_examples'] = arg.n or None
  evals = dict(retrieval=dict(type='retrieval', every=0, batch_size=arg.batch, data=data, ks=(1, 5, 10)))
  return recipes.eval_config(arg.weights, arg.tokenizer, evals)
