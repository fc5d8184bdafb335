"""The training loop: `run(config, workdir)` is the whole program; `jmm.main` only parses flags.

Builders live with what they build (`jmm.data.build`, `jmm.models.build`, `jmm.step`, `jmm.evaluators.run`);
this module only puts them in order and loops. Restarting with the same workdir resumes from the newest
checkpoint, data iterator included, so a preempted run continues bit-for-bit.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from jmm import checkpoint as ckpt_lib
from jmm import cpu_matmuls
from jmm import metrics as metrics_lib
from jmm import objectives as objectives_lib
from jmm import parallel
from jmm import step as step_lib
from jmm import validation
from jmm.data import build as data_build
from jmm.errors import NonFiniteError, WorkdirError
from jmm.evaluators import run as eval_run
from jmm.models import build as model_build
from jmm.models import moe as moe_lib


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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint); returns the final metrics."""
  # ----- Set-up: validate everything cheap before anything expensive. -----
  terms = validation.validate(config)
  total_steps, batch_size = config.total_steps, config.batch_size
  mesh = parallel.make_mesh(config.get('mesh'))  # MeshError (before any compilation) if it does not fit.
  parallel.check_batch(batch_size, mesh)
  moe_lib.check_mesh(config, mesh)
  axis_rules = parallel.rules(config, mesh)
  workdir = ensure_workdir(workdir)
  is_main = jax.process_index() == 0
  ck = config.checkpoint
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=ck.keep, every=ck.every, use_async=ck.get('async', True))
  start_step = checkpointer.latest_step() or 0
  config_path = os.path.join(workdir, 'config.json')
  saved = None
  if start_step and os.path.isfile(config_path):
    with open(config_path) as f:
      saved = json.load(f)
  if jax.process_count() > 1:  # Every process reads the old config.json before process 0 replaces it.
    multihost_utils.sync_global_devices('config.json read')
  if saved is not None:
    if config.get('resume_check', True):
      try:
        validation.check_resume(saved, config)
      except Exception:
        checkpointer.close()
        raise
    if saved.get('total_steps') != total_steps:
      print(f'total_steps: {saved.get("total_steps")} -> {total_steps} (the schedule follows the new value)',
            flush=True)
  if is_main:  # Written whole, then renamed: a reader never sees half a file.
    with open(config_path + '.tmp', 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(config_path + '.tmp', config_path)
  print(f'mesh: {parallel.describe(mesh)}', flush=True)
  print('objectives: ' + ', '.join(f'{t.name} ({t.module.__name__.removeprefix("jmm.objectives.")}) x {t.weight:g}'
                                   for t in terms), flush=True)

  # ----- Data. -----
  tokenizer = data_build.make_tokenizer(config, workdir)
  data_iter = data_build.make_train_iterator(config, tokenizer, batch_size // jax.process_count(),
                                             jax.process_index(), jax.process_count())

  # ----- Model and state, created sharded on the mesh. -----
  model = model_build.make_model(config, tokenizer.vocab_size)
  spec = data_build.batch_spec(config)
  init = None
  if config.get('init_from') and not start_step:  # A jmm workdir or converted weights (jmm.convert).
    from jmm import convert  # pylint: disable=g-import-not-at-top
    params, _ = model_build.init_params(model, spec, config.seed)
    is_moe = bool(moe_lib.tower_moe(config, 'image') or moe_lib.tower_moe(config, 'text'))
    init = convert.initial_params(config.init_from, params, moe=is_moe,
                                  only=model_build.init_from_params(config))  # config.init_from_towers
  with jax.set_mesh(mesh):
    state, state_shardings, tx, schedule = step_lib.create_state(model, config, spec, mesh, axis_rules, init)
  num_params = sum(x.size for x in jax.tree.leaves(state['params']))
  print(f'model: {num_params / 1e6:.2f}M parameters; {total_steps} steps of batch {batch_size}', flush=True)
  if config.model.get('locked'):
    print(f'locked (no gradient, no optimizer state): {", ".join(model_build.locked_params(config))}', flush=True)

  # ----- Resume (onto this mesh, whatever mesh wrote the checkpoint). -----
  if start_step:
    restored, data_state = checkpointer.restore(start_step, ckpt_lib.abstract_like(state))
    state = {**state, **restored}
    if data_state:
      data_iter.set_state(data_state)
    print(f'resumed from checkpoint at step {start_step}', flush=True)

  def make_step(compiler_options, phase=None):
    return step_lib.make_train_step(
        model, tx, schedule, terms, max_nonfinite_steps=config.get('max_nonfinite_steps', 10),
        state_shardings=state_shardings, mesh=mesh, axis_rules=axis_rules, compiler_options=compiler_options,
        phase=phase)
  matmul_options = cpu_matmuls.compiler_options(config.get('cpu_matmuls', 'auto'))
  train_step = None  # Built at the first batch: oneDNN matmuls are checked on the compiled step (cpu_matmuls).
  train_phase = None  # The objectives' phase it was built for: a new phase (new shapes) builds the next one.
  embed_fns = eval_run.make_embed_fns(model, mesh)
  writer = metrics_lib.MetricWriter(workdir, is_main=is_main)
  progress = metrics_lib.Progress(total_steps, batch_size, start_step)

  # SIGTERM (preemption, scancel, kill) asks for a checkpoint at the next step boundary, then a clean exit.
  stop = {'signal': None}
  previous_handler = signal.signal(signal.SIGTERM, lambda signum, _: stop.update(signal=signum))
  debug = config.get('debug', {})
  kill_at = debug.get('kill_at_step', -1)

  # ----- Train. -----
  train_start, metrics, data_stats = time.perf_counter(), {}, {}
  scope = contextlib.ExitStack()
  try:
    scope.enter_context(jax.set_mesh(mesh))  # The context mesh: shard_map losses and sharding constraints.
    for step in range(start_step + 1, total_steps + 1):
      batch = next(data_iter)
      # Host-side counters from the input pipeline (bad records skipped, per source): summed, logged.
      for name, count in (batch.pop('data_stats', None) or {}).items():
        data_stats[name] = data_stats.get(name, 0) + int(np.sum(count))
      global_batch = parallel.global_batch(batch, mesh)
      phase = objectives_lib.phase_at(terms, step - 1, total_steps)
      if train_step is None or phase != train_phase:
        t0 = time.perf_counter()
        train_step, onednn = cpu_matmuls.checked_jit(lambda options, p=phase: make_step(options, p),
                                                     matmul_options, state, global_batch)
        if train_phase is not None:
          entered = ', '.join(f'{t.name} phase {p}' for t, p in zip(terms, phase) if p)
          print(f'step {step}: {entered or "first phase"}: a new train step compiled', flush=True)
        train_phase = phase
        if onednn:
          print(f'train step compiled with oneDNN matmuls in {time.perf_counter() - t0:.1f} s', flush=True)
      state, metrics = train_step(state, global_batch)

      log_now = step % config.log_every == 0 or step == total_steps
      if log_now:
        metrics = jax.device_get(metrics)
        metrics.update({f'data/{k}': v for k, v in data_stats.items()})
        metrics.update(progress.report(step, metrics))
        writer.write(step, metrics)
      # The non-finite guard's state, read where the loop syncs anyway and before any checkpoint: no checkpoint
      # is written in the middle of a run of skipped steps, so a run that stops leaves one from before the trouble.
      in_trouble = False
      if log_now or step % ck.every == 0:
        stop_now, in_a_row = step_lib.nonfinite_status(state)
        if stop_now:
          checkpointer.wait()
          raise NonFiniteError(
              f'{config.get("max_nonfinite_steps", 10)} steps in a row had a non-finite loss or gradient norm '
              f'(config.max_nonfinite_steps; stopped at step {step}); the newest checkpoint in '
              f'{checkpointer.directory} is from step {checkpointer.latest_step()}, before the trouble. Lower '
              'config.optim.lr or check the data, then resume.')
        in_trouble = in_a_row > 0

      if step < total_steps and eval_run.due(config, step):
        t0 = time.perf_counter()
        results = eval_run.run_evaluators(config, embed_fns, state['params'], tokenizer, step)
        print(eval_run.format_results(step, results), flush=True)
        writer.write(step, results)
        progress.excluded += time.perf_counter() - t0

      if step == debug.get('sigterm_at_step', -1) and jax.process_index() == debug.get('sigterm_process', 0):
        os.kill(os.getpid(), signal.SIGTERM)  # Test hook: a preemption notice that reaches one process only.
      t0 = time.perf_counter()
      if jax.process_count() > 1:  # Every process must agree to stop at the same step (saves are collective).
        stop['signal'] = agree_on_stop(stop['signal'])
      if not in_trouble or stop['signal'] or step == total_steps:
        checkpointer.save(step, state, data_iter.get_state(), force=bool(stop['signal']) or step == total_steps)
      progress.excluded += time.perf_counter() - t0
      if step == kill_at:  # Test hook: die hard right after a committed checkpoint, as a preemption would.
        checkpointer.wait()
        os.kill(os.getpid(), signal.SIGKILL)
      if stop['signal']:
        checkpointer.wait()
        print(f'SIGTERM: saved a checkpoint at step {step}; exiting', flush=True)
        return {'stopped_at_step': step}

    # ----- Final evaluation. -----
    final = {'step': total_steps, 'train_seconds': time.perf_counter() - train_start, 'num_params': num_params,
             'final_loss': metrics.get('loss'), 'nonfinite_steps': metrics.get('nonfinite_steps')}
    final.update(eval_run.run_evaluators(config, embed_fns, state['params'], tokenizer, None))
    final = {k: metrics_lib.to_python(v) for k, v in final.items() if v is not None}
    print(eval_run.format_results(total_steps, final), flush=True)
    if is_main:
      writer.write(total_steps, final)
      _atomic_write_json(os.path.join(workdir, 'final_metrics.json'), final)
    return final
  finally:
    checkpointer.close()
    scope.close()
    signal.signal(signal.SIGTERM, previous_handler)


def agree_on_stop(signum: int | None) -> int | None:
  """The stop signal any process received (or None): every process stops at the same step, as saves are
  collective. Cheap: one int32 all-gather per step, only on multi-process runs."""
  return int(multihost_utils.process_allgather(np.int32(signum or 0)).max()) or None


def _atomic_write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
