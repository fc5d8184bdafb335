"""Config helpers: argument strings, validation with clear errors, name -> module lookup.

Configs are plain `ml_collections.ConfigDict`s built by `configs/*.py:get_config(arg)`. This module holds the
few pieces of logic configs must not contain themselves.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

import ml_collections


from jmm.errors import ConfigError  # noqa: F401  (re-exported: jmm.config.ConfigError)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `'img=B/16,res=224'` into a ConfigDict, typed like `defaults`.

  Only keys present in `defaults` are allowed, so a typo in the argument string is an error, not a silent
  no-op. Values are converted to the type of their default (bool accepts true/false/1/0).
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(','):
    item = item.strip()
    if not item:
      continue
    if '=' not in item:
      raise ConfigError(f'config argument {item!r} must look like key=value (known keys: {sorted(defaults)})')
    key, value = (s.strip() for s in item.split('=', 1))
    if key not in defaults:
      raise ConfigError(f'unknown config argument {key!r}; known: {sorted(defaults)}')
    default = defaults[key]
    try:
      if isinstance(default, bool):
        if value.lower() not in ('true', 'false', '1', '0'):
          raise ValueError(value)
        typed = value.lower() in ('true', '1')
      elif isinstance(default, int):
        typed = int(value)
      elif isinstance(default, float):
        typed = float(value)
      else:
        typed = value
    except ValueError:
      raise ConfigError(
          f'config argument {key}={value!r}: expected {type(default).__name__}') from None
    out[key] = typed
  return out


def lookup(package: str, name: str):
  """Imports `jmm.<package>.<name>` (e.g. an objective or evaluator by its config name)."""
  try:
    return importlib.import_module(f'jmm.{package}.{name}')
  except ModuleNotFoundError as e:
    if e.name and e.name.startswith(f'jmm.{package}.{name}'):
      folder = os.path.join(os.path.dirname(__file__), package)
      known = sorted(f[:-3] for f in os.listdir(folder) if f.endswith('.py') and not f.startswith('_'))
      raise ConfigError(f'unknown {package} name {name!r}; known: {known}') from None
    raise


_CHOICES = {
    'loss.name': ('sigmoid', 'softmax'),
    'loss.impl': ('dense', 'ring', 'bidir', 'gather'),
    'optim.name': ('adamw', 'adafactor'),
    'optim.schedule': ('cosine', 'linear', 'constant'),
    'dtype': ('float32', 'bfloat16'),
    'data.name': ('synthetic', 'webdataset', 'array_record', 'tfds', 'mixture'),
    'data.transform': ('resize', 'resize_crop', 'random_resized_crop'),
    'attention_impl': ('xla', 'cudnn', 'pallas', 'auto', 'reference'),
    'host_malloc': ('auto', 'tuned', 'default'),
    'cpu_matmuls': ('auto', 'onednn', 'xla'),
}


def _get(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a training config before any work starts; raises ConfigError naming the bad field."""
  for field in ('total_steps', 'batch_size', 'model', 'data', 'optim', 'loss', 'objective'):
    if field not in config:
      raise ConfigError(f'config is missing the required field {field!r}')
  for dotted, choices in _CHOICES.items():
    try:
      value = _get(config, dotted)
    except (KeyError, AttributeError):
      continue
    if value not in choices:
      raise ConfigError(f'config.{dotted}={value!r} is not one of {list(choices)}')
  impl = config.loss.get('impl', 'dense')
  if impl in ('ring', 'bidir') and config.loss.get('name') != 'sigmoid':  # The ring passes sigmoid-loss blocks.
    raise ConfigError(f'config.loss.impl={impl!r} needs config.loss.name=\'sigmoid\' (got '
                      f'{config.loss.get("name")!r}); the softmax loss takes impl \'dense\' or \'gather\'')
  for dotted in ('total_steps', 'batch_size', 'data.resolution', 'data.text_len'):
    value = _get(config, dotted)
    if not isinstance(value, int) or value <= 0:
      raise ConfigError(f'config.{dotted} must be a positive integer, got {value!r}')
  from jmm.models import vit  # Local import: config validation must not pull the model code in early.
  for tower in ('image', 'text'):
    variant = config.model[tower].get('variant')
    if variant:
      try:
        vit.decode_variant(variant)
      except ValueError as e:
        raise ConfigError(f'config.model.{tower}.variant: {e}') from None
  patch = config.model.image.get('patch_size')
  if patch is None and config.model.image.get('variant'):
    patch = vit.decode_variant(config.model.image.variant).get('patch_size')
  if patch is not None and config.data.resolution % patch[0]:
    raise ConfigError(f'config.data.resolution={config.data.resolution} is not divisible by the '
                      f'patch size {tuple(patch)}')
  if config.data.name != 'synthetic':
    from jmm.data import mixture  # Local import, as above: file sources only when a config names them.
    try:
      mixture.validate_data(config.data)
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(str(e)) from None
  from jmm.models import moe  # Local import, as above.
  moe.validate(config)  # config.model.moe: mixture-of-experts fields (absent or num_experts=0: dense).
  lookup('objectives', config.objective)
  for name, ev in config.get('evals', {}).items():
    lookup('evaluators', ev.get('type', name))
