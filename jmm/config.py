"""Config helpers: argument strings, name -> module lookup, checks of the top-level fields, command-line flag errors.

Configs are plain `ml_collections.ConfigDict`s built by `configs/*.py:get_config(arg)`. This module holds the
few pieces of logic configs must not contain themselves. It imports nothing of jmm but `jmm.errors`, so every
layer may use it; each package checks its own config section (`jmm.validation` runs them all).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from typing import Any

import ml_collections
from absl import flags

from jmm import errors
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


# ---------------------------------------------------------------------------------------------------------------
# Command-line flags. config_flags loads the config file and applies --config.FIELD overrides while absl parses
# the flags, before the entry point's main() runs (and holds a missing file's error until the config is first
# read), so errors there would escape main's `error: ...` handler as tracebacks: they are caught here instead.

def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for `app.run(main, flags_parser=parse_flags)`: a bad flag exits with one error line.

  The line names the flag and what was expected: an unknown config file or argument, a --config.FIELD override
  that names no field, or a value absl cannot parse. An error of another kind (a bug inside a config file) keeps
  its traceback, which is what its author needs.
  """
  try:
    args = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].value is not None:
      flags.FLAGS['config'].value.keys()  # A file that failed to load is a stand-in that raises on first use.
    return args
  except Exception as e:  # pylint: disable=broad-except
    message = _flag_error(e, argv)
    if message is None:
      raise
    sys.exit(f'error: {message}')


def _flag_value(argv, name: str) -> str | None:
  """The last value given to --name (either `--name=V` or `--name V`), as absl would take it."""
  value = None
  for i, arg in enumerate(argv):
    for dashes in ('--', '-'):
      if arg.startswith(f'{dashes}{name}='):
        value = arg.split('=', 1)[1]
      elif arg == f'{dashes}{name}' and i + 1 < len(argv):
        value = argv[i + 1]
  return value


def _innermost(e: BaseException) -> BaseException:
  """The first exception of the chain: config_flags and absl re-raise a config file's error twice, as text."""
  while True:  # As Python prints the chain: `raise ... from None` (parse_arg's) hides the context behind it.
    inner = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if inner is None:
      return e
    e = inner


def _flag_error(e: Exception, argv) -> str | None:
  """The one-line description of a flag-parsing error, or None for an error this does not recognise."""
  config_arg = _flag_value(argv, 'config')
  if config_arg is not None:
    path = config_arg.split(':', 1)[0]
    if not os.path.isfile(path):
      return (f'--config={config_arg}: no config file {path!r} (expected a Python file defining get_config(arg), '
              'e.g. configs/siglip.py)')
    inner = _innermost(e)
    if isinstance(inner, errors.USER_ERRORS):  # e.g. parse_arg's unknown argument, raised by get_config.
      return f'--config={config_arg}: {inner}'
    if isinstance(e, (KeyError, AttributeError, IndexError)):  # config_flags' lookup of an override's field.
      message = _unknown_override(config_arg, argv)
      if message:
        return message
  if isinstance(e, flags.Error) and 'Traceback' not in str(e):
    return str(e)  # absl's own line: names the flag and the value it could not parse.
  return None


def _unknown_override(config_arg: str, argv) -> str | None:
  """'--config.a.b: config.a has no field 'b' ...' for the first override naming no field of the config."""
  # Loaded again, as config_flags loads it (get_config with the text after ':', if any): the failed parse kept
  # no config to look the override up in.
  path_and_arg = config_arg.split(':', 1)
  spec = importlib.util.spec_from_file_location('jmm_flag_check_config', path_and_arg[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(*path_and_arg[1:])
  for arg in argv:
    flag = arg.split('=', 1)[0].lstrip('-')
    if not flag.startswith(('config.', 'noconfig.')):
      continue
    parts = flag.split('.')[1:]
    node, where = config, 'config'
    for part in parts:
      if not hasattr(node, 'keys'):
        return f'--config.{".".join(parts)}: {where} is {node!r}, not a section with fields'
      if part not in node:
        known = sorted(node.keys())
        close = difflib.get_close_matches(part, known, n=3)
        hint = f'did you mean {", ".join(close)}?' if close else f'its fields: {", ".join(known)}'
        return f'--config.{".".join(parts)}: {where} has no field {part!r}; {hint}'
      node, where = node[part], f'{where}.{part}'
  return None
