"""Running the evaluators of `config.evals`: the embedding functions they call, and their schedule.

Each entry of `config.evals` is `{name: {type, every, ...}}`: `type` names a module `jmm.evaluators.<type>` (or
a dotted module path) with `evaluate(embed_images, embed_texts, tokenizer, config) -> {metric: value}` and
optionally `validate(config)`; `every` is the interval in steps (0: only at the end of training; -1: never, e.g.
`--config.evals.linear_probe.every=-1` turns one off from the command line); `dims` (any entry, e.g. (16, 32, 64))
also evaluates the embeddings cut to those prefix widths and re-normalised, metric keys suffixed '@16' ...
(Matryoshka representations; `common.evaluate_at_dims`); `similarity` ('global' default | 'filip', for
zeroshot, synthetic_zeroshot and retrieval) scores with FILIP's token-wise late interaction instead of the global
embeddings' cosine: the embedding functions then return the FILIP head's token embeddings (`token_embed_fns`;
`head`, default 'filip', names it), and the evaluator's scores come from `common.similarities`.
"""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from jmm import config as config_lib
from jmm import parallel
from jmm.errors import ConfigError
from jmm.evaluators import common
from jmm.evaluators import region_embeddings
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
    out_dim = (config.get('model') or {}).get('out_dim')
    common.eval_dims(ev, f'config.evals.{name}.', out_dim if isinstance(out_dim, int) else None)
    if not hasattr(module, 'evaluate'):
      raise ConfigError(f'config.evals.{name}: {module.__name__} has no evaluate()')
    _validate_similarity(config, name, ev, module)
    if hasattr(module, 'validate'):
      try:
        module.validate(ev)
      except ConfigError as e:
        raise ConfigError(f'config.evals.{name}: {e}') from None


SIMILARITIES = ('global', 'filip')
TOKENWISE = ('zeroshot', 'synthetic_zeroshot', 'retrieval')  # Evaluators that score through common.similarities.


def _validate_similarity(config, name, ev, module) -> None:
  """`similarity`: 'global' or 'filip'; 'filip' needs a token-wise evaluator, no dims, and the FILIP head."""
  similarity = ev.get('similarity', 'global') or 'global'
  where = f'config.evals.{name}.'
  if similarity not in SIMILARITIES:
    raise ConfigError(f'{where}similarity={similarity!r} is not one of {list(SIMILARITIES)}')
  if similarity == 'global':
    return
  if module.__name__.rsplit('.', 1)[-1] not in TOKENWISE:
    raise ConfigError(f'{where}similarity={similarity!r}: {module.__name__} scores global embeddings only; '
                      f'token-wise scoring is for {list(TOKENWISE)}')
  if ev.get('dims'):
    raise ConfigError(f'{where}dims={tuple(ev.get("dims"))}: prefix widths are for global embeddings, not with '
                      f'similarity={similarity!r}')
  head = ev.get('head', 'filip') or 'filip'
  heads = (config.get('model') or {}).get('heads') or {}
  if head not in heads or not str(heads[head].get('type', '')).endswith('filip_head'):
    raise ConfigError(f"{where}similarity='filip' reads the FILIP head {head!r} ({where}head), which "
                      f"config.model.heads does not hold (heads: {sorted(heads)})")


class EmbedFns(NamedTuple):
  """Jitted (params, images) -> zimg and (params, tokens) -> ztxt, and the mesh their inputs are split over."""
  image: Callable
  text: Callable
  mesh: Any = None
  tokens: Any = None  # {head name: EmbedFns of its token embeddings} for the model's FILIP heads.
  # {method: jitted (params, images, boxes [N, R, 4]) -> region embeddings [N, R, D]}: 'pooled' (the image tower's
  # tokens averaged inside each box, through its head: `regions.pooled_region_fn`) and each CLOC head's Prompter.
  regions: Any = None


def make_embed_fns(model, mesh=None) -> EmbedFns:
  """The embedding functions, built once per run so evals compile once.

  On a mesh the inputs are split over its batch axes (every device embeds a slice) and the outputs are
  replicated, so every process can read the whole embedding back to the host.
  """
  out = {} if mesh is None else {'out_shardings': parallel.replicated(mesh)}
  img_fn = jax.jit(lambda p, x: model_build.apply(model, p, {'image': x})['zimg'], **out)
  txt_fn = jax.jit(lambda p, t: model_build.apply(model, p, {'text': t})['ztxt'], **out)
  heads = getattr(model, 'heads', None) or {}
  tokens = {name: token_embed_fns(model, name, mesh) for name, head in heads.items()
            if str(head.get('type', '')).endswith('filip_head')}  # Jitted lazily: compiled when first used.
  regions = {'pooled': jax.jit(region_embeddings.pooled_region_fn(model), **out)}
  for name, head in heads.items():
    if str(head.get('type', '')).endswith('cloc_head'):
      regions[name] = jax.jit(region_embeddings.prompter_region_fn(model, name), **out)
  return EmbedFns(img_fn, txt_fn, mesh, tokens, regions)


def token_embed_fns(model, head: str = 'filip', mesh=None) -> EmbedFns:
  """Embedding functions returning the FILIP head `head`'s token embeddings: images [N, T, D], texts [N, L, D]
  with the padding tokens' rows set to zero (how the host side knows the mask: real tokens are unit vectors)."""
  out = {} if mesh is None else {'out_shardings': parallel.replicated(mesh)}

  def texts(p, t):
    tokens = model_build.apply(model, p, {'text': t})[head]
    return tokens['ztxt_tokens'] * tokens['txt_mask'][..., None]

  img_fn = jax.jit(lambda p, x: model_build.apply(model, p, {'image': x})[head]['zimg_tokens'], **out)
  return EmbedFns(img_fn, jax.jit(texts, **out), mesh)


class Progress:
  """A progress line for long evaluations: what has been embedded, and how fast, every `every` seconds."""

  def __init__(self, name: str, every: float = 10.0):
    self.name, self.every = name, every
    self.counts = {'images': 0, 'texts': 0}
    self.start = self.last = time.perf_counter()

  def update(self, what: str, n: int) -> None:
    self.counts[what] += n
    now = time.perf_counter()
    if now - self.last >= self.every:
      self.last = now
      rate = self.counts['images'] / max(now - self.start, 1e-9)
      print(f'eval {self.name}: {self.counts["images"]:,} images, {self.counts["texts"]:,} texts embedded '
            f'({rate:,.0f} images/s, {now - self.start:.0f} s)', flush=True)


def host_embed_fns(embed_fns: EmbedFns, params, progress: Progress | None = None):
  """Host-side (numpy in, numpy float32 out) embedding functions for the evaluators.

  Every process passes the same full batch; on a mesh each device takes its slice of it (a batch that does not
  split evenly is padded with copies of its last row, dropped from the output), so evaluation is multi-host
  safe and keeps every device busy.
  """
  mesh = embed_fns.mesh

  def put(x):
    if mesh is None:
      return x
    pad = -len(x) % parallel.batch_shards(mesh)
    if pad:
      x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return jax.make_array_from_callback(x.shape, parallel.batch_sharding(mesh), lambda index: x[index])

  def wrap(fn, what):
    def call(*xs):  # Arrays with the same leading dimension (images; images and boxes for regions).
      xs = [np.asarray(x) for x in xs]
      n = len(xs[0])
      out = np.asarray(fn(params, *[put(x) for x in xs]), np.float32)[:n]
      if progress is not None:
        progress.update(what, n)
      return out
    return call
  return wrap(embed_fns.image, 'images'), wrap(embed_fns.text, 'texts')


def due(config, step: int) -> bool:
  """Whether any evaluator runs at `step` (during training; the end of training runs them all)."""
  return any(ev.get('every', 0) > 0 and step % ev.every == 0 for ev in config.get('evals', {}).values())


def run_evaluators(config, embed_fns, params, tokenizer, step: int | None = None) -> dict:
  """Runs every evaluator in `config.evals` (those due at `step`, or all if None); returns prefixed metrics.

  `embed_fns` comes from `make_embed_fns`; evaluators get host-side functions (`host_embed_fns`), numpy in and out.
  """
  out = {}
  for name, ev in config.get('evals', {}).items():
    every = ev.get('every', 0)
    if every < 0 or (step is not None and (not every or step % every)):
      continue
    start = time.perf_counter()
    fns = embed_fns
    if getattr(_module(name, ev), 'EMBEDS', 'global') == 'regions':  # Region evaluators: images and boxes.
      method = region_embeddings.region_method(ev, embed_fns.regions or {})
      if method not in (embed_fns.regions or {}):
        raise ConfigError(f'config.evals.{name}.method={method!r}: the model embeds regions by '
                          f'{sorted(embed_fns.regions or {})}')
      fns = embed_fns._replace(image=embed_fns.regions[method])
    elif (ev.get('similarity', 'global') or 'global') == 'filip':
      head = ev.get('head', 'filip') or 'filip'
      if head not in (embed_fns.tokens or {}):
        raise ConfigError(f"config.evals.{name}.similarity='filip': the model has no FILIP head {head!r}")
      fns = embed_fns.tokens[head]
    embed_images, embed_texts = host_embed_fns(fns, params, Progress(name))
    # `dims`: also at embedding prefixes, keys suffixed '@d' (common.evaluate_at_dims; every evaluator gets it).
    results = common.evaluate_at_dims(_module(name, ev).evaluate, embed_images, embed_texts, tokenizer, ev,
                                      f'config.evals.{name}.')
    out.update({f'{name}/{k}': v for k, v in results.items()})
    out[f'{name}/seconds'] = time.perf_counter() - start
  return out


def format_results(step: int, results: dict) -> str:
  """The terminal line of an evaluation: its top-1 and recall@1 figures."""
  keys = [k for k in results if k.endswith(('top1', 'top1_seen', 'top1_unseen', 'r1'))]
  return f'eval @ {step}: ' + ', '.join(f'{k} {results[k]:.3f}' for k in keys)
