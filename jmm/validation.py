"""Checks a whole training config before any work starts: each package checks its own section.

Top-level fields (`jmm.config`), `config.data` / `config.tokenizer` (`jmm.data.build`), `config.model` (the
named model's `validate`), `config.optim` (`jmm.optim`), `config.objectives` (each objective's `validate`),
`config.evals` (each evaluator's), and the few rules that tie sections together.
"""
from __future__ import annotations

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
