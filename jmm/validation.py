"""Checks a whole training config before any work starts: each package checks its own section.

Top-level fields (`jmm.config`), `config.data` / `config.tokenizer` (`jmm.data.build`), `config.model` (the
named model's `validate`), `config.optim` (`jmm.optim`), `config.objectives` (each objective's `validate`),
`config.evals` (each evaluator's), and the few rules that tie sections together.
"""
from __future__ import annotations

import json

from jmm import config as config_lib
from jmm import objectives as objectives_lib
from jmm import optim
from jmm.data import build as data_build
from jmm.errors import ConfigError
from jmm.evaluators import run as eval_run
from jmm.models import build as model_build


def validate(config) -> list:
  """Raises ConfigError naming the first bad field; returns the objective terms (`jmm.objectives.Term`)."""
  config_lib.validate_top(config)
  data_build.validate(config)
  model_build.validate(config)
  optim.validate(config.optim)
  terms = objectives_lib.validate(config)
  eval_run.validate(config)
  # Across sections: the MoE layers' auxiliary losses are an objective term; without it routers collapse.
  if (config.model.get('moe') or {}).get('num_experts') and not any(t.module.__name__ == 'jmm.objectives.moe'
                                                                      for t in terms):
    raise ConfigError('config.model.moe.num_experts > 0 needs the MoE auxiliary losses among the objectives: '
                      "config.objectives.moe = dict(type='moe', weight=1.0) (weight 0 turns them off)")
  objectives_lib.check_batch_fields(terms, data_build.batch_fields(config))
  return terms


# What a resumed run must share with the run that wrote the checkpoint: anything that changes the numerics of the
# step or the data stream. total_steps may change (extending a run), as may the mesh, evaluators, checkpointing
# and the data's throughput knobs and locations.
_RESUME_FIELDS = ('seed', 'batch_size', 'dtype', 'model', 'objectives', 'optim', 'tokenizer', 'data', 'init_from',
                  'init_from_towers')
_RESUME_FREE_DATA = ('paths', 'data_dir', 'index_cache', 'worker_count', 'num_threads', 'prefetch',
                     'max_consecutive_bad')


def _differences(saved, current, path: str, out: list[str]) -> None:
  if isinstance(saved, dict) and isinstance(current, dict):
    for key in sorted(set(saved) | set(current)):
      if path == 'data' and key in _RESUME_FREE_DATA:
        continue
      if key not in saved and not current[key]:  # A field added since that run, left off ('', False, ()).
        continue
      _differences(saved.get(key), current.get(key), f'{path}.{key}' if path else key, out)
  elif saved != current:
    out.append(f'{path}: {saved!r} -> {current!r}')


def check_resume(saved: dict, config) -> None:
  """Raises ConfigError when `config` would resume a checkpoint written under a different recipe.

  `saved` is the workdir's config.json (the config of the run that wrote the checkpoint). Without this check a
  changed config, or a reused workdir, silently continues the old run under new settings.
  """
  current = json.loads(config.to_json_best_effort())
  diffs: list[str] = []
  _differences({k: saved[k] for k in _RESUME_FIELDS if k in saved},
               {k: current[k] for k in _RESUME_FIELDS if k in current}, '', diffs)
  if diffs:
    shown = '; '.join(diffs[:5]) + (f'; and {len(diffs) - 5} more' if len(diffs) > 5 else '')
    raise ConfigError(f'the workdir holds a checkpoint of a run with another config ({shown}). Use a fresh '
                      '--workdir, or resume anyway with --config.resume_check=False')
