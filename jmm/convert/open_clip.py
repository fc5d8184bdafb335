"""open_clip `CLIP` state dicts (ViT image tower + text transformer) <-> jmm two-tower parameters.

Layout (open_clip's model.py / transformer.py): `visual.conv1` (no bias), `visual.class_embedding`,
`visual.positional_embedding` [1 + grid^2, W] (class token's row first), `visual.ln_pre`,
`visual.transformer.resblocks.{i}` (ln_1, attn = torch nn.MultiheadAttention with packed in_proj, ln_2,
mlp.c_fc / c_proj), `visual.ln_post`, `visual.proj` [W, D] (x @ proj, no bias); text: `token_embedding`,
`positional_embedding`, `transformer.resblocks.{i}`, `ln_final`, `text_projection` [W, D] (or a Linear),
causal mask, pooled at argmax(ids) (end-of-text is the largest id); `logit_scale`, and `logit_bias` in
SigLIP-style models. LayerNorm eps is torch's 1e-5; MLP activation exact GELU, or QuickGELU for the OpenAI
weights (`quick_gelu: true` / '-quickgelu' model names).

Head counts are not in the state dict: they come from the model config (`open_clip_config.json` of a hub
model, or an open_clip model_configs/*.json), else open_clip's defaults (vision head_width 64, text 8 heads).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from jmm.convert import common
from jmm.convert.common import Entry

_IGNORED = ('attn_mask', 'text.attn_mask')
_TEXT_POOLS = {'argmax': 'argmax', 'last': 'last', 'first': 'first', 'eos': 'eos'}


def read_config(path: str | None) -> dict:
  """An open_clip model config: {'embed_dim', 'vision_cfg', 'text_cfg', 'quick_gelu'} (hub files wrap it in
  'model_cfg'); {} when `path` is None."""
  if not path:
    return {}
  with open(path) as f:
    config = json.load(f)
  return config.get('model_cfg', config)


def spec_from_open_clip(tensors: dict[str, np.ndarray], config: dict) -> dict:
  """The jmm spec of an open_clip CLIP state dict + model config."""
  if 'visual.conv1.weight' not in tensors or 'token_embedding.weight' not in tensors:
    raise ValueError('not an open_clip CLIP ViT state dict (no visual.conv1.weight / token_embedding.weight); '
                     'timm / HF-text towers are not supported')
  vcfg, tcfg = config.get('vision_cfg', {}), config.get('text_cfg', {})
  unsupported = {k: v for k, v in {**vcfg, **tcfg}.items()
                 if k in ('ls_init_value', 'attentional_pool', 'final_ln_after_pool', 'proj_bias', 'embed_cls',
                          'no_ln_pre', 'qk_norm', 'scaled_cosine_attn', 'scale_heads', 'scale_attn',
                          'scale_fc', 'timm_model_name', 'hf_model_name') and v}
  if unsupported:
    raise ValueError(f'open_clip config options jmm does not implement: {unsupported}')
  activation = 'quick_gelu' if config.get('quick_gelu') else 'gelu'
  patch = tensors['visual.conv1.weight']  # [W, 3, p, p]
  vwidth, _, ph, pw = (int(s) for s in patch.shape)
  positions = tensors['visual.positional_embedding'].shape[0] - 1
  grid = math.isqrt(positions)
  if grid * grid != positions:
    raise ValueError(f'visual.positional_embedding: {positions} patch positions is not a square grid')
  head_width = int(vcfg.get('head_width', 64))
  image = dict(width=vwidth, depth=common.count_layers(tensors, 'visual.transformer.resblocks.'),
               mlp_dim=int(tensors['visual.transformer.resblocks.0.mlp.c_fc.weight'].shape[0]),
               num_heads=common.check_heads(vwidth, vwidth // head_width, 'vision_cfg.width // head_width'),
               patch_size=[ph, pw], pool_type='tok', cls_posemb=True, ln_pre=True, patch_bias=False,
               head_bias=False, activation=activation, norm_eps=1e-5)
  if vcfg.get('pool_type', 'tok') != 'tok':
    raise ValueError(f'vision_cfg.pool_type={vcfg["pool_type"]!r}: only "tok" is supported')
  twidth = int(tensors['token_embedding.weight'].shape[1])
  pool = tcfg.get('pool_type', 'argmax')
  if pool not in _TEXT_POOLS:
    raise ValueError(f'text_cfg.pool_type={pool!r}: supported: {", ".join(_TEXT_POOLS)}')
  text = dict(width=twidth, depth=common.count_layers(tensors, 'transformer.resblocks.'),
              mlp_dim=int(tensors['transformer.resblocks.0.mlp.c_fc.weight'].shape[0]),
              num_heads=common.check_heads(twidth, int(tcfg.get('heads', 8)), 'text_cfg.heads'),
              causal=not tcfg.get('no_causal_mask', False), pool_type=_TEXT_POOLS[pool], head_bias=False,
              activation=activation, norm_eps=1e-5)
  if pool == 'eos':
    text['eos_id'] = int(tcfg.get('eos_id', 2))
  out_dim = int(tensors['visual.proj'].shape[1])
  sigmoid = 'logit_bias' in tensors
  # open_clip's SigLIP models squash to [-1, 1] and canonicalise texts; its CLIPs use OpenAI's preprocessing.
  pre = (dict(transform='resize', mean=(0.5,) * 3, std=(0.5,) * 3, canonicalize=True, pad_id=1) if sigmoid else
         dict(transform='resize_crop', mean=common.OPENAI_CLIP_MEAN, std=common.OPENAI_CLIP_STD,
              canonicalize=False, pad_id=0))
  return common.add_preprocessing(dict(format='open_clip', loss='sigmoid' if sigmoid else 'softmax', resolution=grid * ph,
              text_len=int(tensors['positional_embedding'].shape[0]),
              vocab_size=int(tensors['token_embedding.weight'].shape[0]),
              model=dict(image=image, text=text, out_dim=out_dim,
                         temperature_init=math.log(10.0) if sigmoid else math.log(1 / 0.07),
                         bias_init=-10.0 if sigmoid else 0.0)), **pre)


def mapping(spec: dict, tensors=None) -> tuple[list[Entry], dict]:
  """(entries, peer shapes) between jmm params and the open_clip model described by `spec`."""
  image, text = spec['model']['image'], spec['model']['text']
  out = [Entry('img/embedding/kernel', 'visual.conv1.weight', 'conv'), Entry('img/cls', 'visual.class_embedding'),
         Entry('img/pos_embedding', 'visual.positional_embedding'), Entry('img/head/kernel', 'visual.proj'),
         Entry('txt/token_embedding', 'token_embedding.weight'), Entry('txt/pos_embedding', 'positional_embedding'),
         Entry('t', 'logit_scale', 'scalar')]
  out += common.ln_entries('img/ln_pre', 'visual.ln_pre')
  out += common.ln_entries('img/encoder/encoder_norm', 'visual.ln_post')
  out += common.ln_entries('txt/encoder/encoder_norm', 'ln_final')
  for i in range(image['depth']):
    out += common.block_entries(f'img/encoder/encoderblock_{i}', f'visual.transformer.resblocks.{i}', 'open_clip',
                                image['num_heads'])
  for i in range(text['depth']):
    out += common.block_entries(f'txt/encoder/encoderblock_{i}', f'transformer.resblocks.{i}', 'open_clip',
                                text['num_heads'])
  linear_text_proj = tensors is not None and 'text_projection.weight' in tensors
  out += [Entry('txt/head/kernel', 'text_projection.weight', 'linear') if linear_text_proj
          else Entry('txt/head/kernel', 'text_projection')]
  shapes = {'logit_scale': spec.get('logit_scale_shape', ())}
  if spec['loss'] == 'sigmoid':
    out.append(Entry('b', 'logit_bias', 'scalar'))
    shapes['logit_bias'] = spec.get('logit_bias_shape', ())
  return out, shapes


def from_state_dict(tensors: dict[str, np.ndarray], config: dict | None = None,
                    source: str = 'state dict') -> tuple[dict, dict[str, np.ndarray]]:
  """An open_clip CLIP state dict (+ model config dict) -> (spec, flat jmm params)."""
  tensors = {k.removeprefix('module.'): v for k, v in tensors.items()}  # DDP-saved checkpoints.
  tensors = common.as_float32({k: np.asarray(v) for k, v in tensors.items()})
  spec = spec_from_open_clip(tensors, config or {})
  spec['logit_scale_shape'] = list(tensors['logit_scale'].shape)  # () or [1] (nonscalar_logit_scale).
  if 'logit_bias' in tensors:
    spec['logit_bias_shape'] = list(tensors['logit_bias'].shape)
  entries, _ = mapping(spec, tensors)
  flat = common.apply_import(tensors, entries, source, ignore=_IGNORED)
  if 'b' not in flat:
    flat['b'] = np.zeros((), np.float32)  # CLIP has no logit bias; jmm's is unused by the softmax loss.
  return spec, flat


def to_open_clip(flat: dict[str, np.ndarray], spec: dict) -> dict[str, np.ndarray]:
  """Flat jmm params of an open_clip-shaped model (`spec` from `from_state_dict`) -> open_clip state dict."""
  entries, shapes = mapping(spec)
  shapes = {k: tuple(v) for k, v in shapes.items()}
  return common.apply_export(flat, entries, shapes)


def load(path: str, config_path: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """An open_clip checkpoint (a hub directory with open_clip_model.safetensors / open_clip_pytorch_model.bin and
  open_clip_config.json, or a weights file plus `config_path`) -> (spec, flat jmm params)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    weights = common.find_file(path, ('open_clip_model.safetensors', 'open_clip_pytorch_model.bin',
                                      'model.safetensors', 'pytorch_model.bin'), 'open_clip weights')
    if config_path is None and os.path.isfile(os.path.join(path, 'open_clip_config.json')):
      config_path = os.path.join(path, 'open_clip_config.json')
  else:
    weights = path
  return from_state_dict(common.load_tensors(weights), read_config(config_path), source=weights)
