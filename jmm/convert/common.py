"""What every converter shares: safe tensor-file I/O, name-mapping tables, jmm's converted-params file.

Loading never unpickles arbitrary objects: safetensors are parsed here (an 8-byte little-endian header length,
a JSON header of {name: {dtype, shape, data_offsets}}, then raw bytes; huggingface/safetensors README), `.npz`
goes through `numpy.load(allow_pickle=False)` and torch files through `torch.load(weights_only=True)`.

A mapping is a list of `Entry(jmm, peer, kind, heads)`: one jmm parameter path (or three, for torch's packed
q/k/v) and one peer tensor name, with the layout change between them. Every kind has an exact inverse (only
transposes and reshapes), so export(import(x)) == x bit for bit.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

# OpenAI CLIP's per-channel pixel mean / std on [0, 1] pixels (Radford et al. 2021; open_clip and HF use them too).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SPEC_KEY = '__jmm_spec__'  # The model description stored inside a converted params .npz (a JSON string).

# safetensors dtype names -> numpy dtypes. BF16 comes from ml_dtypes (a jax dependency).
_ST_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64, 'I32': np.int32,
              'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


def _st_dtype(name: str, path: str, key: str):
  if name == 'BF16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  if name not in _ST_DTYPES:
    raise ValueError(f'{path}: tensor {key!r} has dtype {name}, which jmm cannot read; known: '
                     f'{", ".join(sorted(_ST_DTYPES))}, BF16')
  return np.dtype(_ST_DTYPES[name])


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A `.safetensors` file -> {name: numpy array} (float16 / bfloat16 kept as they are; no pickle involved)."""
  with open(path, 'rb') as f:
    raw = f.read()
  if len(raw) < 8:
    raise ValueError(f'{path}: not a safetensors file (shorter than its 8-byte header length)')
  (size,) = struct.unpack('<Q', raw[:8])
  if 8 + size > len(raw):
    raise ValueError(f'{path}: not a safetensors file (header length {size} exceeds the file size)')
  try:
    header = json.loads(raw[8:8 + size])
  except ValueError as e:
    raise ValueError(f'{path}: not a safetensors file (header is not JSON: {e})') from None
  data = memoryview(raw)[8 + size:]
  out = {}
  for key, info in header.items():
    if key == '__metadata__':
      continue
    dtype = _st_dtype(info['dtype'], path, key)
    start, end = info['data_offsets']
    shape = tuple(info['shape'])
    if end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise ValueError(f'{path}: tensor {key!r} has {end - start} bytes, expected shape {shape} of {dtype}')
    out[key] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape).copy()
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
  """Writes {name: array} as `.safetensors` (names sorted, 8-byte aligned header, as the reference writer)."""
  names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
  header: dict[str, Any] = {'__metadata__': dict(metadata)} if metadata else {}
  blobs, offset = [], 0
  for key in sorted(tensors):
    array = np.asarray(tensors[key], order='C')
    if array.dtype.name == 'bfloat16':
      dtype = 'BF16'
    elif array.dtype in names:
      dtype = names[array.dtype]
    else:
      raise ValueError(f'cannot write tensor {key!r} of dtype {array.dtype} to safetensors')
    blob = array.tobytes()
    header[key] = {'dtype': dtype, 'shape': list(array.shape), 'data_offsets': [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(text)))
    f.write(text)
    for blob in blobs:
      f.write(blob)
  os.replace(tmp, path)


def _torch_load(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f'{path}: reading a torch checkpoint needs torch; convert it to .safetensors, or '
                      f'install torch') from None
  state = torch.load(path, map_location='cpu', weights_only=True)  # Tensors and containers only, no code.
  if isinstance(state, dict) and 'state_dict' in state and isinstance(state['state_dict'], dict):
    state = state['state_dict']  # open_clip training checkpoints wrap the weights.
  if not isinstance(state, dict):
    raise ValueError(f'{path}: expected a state dict (name -> tensor), got {type(state).__name__}')
  out = {}
  for key, value in state.items():
    if not hasattr(value, 'detach'):
      continue  # Non-tensor entries (epoch counters, ...).
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
      value = value.float()
    out[key] = value.numpy().copy()
  return out


def load_tensors(path: str) -> dict[str, np.ndarray]:
  """Tensors of a `.safetensors`, `.npz` (no pickle) or torch `.bin` / `.pt` / `.pth` (weights_only) file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint file not found: {path!r}')
  if path.endswith('.safetensors'):
    return read_safetensors(path)
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  if path.endswith(('.bin', '.pt', '.pth', '.ckpt')):
    return _torch_load(path)
  raise ValueError(f'{path}: unknown checkpoint format; expected .safetensors, .npz, .bin, .pt or .pth')


def find_file(directory: str, names: Sequence[str], what: str) -> str:
  """The first of `names` present in `directory`; FileNotFoundError listing them otherwise."""
  for name in names:
    candidate = os.path.join(directory, name)
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f'{directory}: no {what} found; looked for {", ".join(names)}')


def as_float32(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Floating tensors (float16, bfloat16, float64) as float32, the dtype jmm keeps parameters in."""
  out = {}
  for k, v in tensors.items():
    kind = np.dtype(v.dtype)
    out[k] = v.astype(np.float32) if (kind.kind == 'f' or kind.name == 'bfloat16') else v
  return out


# ---------------------------------------------------------------------------------------------------------
# Name mappings.
# ---------------------------------------------------------------------------------------------------------
class Entry(NamedTuple):
  """jmm path(s) <-> a peer tensor name, with the layout change `kind` (see `to_jmm`)."""
  jmm: str | tuple[str, str, str]
  peer: str
  kind: str = 'id'
  heads: int = 0


def to_jmm(kind: str, x: np.ndarray, heads: int = 0):
  """A peer tensor in jmm's layout. kinds:

  id: unchanged. linear: torch Linear weight [out, in] -> kernel [in, out]. q: torch q/k/v weight [H*D, W] ->
  [W, H, D]; q_bias: [H*D] -> [H, D]. out: torch out_proj weight [W, H*D] -> [H, D, W]. packed / packed_bias:
  torch nn.MultiheadAttention in_proj [3*H*D, W] -> three [W, H, D] (q, k, v; returned as a tuple).
  conv: torch [out, in, kh, kw] -> [kh, kw, in, out]. probe / pos: keep the last two axes (probe [1, 1, W] ->
  [1, W], big_vision pos_embedding [1, N, W] -> [N, W]). scalar: [1] or [] -> []. vector: big_vision cls
  [1, 1, W] -> [W].
  """
  if kind == 'id':
    return x
  if kind == 'linear':
    return x.T
  if kind == 'q':
    return x.T.reshape(x.shape[1], heads, -1)
  if kind == 'q_bias':
    return x.reshape(heads, -1)
  if kind == 'out':
    return x.T.reshape(heads, -1, x.shape[0])
  if kind == 'packed':
    return tuple(to_jmm('q', part, heads) for part in np.split(x, 3, axis=0))
  if kind == 'packed_bias':
    return tuple(to_jmm('q_bias', part, heads) for part in np.split(x, 3, axis=0))
  if kind == 'conv':
    return x.transpose(2, 3, 1, 0)
  if kind == 'scalar':
    return x.reshape(())
  if kind in ('probe', 'pos'):
    return x.reshape(x.shape[-2:])
  if kind == 'vector':
    return x.reshape(-1)
  raise ValueError(f'unknown mapping kind {kind!r}')


def to_peer(kind: str, x, shape: tuple[int, ...]):
  """The inverse of `to_jmm`: jmm value(s) -> the peer tensor of `shape`."""
  if kind == 'id':
    return x
  if kind == 'linear':
    return x.T
  if kind == 'q':
    return x.reshape(x.shape[0], -1).T
  if kind == 'q_bias':
    return x.reshape(-1)
  if kind == 'out':
    return x.reshape(-1, x.shape[-1]).T
  if kind == 'packed':
    return np.concatenate([to_peer('q', part, ()) for part in x], axis=0)
  if kind == 'packed_bias':
    return np.concatenate([part.reshape(-1) for part in x], axis=0)
  if kind == 'conv':
    return x.transpose(3, 2, 0, 1)
  if kind in ('scalar', 'probe', 'pos', 'vector'):
    return x.reshape(shape)
  raise ValueError(f'unknown mapping kind {kind!r}')


def apply_import(tensors: dict[str, np.ndarray], mapping: Iterable[Entry], source: str,
                 ignore: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """Peer tensors -> flat jmm params {'img/encoder/...': array}. Every peer tensor must be used (or in
  `ignore`): a tensor nobody maps is a part of the model jmm would silently drop, so it is an error."""
  out, used = {}, set()
  for e in mapping:
    if e.peer not in tensors:
      raise KeyError(f'{source}: tensor {e.peer!r} is missing (needed for jmm {e.jmm!r})')
    value = to_jmm(e.kind, np.asarray(tensors[e.peer]), e.heads)
    used.add(e.peer)
    if isinstance(e.jmm, tuple):
      out.update(zip(e.jmm, value))
    else:
      out[e.jmm] = value
  unused = sorted(k for k in tensors if k not in used and k not in ignore)
  if unused:
    raise ValueError(f'{source}: {len(unused)} tensor(s) have no jmm counterpart (a model variant this '
                     f'converter does not know), e.g. {unused[:5]}')
  return {k: np.asarray(v, order='C') for k, v in out.items()}  # (ascontiguousarray makes 0-d 1-d.)


def apply_export(flat: dict[str, np.ndarray], mapping: Iterable[Entry], shapes: dict[str, tuple[int, ...]]):
  """Flat jmm params -> peer tensors, by the same mapping (`shapes`: the peer shape of each reshaped kind)."""
  out = {}
  for e in mapping:
    names = e.jmm if isinstance(e.jmm, tuple) else (e.jmm,)
    missing = [n for n in names if n not in flat]
    if missing:
      raise KeyError(f'jmm parameter {missing[0]!r} is missing (needed for {e.peer!r})')
    value = tuple(flat[n] for n in names) if isinstance(e.jmm, tuple) else flat[e.jmm]
    out[e.peer] = np.asarray(to_peer(e.kind, value, shapes.get(e.peer, ())), order='C')
  return out


def block_entries(jmm_prefix: str, peer_prefix: str, style: str, heads: int) -> list[Entry]:
  """One pre-LN transformer block's mapping. style: 'hf' (transformers CLIP / SigLIP layer), 'open_clip'
  (ResidualAttentionBlock with nn.MultiheadAttention), 'big_vision' (flax Encoder1DBlock, same layouts as jmm).
  """
  j, p = jmm_prefix, peer_prefix
  if style == 'hf':
    names = dict(ln_attn='layer_norm1', ln_mlp='layer_norm2', fc_in='mlp.fc1', fc_out='mlp.fc2')
    out = [Entry(f'{j}/attn/{q}/kernel', f'{p}.self_attn.{t}_proj.weight', 'q', heads)
           for q, t in (('query', 'q'), ('key', 'k'), ('value', 'v'))]
    out += [Entry(f'{j}/attn/{q}/bias', f'{p}.self_attn.{t}_proj.bias', 'q_bias', heads)
            for q, t in (('query', 'q'), ('key', 'k'), ('value', 'v'))]
    out += [Entry(f'{j}/attn/out/kernel', f'{p}.self_attn.out_proj.weight', 'out', heads),
            Entry(f'{j}/attn/out/bias', f'{p}.self_attn.out_proj.bias')]
  elif style == 'open_clip':
    names = dict(ln_attn='ln_1', ln_mlp='ln_2', fc_in='mlp.c_fc', fc_out='mlp.c_proj')
    out = mha_entries(f'{j}/attn', f'{p}.attn', heads)
  elif style == 'big_vision':
    names = dict(ln_attn='LayerNorm_0', ln_mlp='LayerNorm_1', fc_in='MlpBlock_0/Dense_0',
                 fc_out='MlpBlock_0/Dense_1')
    out = [Entry(f'{j}/attn/{q}/{w}', f'{p}/MultiHeadDotProductAttention_0/{q}/{w}')
           for q in ('query', 'key', 'value', 'out') for w in ('kernel', 'bias')]
  else:
    raise ValueError(f'unknown block style {style!r}')
  if style == 'big_vision':
    out += [Entry(f'{j}/{a}/{w}', f'{p}/{names[a]}/{w}') for a in ('ln_attn', 'ln_mlp') for w in ('scale', 'bias')]
    out += [Entry(f'{j}/mlp/{a}/{w}', f'{p}/{names[a]}/{w}') for a in ('fc_in', 'fc_out') for w in ('kernel', 'bias')]
  else:
    out += ln_entries(f'{j}/ln_attn', f'{p}.{names["ln_attn"]}') + ln_entries(f'{j}/ln_mlp', f'{p}.{names["ln_mlp"]}')
    out += linear_entries(f'{j}/mlp/fc_in', f'{p}.{names["fc_in"]}')
    out += linear_entries(f'{j}/mlp/fc_out', f'{p}.{names["fc_out"]}')
  return out


def ln_entries(jmm: str, peer: str) -> list[Entry]:
  """A torch LayerNorm (weight, bias) <-> jmm (scale, bias)."""
  return [Entry(f'{jmm}/scale', f'{peer}.weight'), Entry(f'{jmm}/bias', f'{peer}.bias')]


def linear_entries(jmm: str, peer: str, bias: bool = True) -> list[Entry]:
  """A torch nn.Linear <-> a jmm Dense."""
  out = [Entry(f'{jmm}/kernel', f'{peer}.weight', 'linear')]
  return out + ([Entry(f'{jmm}/bias', f'{peer}.bias')] if bias else [])


def mha_entries(jmm: str, peer: str, heads: int) -> list[Entry]:
  """A torch nn.MultiheadAttention (packed in_proj [3W, W], out_proj) <-> jmm MultiHeadAttention."""
  qkv = tuple(f'{jmm}/{q}/kernel' for q in ('query', 'key', 'value'))
  qkv_bias = tuple(f'{jmm}/{q}/bias' for q in ('query', 'key', 'value'))
  return [Entry(qkv, f'{peer}.in_proj_weight', 'packed', heads),
          Entry(qkv_bias, f'{peer}.in_proj_bias', 'packed_bias', heads),
          Entry(f'{jmm}/out/kernel', f'{peer}.out_proj.weight', 'out', heads),
          Entry(f'{jmm}/out/bias', f'{peer}.out_proj.bias')]


def count_layers(tensors: Iterable[str], prefix: str) -> int:
  """Number of blocks `prefix{i}...` present (0, 1, ... consecutive)."""
  names = list(tensors)
  depth = 0
  while any(n.startswith(f'{prefix}{depth}.') or n.startswith(f'{prefix}{depth}/') for n in names):
    depth += 1
  return depth


def check_heads(width: int, heads: int, where: str) -> int:
  """`heads` if it divides `width`; a ValueError naming the config field otherwise."""
  if heads <= 0 or width % heads:
    raise ValueError(f'{where}={heads} does not divide the width {width}')
  return heads


# ---------------------------------------------------------------------------------------------------------
# jmm's converted-params file: flat 'img/encoder/...' arrays plus the spec, one .npz.
# ---------------------------------------------------------------------------------------------------------
def save_params(path: str, flat: dict[str, np.ndarray], spec: dict) -> None:
  """Writes flat params and `spec` (the model description, JSON) to one `.npz`, atomically."""
  if SPEC_KEY in flat:
    raise ValueError(f'parameter name {SPEC_KEY!r} is reserved')
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f'{path}.tmp.npz'
  np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()}, **{SPEC_KEY: np.array(json.dumps(spec))})
  os.replace(tmp, path)


def load_params(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
  """(flat params, spec or None) of a `.npz` written by `save_params` (or any flat 'a/b/c' npz)."""
  tensors = load_tensors(path)
  spec = tensors.pop(SPEC_KEY, None)
  return tensors, (json.loads(str(spec)) if spec is not None else None)


def add_preprocessing(spec: dict, *, transform: str, mean: Sequence[float], std: Sequence[float],
                      canonicalize: bool, pad_id: int) -> dict:
  """Records in `spec` how the weights expect their inputs, so evaluation and fine-tuning feed them right.

  spec['preprocess'] = {transform: 'resize' (squash to the resolution, SigLIP) | 'resize_crop' (shorter side to
  the resolution, then the centre crop, CLIP), mean, std (per channel, on [0, 1] pixels)}; spec['tokenizer'] =
  {canonicalize (SigLIP's text cleaning), pad_id}. jmm feeds images in [-1, 1] (mean = std = 0.5); any other
  normalisation becomes the image tower's pixel_mean / pixel_std, so the model maps the pixels itself.
  """
  mean, std = [float(m) for m in mean], [float(s) for s in std]
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ValueError(f'pixel mean / std must be 3 values each (std > 0), got {mean} / {std}')
  spec['preprocess'] = dict(transform=transform, mean=mean, std=std)
  spec['tokenizer'] = dict(canonicalize=bool(canonicalize), pad_id=int(pad_id))
  if any(abs(v - 0.5) > 1e-6 for v in mean + std):
    spec['model']['image'].update(pixel_mean=mean, pixel_std=std)
  return spec
