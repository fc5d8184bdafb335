"""Building, initialising and applying a model named by the config: the model side of the training seam.

A model is a module `jmm.models.<config.model.name>` (or any importable module path) with
`build(config, vocab_size) -> flax module` and optionally `validate(config)`. The flax module maps a batch (a
dict) to a dict of named outputs (`jmm.models.two_tower.TwoTower` documents the two-tower ones).

Optional heads (`config.model.heads = {name: {'type': module, **fields}}`): a module with a `Head` flax class,
called as `Head(**fields)(outputs, batch, train=...)` after the towers; what it returns is `outputs[name]`.

Layers that record values during the forward pass (`self.sow`, e.g. the MoE routers' statistics in the 'moe'
collection) are collected by `apply` into `outputs['sown']`, where objectives read them.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmm import config as config_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
SOWN = ('moe',)  # Collections that layers sow into; `apply` returns them as outputs['sown'].
DEFAULT_MODEL = 'two_tower'


def model_module(config):
  """The module that builds `config.model.name` (default 'two_tower')."""
  return config_lib.lookup('models', config.model.get('name', DEFAULT_MODEL) or DEFAULT_MODEL)


def validate(config) -> None:
  """Checks config.model (and `dtype`) through the named model's own `validate`; raises ConfigError."""
  module = model_module(config)
  if not hasattr(module, 'build'):
    raise config_lib.ConfigError(f'config.model.name={config.model.name!r}: {module.__name__} has no build()')
  if hasattr(module, 'validate'):
    module.validate(config)
  for field, value, hook in (('model.locked', config.model.get('locked'), 'locked_params'),
                             ('init_from_towers', config.get('init_from_towers'), 'init_from_params')):
    if value and not hasattr(module, hook):
      raise config_lib.ConfigError(f'config.{field}={value!r}: the model {module.__name__} names no towers '
                                   f'(it has no {hook}())')


def locked_params(config) -> tuple[str, ...]:
  """Top-level parameter names of the parts `config.model.locked` locks (the model's `locked_params`): the
  optimizer keeps no state for them and they get no updates; () for a model without locked parts."""
  module = model_module(config)
  return tuple(module.locked_params(config)) if hasattr(module, 'locked_params') else ()


def init_from_params(config) -> tuple[str, ...] | None:
  """Top-level parameter names `config.init_from` loads (`config.init_from_towers`, through the model's
  `init_from_params`); None = all of them."""
  module = model_module(config)
  return module.init_from_params(config) if hasattr(module, 'init_from_params') else None


def make_model(config, vocab_size: int) -> nn.Module:
  """The flax module for `config.model`, its text vocabulary sized `vocab_size`."""
  return model_module(config).build(config, vocab_size)


def dummy_batch(spec: Mapping[str, Any]) -> dict:
  """Zeros shaped like `spec` ({field: jax.ShapeDtypeStruct}, e.g. `jmm.data.build.batch_spec`)."""
  return {k: jnp.zeros(v.shape, v.dtype) for k, v in spec.items()}


def init_params(model: nn.Module, spec: Mapping[str, Any], seed: int):
  """Initialises parameters for batches like `spec`; returns (params, logical partition specs)."""
  variables = jax.jit(model.init)(jax.random.key(seed), dummy_batch(spec))
  return nn.unbox(variables['params']), nn.get_partition_spec(variables)['params']


def abstract_params(model: nn.Module, spec: Mapping[str, Any], seed: int = 0, axis_rules=()):
  """(shapes and dtypes of the parameters, their logical partition specs), nothing allocated.

  Traced under `axis_rules` (the activations' sharding constraints); unboxed outside them.
  """
  with nn.logical_axis_rules(axis_rules):
    boxed = jax.eval_shape(lambda key: model.init(key, dummy_batch(spec)), jax.random.key(seed))['params']
  return nn.unbox(boxed), nn.get_partition_spec(boxed)


def apply(model: nn.Module, params, batch: Mapping[str, Any], *, train: bool = False, rngs=None) -> dict:
  """The model's outputs for `batch`; values sown during the forward pass under outputs['sown'][collection]."""
  outputs, sown = model.apply({'params': params}, batch, train=train, rngs=rngs, mutable=list(SOWN))
  outputs = dict(outputs)
  outputs['sown'] = dict(sown)
  return outputs
