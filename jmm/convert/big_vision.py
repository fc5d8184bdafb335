"""big_vision SigLIP `.npz` checkpoints <-> jmm two-tower parameters.

big_vision saves the flax params tree flattened with '/' (keys 'params/img/...' or 'img/...'); jmm's layers
are the same flax layouts under other names (big_vision models/vit.py, models/proj/image_text/
text_transformer.py and two_towers.py; the names agree with transformers' convert_siglip_to_hf.py):

  img/embedding/{kernel [p, p, 3, W], bias}      -> img/embedding/...
  img/pos_embedding [1, N, W]                    -> img/pos_embedding [N, W]
  img/cls [1, 1, W] ('tok' pooling)              -> img/cls [W]
  img/Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
    LayerNorm_1, MlpBlock_0/Dense_{0,1}          -> img/encoder/encoderblock_{i}/ln_attn, attn/..., ln_mlp,
                                                    mlp/fc_{in,out}
  img/Transformer/encoder_norm                   -> img/encoder/encoder_norm
  img/MAPHead_0/{probe [1, 1, W], MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}
                                                 -> img/MAPHead/{probe [1, W], attn, ln, mlp}
  img/head, txt/head                             -> the same
  txt/Embed_0/embedding, txt/pos_embedding      -> txt/token_embedding, txt/pos_embedding
  txt/Encoder_0/...                              -> txt/encoder/...
  t [1], b [1]                                   -> t [], b []

Scanned checkpoints ('encoderblock/...' with a leading depth axis) are split per block. Everything is
inferred from shapes (heads from the [W, heads, head_dim] attention kernels); big_vision's defaults give the
rest: tanh-GELU, LayerNorm eps 1e-6, text pooled at the last token.
"""
from __future__ import annotations

import math
import os

import numpy as np

from jmm.convert import common
from jmm.convert.common import Entry

_ATTN = 'MultiHeadDotProductAttention_0'


def _unscan(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """'.../encoderblock/x' [depth, ...] -> '.../encoderblock_{i}/x' [...]."""
  out = {}
  for key, value in tensors.items():
    if '/encoderblock/' in key:
      head, tail = key.split('/encoderblock/', 1)
      for i, layer in enumerate(value):
        out[f'{head}/encoderblock_{i}/{tail}'] = layer
    else:
      out[key] = value
  return out


def _tower_sizes(tensors, encoder: str) -> dict:
  query = tensors[f'{encoder}/encoderblock_0/{_ATTN}/query/kernel']  # [W, heads, head_dim]
  return dict(width=int(query.shape[0]), num_heads=int(query.shape[1]),
              depth=common.count_layers(tensors, f'{encoder}/encoderblock_'),
              mlp_dim=int(tensors[f'{encoder}/encoderblock_0/MlpBlock_0/Dense_0/kernel'].shape[1]),
              activation='gelu_tanh', norm_eps=1e-6)


def spec_from_big_vision(tensors: dict[str, np.ndarray]) -> dict:
  """The jmm spec of a big_vision two-tower params dict (keys without the 'params/' prefix)."""
  for needed in ('img/embedding/kernel', 'txt/Embed_0/embedding', 't'):
    if needed not in tensors:
      raise ValueError(f'not a big_vision two-tower checkpoint: {needed!r} is missing')
  kernel = tensors['img/embedding/kernel']  # [p, p, 3, W]
  ph, pw = int(kernel.shape[0]), int(kernel.shape[1])
  image = dict(_tower_sizes(tensors, 'img/Transformer'), patch_size=[ph, pw])
  if 'img/MAPHead_0/probe' in tensors:
    image['pool_type'] = 'map'
  elif 'img/cls' in tensors:
    image['pool_type'] = 'tok'
  else:
    image['pool_type'] = 'gap'
  image['out_dim'] = int(tensors['img/head/kernel'].shape[1]) if 'img/head/kernel' in tensors else 0
  text = dict(_tower_sizes(tensors, 'txt/Encoder_0'),
              pool_type='map' if 'txt/MAPHead_0/probe' in tensors else 'last')
  text['out_dim'] = int(tensors['txt/head/kernel'].shape[1]) if 'txt/head/kernel' in tensors else 0
  positions = tensors['img/pos_embedding'].shape[-2]
  grid = math.isqrt(positions)
  if grid * grid != positions:
    raise ValueError(f'img/pos_embedding: {positions} positions is not a square grid')
  out_dim = text['out_dim'] or image['out_dim'] or text['width']
  spec = dict(format='big_vision', loss='sigmoid', resolution=grid * ph,
              text_len=int(tensors['txt/pos_embedding'].shape[-2]),
              vocab_size=int(tensors['txt/Embed_0/embedding'].shape[0]),
              model=dict(image=image, text=text, out_dim=out_dim, temperature_init=math.log(10.0), bias_init=-10.0))
  # big_vision's SigLIP: squash-resize, pixels in [-1, 1], texts canonicalised and padded with eos (pad_value=1).
  return common.add_preprocessing(spec, transform='resize', mean=(0.5,) * 3, std=(0.5,) * 3, canonicalize=True,
                                  pad_id=1)


def _map_head_entries(jmm: str, bv: str, width: int) -> tuple[list[Entry], dict]:
  out = [Entry(f'{jmm}/probe', f'{bv}/probe', 'probe')]
  out += [Entry(f'{jmm}/attn/{q}/{w}', f'{bv}/{_ATTN}/{q}/{w}') for q in ('query', 'key', 'value', 'out')
          for w in ('kernel', 'bias')]
  out += [Entry(f'{jmm}/ln/{w}', f'{bv}/LayerNorm_0/{w}') for w in ('scale', 'bias')]
  out += [Entry(f'{jmm}/mlp/{a}/{w}', f'{bv}/MlpBlock_0/Dense_{i}/{w}') for i, a in enumerate(('fc_in', 'fc_out'))
          for w in ('kernel', 'bias')]
  return out, {f'{bv}/probe': (1, 1, width)}


def mapping(spec: dict) -> tuple[list[Entry], dict]:
  """(entries, big_vision shapes of reshaped tensors) for the model described by `spec`."""
  image, text = spec['model']['image'], spec['model']['text']
  out = [Entry('img/embedding/kernel', 'img/embedding/kernel'), Entry('img/embedding/bias', 'img/embedding/bias'),
         Entry('img/pos_embedding', 'img/pos_embedding', 'pos'),
         Entry('txt/token_embedding', 'txt/Embed_0/embedding'), Entry('txt/pos_embedding', 'txt/pos_embedding', 'pos'),
         Entry('t', 't', 'scalar'), Entry('b', 'b', 'scalar')]
  num_pos = (spec['resolution'] // image['patch_size'][0]) ** 2
  shapes = {'t': (1,), 'b': (1,), 'img/pos_embedding': (1, num_pos, image['width']),
            'txt/pos_embedding': (1, spec['text_len'], text['width'])}
  for tower, jmm, encoder in ((image, 'img', 'img/Transformer'), (text, 'txt', 'txt/Encoder_0')):
    for i in range(tower['depth']):
      out += common.block_entries(f'{jmm}/encoder/encoderblock_{i}', f'{encoder}/encoderblock_{i}', 'big_vision',
                                  tower['num_heads'])
    out += [Entry(f'{jmm}/encoder/encoder_norm/{w}', f'{encoder}/encoder_norm/{w}') for w in ('scale', 'bias')]
    if tower['pool_type'] == 'map':
      entries, more = _map_head_entries(f'{jmm}/MAPHead', f'{jmm}/MAPHead_0', tower['width'])
      out += entries
      shapes.update(more)
    if tower.get('out_dim'):
      out += [Entry(f'{jmm}/head/{w}', f'{jmm}/head/{w}') for w in ('kernel', 'bias')]
  if image['pool_type'] == 'tok':
    out.append(Entry('img/cls', 'img/cls', 'vector'))
    shapes['img/cls'] = (1, 1, image['width'])
  return out, shapes


def from_params(tensors: dict[str, np.ndarray], source: str = 'params') -> tuple[dict, dict[str, np.ndarray]]:
  """A flattened big_vision params dict ('params/img/...' or 'img/...') -> (spec, flat jmm params)."""
  tensors = {k.removeprefix('params/'): v for k, v in tensors.items()}
  tensors = _unscan(common.as_float32({k: np.asarray(v) for k, v in tensors.items()}))
  spec = spec_from_big_vision(tensors)
  entries, _ = mapping(spec)
  return spec, common.apply_import(tensors, entries, source)


def to_big_vision(flat: dict[str, np.ndarray], spec: dict) -> dict[str, np.ndarray]:
  """Flat jmm params of a SigLIP-shaped model -> big_vision names ('params/...'), as big_vision saves them."""
  entries, shapes = mapping(spec)
  return {f'params/{k}': v for k, v in common.apply_export(flat, entries, shapes).items()}


def load(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """A big_vision `.npz` (read with allow_pickle=False) -> (spec, flat jmm params)."""
  path = os.fspath(path)
  if not path.endswith('.npz'):
    raise ValueError(f'{path}: a big_vision checkpoint is an .npz file')
  return from_params(common.load_tensors(path), source=path)
