"""MoE routing on one routing group of T tokens: gates, expert capacity, auxiliary losses, expert buffers.

Pure functions below both the expert-parallel exchanges (`moe_parallel`) and the MoE layer (`moe`), which import
them; the definitions of capacity, slot priority and the losses are in `moe`'s module docstring.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jmm.kernels import moe as kernels
from jmm.models import layers

GATINGS = ('softmax_topk', 'topk_softmax')


# ---------------------------------------------------------------------------------------------------------
# Routing, capacity, losses.
# ---------------------------------------------------------------------------------------------------------
def route(logits, k: int, gating: str = 'softmax_topk', renormalize: bool = True):
  """Router logits [T, E] -> (gate weights [T, k], experts [T, k] int32, probs [T, E]), all float32.

  'softmax_topk': softmax over all experts, keep the k largest probabilities (renormalised to sum to one when
  `renormalize`; k=1 without it is Switch's gate). 'topk_softmax': keep the k largest logits, softmax over them.
  `probs` (the full softmax) feeds the load-balance loss in both cases.
  """
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  top_logits, experts = kernels.topk_route(logits, k)
  if gating == 'softmax_topk':
    weights = jnp.take_along_axis(probs, experts, axis=-1)
    if renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  elif gating == 'topk_softmax':
    weights = jax.nn.softmax(top_logits, axis=-1)
  else:
    raise ValueError(f'unknown gating {gating!r}; known: {", ".join(GATINGS)}')
  return weights, experts, probs


def expert_capacity(tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
  """Slots per expert in a group of `tokens`: ceil(capacity_factor * tokens * k / experts), at most `tokens`.

  capacity_factor 0 (dropless) gives `tokens`, the most one expert can receive (each token picks k distinct experts).
  """
  if capacity_factor <= 0:
    return tokens
  return max(1, min(tokens, math.ceil(capacity_factor * tokens * k / num_experts)))


def capacity_positions(experts, num_experts: int):
  """Each assignment's slot in its expert's buffer [T, k]: first choices of all tokens, then second choices, ...

  Slot-major priority (GShard / V-MoE): a token's second choice never displaces another token's first choice.
  """
  tokens, k = experts.shape
  onehot = jax.nn.one_hot(experts.T.reshape(-1), num_experts, dtype=jnp.int32)  # [k*T, E], slot-major.
  position = jnp.cumsum(onehot, axis=0) - 1
  position = jnp.sum(position * onehot, axis=-1)  # [k*T]
  return position.reshape(k, tokens).T  # [T, k]


def load_balance_loss(probs, experts, num_experts: int):
  """Switch / GShard auxiliary loss E * sum_e f_e * p_e; 1 when routing is uniform, E when one expert takes all.

  f_e: fraction of the T*k assignments that chose expert e (before dropping); p_e: mean router probability of e.
  Returns (loss, f [E]).
  """
  load = jnp.mean(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=(0, 1))  # [E], sums to 1.
  return num_experts * jnp.sum(load * jnp.mean(probs, axis=0)), load


def router_z_loss(logits):
  """ST-MoE's router z-loss (Zoph et al. 2022): mean over tokens of logsumexp(logits)^2."""
  return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)


def group_stats(logits, probs, weights, experts, keep, num_experts):
  """One group's sown statistics: aux (load-balance) loss, z-loss, load [E], fraction of assignments dropped."""
  aux, load = load_balance_loss(probs, experts, num_experts)
  return {'aux_loss': aux, 'z_loss': router_z_loss(logits), 'load': load,
          'dropped_fraction': jnp.mean((~keep).astype(jnp.float32))}


# ---------------------------------------------------------------------------------------------------------
# Experts on one group (capacity buffers) or on all tokens (dropless).
# ---------------------------------------------------------------------------------------------------------
def experts_padded(buf, w, activation):
  """Every expert on its own buffer: buf [E, ..., C, D] -> [E, ..., C, D] (einsum over the expert axis)."""
  w_in, b_in, w_out, b_out = w
  extra = (None,) * (buf.ndim - 2)
  h = jnp.einsum('e...d,edh->e...h', buf, w_in) + b_in[(slice(None),) + extra]
  h = layers.activation_fn(activation)(h)
  return jnp.einsum('e...h,ehd->e...d', h, w_out) + b_out[(slice(None),) + extra]


def dispatch_buffer(x, experts, position, num_experts, capacity):
  """Tokens x [T, D] into an [E, C, D] buffer at (expert, slot); assignments with slot >= C are dropped."""
  tokens, k = experts.shape
  rows = jnp.broadcast_to(x[:, None], (tokens, k, x.shape[-1]))
  buf = jnp.zeros((num_experts, capacity, x.shape[-1]), x.dtype)
  return buf.at[experts, position].set(rows, mode='drop')


def combine_buffer(y, weights, experts, position, keep):
  """Expert outputs y [E, C, D] back to tokens: sum_j weights[t, j] * y[experts[t, j], position[t, j]] (kept ones)."""
  capacity = y.shape[1]
  picked = y[experts, jnp.minimum(position, capacity - 1)]  # [T, k, D]
  scale = (weights * keep).astype(y.dtype)
  return jnp.einsum('tkd,tk->td', picked, scale)


def moe_group_capacity(x, weights, experts, w, *, capacity_factor, activation):
  """One routing group in capacity mode: x [T, D] and its routing ([T, k] each) -> (out [T, D], keep [T, k])."""
  num_experts = w[0].shape[0]
  capacity = expert_capacity(x.shape[0], num_experts, experts.shape[1], capacity_factor)
  position = capacity_positions(experts, num_experts)
  keep = position < capacity
  y = experts_padded(dispatch_buffer(x, experts, position, num_experts, capacity), w, activation)
  return combine_buffer(y, weights, experts, position, keep), keep


def moe_dropless(x, weights, experts, w, *, activation, impl='auto'):
  """Dropless: all tokens x [N, D] sorted by expert through a grouped matmul -> [N, D].

  Routing groups do not matter here (nothing competes for slots), so the whole batch is one sort.
  """
  num_experts, k = w[0].shape[0], experts.shape[1]
  w_in, b_in, w_out, b_out = w
  perm, sizes = kernels.sort_by_expert(experts, num_experts)  # [N*k] grouped by expert, [E]
  expert_of_row = experts.reshape(-1)[perm]  # [N*k]
  xs = kernels.permute(x, perm, k)  # [N*k, D]
  h = kernels.grouped_matmul(xs, w_in, sizes, impl=impl) + b_in[expert_of_row]
  h = layers.activation_fn(activation)(h)
  ys = kernels.grouped_matmul(h, w_out, sizes, impl=impl) + b_out[expert_of_row]  # [N*k, D]
  return kernels.unpermute(ys, perm, weights).astype(x.dtype)
