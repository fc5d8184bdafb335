"""HF transformers `SiglipModel` and `CLIPModel` <-> jmm two-tower parameters.

Import reads `config.json` and `model.safetensors` (or `pytorch_model.bin`, or a sharded index) of a saved
model directory, or a state dict plus config dict; the tower sizes come from the tensor shapes, the rest
(heads, activation, LayerNorm epsilon, CLIP's eos id) from the config, with transformers' defaults for keys a
saved config leaves out (HF writes only values that differ from the defaults). Export writes the same two files
back. Layouts (transformers' modeling_siglip.py / modeling_clip.py):

  SigLIP: patch conv with bias, position table without class token, encoder, post_layernorm over all tokens,
    image embedding = MAP head output (`vision_model.head`, torch nn.MultiheadAttention; no projection);
    text: encoder, final_layer_norm, last-token pooling, `text_model.head` Linear with bias; logit_scale and
    logit_bias of shape [1]. jmm: image pool 'map' with out_dim=0, text pool 'last'.
  CLIP: class_embedding, bias-free patch conv, position table with the class token's row, pre_layrnorm,
    encoder, post_layernorm (on the class token; per-token, so the same), bias-free visual/text projections,
    causal text attention pooled at the first eos id (argmax of ids for old configs with eos_token_id=2),
    scalar logit_scale, no bias. jmm: cls_posemb, ln_pre, patch_bias=False, head_bias=False, pool 'eos'.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from jmm.convert import common
from jmm.convert.common import Entry

# transformers' hidden_act names <-> jmm activations (layers.ACTIVATIONS).
ACT_FROM_HF = {'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh', 'gelu': 'gelu',
               'quick_gelu': 'quick_gelu'}
ACT_TO_HF = {'gelu_tanh': 'gelu_pytorch_tanh', 'gelu': 'gelu', 'quick_gelu': 'quick_gelu'}

# transformers' config defaults for the keys jmm reads (configuration_siglip.py / configuration_clip.py;
# tests/test_convert.py checks them against the installed transformers).
DEFAULTS = {
    ('siglip', 'vision'): dict(num_attention_heads=12, hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6),
    ('siglip', 'text'): dict(num_attention_heads=12, hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6),
    ('clip', 'vision'): dict(num_attention_heads=12, hidden_act='quick_gelu', layer_norm_eps=1e-5),
    ('clip', 'text'): dict(num_attention_heads=8, hidden_act='quick_gelu', layer_norm_eps=1e-5,
                           eos_token_id=49407),
}
_IGNORED = ('text_model.embeddings.position_ids', 'vision_model.embeddings.position_ids')


def _tower_config(config: dict, family: str, tower: str) -> dict:
  return {**DEFAULTS[(family, tower)], **(config.get(f'{tower}_config') or {})}


def _activation(value: str, where: str) -> str:
  if value not in ACT_FROM_HF:
    raise ValueError(f'{where}={value!r}: jmm has no such activation; known: {", ".join(ACT_FROM_HF)}')
  return ACT_FROM_HF[value]


def guess_family(tensors) -> str:
  """'siglip' or 'clip' from the tensor names of a state dict."""
  if 'vision_model.head.probe' in tensors or 'logit_bias' in tensors:
    return 'siglip'
  if 'visual_projection.weight' in tensors:
    return 'clip'
  raise ValueError('state dict is neither an HF SiglipModel (vision_model.head.probe) nor a CLIPModel '
                   '(visual_projection.weight)')


def spec_from_hf(tensors: dict[str, np.ndarray], config: dict, preprocessor: dict | None = None) -> dict:
  """The jmm spec (model config, loss, resolution, text length, vocabulary, preprocessing) of an HF state dict +
  config (+ its preprocessor_config.json, when there is one)."""
  family = {'siglip_model': 'siglip', 'siglip': 'siglip', 'clip': 'clip', 'clip_model': 'clip'}.get(
      config.get('model_type', ''), None) or guess_family(tensors)
  vc, tc = _tower_config(config, family, 'vision'), _tower_config(config, family, 'text')
  v, t = 'vision_model.', 'text_model.'
  patch = tensors[f'{v}embeddings.patch_embedding.weight']  # [W, 3, p, p]
  vwidth, channels, ph, pw = patch.shape
  if channels != 3:
    raise ValueError(f'{v}embeddings.patch_embedding.weight has {channels} input channels; jmm expects 3')
  positions = tensors[f'{v}embeddings.position_embedding.weight'].shape[0] - (1 if family == 'clip' else 0)
  grid = math.isqrt(positions)
  if grid * grid != positions:
    raise ValueError(f'{v}embeddings.position_embedding.weight: {positions} patch positions is not a square grid')
  image = dict(
      width=int(vwidth), depth=common.count_layers(tensors, f'{v}encoder.layers.'),
      mlp_dim=int(tensors[f'{v}encoder.layers.0.mlp.fc1.weight'].shape[0]),
      num_heads=common.check_heads(int(vwidth), int(vc['num_attention_heads']),
                                   'vision_config.num_attention_heads'),
      patch_size=[int(ph), int(pw)], activation=_activation(vc['hidden_act'], 'vision_config.hidden_act'),
      norm_eps=float(vc['layer_norm_eps']))
  table = tensors[f'{t}embeddings.token_embedding.weight']  # [vocab, W]
  twidth = int(table.shape[1])
  text = dict(
      width=twidth, depth=common.count_layers(tensors, f'{t}encoder.layers.'),
      mlp_dim=int(tensors[f'{t}encoder.layers.0.mlp.fc1.weight'].shape[0]),
      num_heads=common.check_heads(twidth, int(tc['num_attention_heads']), 'text_config.num_attention_heads'),
      activation=_activation(tc['hidden_act'], 'text_config.hidden_act'), norm_eps=float(tc['layer_norm_eps']))
  if family == 'siglip':
    if f'{v}head.probe' not in tensors:
      raise ValueError('SigLIP vision_use_head=False (no MAP head) is not supported: jmm needs an image embedding')
    out_dim = int(tensors[f'{t}head.weight'].shape[0])
    if out_dim != vwidth:
      raise ValueError(f'text_model.head projects to {out_dim}, but the image embedding (MAP head) has width '
                       f'{vwidth}; SiglipModel needs them equal')
    image.update(pool_type='map', out_dim=0)
    text.update(pool_type='last', out_dim=out_dim)
    loss, bias_init, temperature_init = 'sigmoid', -10.0, math.log(10.0)
  else:
    out_dim = int(tensors['visual_projection.weight'].shape[0])
    image.update(pool_type='tok', cls_posemb=True, ln_pre=True, patch_bias=False, head_bias=False,
                 out_dim=out_dim)
    eos = int(tc['eos_token_id'])
    # transformers: eos_token_id == 2 marks configs from before the eos fix, pooled at argmax(ids).
    pool = dict(pool_type='argmax') if eos == 2 else dict(pool_type='eos', eos_id=eos)
    text.update(causal=True, head_bias=False, out_dim=out_dim, **pool)
    loss, bias_init, temperature_init = 'softmax', 0.0, math.log(1 / 0.07)
  spec = dict(format=f'hf_{family}', loss=loss, resolution=int(grid * ph), text_len=int(
      tensors[f'{t}embeddings.position_embedding.weight'].shape[0]), vocab_size=int(table.shape[0]),
              model=dict(image=image, text=text, out_dim=out_dim, temperature_init=temperature_init,
                         bias_init=bias_init))
  return common.add_preprocessing(spec, **_preprocessing(family, preprocessor or {}))


def _preprocessing(family: str, preprocessor: dict) -> dict:
  """`common.add_preprocessing`'s fields from an HF preprocessor_config.json (the family's defaults where it
  is absent): SigLIP squashes to the resolution and maps pixels to [-1, 1]; CLIP resizes the shorter side,
  centre-crops and normalises with OpenAI's mean / std."""
  if family == 'siglip':
    default = dict(transform='resize', mean=(0.5,) * 3, std=(0.5,) * 3)
  else:
    default = dict(transform='resize_crop', mean=common.OPENAI_CLIP_MEAN, std=common.OPENAI_CLIP_STD)
  size = preprocessor.get('size')
  if isinstance(size, dict) and 'shortest_edge' in size:
    default['transform'] = 'resize_crop'
  elif isinstance(size, dict) and 'height' in size:
    default['transform'] = 'resize'
  if preprocessor.get('do_normalize') is False:
    default.update(mean=(0.0,) * 3, std=(1.0,) * 3)
  else:
    default.update({k: preprocessor[f'image_{k}'] for k in ('mean', 'std') if preprocessor.get(f'image_{k}')})
  return dict(default, canonicalize=family == 'siglip', pad_id=1 if family == 'siglip' else 0)


def mapping(spec: dict) -> tuple[list[Entry], dict]:
  """(entries, peer shapes of reshaped tensors) between jmm params and the HF model described by `spec`."""
  family = spec['format'].removeprefix('hf_')
  image, text = spec['model']['image'], spec['model']['text']
  v, t = 'vision_model.', 'text_model.'
  out = [Entry('img/embedding/kernel', f'{v}embeddings.patch_embedding.weight', 'conv'),
         Entry('img/pos_embedding', f'{v}embeddings.position_embedding.weight'),
         Entry('txt/token_embedding', f'{t}embeddings.token_embedding.weight'),
         Entry('txt/pos_embedding', f'{t}embeddings.position_embedding.weight'),
         Entry('t', 'logit_scale', 'scalar')]
  for i in range(image['depth']):
    out += common.block_entries(f'img/encoder/encoderblock_{i}', f'{v}encoder.layers.{i}', 'hf', image['num_heads'])
  for i in range(text['depth']):
    out += common.block_entries(f'txt/encoder/encoderblock_{i}', f'{t}encoder.layers.{i}', 'hf', text['num_heads'])
  out += common.ln_entries('img/encoder/encoder_norm', f'{v}post_layernorm')
  out += common.ln_entries('txt/encoder/encoder_norm', f'{t}final_layer_norm')
  shapes = {}
  if family == 'siglip':
    out += [Entry('img/embedding/bias', f'{v}embeddings.patch_embedding.bias'),
            Entry('img/MAPHead/probe', f'{v}head.probe', 'probe'), Entry('b', 'logit_bias', 'scalar')]
    out += common.mha_entries('img/MAPHead/attn', f'{v}head.attention', image['num_heads'])
    out += common.ln_entries('img/MAPHead/ln', f'{v}head.layernorm')
    out += common.linear_entries('img/MAPHead/mlp/fc_in', f'{v}head.mlp.fc1')
    out += common.linear_entries('img/MAPHead/mlp/fc_out', f'{v}head.mlp.fc2')
    out += common.linear_entries('txt/head', f'{t}head')
    shapes = {'logit_scale': (1,), 'logit_bias': (1,), f'{v}head.probe': (1, 1, image['width'])}
  elif family == 'clip':
    out += [Entry('img/cls', f'{v}embeddings.class_embedding')]
    out += common.ln_entries('img/ln_pre', f'{v}pre_layrnorm')  # Sic: transformers' attribute name.
    out += common.linear_entries('img/head', 'visual_projection', bias=False)
    out += common.linear_entries('txt/head', 'text_projection', bias=False)
  else:
    raise ValueError(f'spec format {spec["format"]!r} is not an HF model (hf_siglip or hf_clip)')
  return out, shapes


def from_state_dict(tensors: dict[str, np.ndarray], config: dict | None = None,
                    source: str = 'state dict', preprocessor: dict | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """An HF SiglipModel / CLIPModel state dict (name -> array), its config dict and (optionally) its
  preprocessor_config.json dict -> (spec, flat jmm params)."""
  tensors = common.as_float32({k: np.asarray(v) for k, v in tensors.items()})
  spec = spec_from_hf(tensors, config or {}, preprocessor)
  entries, _ = mapping(spec)
  flat = common.apply_import(tensors, entries, source, ignore=_IGNORED)
  if spec['format'] == 'hf_clip':
    flat['b'] = np.zeros((), np.float32)  # CLIP has no logit bias; jmm's is unused by the softmax loss.
  return spec, flat


def load(path: str, config_path: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """An HF model directory (config.json + model.safetensors / pytorch_model.bin / sharded) or weights file
  (config.json beside it, or `config_path`) -> (spec, flat jmm params). A preprocessor_config.json beside the
  weights sets the spec's preprocessing; without one, the family's published defaults."""
  path = os.fspath(path)
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = config_path or os.path.join(directory, 'config.json')
  config = {}
  if os.path.isfile(config_path):
    with open(config_path) as f:
      config = json.load(f)
  elif os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no config.json (the HF model config) in this directory')
  if os.path.isdir(path):
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.isfile(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
      tensors = {}
      for shard in shards:
        tensors.update(common.load_tensors(os.path.join(path, shard)))
    else:
      tensors = common.load_tensors(common.find_file(
          path, ('model.safetensors', 'pytorch_model.bin'), 'HF weights'))
  else:
    tensors = common.load_tensors(path)
  preprocessor = {}
  if os.path.isfile(os.path.join(directory, 'preprocessor_config.json')):
    with open(os.path.join(directory, 'preprocessor_config.json')) as f:
      preprocessor = json.load(f)
  return from_state_dict(tensors, config, source=path, preprocessor=preprocessor)


def _family_of(spec: dict) -> str:
  """'siglip' or 'clip' for a spec from any source (an HF import, a jmm training config, open_clip)."""
  fmt = spec.get('format', '')
  if fmt in ('hf_siglip', 'hf_clip'):
    return fmt.removeprefix('hf_')
  image = spec['model']['image']
  return 'siglip' if image.get('pool_type') == 'map' else 'clip'


def _require(tower: dict, field: str, want, default, where: str):
  have = tower.get(field, default)
  if have != want:
    raise ValueError(f'cannot export to HF: model.{where}.{field}={have!r}, but the HF model needs {want!r}')


def to_hf(flat: dict[str, np.ndarray], spec: dict) -> tuple[dict[str, np.ndarray], dict]:
  """Flat jmm params + spec -> (HF state dict of numpy arrays, HF config dict). Raises ValueError naming the
  model field when the jmm model has no HF equivalent (e.g. a SigLIP image tower with a head)."""
  family = _family_of(spec)
  image, text = dict(spec['model']['image']), dict(spec['model']['text'])
  for tower, name in ((image, 'image'), (text, 'text')):
    if tower.get('scan'):
      raise ValueError(f'cannot export to HF: model.{name}.scan=True; convert the stacked params first')
  if family == 'siglip':
    _require(image, 'pool_type', 'map', 'map', 'image')
    _require(image, 'out_dim', 0, spec['model'].get('out_dim'), 'image')
    _require(text, 'pool_type', 'last', 'last', 'text')
    _require(text, 'causal', False, False, 'text')
  else:
    for field, want, default in (('pool_type', 'tok', 'map'), ('cls_posemb', True, False), ('ln_pre', True, False),
                                 ('patch_bias', False, True), ('head_bias', False, True)):
      _require(image, field, want, default, 'image')
    _require(text, 'causal', True, False, 'text')
    _require(text, 'head_bias', False, True, 'text')
    if text.get('pool_type') not in ('eos', 'argmax'):
      raise ValueError(f'cannot export to HF: model.text.pool_type={text.get("pool_type")!r}; CLIPModel pools '
                       f'at the eos token ("eos" or "argmax")')
  for tower, name in ((image, 'image'), (text, 'text')):
    if tower.get('activation', 'gelu_tanh') not in ACT_TO_HF:
      raise ValueError(f'cannot export to HF: model.{name}.activation={tower["activation"]!r}')
  full = dict(spec, format=f'hf_{family}', model=dict(spec['model'], image=image, text=text))
  entries, shapes = mapping(full)
  state = common.apply_export(flat, entries, shapes)
  return state, hf_config(full, flat)


def hf_config(spec: dict, flat: dict[str, np.ndarray]) -> dict:
  """The HF config.json dict of the model in `spec` (every field transformers needs, written explicitly)."""
  family = spec['format'].removeprefix('hf_')
  image, text = spec['model']['image'], spec['model']['text']
  grid = int(round(math.sqrt(flat['img/pos_embedding'].shape[0] - (1 if family == 'clip' else 0))))
  vision = dict(hidden_size=image['width'], intermediate_size=image['mlp_dim'],
                num_hidden_layers=image['depth'], num_attention_heads=image['num_heads'], num_channels=3,
                image_size=grid * int(image['patch_size'][0]), patch_size=int(image['patch_size'][0]),
                hidden_act=ACT_TO_HF[image.get('activation', 'gelu_tanh')],
                layer_norm_eps=float(image.get('norm_eps', 1e-6)))
  txt = dict(vocab_size=int(flat['txt/token_embedding'].shape[0]), hidden_size=text['width'],
             intermediate_size=text['mlp_dim'], num_hidden_layers=text['depth'],
             num_attention_heads=text['num_heads'], max_position_embeddings=int(flat['txt/pos_embedding'].shape[0]),
             hidden_act=ACT_TO_HF[text.get('activation', 'gelu_tanh')],
             layer_norm_eps=float(text.get('norm_eps', 1e-6)))
  if family == 'siglip':
    txt['projection_size'] = int(flat['txt/head/kernel'].shape[1])
    vision['vision_use_head'] = True
    return dict(architectures=['SiglipModel'], model_type='siglip', text_config=txt, vision_config=vision)
  projection = int(flat['img/head/kernel'].shape[1])
  txt['eos_token_id'] = 2 if text['pool_type'] == 'argmax' else int(text.get('eos_id', 1))
  txt['projection_dim'] = vision['projection_dim'] = projection
  return dict(architectures=['CLIPModel'], model_type='clip', projection_dim=projection,
              logit_scale_init_value=float(np.asarray(flat['t'])), text_config=txt, vision_config=vision)


def save(directory: str, flat: dict[str, np.ndarray], spec: dict) -> None:
  """Writes `directory/model.safetensors` and `directory/config.json` (loadable by `from_pretrained`)."""
  state, config = to_hf(flat, spec)
  os.makedirs(directory, exist_ok=True)
  common.write_safetensors(os.path.join(directory, 'model.safetensors'),
                           {k: np.asarray(v, np.float32) for k, v in state.items()}, metadata={'format': 'pt'})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
