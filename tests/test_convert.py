"""Checkpoint import/export against the peers themselves: HF SigLIP / CLIP, open_clip, big_vision names.

Randomly initialised tiny peer models (fixed torch seed) are converted to jmm; image and text embeddings and
logits must equal the peer's within 1e-4 relative error, and export must give back every tensor bit for bit.
"""
from __future__ import annotations

import json
import math
import os
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmm import convert
from jmm.convert import common
from jmm.convert import hf
from jmm.models import build as model_build

torch = pytest.importorskip('torch')


def _block_broken_torchvision():
  """torchvision from PyPI next to CPU torch fails at import ('operator torchvision::nms does not exist'), and
  transformers imports it whenever it is installed. Marking it absent (sys.modules[name] = None makes
  importlib.util.find_spec return None) lets transformers run without it; a healthy torchvision is kept."""
  if 'torchvision' in sys.modules:
    return
  try:
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except Exception:  # pylint: disable=broad-except
    for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
      del sys.modules[name]
    sys.modules['torchvision'] = None


_block_broken_torchvision()
transformers = pytest.importorskip('transformers')

RTOL = 1e-4
IMAGE, PATCH, TEXT_LEN, VOCAB, BATCH = 32, 8, 12, 80, 4


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _inputs(seed=0, eos=None):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (BATCH, IMAGE, IMAGE, 3)).astype(np.float32)  # [B, H, W, 3]
  ids = rng.integers(3, VOCAB - 2, (BATCH, TEXT_LEN)).astype(np.int32)  # [B, L]
  if eos is not None:  # CLIP-style rows: text, eos, then padding, at different lengths.
    for row, n in zip(ids, (3, 5, TEXT_LEN - 1, 7)):
      row[n] = eos
      row[n + 1:] = 0
  return images, ids


def _jmm_outputs(spec, flat, images, ids):
  """`images` are the peer's normalised pixels; jmm is fed the same pictures in [-1, 1] and normalises them
  itself (the image tower's pixel_mean / pixel_std) when the weights expect another normalisation."""
  image = spec['model']['image']
  if image.get('pixel_mean') is not None:
    images = (images * np.float32(image['pixel_std']) + np.float32(image['pixel_mean'])) * 2 - 1
  model = convert.model_from_spec(spec)
  params = convert.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  with jax.default_matmul_precision('highest'):
    out = jax.jit(model.apply)({'params': params}, {'image': jnp.asarray(images), 'text': jnp.asarray(ids)})
  zimg, ztxt = out['zimg'], out['ztxt']
  logits = np.asarray(ztxt @ zimg.T * out['t'] + out['b'])  # [texts, images], as HF's logits_per_text.
  return np.asarray(zimg), np.asarray(ztxt), logits


def _hf_outputs(model, images, ids):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_text.numpy()


def _state(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _tower(width, depth, heads, mlp):
  return dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp)


@pytest.fixture(scope='module')
def hf_siglip():
  torch.manual_seed(0)
  config = transformers.SiglipConfig(
      text_config=dict(_tower(48, 2, 4, 96), vocab_size=VOCAB, max_position_embeddings=TEXT_LEN),
      vision_config=dict(_tower(48, 2, 4, 80), image_size=IMAGE, patch_size=PATCH))
  model = transformers.SiglipModel(config).eval()
  with torch.no_grad():  # Non-trivial scale and bias (the defaults are log 1 and 0).
    model.logit_scale.fill_(math.log(10.0))
    model.logit_bias.fill_(-3.0)
  return model


@pytest.fixture(scope='module')
def hf_clip():
  torch.manual_seed(1)
  config = transformers.CLIPConfig(
      text_config=dict(_tower(32, 2, 2, 64), vocab_size=VOCAB, max_position_embeddings=TEXT_LEN,
                       eos_token_id=VOCAB - 1),
      vision_config=dict(_tower(48, 2, 4, 96), image_size=IMAGE, patch_size=PATCH), projection_dim=40)
  return transformers.CLIPModel(config).eval()


def test_hf_defaults_match_transformers():
  """The config defaults jmm assumes for keys a saved config.json leaves out are transformers' own."""
  for (family, tower), defaults in hf.DEFAULTS.items():
    cls = {('siglip', 'vision'): transformers.SiglipVisionConfig, ('siglip', 'text'): transformers.SiglipTextConfig,
           ('clip', 'vision'): transformers.CLIPVisionConfig, ('clip', 'text'): transformers.CLIPTextConfig}
    config = cls[(family, tower)]()
    for key, value in defaults.items():
      assert getattr(config, key) == value, (family, tower, key)


def test_hf_siglip_parity_and_roundtrip(hf_siglip, tmp_path):
  state = _state(hf_siglip)
  spec, flat = hf.from_state_dict(state, hf_siglip.config.to_dict())
  assert spec['loss'] == 'sigmoid' and spec['resolution'] == IMAGE and spec['text_len'] == TEXT_LEN
  assert spec['preprocess']['transform'] == 'resize' and spec['tokenizer'] == dict(canonicalize=True, pad_id=1)
  assert 'pixel_mean' not in spec['model']['image']  # SigLIP's [-1, 1] is jmm's own.
  images, ids = _inputs()
  for got, want in zip(_jmm_outputs(spec, flat, images, ids), _hf_outputs(hf_siglip, images, ids)):
    assert _rel_err(got, want) < RTOL
  # Export: every tensor back bit for bit, and the saved directory loads in transformers.
  back, _ = hf.to_hf(flat, spec)
  assert sorted(back) == sorted(k for k in state if not k.endswith('position_ids'))
  for key, value in back.items():
    assert value.shape == state[key].shape and np.array_equal(value, state[key]), key
  hf.save(str(tmp_path / 'out'), flat, spec)
  reloaded = transformers.SiglipModel.from_pretrained(str(tmp_path / 'out')).eval()
  for got, want in zip(_hf_outputs(reloaded, images, ids), _hf_outputs(hf_siglip, images, ids)):
    np.testing.assert_array_equal(got, want)


def test_hf_clip_parity_and_roundtrip(hf_clip, tmp_path):
  state = _state(hf_clip)
  spec, flat = hf.from_state_dict(state, hf_clip.config.to_dict())
  assert spec['loss'] == 'softmax' and spec['model']['text']['pool_type'] == 'eos'
  assert spec['preprocess']['transform'] == 'resize_crop' and spec['tokenizer'] == dict(canonicalize=False, pad_id=0)
  np.testing.assert_allclose(spec['model']['image']['pixel_mean'], [0.48145466, 0.4578275, 0.40821073])
  images, ids = _inputs(1, eos=VOCAB - 1)
  for got, want in zip(_jmm_outputs(spec, flat, images, ids), _hf_outputs(hf_clip, images, ids)):
    assert _rel_err(got, want) < RTOL
  back, _ = hf.to_hf(flat, spec)
  assert sorted(back) == sorted(k for k in state if not k.endswith('position_ids'))
  for key, value in back.items():
    assert value.shape == state[key].shape and np.array_equal(value, state[key]), key
  hf.save(str(tmp_path / 'out'), flat, spec)
  reloaded = transformers.CLIPModel.from_pretrained(str(tmp_path / 'out')).eval()
  for got, want in zip(_hf_outputs(reloaded, images, ids), _hf_outputs(hf_clip, images, ids)):
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope='module')
def open_clip_model():
  """A tiny open_clip CLIP. `import open_clip` pulls in torchvision (broken beside CPU torch, see above) through
  its transforms; the model code needs only `torchvision.ops.misc.FrozenBatchNorm2d` (open_clip/utils.py). So,
  for this import only, torchvision is a stub with that one class and open_clip's package __init__ is skipped
  (an empty package whose path is the real one); sys.modules is restored afterwards."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec('open_clip')
  if spec is None:
    pytest.skip('open_clip is not installed')
  names = ('torchvision', 'torchvision.ops', 'torchvision.ops.misc', 'open_clip')
  saved = {n: sys.modules[n] for n in names if n in sys.modules}
  try:
    import torchvision as real_torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    ocm = importlib.import_module('open_clip.model')
  except Exception:  # pylint: disable=broad-except
    stubs = {n: types.ModuleType(n) for n in names}
    stubs['torchvision.ops.misc'].FrozenBatchNorm2d = type('FrozenBatchNorm2d', (torch.nn.Module,), {})
    stubs['torchvision'].ops = stubs['torchvision.ops']
    stubs['torchvision.ops'].misc = stubs['torchvision.ops.misc']
    stubs['open_clip'].__path__ = list(spec.submodule_search_locations)
    sys.modules.update(stubs)
    try:
      ocm = importlib.import_module('open_clip.model')
    finally:
      for n in names:
        sys.modules.pop(n, None)
      sys.modules.update(saved)
  torch.manual_seed(2)
  model = ocm.CLIP(embed_dim=40, vision_cfg=dict(image_size=IMAGE, layers=2, width=48, patch_size=PATCH,
                                                 head_width=12, mlp_ratio=2.0),
                   text_cfg=dict(context_length=TEXT_LEN, vocab_size=VOCAB, width=32, heads=2, layers=2),
                   init_logit_bias=-4.0).eval()
  config = {'model_cfg': {'embed_dim': 40, 'vision_cfg': {'image_size': IMAGE, 'layers': 2, 'width': 48,
                                                          'patch_size': PATCH, 'head_width': 12},
                          'text_cfg': {'context_length': TEXT_LEN, 'vocab_size': VOCAB, 'width': 32, 'heads': 2,
                                       'layers': 2}}}
  return model, config


def test_open_clip_parity_and_roundtrip(open_clip_model, tmp_path):
  from jmm.convert import open_clip  # pylint: disable=g-import-not-at-top
  model, config = open_clip_model
  state = _state(model)
  (tmp_path / 'open_clip_config.json').write_text(json.dumps(config))
  common.write_safetensors(str(tmp_path / 'open_clip_model.safetensors'), state)
  spec, flat = convert.import_checkpoint('open_clip', str(tmp_path))
  assert spec['loss'] == 'sigmoid' and spec['model']['image']['num_heads'] == 4
  assert spec['model']['image']['activation'] == 'gelu'  # Exact GELU: open_clip without quick_gelu.
  images, ids = _inputs(2, eos=VOCAB - 1)  # End-of-text is the largest id, as in CLIP's vocabulary.
  with torch.no_grad():
    zimg = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), normalize=True)
    ztxt = model.encode_text(torch.from_numpy(ids.astype(np.int64)), normalize=True)
    logits = ztxt @ zimg.T * model.logit_scale.exp() + model.logit_bias
  for got, want in zip(_jmm_outputs(spec, flat, images, ids), (zimg, ztxt, logits)):
    assert _rel_err(got, want.numpy()) < RTOL
  back = open_clip.to_open_clip(flat, spec)
  assert sorted(back) == sorted(k for k in state if k != 'attn_mask')
  for key, value in back.items():
    assert value.shape == state[key].shape and np.array_equal(value, state[key]), key


def _hf_siglip_to_big_vision(state, vheads, theads):
  """big_vision names for an HF SigLIP state dict, written out independently of jmm.convert from the table in
  transformers' convert_siglip_to_hf.py (run backwards): flax layouts, 'params/' prefix, [1, N, W] tables."""
  bv = {}

  def attn(dst, src, heads, packed=False):
    if packed:
      weights = dict(zip(('query', 'key', 'value'), np.split(state[f'{src}.in_proj_weight'], 3)))
      biases = dict(zip(('query', 'key', 'value'), np.split(state[f'{src}.in_proj_bias'], 3)))
    else:
      weights = {q: state[f'{src}.{t}_proj.weight'] for q, t in (('query', 'q'), ('key', 'k'), ('value', 'v'))}
      biases = {q: state[f'{src}.{t}_proj.bias'] for q, t in (('query', 'q'), ('key', 'k'), ('value', 'v'))}
    for q in ('query', 'key', 'value'):
      width = weights[q].shape[1]
      bv[f'{dst}/{q}/kernel'] = weights[q].T.reshape(width, heads, -1)
      bv[f'{dst}/{q}/bias'] = biases[q].reshape(heads, -1)
    out = state[f'{src}.out_proj.weight']  # [W, H*D]
    bv[f'{dst}/out/kernel'] = out.T.reshape(heads, -1, out.shape[0])
    bv[f'{dst}/out/bias'] = state[f'{src}.out_proj.bias']

  def dense(dst, src):
    bv[f'{dst}/kernel'], bv[f'{dst}/bias'] = state[f'{src}.weight'].T, state[f'{src}.bias']

  def norm(dst, src):
    bv[f'{dst}/scale'], bv[f'{dst}/bias'] = state[f'{src}.weight'], state[f'{src}.bias']

  for tower, enc, src, heads in (('img', 'Transformer', 'vision_model', vheads), ('txt', 'Encoder_0', 'text_model',
                                                                              theads)):
    i = 0
    while f'{src}.encoder.layers.{i}.layer_norm1.weight' in state:
      block, layer = f'params/{tower}/{enc}/encoderblock_{i}', f'{src}.encoder.layers.{i}'
      norm(f'{block}/LayerNorm_0', f'{layer}.layer_norm1')
      norm(f'{block}/LayerNorm_1', f'{layer}.layer_norm2')
      attn(f'{block}/MultiHeadDotProductAttention_0', f'{layer}.self_attn', heads)
      dense(f'{block}/MlpBlock_0/Dense_0', f'{layer}.mlp.fc1')
      dense(f'{block}/MlpBlock_0/Dense_1', f'{layer}.mlp.fc2')
      i += 1
  norm('params/img/Transformer/encoder_norm', 'vision_model.post_layernorm')
  norm('params/txt/Encoder_0/encoder_norm', 'text_model.final_layer_norm')
  bv['params/img/embedding/kernel'] = state['vision_model.embeddings.patch_embedding.weight'].transpose(2, 3, 1, 0)
  bv['params/img/embedding/bias'] = state['vision_model.embeddings.patch_embedding.bias']
  bv['params/img/pos_embedding'] = state['vision_model.embeddings.position_embedding.weight'][None]
  bv['params/img/MAPHead_0/probe'] = state['vision_model.head.probe']
  attn('params/img/MAPHead_0/MultiHeadDotProductAttention_0', 'vision_model.head.attention', vheads, packed=True)
  norm('params/img/MAPHead_0/LayerNorm_0', 'vision_model.head.layernorm')
  dense('params/img/MAPHead_0/MlpBlock_0/Dense_0', 'vision_model.head.mlp.fc1')
  dense('params/img/MAPHead_0/MlpBlock_0/Dense_1', 'vision_model.head.mlp.fc2')
  bv['params/txt/Embed_0/embedding'] = state['text_model.embeddings.token_embedding.weight']
  bv['params/txt/pos_embedding'] = state['text_model.embeddings.position_embedding.weight'][None]
  dense('params/txt/head', 'text_model.head')
  bv['params/t'], bv['params/b'] = state['logit_scale'], state['logit_bias']
  return {k: np.ascontiguousarray(v) for k, v in bv.items()}


def test_big_vision_parity_roundtrip_and_scan(hf_siglip, tmp_path):
  from jmm.convert import big_vision  # pylint: disable=g-import-not-at-top
  bv = _hf_siglip_to_big_vision(_state(hf_siglip), 4, 4)
  np.savez(tmp_path / 'siglip.npz', **bv)
  spec, flat = convert.import_checkpoint('big_vision', str(tmp_path / 'siglip.npz'))
  assert spec['model']['image']['num_heads'] == 4 and spec['model']['image']['pool_type'] == 'map'
  images, ids = _inputs(3)
  for got, want in zip(_jmm_outputs(spec, flat, images, ids), _hf_outputs(hf_siglip, images, ids)):
    assert _rel_err(got, want) < RTOL
  back = big_vision.to_big_vision(flat, spec)
  assert sorted(back) == sorted(bv)
  for key, value in back.items():
    assert value.shape == bv[key].shape and np.array_equal(value, bv[key]), key
  # A scanned checkpoint (one 'encoderblock' with a leading depth axis) gives the same parameters.
  scanned = {k: v for k, v in bv.items() if '/encoderblock_' not in k}
  for prefix in ('params/img/Transformer', 'params/txt/Encoder_0'):
    names = {k.split('/', 4)[-1] for k in bv if k.startswith(f'{prefix}/encoderblock_0/')}
    for name in names:
      scanned[f'{prefix}/encoderblock/{name}'] = np.stack([bv[f'{prefix}/encoderblock_{i}/{name}'] for i in range(2)])
  _, flat2 = big_vision.from_params(scanned)
  assert sorted(flat2) == sorted(flat) and all(np.array_equal(flat2[k], flat[k]) for k in flat)


def _param_shapes(model, text_len, resolution=IMAGE):
  """The model's parameter tree as ShapeDtypeStructs (nothing computed: all load_init_params needs)."""
  def init():
    variables = model.init(jax.random.key(0), {'image': jnp.zeros((1, resolution, resolution, 3)),
                                               'text': jnp.zeros((1, text_len), jnp.int32)})
    return nn.unbox(variables['params'])
  return jax.eval_shape(init)


def _load_config(name, arg):
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(name, os.path.join(root, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_cli_import_then_pretrained_config_and_init(hf_siglip, tmp_path, capsys):
  """import_weights CLI -> .npz -> configs/pretrained.py builds the model -> load_init_params -> HF's outputs."""
  from jmm.convert import import_weights  # pylint: disable=g-import-not-at-top
  hf_siglip.save_pretrained(str(tmp_path / 'hf'))
  out = str(tmp_path / 'siglip.npz')
  assert import_weights.main(['--format=hf', f'--src={tmp_path / "hf"}', f'--out={out}']) == 0
  printed = capsys.readouterr().out
  assert f'configs/pretrained.py:weights={out}' in printed and '--config.data.text_len=12' in printed
  config = _load_config('pretrained', f'weights={out}')
  assert config.init_from == out and config.objectives.sigmoid.loss == 'sigmoid' and config.data.resolution == IMAGE
  model = model_build.make_model(config, vocab_size=VOCAB)
  loaded = convert.load_init_params(config.init_from, _param_shapes(model, config.data.text_len))
  images, ids = _inputs(4)
  with jax.default_matmul_precision('highest'):
    out_ = jax.jit(model.apply)({'params': loaded}, {'image': jnp.asarray(images), 'text': jnp.asarray(ids)})
  zimg, ztxt = out_['zimg'], out_['ztxt']
  want = _hf_outputs(hf_siglip, images, ids)
  assert _rel_err(zimg, want[0]) < RTOL and _rel_err(ztxt, want[1]) < RTOL
  # A config that does not match the weights is refused, naming the parameter.
  params = _param_shapes(model_build.make_model(config, vocab_size=VOCAB), TEXT_LEN + 4)
  with pytest.raises(ValueError, match=r"'txt/pos_embedding' has shape \(12, 48\) there.*\(16, 48\)"):
    convert.load_init_params(out, params)
  # Export back through the CLI: the HF directory reproduces the original model's outputs.
  from jmm.convert import export_weights  # pylint: disable=g-import-not-at-top
  assert export_weights.main([f'--src={out}', f'--out={tmp_path / "back"}']) == 0
  back = transformers.SiglipModel.from_pretrained(str(tmp_path / 'back')).eval()
  for got, want_ in zip(_hf_outputs(back, images, ids), want):
    np.testing.assert_array_equal(got, want_)


def test_load_init_params_from_workdir(tmp_path):
  """A jmm workdir's latest checkpoint gives its params (only), stacked-layer names included; mismatches named."""
  from jmm import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  spec = dict(format='jmm', loss='sigmoid', resolution=16, text_len=8, vocab_size=32,
              model=dict(image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=[8, 8], pool_type='map'),
                         text=dict(width=32, depth=1, mlp_dim=64, num_heads=2, pool_type='last'), out_dim=16,
                         temperature_init=1.0, bias_init=-1.0))
  model = convert.model_from_spec(spec)
  init = jax.jit(lambda key: nn.unbox(model.init(key, {'image': jnp.zeros((1, 16, 16, 3)),
                                                      'text': jnp.zeros((1, 8), jnp.int32)})))
  params = jax.tree.map(np.asarray, init(jax.random.key(0))['params'])
  state = {'params': params, 'opt_state': {'mu': jax.tree.map(np.ones_like, params)}, 'step': np.int32(7)}
  ck = ckpt_lib.Checkpointer(str(tmp_path), use_async=False, every=1)
  ck.save(7, state, {'position': 3}, force=True)
  ck.close()
  zeros = jax.tree.map(np.zeros_like, params)
  loaded = convert.load_init_params(str(tmp_path), zeros)
  flat_loaded, flat_want = convert.flatten(loaded), convert.flatten(params)
  assert sorted(flat_loaded) == sorted(flat_want)
  assert all(np.array_equal(flat_loaded[k], flat_want[k]) for k in flat_want)
  wrong = dict(spec, model=dict(spec['model'], out_dim=8))
  wrong_params = _param_shapes(convert.model_from_spec(wrong), 8, 16)
  with pytest.raises(ValueError, match="'img/head/bias' has shape"):
    convert.load_init_params(str(tmp_path), wrong_params)
  # A converted .npz saved per block loads into a scanned (nn.scan) model of the same sizes.
  common.save_params(str(tmp_path / 'p.npz'), flat_want, spec)
  scan = dict(spec, model=dict(spec['model'], image=dict(spec['model']['image'], scan=True)))
  scan_params = _param_shapes(convert.model_from_spec(scan), 8, 16)
  stacked = convert.flatten(convert.load_init_params(str(tmp_path / 'p.npz'), scan_params))
  key = 'img/encoder/encoderblock/attn/query/kernel'
  assert np.array_equal(stacked[key][0], flat_want['img/encoder/encoderblock_0/attn/query/kernel'])


def test_export_jmm_workdir_to_hf(tmp_path):
  """A model trained in jmm (SigLIP-shaped, no image head) exports from its workdir to an HF SiglipModel that gives
  jmm's embeddings and logits; a model HF cannot represent is refused, naming the field."""
  from jmm import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from jmm.convert import export_weights  # pylint: disable=g-import-not-at-top
  model_config = dict(image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=[8, 8], pool_type='map',
                                 out_dim=0), text=dict(width=32, depth=2, mlp_dim=64, num_heads=2, pool_type='last'),
                      out_dim=32, temperature_init=math.log(10.0), bias_init=-10.0)
  spec = dict(format='jmm', loss='sigmoid', resolution=IMAGE, text_len=TEXT_LEN, vocab_size=VOCAB, model=model_config)
  model = convert.model_from_spec(spec)
  init = jax.jit(lambda key: nn.unbox(model.init(key, {'image': jnp.zeros((1, IMAGE, IMAGE, 3)),
                                                      'text': jnp.zeros((1, TEXT_LEN), jnp.int32)})))
  params = jax.tree.map(np.asarray, init(jax.random.key(3))['params'])
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'wd'), use_async=False, every=1)
  ck.save(5, {'params': params, 'step': np.int32(5)}, None, force=True)
  ck.close()
  config = {'model': model_config, 'data': {'resolution': IMAGE, 'text_len': TEXT_LEN},
            'objectives': {'sigmoid': {'type': 'contrastive', 'loss': 'sigmoid'}}}
  (tmp_path / 'wd' / 'config.json').write_text(json.dumps(config))
  assert export_weights.main([f'--src={tmp_path / "wd"}', f'--out={tmp_path / "hf"}']) == 0
  exported = transformers.SiglipModel.from_pretrained(str(tmp_path / 'hf')).eval()
  images, ids = _inputs(5)
  got = _jmm_outputs(spec, convert.flatten(params), images, ids)
  for ours, theirs in zip(got, _hf_outputs(exported, images, ids)):
    assert _rel_err(ours, theirs) < RTOL
  with_head = dict(spec, model=dict(model_config, image=dict(model_config['image'], out_dim=16)))
  with pytest.raises(ValueError, match=r'model\.image\.out_dim=16'):
    hf.to_hf(convert.flatten(params), with_head)
