"""Config helpers: argument strings, name -> module lookup, checks of the top-level fields.

Configs are plain `ml_collections.ConfigDict`s built by `configs/*.py:get_config(arg)`. This module holds the
few pieces of logic configs must not contain themselves. It imports nothing of jmm but `jmm.errors`, so every
layer may use it; each package checks its own config section (`jmm.validation` runs them all).
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
  """Imports `jmm.<package>.<name>` (an objective, evaluator or model by its config name).

  A name with a dot, or one that names no module of `jmm.<package>`, is imported as a module path
  (`my_project.my_objective`): a user's own objective, evaluator, model or head plugs in without an edit of jmm.
  """
  if '.' not in name:
    try:
      return importlib.import_module(f'jmm.{package}.{name}')
    except ModuleNotFoundError as e:
      if not (e.name and e.name.startswith(f'jmm.{package}.{name}')):
        raise  # The module exists but an import inside it failed.
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name and name.startswith(e.name):
      folder = os.path.join(os.path.dirname(__file__), package)
      known = sorted(f[:-3] for f in os.listdir(folder) if f.endswith('.py') and not f.startswith('_'))
      raise ConfigError(f'unknown {package} name {name!r}; known: {known} (or an importable module path)') from None
    raise


_CHOICES = {
    'dtype': ('float32', 'bfloat16'),
    'attention_impl': ('xla', 'cudnn', 'pallas', 'auto', 'reference'),
    'host_malloc': ('auto', 'tuned', 'default'),
    'cpu_matmuls': ('auto', 'onednn', 'xla'),
}
REQUIRED = ('total_steps', 'batch_size', 'model', 'data', 'optim', 'objectives')


def get_dotted(config, dotted: str):
  """config['a']['b'] for 'a.b'; KeyError / AttributeError when a part is missing."""
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def check_choice(config, dotted: str, choices, prefix: str = 'config') -> None:
  """Raises ConfigError naming `prefix.dotted` unless its value is one of `choices` (a missing field passes)."""
  try:
    value = get_dotted(config, dotted)
  except (KeyError, AttributeError):
    return
  if value not in choices:
    raise ConfigError(f'{prefix}.{dotted}={value!r} is not one of {list(choices)}')


def check_positive_int(config, dotted: str, prefix: str = 'config') -> None:
  """Raises ConfigError naming `prefix.dotted` unless it is an integer > 0."""
  value = get_dotted(config, dotted)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ConfigError(f'{prefix}.{dotted} must be a positive integer, got {value!r}')


def validate_top(config: ml_collections.ConfigDict) -> None:
  """Checks the top-level fields of a training config (sections are checked by their packages)."""
  for field in REQUIRED:
    if field not in config:
      hint = (' (config.objective + config.loss became config.objectives = {name: {type, weight, ...}}: see '
              'configs/siglip.py)' if field == 'objectives' and 'loss' in config else '')
      raise ConfigError(f'config is missing the required field {field!r}{hint}')
  for dotted, choices in _CHOICES.items():
    check_choice(config, dotted, choices)
  for dotted in ('total_steps', 'batch_size', 'log_every', 'max_nonfinite_steps'):
    if dotted in config:
      check_positive_int(config, dotted)
