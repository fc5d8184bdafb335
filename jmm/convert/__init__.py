"""Import and export of peer checkpoints (HF transformers, open_clip, big_vision) and initial parameters.

Every importer returns `(spec, flat)`: `flat` maps jmm parameter paths ('img/encoder/encoderblock_0/attn/query/
kernel', ..., 't', 'b') to float32 numpy arrays; `spec` describes the model they fit: {'format', 'loss'
('sigmoid' | 'softmax'), 'resolution', 'text_len', 'vocab_size', 'model': {'image', 'text', 'out_dim',
'temperature_init', 'bias_init'}} with the tower dicts in `jmm.models.two_tower.TwoTower`'s terms.
`common.save_params` stores both in one `.npz`, which `config.init_from` and `configs/pretrained.py` read.
"""
from __future__ import annotations

import os

import numpy as np

from jmm.convert import common

FORMATS = ('hf', 'open_clip', 'big_vision')


def import_checkpoint(fmt: str, src: str, config_path: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads a peer checkpoint of format `fmt` ('hf', 'open_clip', 'big_vision') -> (spec, flat params)."""
  if fmt == 'hf':
    from jmm.convert import hf  # pylint: disable=g-import-not-at-top
    return hf.load(src, config_path)
  if fmt == 'open_clip':
    from jmm.convert import open_clip  # pylint: disable=g-import-not-at-top
    return open_clip.load(src, config_path)
  if fmt == 'big_vision':
    from jmm.convert import big_vision  # pylint: disable=g-import-not-at-top
    return big_vision.load(src)
  raise ValueError(f'unknown checkpoint format {fmt!r}; known: {", ".join(FORMATS)}')


def model_from_spec(spec: dict, **overrides):
  """The `TwoTower` a spec describes (its text tower sized to spec['vocab_size'])."""
  from jmm.models import two_tower  # pylint: disable=g-import-not-at-top
  m = {**spec['model'], **overrides}
  text = {**m['text'], 'vocab_size': spec['vocab_size']}
  image = dict(m['image'])
  if image.get('patch_size') is not None:
    image['patch_size'] = tuple(image['patch_size'])
  return two_tower.TwoTower(image=image, text=text, out_dim=m['out_dim'], temperature_init=m['temperature_init'],
                            bias_init=m['bias_init'])


def flatten(tree, prefix: str = '') -> dict:
  """A nested params dict -> {'a/b/c': leaf}."""
  out = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, dict) or hasattr(value, 'items'):
      out.update(flatten(value, f'{path}/'))
    else:
      out[path] = value
  return out


def unflatten(flat: dict) -> dict:
  """{'a/b/c': leaf} -> a nested dict."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _stack_layers(flat: dict, want: set) -> dict:
  """Params saved per block ('encoderblock_3/...') stacked for an `nn.scan` model ('encoderblock/...')."""
  out = dict(flat)
  for key in want:
    if '/encoderblock/' not in key or key in out:
      continue
    head, tail = key.split('/encoderblock/', 1)
    layers = []
    while f'{head}/encoderblock_{len(layers)}/{tail}' in out:
      layers.append(out.pop(f'{head}/encoderblock_{len(layers)}/{tail}'))
    if layers:
      out[key] = np.stack(layers)
  return out


def match_params(flat: dict, params, source: str):
  """Flat arrays -> a tree shaped like `params`; ValueError naming the first missing / unexpected /
  mis-shaped parameter (the usual cause: a config that does not match the converted model)."""
  want = flatten(params)
  flat = _stack_layers(flat, set(want))
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  if missing:
    raise ValueError(f'{source}: parameter {missing[0]!r} of the model is not in it ({len(missing)} missing'
                     f'{", and it has unexpected " + repr(extra[:3]) if extra else ""}); does the config match '
                     f'the converted model? (configs/pretrained.py builds the model from the file)')
  if extra:
    raise ValueError(f'{source}: parameter {extra[0]!r} is not in the model ({len(extra)} unexpected); does the '
                     f'config match the converted model?')
  out = {}
  for key in sorted(want):
    have, need = np.shape(flat[key]), tuple(np.shape(want[key]))
    if tuple(have) != need:
      raise ValueError(f'{source}: parameter {key!r} has shape {tuple(have)} there, but the model built by the '
                       f'config has {need}')
    dtype = getattr(want[key], 'dtype', np.float32)
    out[key] = np.asarray(flat[key]).astype(dtype)
  return unflatten(out)


def select(flat: dict, only) -> dict:
  """The entries of a flat {'a/b/c': leaf} dict under the top-level names `only` (all of them for None)."""
  return flat if only is None else {k: v for k, v in flat.items() if k.split('/', 1)[0] in only}


def read_workdir_params(workdir: str, params=None, only=None, step: int | None = None) -> tuple[dict, int]:
  """(params (only) of the checkpoint at `step` (default: the latest) in a jmm workdir as numpy on the host, step).

  With `params` (the model's tree), names and shapes are checked against it from the checkpoint's metadata
  before any bytes are read; `only` (top-level names) limits that check to those subtrees. The whole saved state
  is restored into single-device host buffers (a target built from the metadata, so the mesh that wrote it does
  not matter) and its params kept.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from jmm import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  ck = ckpt_lib.Checkpointer(workdir, use_async=False)
  try:
    step = ck.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{workdir!r}: no checkpoint in {ck.directory}')
    meta = ck.manager.item_metadata(step)['state']
    meta = getattr(meta, 'tree', meta)
    if params is not None:
      shapes = {k: tuple(getattr(v, 'shape', ()) or ()) for k, v in flatten(meta['params']).items()}
      match_params(select({k: np.zeros(s, np.float32) for k, s in shapes.items()}, only), params,
                   f'{ck.directory}/{step}')
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(getattr(m, 'shape', ()) or ()), m.dtype, sharding=device), meta)
    restored = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return jax.tree.map(np.asarray, restored['state']['params']), int(step)
  finally:
    ck.close()


def load_init_params(path: str, params, only=None):
  """Returns parameters loaded from `path` (a jmm workdir or a converted params file), shaped like `params`.

  path: a jmm workdir (params of its latest checkpoint; optimizer state and step are not taken), a `.npz`
  written by `python -m jmm.convert.import_weights`, or an HF model directory / `.safetensors` (converted on
  the fly). Every parameter name and shape must match the model; the first mismatch is named. only: top-level
  names (e.g. ('img',)): `params` holds just those subtrees, and the rest of the file is ignored.
  """
  path = os.fspath(path)
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return match_params(select(flatten(read_workdir_params(path, params, only)[0]), only), params, path)
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, 'config.json')):
    from jmm.convert import hf  # pylint: disable=g-import-not-at-top
    _, flat = hf.load(path)
  elif path.endswith('.npz'):
    flat, _ = common.load_params(path)
  elif path.endswith('.safetensors'):
    from jmm.convert import hf  # pylint: disable=g-import-not-at-top
    _, flat = hf.load(path)
  elif os.path.exists(path):
    raise ValueError(f'init_from={path!r}: expected a jmm workdir (with checkpoints/), a .npz from '
                     f'jmm.convert.import_weights, or an HF model directory')
  else:
    raise FileNotFoundError(f'init_from={path!r} does not exist')
  return match_params(select(flat, only), params, path)


def read_spec(path: str) -> dict:
  """The model description stored in a converted params `.npz` (only that entry is read)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'converted weights not found: {path!r} (write them with '
                            f'python -m jmm.convert.import_weights)')
  import json  # pylint: disable=g-import-not-at-top
  with np.load(path, allow_pickle=False) as z:
    if common.SPEC_KEY not in z.files:
      raise ValueError(f'{path}: no model description inside; was it written by jmm.convert.import_weights?')
    return json.loads(str(z[common.SPEC_KEY]))


def initial_params(path: str, params, *, moe: bool = False, only=None):
  """`config.init_from` for a fresh run: parameters from a jmm workdir or a converted `.npz`, fitted to `params`.

  For a mixture-of-experts model (`moe`), a MoE checkpoint of the same shape loads as is, and a dense parent is
  upcycled (CLIP-UP: each expert a copy of the dense MLP, routers from the fresh initialisation in `params`).
  only: top-level parameter names to load (`config.init_from_towers`, e.g. ('img',) for LiT); the others keep
  their fresh initialisation from `params`. None loads everything.
  """
  if only is not None:
    missing = sorted(set(only) - set(params))
    if missing:
      raise ValueError(f'init_from={path!r}: the model has no parameters {missing[0]!r} to load')
    loaded = _initial_params(path, {k: params[k] for k in only}, moe, only)
    kept = sorted(set(params) - set(only))
    print(f'init_from: loaded {", ".join(sorted(only))} from {path}; {", ".join(kept)} freshly initialised',
          flush=True)
    return {**params, **loaded}
  return _initial_params(path, params, moe, None)


def _initial_params(path: str, params, moe: bool, only):
  if not moe:
    return load_init_params(path, params, only)
  from jmm.models import moe as moe_lib  # pylint: disable=g-import-not-at-top
  try:
    return load_init_params(path, params, only)
  except ValueError as moe_error:
    try:
      dense = load_init_params(path, moe_lib.dense_template(params), only)
    except ValueError as dense_error:
      raise ValueError(f'init_from={path!r} fits neither the MoE model ({moe_error}) nor its dense parent '
                       f'({dense_error})') from None
  print(f'init_from: upcycled the dense parameters of {path} into the MoE model', flush=True)
  return moe_lib.upcycle(dense, params)
