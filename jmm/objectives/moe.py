"""Mixture-of-experts auxiliary losses as an objective term: the load-balance loss (Switch Transformer, Fedus et
al. 2022) and the router z-loss (ST-MoE, Zoph et al. 2022) of every MoE layer.

The MoE layers sow their routing statistics during the forward pass (`jmm.models.moe.MoeMlp`); the model's
outputs carry them under outputs['sown']['moe']. This term adds, per layer and summed over layers and towers,
`aux_loss_weight * aux_loss + z_loss_weight * z_loss`, and logs per tower (averaged over its layers): aux_loss,
z_loss, dropped_fraction, load_max_over_mean, load_min_over_mean and load/eN per expert.

  config.objectives.moe = dict(type='moe', weight=1.0, aux_loss_weight=0.01, z_loss_weight=1e-3)
"""
from __future__ import annotations

from jmm.errors import ConfigError
from jmm.models import moe as moe_lib

WEIGHTS = dict(aux_loss_weight=0.01, z_loss_weight=1e-3)  # ST-MoE's (Zoph et al. 2022) standard values.


def validate(config) -> None:
  for field in WEIGHTS:
    value = config.get(field, WEIGHTS[field])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise ConfigError(f'{field} must be a number >= 0, got {value!r}')


def loss(outputs, batch, config):
  """(weighted aux + z loss over every MoE layer, per-tower metrics); zero for a model without MoE layers."""
  del batch
  sown = outputs.get('sown', {}).get('moe', {})
  weights = {f: config.get(f, default) for f, default in WEIGHTS.items()}
  total, metrics = moe_lib.aux_losses(sown, weights)
  return total, {k.removeprefix('moe/'): v for k, v in metrics.items() if k != 'moe/aux_total'}
