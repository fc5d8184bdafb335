"""Training objectives, and the contract every objective meets.

An objective is one module: a file in `jmm/objectives/` (named by its file name) or any importable module
(named by its dotted path, so a user's own objective needs no edit of jmm). It defines

  loss(outputs, batch, config) -> (loss, metrics)
      Required. `outputs` is the model's dict of named outputs (`jmm.models.two_tower.TwoTower`: 'zimg',
      'ztxt', 't', 'b', 'img', 'txt', heads' outputs, and 'sown' values such as the MoE router statistics);
      `batch` the step's batch after `prepare`; `config` the objective's own config section. `loss` is a
      float32 scalar, `metrics` a flat dict of scalars (logged as '<name>/<key>').
  validate(config) -> None
      Optional. Raises `jmm.errors.ConfigError` naming the bad field of its section.
  batch_fields(config) -> tuple[str, ...]
      Optional. Batch fields the objective needs from the input pipeline beyond 'image' and 'text' (e.g. the
      synthetic data's 'boxes'); the run stops with a clear error before training if the pipeline lacks one.
  prepare(step, key, batch, config) -> dict
      Optional. Per-step inputs drawn from `key` (a typed PRNG key derived from the train state's key and the
      step, so a resumed run draws the same ones): masks, mask ratios. The dict is merged into the batch before
      the model runs, so model options can read it. Inside jit: `step` is a traced int32 scalar.
  phases(config, total_steps) -> tuple[int, ...]
      Optional. The steps (counted as `prepare`'s `step`, the steps done before) from which `prepare` returns
      arrays of other shapes, e.g. FLIP's unmasked last steps (`jmm/objectives/flip.py`). Shapes are part of the
      compiled program, so the loop compiles one training step per phase (`phase_at`) and `prepare` then gets
      `phase=` as a keyword: how many of its boundaries the step has reached (a Python int, 0 in the first phase).
      The phase is a function of the step, so a resumed run compiles the program the uninterrupted one ran.
  check_model(model_config, config) -> None
      Optional. Cross-checks the objective's section against `config.model` (e.g. FLIP's patch grid is the
      image tower's); raises ConfigError naming the field.

`config.objectives` maps names to sections, `{name: {type, weight, ...}}`: `type` names the module (default:
the entry's name), `weight` (default 1.0) multiplies its loss. The step minimises the weighted sum, logged as
'loss', and logs each term's own metrics under its name ('sigmoid/loss', 'moe/img/aux_loss', ...).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jmm import config as config_lib
from jmm.errors import ConfigError

BASE_FIELDS = ('image', 'text')  # Every pipeline yields these.


@dataclasses.dataclass(frozen=True)
class Term:
  """One entry of `config.objectives`: its name, module, weight and config section."""
  name: str
  module: Any
  weight: float
  config: Any


def load(config) -> list[Term]:
  """The terms of `config.objectives`, in name order; raises ConfigError for a bad entry."""
  objectives = config.get('objectives')
  if not objectives:
    raise ConfigError('config.objectives is empty: name at least one objective, e.g. '
                      "dict(sigmoid=dict(type='contrastive', weight=1.0, loss='sigmoid'))")
  terms = []
  for name in sorted(objectives):
    section = objectives[name]
    if not hasattr(section, 'get'):
      raise ConfigError(f'config.objectives.{name} must be a dict of fields (type, weight, ...), got {section!r}')
    module = config_lib.lookup('objectives', section.get('type', name) or name)
    if not hasattr(module, 'loss'):
      raise ConfigError(f'config.objectives.{name}: module {module.__name__} has no loss(outputs, batch, config)')
    weight = section.get('weight', 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
      raise ConfigError(f'config.objectives.{name}.weight must be a number >= 0, got {weight!r}')
    terms.append(Term(name, module, float(weight), section))
  return terms


def validate(config) -> list[Term]:
  """Loads the terms and runs each module's own `validate` on its section; returns the terms."""
  terms = load(config)
  for term in terms:
    try:
      if hasattr(term.module, 'validate'):
        term.module.validate(term.config)
      if hasattr(term.module, 'check_model'):
        term.module.check_model(config.model, term.config)
    except ConfigError as e:
      raise ConfigError(f'config.objectives.{term.name}: {e}') from None
  return terms


def check_head(model_config, config, default: str, head_type: str) -> None:
  """For `check_model`: config.model.heads holds the head the section's `head` names (default `default`), of
  type `head_type` (or a module path ending in it); ConfigError naming the field otherwise."""
  name = config.get('head', default)
  heads = model_config.get('heads') or {}
  if name not in heads:
    raise ConfigError(f"head={name!r} is not in config.model.heads ({sorted(heads)}); add "
                      f"config.model.heads.{name} = dict(type={head_type!r})")
  if not str(heads[name].get('type', '')).endswith(head_type):
    raise ConfigError(f"head={name!r}: config.model.heads.{name}.type={heads[name].get('type')!r} is not "
                      f"{head_type!r}")


def batch_fields(terms) -> tuple[str, ...]:
  """Every batch field the terms need beyond 'image' and 'text', sorted."""
  fields = set()
  for term in terms:
    if hasattr(term.module, 'batch_fields'):
      fields.update(term.module.batch_fields(term.config))
  return tuple(sorted(fields - set(BASE_FIELDS)))


def check_batch_fields(terms, available) -> None:
  """Raises ConfigError naming the objective whose batch fields the pipeline does not yield."""
  for term in terms:
    if hasattr(term.module, 'batch_fields'):
      missing = sorted(set(term.module.batch_fields(term.config)) - set(available))
      if missing:
        raise ConfigError(f'config.objectives.{term.name} needs batch fields {missing}, which the data '
                          f'(config.data.name) does not provide; it yields {sorted(available)}')


def phase_at(terms, step: int, total_steps: int) -> tuple[int, ...]:
  """Per term, how many of its `phases` boundaries `step` (steps done) has reached; 0 for terms without phases.

  The static part of the training step: the loop compiles one program per distinct value (`jmm.step`).
  """
  return tuple(sum(step >= b for b in term.module.phases(term.config, total_steps))
               if hasattr(term.module, 'phases') else 0 for term in terms)


def prepare(terms, step, key, batch: dict, phase: tuple[int, ...] | None = None) -> dict:
  """The batch with every term's per-step inputs merged in; term i draws from fold_in(key, i).

  phase: `phase_at` of this step (None: every term's first phase); terms with `phases` get theirs as `phase=`.
  """
  batch = dict(batch)
  for i, term in enumerate(terms):
    if hasattr(term.module, 'prepare'):
      kw = {'phase': phase[i] if phase else 0} if hasattr(term.module, 'phases') else {}
      batch.update(term.module.prepare(step, jax.random.fold_in(key, i), batch, term.config, **kw))
  return batch


def total_loss(terms, outputs, batch):
  """(sum of weight * loss over the terms, metrics): 'loss' the total, '<name>/<key>' each term's metrics."""
  total, metrics = None, {}
  for term in terms:
    loss, term_metrics = term.module.loss(outputs, batch, term.config)
    metrics.update({f'{term.name}/{k}': v for k, v in term_metrics.items()})
    metrics[f'{term.name}/loss'] = loss
    weighted = loss if term.weight == 1.0 else term.weight * loss  # 1.0: the same bits as the loss alone.
    total = weighted if total is None else total + weighted
  metrics['loss'] = total
  return total, metrics
