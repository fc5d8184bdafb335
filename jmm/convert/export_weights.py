"""Exports jmm parameters (a converted .npz, or a jmm workdir's latest checkpoint) to a peer format.

  python -m jmm.convert.export_weights --src=/tmp/siglip.npz --out=/tmp/siglip_hf      # HF SiglipModel / CLIPModel
  python -m jmm.convert.export_weights --src=WORKDIR --out=/tmp/hf_model
  python -m jmm.convert.export_weights --format=big_vision --src=WORKDIR --out=/tmp/siglip_bv.npz

HF output is a directory with config.json and model.safetensors (`SiglipModel.from_pretrained(DIR)`). A model
the target cannot represent (e.g. a SigLIP image tower with a head, for HF) is an error naming the field.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from jmm import convert
from jmm.convert import common


def spec_from_workdir_config(config: dict, flat: dict) -> dict:
  """A spec for the model of a jmm training config (WORKDIR/config.json) whose params are `flat`."""
  from jmm.models import vit  # pylint: disable=g-import-not-at-top
  model = config['model']
  towers = {}
  for name in ('image', 'text'):
    tower = {k: v for k, v in dict(model[name]).items() if v is not None and v != ''}
    variant = tower.pop('variant', None)
    sizes = vit.decode_variant(variant) if variant else {}
    if name == 'text':
      sizes.pop('patch_size', None)
    towers[name] = {**sizes, **tower}
    towers[name].setdefault('out_dim', model['out_dim'])
  towers['image'].setdefault('patch_size', [16, 16])
  towers['image']['patch_size'] = list(towers['image']['patch_size'])
  return dict(format='jmm', loss=contrastive_loss(config),
              resolution=int(config['data']['resolution']), text_len=int(flat['txt/pos_embedding'].shape[0]),
              vocab_size=int(flat['txt/token_embedding'].shape[0]),
              model=dict(image=towers['image'], text=towers['text'], out_dim=model['out_dim'],
                         temperature_init=model.get('temperature_init', 0.0), bias_init=model.get('bias_init', 0.0)))


def read_workdir(workdir: str) -> tuple[dict, dict]:
  """(spec, flat params) of the latest checkpoint in a jmm workdir (its config.json describes the model)."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  flat = {k: np.asarray(v) for k, v in convert.flatten(convert.read_workdir_params(workdir)[0]).items()}
  return spec_from_workdir_config(config, flat), flat


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--format', default='hf', choices=('hf', 'big_vision', 'open_clip'))
  parser.add_argument('--src', required=True, help='a .npz from jmm.convert.import_weights, or a jmm workdir')
  parser.add_argument('--out', required=True, help='output directory (hf) or file (.npz / .safetensors)')
  args = parser.parse_args(argv)
  if os.path.isdir(args.src):
    spec, flat = read_workdir(args.src)
  else:
    flat, spec = common.load_params(args.src)
    if spec is None:
      raise ValueError(f'{args.src}: no model description inside; was it written by jmm.convert.import_weights?')
  if args.format == 'hf':
    from jmm.convert import hf  # pylint: disable=g-import-not-at-top
    hf.save(args.out, flat, spec)
  elif args.format == 'big_vision':
    from jmm.convert import big_vision  # pylint: disable=g-import-not-at-top
    np.savez(args.out, **big_vision.to_big_vision(flat, spec))
  else:
    from jmm.convert import open_clip  # pylint: disable=g-import-not-at-top
    if spec.get('format') != 'open_clip':
      raise ValueError('open_clip export needs params imported from open_clip (their layout choices are kept)')
    common.write_safetensors(args.out, open_clip.to_open_clip(flat, spec))
  print(f'wrote {args.format} weights to {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())


def contrastive_loss(config: dict) -> str:
  """'sigmoid' or 'softmax': the contrastive objective of a workdir's config.json (the first, if several)."""
  for section in (config.get('objectives') or {}).values():
    if section.get('type') == 'contrastive':
      return section.get('loss', 'sigmoid')
  return (config.get('loss') or {}).get('name', 'sigmoid')  # Workdirs written before config.objectives.
