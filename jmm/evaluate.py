"""Standalone evaluation of a checkpoint: `python -m jmm.evaluate --config=... --workdir=DIR [--step=N]`.

Restores the newest (or the given) checkpoint's parameters from DIR, runs every evaluator in `config.evals`,
prints the results and writes `DIR/eval_<step>.json`.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from jmm import config as config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file the checkpoint was trained with.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir holding checkpoints/ and tokenizer.model.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the newest).')


def evaluate_checkpoint(config, workdir: str, step: int | None = None) -> dict:
  """Restores params at `step` (default newest) from `workdir` and returns the evaluators' metrics."""
  import jax
  from jmm import checkpoint as ckpt_lib
  from jmm import metrics as metrics_lib
  from jmm import parallel
  from jmm import step as step_lib
  from jmm.data import build as data_build
  from jmm.evaluators import run as eval_run
  from jmm.models import build as model_build

  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(f'no checkpoints/ folder in workdir {workdir!r}: train there first')
  eval_run.validate(config)
  tokenizer = data_build.make_tokenizer(config, workdir)
  model = model_build.make_model(config, tokenizer.vocab_size)
  # The restore target, on one device; evals embed there.
  mesh = parallel.make_mesh('data=1,fsdp=1,tensor=1', devices=jax.local_devices()[:1])
  state, _, _, _ = step_lib.create_state(model, config, data_build.batch_spec(config), mesh,
                                         parallel.rules(config, mesh))
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, every=config.checkpoint.every)
  try:
    step = step if step is not None else checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f'no complete checkpoint in {checkpointer.directory}')
    state, _ = checkpointer.restore(step, ckpt_lib.abstract_like(state))
  finally:
    checkpointer.close()
  results = eval_run.run_evaluators(config, eval_run.make_embed_fns(model), state['params'], tokenizer, None)
  results = {k: metrics_lib.to_python(v) for k, v in results.items()}
  results['step'] = int(step)
  return results


def main(argv) -> None:
  del argv
  from jmm import errors
  from jmm import metrics
  metrics.quiet_library_logs()
  try:
    results = evaluate_checkpoint(_CONFIG.value, os.path.abspath(_WORKDIR.value), _STEP.value)
  except errors.USER_ERRORS as e:
    sys.exit(f'error: {e}')
  for k, v in sorted(results.items()):
    print(f'{k:32s} {v:.4f}' if isinstance(v, float) else f'{k:32s} {v}')
  path = os.path.join(_WORKDIR.value, f'eval_{results["step"]}.json')
  with open(path, 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  print(f'wrote {path}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=config_lib.parse_flags)  # Bad flags: one error line, no traceback.
