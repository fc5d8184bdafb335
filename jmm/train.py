"""The training loop: data, model, optimizer, jitted step, evaluations, checkpoints.

`run(config, workdir)` is the whole program; `jmm.main` only parses flags. Restarting with the same workdir
resumes from the newest checkpoint, data iterator included, so a preempted run continues bit-for-bit.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import time

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from jmm import checkpoint as ckpt_lib
from jmm import config as config_lib
from jmm import cpu_matmuls
from jmm import metrics as metrics_lib
from jmm import optim
from jmm import parallel
from jmm.data import pipeline
from jmm.data import synthetic
from jmm.data import tokenizer as tokenizer_lib
from jmm.models import moe as moe_lib
from jmm.models import two_tower

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


from jmm.errors import WorkdirError  # noqa: F401  (re-exported)


def ensure_workdir(workdir: str) -> str:
  """Creates `workdir` and proves it writable before any expensive work starts."""
  if not workdir:
    raise WorkdirError('--workdir is required')
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'workdir {workdir!r} cannot be written: {e.strerror or e}') from None
  return workdir


# ---------------------------------------------------------------------------------------------------------
# Building blocks shared with jmm.evaluate.
# ---------------------------------------------------------------------------------------------------------
def make_source(config, split: str = 'train'):
  """The training data source named by `config.data.name`: synthetic, a file source, or a SourceMixture."""
  data = config.data
  if data.name == 'synthetic':
    return synthetic.SyntheticCaptions(split, resolution=data.resolution, seed=data.seed,
                                       max_objects=data.max_objects)
  from jmm.data import mixture  # pylint: disable=g-import-not-at-top  (file sources only when asked for)
  try:
    return mixture.make_sources(data, split)
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError(str(e)) from None


def make_train_iterator(config, tokenizer, per_process_batch: int, process_index: int, process_count: int):
  """This process's iterator of training batches (its slice of the data), with get_state / set_state.

  File sources skip and count bad records: each batch carries `data_stats` (per source) for the trainer.
  """
  data = config.data
  knobs = dict(num_threads=data.get('num_threads', 1), prefetch=data.get('prefetch', 2),
               worker_count=data.get('worker_count', 0))
  source = make_source(config)
  if data.name == 'synthetic':
    return pipeline.train_iterator(
        source, tokenizer, batch_size=per_process_batch, text_len=data.text_len, seed=config.seed,
        shard_index=process_index, shard_count=process_count, split_batches=True, **knobs)
  from jmm.data import mixture  # pylint: disable=g-import-not-at-top
  sources, weights = (source.sources, source.weights) if isinstance(source, mixture.SourceMixture) else (
      [source], None)
  return pipeline.file_train_iterator(
      sources, tokenizer, mixture.make_transform(data), weights=weights, batch_size=per_process_batch,
      text_len=data.text_len, seed=config.seed, shard_index=process_index, shard_count=process_count,
      value_range=tuple(data.get('value_range', (-1.0, 1.0))),
      max_consecutive_bad=data.get('max_consecutive_bad', 1000), **knobs)


def make_tokenizer(config, workdir: str):
  """Loads `config.tokenizer.path`, or trains (once, cached in the workdir) a SentencePiece model."""
  path = config.tokenizer.get('path') or None
  source = make_source(config)
  return tokenizer_lib.get_tokenizer(
      path, workdir, lambda: source.captions(config.tokenizer.get('train_sentences', 20000)),
      config.tokenizer.vocab_size)


def make_model(config, vocab_size: int) -> two_tower.TwoTower:
  """The two-tower model described by `config.model`."""
  m = config.model
  dtype = DTYPES[config.get('dtype', 'float32')]
  impl = config.get('attention_impl', 'xla')
  image = {**m.image.to_dict(), 'attention_impl': impl}
  text = {**m.text.to_dict(), 'vocab_size': vocab_size, 'attention_impl': impl}
  for tower, name in ((image, 'image'), (text, 'text')):
    if moe_lib.tower_moe(config, name):  # Mixture-of-experts MLPs in some blocks (config.model.moe).
      tower['moe'] = moe_lib.tower_moe(config, name)
    if 'patch_size' in tower and tower['patch_size'] is not None:
      tower['patch_size'] = tuple(tower['patch_size'])
    for k in [k for k, v in tower.items() if v is None or v == '']:
      del tower[k]
  return two_tower.TwoTower(image=image, text=text, out_dim=m.out_dim,
                            temperature_init=m.temperature_init, bias_init=m.bias_init, dtype=dtype)


def init_params(model, config, seed: int):
  """Initialises parameters from dummy inputs; returns (params, logical partition specs)."""
  res, text_len = config.data.resolution, config.data.text_len
  image = jnp.zeros((1, res, res, 3), jnp.float32)
  text = jnp.zeros((1, text_len), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(seed), image, text)
  return nn.unbox(variables['params']), nn.get_partition_spec(variables)['params']


def create_state(model, config, mesh, axis_rules=parallel.LOGICAL_RULES, params=None):
  """The train state {'params', 'opt_state', 'step'}, created already sharded on `mesh`.

  Shapes and logical names come from `jax.eval_shape` (nothing allocated), shardings from `jmm.parallel`, and
  one `jax.jit(init, out_shardings=...)` then materialises each shard on its own device: a model too big for
  one device never exists whole. `params` (e.g. converted weights) replace the random initialisation.
  Returns (state, state_shardings, tx, schedule).
  """
  res, text_len = config.data.resolution, config.data.text_len
  image = jnp.zeros((1, res, res, 3), jnp.float32)
  text = jnp.zeros((1, text_len), jnp.int32)
  key = jax.random.key(config.seed)
  with nn.logical_axis_rules(axis_rules):
    boxed = jax.eval_shape(model.init, key, image, text)['params']
  logical_specs = nn.get_partition_spec(boxed)
  abstract_params = nn.unbox(boxed)
  tx, schedule = optim.make_optimizer(config.optim, abstract_params, config.total_steps)
  param_shardings = parallel.logical_shardings(abstract_params, logical_specs, mesh, axis_rules)

  def init_fn(key, params):
    if params is None:
      params = nn.unbox(model.init(key, image, text)['params'])
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros([], jnp.int32)}

  abstract_state = jax.eval_shape(init_fn, key, abstract_params)
  shardings = {'params': param_shardings,
               'opt_state': parallel.opt_state_shardings(abstract_state['opt_state'], abstract_params,
                                                         param_shardings, mesh),
               'step': parallel.replicated(mesh)}
  if params is not None:
    params = jax.device_put(params, param_shardings)
  with nn.logical_axis_rules(axis_rules):
    state = jax.jit(init_fn, out_shardings=shardings)(key, params)
  return state, shardings, tx, schedule


def make_embed_fns(model, mesh=None):
  """Jitted (params, images) -> zimg and (params, tokens) -> ztxt, built once per run so evals compile once.

  On a mesh the outputs are replicated, so every process can read the whole embedding back to the host.
  """
  out = {} if mesh is None else {'out_shardings': parallel.replicated(mesh)}
  img_fn = jax.jit(lambda p, x: model.apply({'params': p}, x, None)[0], **out)
  txt_fn = jax.jit(lambda p, t: model.apply({'params': p}, None, t)[1], **out)
  return img_fn, txt_fn


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
    if step is not None and (not every or step % every):
      continue
    module = config_lib.lookup('evaluators', ev.get('type', name))
    start = time.perf_counter()
    results = module.evaluate(embed_images, embed_texts, tokenizer, ev)
    out.update({f'{name}/{k}': v for k, v in results.items()})
    out[f'{name}/seconds'] = time.perf_counter() - start
  return out


def make_train_step(model, tx, schedule, objective, loss_config, *, state_shardings=None, mesh=None,
                    axis_rules=parallel.LOGICAL_RULES, moe_config=None, compiler_options=None):
  """The jitted step: forward, objective, backward, optimizer update. `state` is donated.

  With `state_shardings` and `mesh` the step is compiled for them (batch split over the mesh's batch axes,
  metrics replicated) and the activations follow the logical-axis rules; without, it is a plain jit.
  moe_config (`config.model.moe` with num_experts > 0): the MoE layers' weighted load-balance and z losses are
  added to the objective's ('loss' is the sum; 'contrastive_loss' the objective's alone) and logged ('moe/...').
  compiler_options: XLA options the step is compiled with (`jmm.cpu_matmuls`: oneDNN matmuls on CPU).
  """
  use_moe = bool(moe_config and moe_config.get('num_experts'))
  def train_step(state, batch):
    with nn.logical_axis_rules(axis_rules):
      return _train_step(state, batch)

  def _train_step(state, batch):
    def loss_fn(params):
      if not use_moe:
        outputs = model.apply({'params': params}, batch['image'], batch['text'], train=True)
        return objective.loss_fn(outputs, batch, loss_config)
      outputs, sown = model.apply({'params': params}, batch['image'], batch['text'], train=True, mutable=['moe'])
      loss, metrics = objective.loss_fn(outputs, batch, loss_config)
      extra, moe_metrics = moe_lib.aux_losses(sown['moe'], moe_config)
      return loss + extra, {**metrics, **moe_metrics, 'loss': loss + extra, 'contrastive_loss': loss}

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {**metrics, 'lr': schedule(state['step']), 'grad_norm': optax.tree.norm(grads)}
    return {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}, metrics

  jit = functools.partial(jax.jit, donate_argnums=0, compiler_options=compiler_options or None)
  if state_shardings is None or mesh is None:
    return jit(train_step)
  return jit(train_step, in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
             out_shardings=(state_shardings, parallel.replicated(mesh)))


# ---------------------------------------------------------------------------------------------------------
# The program.
# ---------------------------------------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint); returns the final metrics."""
  # ----- Set-up: validate everything cheap before anything expensive. -----
  config_lib.validate(config)
  total_steps, batch_size = config.total_steps, config.batch_size
  mesh = parallel.make_mesh(config.get('mesh'))  # MeshError (before any compilation) if it does not fit.
  parallel.check_batch(batch_size, mesh)
  moe_lib.check_mesh(config, mesh)
  axis_rules = parallel.rules(config, mesh)
  workdir = ensure_workdir(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  objective = config_lib.lookup('objectives', config.objective)
  print(f'mesh: {parallel.describe(mesh)}', flush=True)

  # ----- Data. -----
  tokenizer = make_tokenizer(config, workdir)
  data_iter = make_train_iterator(config, tokenizer, batch_size // jax.process_count(),
                                  jax.process_index(), jax.process_count())

  # ----- Model and optimizer: state created sharded on the mesh. -----
  model = make_model(config, tokenizer.vocab_size)
  ck = config.checkpoint
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=ck.keep, every=ck.every, use_async=ck.get('async', True))
  start_step = checkpointer.latest_step() or 0
  init = None
  if config.get('init_from') and not start_step:  # A jmm workdir or converted weights (jmm.convert).
    from jmm import convert  # pylint: disable=g-import-not-at-top
    params, _ = init_params(model, config, config.seed)
    if moe_lib.tower_moe(config, 'image') or moe_lib.tower_moe(config, 'text'):
      init = _init_moe_params(convert, config.init_from, params)
    else:
      init = convert.load_init_params(config.init_from, params)
  with jax.set_mesh(mesh):
    state, state_shardings, tx, schedule = create_state(model, config, mesh, axis_rules, params=init)
  num_params = sum(x.size for x in jax.tree.leaves(state['params']))
  logging.info('model: %.2fM parameters', num_params / 1e6)
  print(f'model: {num_params / 1e6:.2f}M parameters; {total_steps} steps of batch {batch_size}', flush=True)

  # ----- Resume (onto this mesh, whatever mesh wrote the checkpoint). -----
  if start_step:
    state, data_state = checkpointer.restore(start_step, ckpt_lib.abstract_like(state))
    if data_state:
      data_iter.set_state(data_state)
    print(f'resumed from checkpoint at step {start_step}', flush=True)

  def make_step(compiler_options):
    return make_train_step(model, tx, schedule, objective, config.loss, state_shardings=state_shardings,
                           mesh=mesh, axis_rules=axis_rules, moe_config=config.model.get('moe'),
                           compiler_options=compiler_options)
  matmul_options = cpu_matmuls.compiler_options(config.get('cpu_matmuls', 'auto'))
  train_step = None  # Built at the first batch: oneDNN matmuls are checked on the compiled step (cpu_matmuls).
  embed_fns = make_embed_fns(model, mesh)
  writer = metrics_lib.MetricWriter(workdir, is_main=is_main)
  progress = metrics_lib.Progress(total_steps, batch_size, start_step)

  # SIGTERM (preemption, scancel, kill) asks for a checkpoint at the next step boundary, then a clean exit.
  stop = {'signal': None}
  previous_handler = signal.signal(signal.SIGTERM, lambda signum, _: stop.update(signal=signum))
  kill_at = config.get('debug', {}).get('kill_at_step', -1)

  # ----- Train. -----
  train_start, metrics, data_stats = time.perf_counter(), {}, {}
  step = start_step
  scope = contextlib.ExitStack()
  try:
    scope.enter_context(jax.set_mesh(mesh))  # The context mesh: shard_map losses and sharding constraints.
    for step in range(start_step + 1, total_steps + 1):
      batch = next(data_iter)
      # Host-side counters from the input pipeline (bad records skipped, per source): summed, logged.
      for name, count in (batch.pop('data_stats', None) or {}).items():
        data_stats[name] = data_stats.get(name, 0) + int(np.sum(count))
      global_batch = parallel.global_batch(batch, mesh)
      if train_step is None:
        t0 = time.perf_counter()
        train_step, onednn = cpu_matmuls.checked_jit(make_step, matmul_options, state, global_batch)
        if onednn:
          print(f'train step compiled with oneDNN matmuls in {time.perf_counter() - t0:.1f} s', flush=True)
      state, metrics = train_step(state, global_batch)

      if step % config.log_every == 0 or step == total_steps:
        metrics = jax.device_get(metrics)
        metrics.update({f'data/{k}': v for k, v in data_stats.items()})
        metrics.update(progress.report(step, metrics))
        writer.write(step, metrics)

      evals_due = step < total_steps and any(
          ev.get('every') and step % ev.every == 0 for ev in config.get('evals', {}).values())
      if evals_due:
        t0 = time.perf_counter()
        results = run_evaluators(config, embed_fns, state['params'], tokenizer, step)
        print(_format_evals(step, results), flush=True)
        writer.write(step, results)
        progress.excluded += time.perf_counter() - t0

      t0 = time.perf_counter()
      if jax.process_count() > 1:  # Every process must agree to stop at the same step (saves are collective).
        stop['signal'] = int(multihost_utils.process_allgather(np.int32(stop['signal'] or 0)).max()) or None
      force = bool(stop['signal']) or step == total_steps
      checkpointer.save(step, state, data_iter.get_state(), force=force)
      progress.excluded += time.perf_counter() - t0
      if step == kill_at:  # Test hook: die hard right after a committed checkpoint, as a preemption would.
        checkpointer.wait()
        os.kill(os.getpid(), signal.SIGKILL)
      if stop['signal']:
        checkpointer.wait()
        print(f'SIGTERM: saved a checkpoint at step {step}; exiting', flush=True)
        return {'stopped_at_step': step}
    # ----- Final evaluation. -----
    train_seconds = time.perf_counter() - train_start
    final = {'step': total_steps, 'train_seconds': train_seconds, 'num_params': num_params,
             'final_loss': metrics_lib.to_python(metrics['loss']) if 'loss' in metrics else None}
    final.update(run_evaluators(config, embed_fns, state['params'], tokenizer, None))
    final = {k: (metrics_lib.to_python(v) if v is not None else None) for k, v in final.items()}
    print(_format_evals(total_steps, final), flush=True)
    if is_main:
      writer.write(total_steps, {k: v for k, v in final.items() if v is not None})
      _atomic_write_json(os.path.join(workdir, 'final_metrics.json'), final)
    return final
  finally:
    checkpointer.close()
    scope.close()
    signal.signal(signal.SIGTERM, previous_handler)


def _init_moe_params(convert, path: str, params):
  """init_from for a MoE model: a MoE checkpoint of the same shape loads as is; a dense parent is upcycled
  (CLIP-UP: each expert a copy of the dense MLP, routers from the fresh initialisation in `params`)."""
  try:
    return convert.load_init_params(path, params)
  except ValueError as moe_error:
    try:
      dense = convert.load_init_params(path, moe_lib.dense_template(params))
    except ValueError as dense_error:
      raise ValueError(f'init_from={path!r} fits neither the MoE model ({moe_error}) nor its dense parent '
                       f'({dense_error})') from None
  print(f'init_from: upcycled the dense parameters of {path} into the MoE model', flush=True)
  return moe_lib.upcycle(dense, params)


def _format_evals(step: int, results: dict) -> str:
  keys = [k for k in results if k.endswith(('top1', 'top1_seen', 'top1_unseen', 'r1'))]
  return f'eval @ {step}: ' + ', '.join(f'{k} {results[k]:.3f}' for k in keys)


def _atomic_write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)

