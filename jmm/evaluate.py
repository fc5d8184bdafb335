"""Standalone evaluation of a jmm checkpoint or of converted released weights.

  python -m jmm.evaluate --config=configs/siglip.py --workdir=DIR [--step=N]      # a training run's checkpoint
  python -m jmm.evaluate --config=configs/eval/imagenet.py:weights=W.npz,tokenizer=T,data=D --out=R.json

With a workdir holding checkpoints/, the newest (or the given) checkpoint's parameters are restored; without one,
`config.init_from` names the weights (a converted `.npz`, an HF model directory or another jmm workdir; the
configs in configs/eval/ set it from `weights=`). Every evaluator in `config.evals` runs, its embeddings computed
over all devices (every process, every device; data-parallel, parameters replicated), with a progress line on
long evaluations. Results: a short table on the terminal and a JSON file (`--out`, default
`WORKDIR/eval_STEP.json`).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags

from jmm import config as config_lib

# Flags are defined only when this module runs as the program (`_define_flags`), so tests and scripts can import
# `evaluate_checkpoint` beside other absl programs' flags (--out, --config...) without a DuplicateFlagError.
_FLAGS: dict = {}


def _define_flags() -> None:
  _FLAGS['config'] = config_flags.DEFINE_config_file(
      'config', None, 'Config: the one the checkpoint was trained with, or an evaluation config from configs/eval/.',
      lock_config=True)
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', None, 'Workdir holding checkpoints/ (and tokenizer.model); '
                                          'optional when config.init_from names the weights.')
  _FLAGS['step'] = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the newest).')
  _FLAGS['out'] = flags.DEFINE_string('out', None, 'Where to write the results JSON (default: WORKDIR/eval_STEP.json).')
  _FLAGS['coordinator_address'] = flags.DEFINE_string('coordinator_address', None,
                                                      'Multi-process: host:port of process 0.')
  _FLAGS['num_processes'] = flags.DEFINE_integer('num_processes', None, 'Multi-process: how many processes.')
  _FLAGS['process_id'] = flags.DEFINE_integer('process_id', None, 'Multi-process: this process index.')


def _has_checkpoints(workdir: str | None) -> bool:
  return bool(workdir) and os.path.isdir(os.path.join(workdir, 'checkpoints'))


def evaluate_checkpoint(config, workdir: str | None = None, step: int | None = None, mesh=None) -> dict:
  """Runs `config.evals` on the parameters of `workdir`'s checkpoint at `step` (default newest), or, with no
  checkpoint there, on `config.init_from`'s weights; returns {'NAME/metric': value, ..., 'step': int}
  ('step' is -1 for weights that are not a training checkpoint). `mesh`: default, all devices data-parallel."""
  import jax
  from jmm import convert
  from jmm import metrics as metrics_lib
  from jmm import parallel
  from jmm.data import build as data_build
  from jmm.errors import ConfigError
  from jmm.evaluators import run as eval_run
  from jmm.models import build as model_build

  eval_run.validate(config)
  if not config.get('evals'):
    raise ConfigError('config.evals is empty: nothing to evaluate (configs/eval/ has evaluation configs)')
  from_checkpoint = _has_checkpoints(workdir)
  if not from_checkpoint and not config.get('init_from'):
    where = f'workdir {workdir!r} has no checkpoints/ folder' if workdir else 'no --workdir given'
    raise ConfigError(f'{where}, and config.init_from is empty: give a workdir a run trained in, or weights '
                      '(e.g. configs/eval/imagenet.py:weights=/path/siglip.npz)')
  if not config.tokenizer.get('path') and not from_checkpoint:
    raise ConfigError('config.tokenizer.path is empty: released weights need the tokenizer they were trained with '
                      '(configs/eval/*.py: tokenizer=...)')
  tokenizer = data_build.make_tokenizer(config, workdir or tempfile.gettempdir())
  model = model_build.make_model(config, tokenizer.vocab_size)
  mesh = mesh or parallel.make_mesh('data=-1')
  abstract, _ = model_build.abstract_params(model, data_build.batch_spec(config), config.get('seed', 0))
  if from_checkpoint:
    params, step = convert.read_workdir_params(workdir, abstract, step=step)
    params = convert.match_params(convert.flatten(params), abstract, f'{workdir} step {step}')
  else:
    params = convert.load_init_params(config.init_from, abstract)
    step = -1
  params = jax.device_put(params, parallel.replicated(mesh))
  print(f'evaluating {workdir if from_checkpoint else config.init_from} (step {step}) on {parallel.describe(mesh)}',
        flush=True)
  results = eval_run.run_evaluators(config, eval_run.make_embed_fns(model, mesh), params, tokenizer, None)
  results = {k: metrics_lib.to_python(v) for k, v in results.items()}
  results['step'] = int(step)
  return results


def format_table(results: dict) -> str:
  """Results as a short table: one row per metric, grouped by evaluator."""
  rows = []
  for key in sorted(k for k in results if '/' in k):
    name, metric = key.split('/', 1)
    value = results[key]
    rows.append((name, metric, f'{value:.4f}' if isinstance(value, float) else str(value)))
  width = max([len(r[0]) for r in rows] + [4])
  mwidth = max([len(r[1]) for r in rows] + [6])
  lines = [f'{"eval":{width}s}  {"metric":{mwidth}s}  value']
  lines += [f'{n:{width}s}  {m:{mwidth}s}  {v}' for n, m, v in rows]
  return '\n'.join(lines)


def main(argv) -> None:
  del argv
  import jax
  from jmm import errors
  from jmm import metrics
  from jmm import parallel
  value = {name: flag.value for name, flag in _FLAGS.items()}
  if value['coordinator_address'] or value['num_processes']:
    parallel.initialize_distributed(value['coordinator_address'], value['num_processes'], value['process_id'])
  metrics.quiet_library_logs()
  workdir = os.path.abspath(value['workdir']) if value['workdir'] else None
  if not workdir and not value['out']:
    sys.exit('error: give --out=RESULTS.json (or --workdir=DIR to write DIR/eval_STEP.json)')
  try:
    results = evaluate_checkpoint(value['config'], workdir, value['step'])
  except errors.USER_ERRORS as e:
    sys.exit(f'error: {e}')
  if jax.process_index():
    return
  print(format_table(results))
  path = value['out'] or os.path.join(workdir, f'eval_{results["step"]}.json')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  print(f'wrote {path}')


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=config_lib.parse_flags)  # Bad flags: one error line, no traceback.
