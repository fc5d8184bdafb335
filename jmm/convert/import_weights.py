"""Converts a peer checkpoint to a jmm params file and prints how to train or evaluate from it.

  python -m jmm.convert.import_weights --format=hf --src=DIR_OF_HF_MODEL --out=/tmp/siglip.npz
  python -m jmm.convert.import_weights --format=open_clip --src=DIR_OR_FILE [--config=open_clip_config.json] --out=F
  python -m jmm.convert.import_weights --format=big_vision --src=webli_en_b16_224.npz --out=/tmp/siglip.npz

The output `.npz` holds the flat jmm parameters and the model description (read by configs/pretrained.py and by
`--config.init_from`). Nothing is unpickled: safetensors / npz are read as data, torch files with
weights_only=True.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from jmm import convert
from jmm.convert import common


def describe(spec: dict, flat: dict, out: str, src: str) -> str:
  """The text printed after a conversion: sizes, the jmm model config, and the commands that use the file."""
  count = sum(int(np.size(v)) for v in flat.values())
  lines = [f'converted {src} ({spec["format"]}): {count / 1e6:.2f}M parameters -> {out}',
           f'loss {spec["loss"]}, images {spec["resolution"]} px, text length {spec["text_len"]}, '
           f'vocabulary {spec["vocab_size"]}',
           'jmm config (config.model):', json.dumps(spec['model'], indent=2),
           'matching overrides: ' + ' '.join([
               f'--config.data.resolution={spec["resolution"]}', f'--config.data.text_len={spec["text_len"]}',
               f'--config.objectives.{spec["loss"]}.loss={spec["loss"]}', f'--config.init_from={out}']),
           'train or evaluate from it (the config builds this model; give the peer\'s tokenizer file):',
           f'  python -m jmm.main --config=configs/pretrained.py:weights={out},tokenizer=TOKENIZER_FILE '
           f'--workdir=DIR']
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--format', required=True, choices=convert.FORMATS)
  parser.add_argument('--src', required=True, help='checkpoint file or directory')
  parser.add_argument('--config', default=None, help='peer model config JSON, if not found beside --src')
  parser.add_argument('--out', required=True, help='output .npz')
  args = parser.parse_args(argv)
  if not args.out.endswith('.npz'):
    parser.error(f'--out={args.out!r} must end with .npz')
  spec, flat = convert.import_checkpoint(args.format, args.src, args.config)
  common.save_params(args.out, flat, spec)
  print(describe(spec, flat, args.out, args.src))
  return 0


if __name__ == '__main__':
  sys.exit(main())
