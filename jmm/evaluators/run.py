"""Running the evaluators of `config.evals`: the embedding functions they call, and their schedule.

Each entry of `config.evals` is `{name: {type, every, ...}}`: `type` names a module `jmm.evaluators.<type>` (or
a dotted module path) with `evaluate(embed_images, embed_texts, tokenizer, config) -> {metric: value}` and
optionally `validate(config)`; `every` is the interval in steps (0: only at the end of training; -1: never, e.g.
`--config.evals.linear_probe.every=-1` turns one off from the command line).
"""
from __future__ import annotations

import time

import jax
import numpy as np

from jmm import config as config_lib
from jmm import parallel
from jmm.errors import ConfigError
from jmm.models import build as model_build


def _module(name: str, ev):
  return config_lib.lookup('evaluators', ev.get('type', name) or name)


def validate(config) -> None:
  """Checks every entry of config.evals (its module exists; its own `validate`); raises ConfigError."""
  for name, ev in config.get('evals', {}).items():
    every = ev.get('every', 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < -1:
      raise ConfigError(f'config.evals.{name}.every must be an integer >= -1 (steps; 0 = at the end; -1 = never), '
                        f'got {every!r}')
    module = _module(name, ev)
    if not hasattr(module, 'evaluate'):
      raise ConfigError(f'config.evals.{name}: {module.__name__} has no evaluate()')
    if hasattr(module, 'validate'):
      try:
        module.validate(ev)
      except ConfigError as e:
        raise ConfigError(f'config.evals.{name}: {e}') from None


def make_embed_fns(model, mesh=None):
  """Jitted (params, images) -> zimg and (params, tokens) -> ztxt, built once per run so evals compile once.

  On a mesh the outputs are replicated, so every process can read the whole embedding back to the host.
  """
  out = {} if mesh is None else {'out_shardings': parallel.replicated(mesh)}
  img_fn = jax.jit(lambda p, x: model_build.apply(model, p, {'image': x})['zimg'], **out)
  txt_fn = jax.jit(lambda p, t: model_build.apply(model, p, {'text': t})['ztxt'], **out)
  return img_fn, txt_fn


def due(config, step: int) -> bool:
  """Whether any evaluator runs at `step` (during training; the end of training runs them all)."""
  return any(ev.get('every', 0) > 0 and step % ev.every == 0 for ev in config.get('evals', {}).values())


def run_evaluators(config, embed_fns, params, tokenizer, step: int | None = None) -> dict:
  """Runs every evaluator in `config.evals` (those due at `step`, or all if None); returns prefixed metrics.

  `embed_fns` comes from `make_embed_fns`; evaluators get host-side functions, numpy in and out.
  """
  img_fn, txt_fn = embed_fns
  embed_images = lambda x: np.asarray(img_fn(params, x), np.float32)  # noqa: E731
  embed_texts = lambda t: np.asarray(txt_fn(params, t), np.float32)  # noqa: E731
  out = {}
  for name, ev in config.get('evals', {}).items():
    every = ev.get('every', 0)
    if every < 0 or (step is not None and (not every or step % every)):
      continue
    start = time.perf_counter()
    results = _module(name, ev).evaluate(embed_images, embed_texts, tokenizer, ev)
    out.update({f'{name}/{k}': v for k, v in results.items()})
    out[f'{name}/seconds'] = time.perf_counter() - start
  return out


def format_results(step: int, results: dict) -> str:
  """The terminal line of an evaluation: its top-1 and recall@1 figures."""
  keys = [k for k in results if k.endswith(('top1', 'top1_seen', 'top1_unseen', 'r1'))]
  return f'eval @ {step}: ' + ', '.join(f'{k} {results[k]:.3f}' for k in keys)
