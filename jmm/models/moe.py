"""Mixture-of-experts MLP (router, top-k gating, capacity or dropless dispatch, expert parallelism) and upcycling.

A `MoeMlp` replaces the `MlpBlock` of the blocks a config selects (`config.model.moe`, see `validate` and the
README's "Mixture of experts (CLIP-UP)"). Each tower builds its own MoE layers, so image and text tokens never share
experts (CLIP-UP's "separated backbone", Wang et al. 2025).

Routing groups. Capacity, dropping and the auxiliary losses are defined per routing group: the batch is cut into
`groups` contiguous slices of examples (0: one per batch shard of the mesh, the GShard convention), and every token
competes for expert slots only inside its group. A group never straddles two devices, so expert parallelism needs
no global communication beyond the all_to_all, and a fixed `groups` gives the same numbers on any mesh. A batch that
`groups` does not divide (an evaluation batch of 250) uses gcd(batch, groups) groups.

Dispatch. Capacity mode (`capacity_factor > 0`): each group fills an [experts, capacity, width] buffer, first choices
before second choices, tokens in order; assignments past an expert's capacity are dropped (their share of the
output is zero; the residual connection carries the token). Dropless mode (`capacity_factor == 0`): tokens sorted by
expert and run through a grouped matmul (`jmm.kernels.moe.grouped_matmul`), nothing dropped. Under a mesh
whose 'expert' axis is larger than one, each device routes its own groups, exchanges the capacity-padded buffers
with `jax.lax.all_to_all` over 'expert' inside `jax.shard_map`, applies its local experts and sends the results
back. Dropless mode under expert parallelism uses the same exchange with capacity = group length (an expert can
receive at most one assignment per token): it never drops and runs on CPU, with buffers of E x group-length rows
where capacity mode has about capacity_factor x k x group-length. `dispatch='ragged'` (dropless) sends instead
exactly the routed rows with `jax.lax.ragged_all_to_all` (`_ragged_expert_parallel`); XLA's CPU backend lacks that
collective, so on CPU (only) `ragged_exchange` emulates it with a padded all_to_all of the same result.

Parameters: router [embed, experts]; fc_in_kernel [experts, embed, mlp], fc_in_bias [experts, mlp];
fc_out_kernel [experts, mlp, embed], fc_out_bias [experts, embed]. Logical names put the expert dimension on the
'expert' mesh axis.
"""
from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jmm.kernels import moe as kernels
from jmm.models import layers

GATINGS = ('softmax_topk', 'topk_softmax')
IMPLS = kernels.GMM_IMPLS  # Grouped matmul of the dropless path: 'auto' = ragged_dot on CPU, Pallas on GPU / TPU.
DISPATCHES = ('capacity', 'ragged')
EXCHANGES = ('auto', 'collective', 'emulated')  # How dispatch='ragged' moves rows: see `ragged_exchange`.
TOWERS = ('image', 'text')
BATCH_AXES = ('data', 'fsdp', 'expert')

# Defaults of config.model.moe (configs/common.py holds the same values; num_experts=0 is the dense model).
DEFAULTS = dict(num_experts=0, k=2, layers='every_other', towers='image,text', capacity_factor=2.0,
                gating='softmax_topk', renormalize=True, aux_loss_weight=0.01, z_loss_weight=1e-3, groups=0,
                impl='auto', dispatch='capacity')
# Fields the MoeMlp module takes (the rest are read by the encoder, make_model and the training loss).
MODULE_FIELDS = ('num_experts', 'k', 'capacity_factor', 'gating', 'renormalize', 'groups', 'impl', 'dispatch')


# ---------------------------------------------------------------------------------------------------------
# Routing, capacity, losses: pure functions on one routing group of T tokens.
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


def _stats(logits, probs, weights, experts, keep, num_experts):
  aux, load = load_balance_loss(probs, experts, num_experts)
  return {'aux_loss': aux, 'z_loss': router_z_loss(logits), 'load': load,
          'dropped_fraction': jnp.mean((~keep).astype(jnp.float32))}


# ---------------------------------------------------------------------------------------------------------
# Experts.
# ---------------------------------------------------------------------------------------------------------
def _experts_padded(buf, w, activation):
  """Every expert on its own buffer: buf [E, ..., C, D] -> [E, ..., C, D] (einsum over the expert axis)."""
  w_in, b_in, w_out, b_out = w
  extra = (None,) * (buf.ndim - 2)
  h = jnp.einsum('e...d,edh->e...h', buf, w_in) + b_in[(slice(None),) + extra]
  h = layers.activation_fn(activation)(h)
  return jnp.einsum('e...h,ehd->e...d', h, w_out) + b_out[(slice(None),) + extra]


def _dispatch(x, experts, position, num_experts, capacity):
  """Tokens x [T, D] into an [E, C, D] buffer at (expert, slot); assignments with slot >= C are dropped."""
  tokens, k = experts.shape
  rows = jnp.broadcast_to(x[:, None], (tokens, k, x.shape[-1]))
  buf = jnp.zeros((num_experts, capacity, x.shape[-1]), x.dtype)
  return buf.at[experts, position].set(rows, mode='drop')


def _combine(y, weights, experts, position, keep):
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
  y = _experts_padded(_dispatch(x, experts, position, num_experts, capacity), w, activation)
  return _combine(y, weights, experts, position, keep), keep


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


def _expert_parallel(x, logits, w, *, groups, shards, k, capacity_factor, gating, renormalize, activation, axes):
  """Capacity-padded expert parallelism: x [B, L, D] split over the batch `axes`, experts over 'expert'.

  Per device: route its groups, fill [groups_local, E, C, D] buffers, all_to_all over 'expert' so each device holds
  [E_local, groups from every 'expert' peer, C, D], apply the local experts, all_to_all back, combine.
  """
  def per_device(x, logits, w_in, b_in, w_out, b_out):
    batch, length, width = x.shape
    local_groups = groups // shards
    xg = x.reshape(local_groups, -1, width)  # [Gl, T, D]
    lg = logits.reshape(local_groups, -1, logits.shape[-1])  # [Gl, T, E]
    num_experts, tokens = lg.shape[-1], xg.shape[1]
    capacity = expert_capacity(tokens, num_experts, k, capacity_factor)
    weights, experts, probs = jax.vmap(lambda l: route(l, k, gating, renormalize))(lg)
    position = jax.vmap(lambda e: capacity_positions(e, num_experts))(experts)
    keep = position < capacity
    buf = jax.vmap(lambda a, e, p: _dispatch(a, e, p, num_experts, capacity))(xg, experts, position)
    buf = jnp.swapaxes(buf, 0, 1)  # [E, Gl, C, D]
    buf = jax.lax.all_to_all(buf, 'expert', 0, 1, tiled=True)  # [E_local, n * Gl, C, D]
    y = _experts_padded(buf, (w_in, b_in, w_out, b_out), activation)
    y = jax.lax.all_to_all(y, 'expert', 1, 0, tiled=True)  # [E, Gl, C, D]
    y = jnp.swapaxes(y, 0, 1)  # [Gl, E, C, D]
    out = jax.vmap(_combine)(y, weights, experts, position, keep)  # [Gl, T, D]
    stats = jax.vmap(lambda l, p, g, e, m: _stats(l, p, g, e, m, num_experts))(lg, probs, weights, experts, keep)
    return out.reshape(batch, length, width), stats

  spec = P(axes)
  expert_spec = P('expert')
  stats_spec = {'aux_loss': spec, 'z_loss': spec, 'load': spec, 'dropped_fraction': spec}
  fn = jax.shard_map(per_device, in_specs=(spec, spec) + (expert_spec,) * 4, out_specs=(spec, stats_spec))
  return fn(x, logits, *w)


def _exclusive_cumsum(a, axis):
  return jnp.cumsum(a, axis=axis) - a


def _ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name, max_slice):
  """`jax.lax.ragged_all_to_all` with one slice per peer, built from a padded `all_to_all` (for CPU, which lacks it).

  Same arguments and result (the received slices written into `output` at the offsets the senders chose); each
  slice travels padded to `max_slice` rows, a static bound on every send size, so [peers, max_slice, ...] moves.
  """
  peers, feature = input_offsets.shape[0], operand.shape[1:]
  i = jnp.arange(max_slice, dtype=jnp.int32)
  valid = i[None] < send_sizes[:, None]  # [peers, S]
  rows = jnp.where(valid, input_offsets[:, None] + i[None], 0)
  send = jnp.take(operand, rows.reshape(-1), axis=0).reshape((peers, max_slice) + feature)
  send = jnp.where(valid.reshape(valid.shape + (1,) * len(feature)), send, jnp.zeros((), operand.dtype))
  recv = jax.lax.all_to_all(send, axis_name, 0, 0, tiled=True)  # [peers, S, ...]: row j of sender p's slice
  where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # [peers]: where sender p writes here
  dest = jnp.where(i[None] < recv_sizes[:, None], where[:, None] + i[None], output.shape[0]).reshape(-1)
  # Slices never overlap: a scatter-add onto zeros places them, and its gradient is a gather.
  placed = jnp.zeros_like(output).at[dest].add(recv.reshape((-1,) + feature), mode='drop')
  written = jnp.zeros(output.shape[:1], jnp.int32).at[dest].add(1, mode='drop') > 0
  return jnp.where(written.reshape(written.shape + (1,) * len(feature)), placed, output)


def ragged_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name,
                    max_slice, exchange='auto'):
  """`jax.lax.ragged_all_to_all(operand, output, ...)` over `axis_name`, one slice per peer (see its docs).

  output_offsets are offsets in the *receivers'* buffers. exchange: 'collective' (the XLA collective; GPU and TPU
  run it, XLA's CPU backend does not implement it), 'emulated' (`_ragged_all_to_all_emulated`: the same result
  from a padded all_to_all, `max_slice` rows per slice) or 'auto': chosen by the platform the computation is
  lowered for (`jax.lax.platform_dependent`), the emulation on CPU only.
  """
  missing = jax.typeof(operand).mat.varying - jax.typeof(output).mat.varying
  output = jax.lax.pcast(output, tuple(sorted(missing)), to='varying')  # The buffer must vary as the data does.
  collective = lambda *a: jax.lax.ragged_all_to_all(*a, axis_name=axis_name)  # noqa: E731
  emulated = lambda *a: _ragged_all_to_all_emulated(*a, axis_name=axis_name, max_slice=max_slice)  # noqa: E731
  args = (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
  if exchange == 'collective':
    return collective(*args)
  if exchange == 'emulated':
    return emulated(*args)
  if exchange != 'auto':
    raise ValueError(f'ragged_exchange: exchange must be one of {EXCHANGES}, got {exchange!r}')
  return jax.lax.platform_dependent(*args, cpu=emulated, default=collective)


def _ragged_expert_parallel(x, logits, w, *, groups, shards, k, gating, renormalize, activation, axes, impl,
                            exchange):
  """Dropless expert parallelism with `ragged_all_to_all`: x [B, L, D] split over the batch `axes`, experts over
  'expert' (device d holds experts [d * E_local, (d + 1) * E_local)).

  Per device: route its N tokens, sort the N * k (token, slot) rows by expert (so by owning device), share every
  device's per-expert counts (an all_gather of [E] int32), send each device exactly its rows, sort the received
  rows by local expert, grouped matmul, unsort and send them back to where they came from; combine. Only real rows
  cross the network; the receive buffer is statically sized for the worst case, n * N * min(k, E_local) rows
  (every peer's every token choosing this device's experts; a token picks k distinct experts), which is at most the
  E * N rows the capacity-padded dropless exchange moves.
  """
  num_experts, n = logits.shape[-1], jax.sharding.get_abstract_mesh().shape['expert']
  local = num_experts // n

  def per_device(x, logits, w_in, b_in, w_out, b_out):
    batch, length, width = x.shape
    tokens = batch * length
    weights, experts, probs = route(logits.reshape(tokens, num_experts), k, gating, renormalize)  # [N, k] [N, E]
    perm, sizes = kernels.sort_by_expert(experts, num_experts)  # [N * k], [E]
    xs = kernels.permute(x.reshape(tokens, width), perm, k)  # [N * k, D] grouped by expert, so by device.
    me = jax.lax.axis_index('expert')
    counts = jax.lax.all_gather(sizes, 'expert').reshape(n, n, local)  # [sender, receiver, local expert]
    pair = jnp.sum(counts, axis=-1)  # [sender, receiver]: rows each sender sends each receiver.
    send_at = _exclusive_cumsum(pair, 1)  # Where a sender's slice for each receiver starts in its xs.
    recv_at = _exclusive_cumsum(pair, 0)  # Where it lands in the receiver's buffer: senders in order, packed.
    bound = n * tokens * min(k, local)
    exch = lambda a, out, *sizes: ragged_exchange(a, out, *sizes, axis_name='expert',  # noqa: E731
                                                  max_slice=tokens * min(k, local), exchange=exchange)
    recv = exch(xs, jnp.zeros((bound, width), xs.dtype), send_at[me], pair[me], recv_at[me], pair[:, me])
    # The received rows: sender blocks, each sorted by local expert, then padding. Group them by local expert.
    group_sizes = jnp.sum(counts[:, me], axis=0)  # [E_local]
    if local == 1:  # One expert: the received rows are already one group.
      rows, row_expert = recv, jnp.zeros((bound,), jnp.int32)
    else:
      segment = jnp.searchsorted(jnp.cumsum(counts[:, me].reshape(-1)), jnp.arange(bound), side='right')
      row_expert = jnp.where(segment < n * local, segment % local, local).astype(jnp.int32)  # padding: local
      rperm, _ = kernels.sort_by_expert(row_expert[:, None], local + 1)
      rows, row_expert = kernels.permute(recv, rperm, 1), jnp.minimum(row_expert[rperm], local - 1)
    h = kernels.grouped_matmul(rows, w_in, group_sizes, impl=impl) + b_in[row_expert]
    h = layers.activation_fn(activation)(h)
    y = kernels.grouped_matmul(h, w_out, group_sizes, impl=impl) + b_out[row_expert]  # [bound, D]
    if local > 1:
      y = kernels.unpermute(y, rperm, jnp.ones((bound, 1), y.dtype))
    back = exch(y, jnp.zeros_like(xs), recv_at[:, me], pair[:, me], send_at[:, me], pair[me])  # [N * k, D]
    out = kernels.unpermute(back, perm, weights).astype(x.dtype).reshape(batch, length, width)
    local_groups = groups // shards
    regroup = lambda a: a.reshape(local_groups, -1, a.shape[-1])  # noqa: E731
    keep = jnp.ones((local_groups, tokens // local_groups, k), bool)
    stats = jax.vmap(lambda l, p, g, e, m: _stats(l, p, g, e, m, num_experts))(
        regroup(logits), regroup(probs), regroup(weights), regroup(experts), keep)
    return out, stats

  spec = P(axes)
  stats_spec = {'aux_loss': spec, 'z_loss': spec, 'load': spec, 'dropped_fraction': spec}
  fn = jax.shard_map(per_device, in_specs=(spec, spec) + (P('expert'),) * 4, out_specs=(spec, stats_spec))
  return fn(x, logits, *w)


def _mesh_axes():
  """(batch axes of the context mesh, their product, the 'expert' axis size); ((), 1, 1) outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return (), 1, 1
  axes = tuple(a for a in mesh.axis_names if a in BATCH_AXES)
  return axes, math.prod(mesh.shape[a] for a in axes), mesh.shape.get('expert', 1)


def moe_mlp(x, logits, w, *, k, capacity_factor=2.0, gating='softmax_topk', renormalize=True, groups=0,
            activation='gelu_tanh', impl='auto', dispatch='capacity', exchange='auto'):
  """The MoE MLP on a batch: x [B, L, D], router logits [B, L, E], w = (w_in, b_in, w_out, b_out).

  Returns (out [B, L, D], stats) with stats averaged over routing groups: 'aux_loss', 'z_loss',
  'dropped_fraction' (scalars) and 'load' [E] (fraction of assignments per expert, before dropping).
  Expert-parallel under a mesh with an 'expert' axis > 1 (when the batch splits evenly over its shards):
  dispatch 'capacity' exchanges capacity-padded buffers, 'ragged' (dropless only: capacity_factor 0) exactly the
  routed rows (`_ragged_expert_parallel`; `exchange` as in `ragged_exchange`). Without expert parallelism both
  dispatches are the same computation.
  """
  if dispatch not in DISPATCHES:
    raise ValueError(f'dispatch must be one of {DISPATCHES}, got {dispatch!r}')
  if dispatch == 'ragged' and capacity_factor > 0:
    raise ValueError(f"dispatch='ragged' is dropless: it needs capacity_factor=0, got {capacity_factor}")
  batch, length, width = x.shape
  axes, shards, expert_size = _mesh_axes()
  groups = groups or shards
  num_experts = logits.shape[-1]
  if expert_size > 1 and batch % shards == 0 and groups % shards == 0 and batch % groups == 0:
    if num_experts % expert_size:
      raise ValueError(f'num_experts={num_experts} is not divisible by the mesh\'s expert axis ({expert_size})')
    if dispatch == 'ragged':
      out, stats = _ragged_expert_parallel(x, logits, w, groups=groups, shards=shards, k=k, gating=gating,
                                           renormalize=renormalize, activation=activation, axes=axes, impl=impl,
                                           exchange=exchange)
    else:
      out, stats = _expert_parallel(x, logits, w, groups=groups, shards=shards, k=k,
                                    capacity_factor=capacity_factor, gating=gating, renormalize=renormalize,
                                    activation=activation, axes=axes)
  else:
    groups = math.gcd(batch, groups)
    lg = logits.reshape(groups, -1, num_experts)  # [G, T, E]
    weights, experts, probs = route(lg.reshape(-1, num_experts), k, gating, renormalize)  # Per token.
    if capacity_factor > 0:
      xg = x.reshape(groups, -1, width)
      split = lambda a: a.reshape(groups, -1, k)  # noqa: E731
      out, keep = jax.vmap(lambda a, g, e: moe_group_capacity(a, g, e, w, capacity_factor=capacity_factor,
                                                              activation=activation))(xg, split(weights),
                                                                                      split(experts))
    else:
      out = moe_dropless(x.reshape(-1, width), weights, experts, w, activation=activation, impl=impl)
      keep = jnp.ones((groups, lg.shape[1], k), bool)
    out = out.reshape(batch, length, width)
    regroup = lambda a: a.reshape(groups, lg.shape[1], -1)  # noqa: E731
    stats = jax.vmap(lambda l, p, g, e, m: _stats(l, p, g, e, m, num_experts))(
        lg, regroup(probs), regroup(weights), regroup(experts), keep)
  return out, jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)


class MoeMlp(nn.Module):
  """Mixture-of-experts MLP: a linear router, `num_experts` MLPs of `mlp_dim`, top-k gating (see `moe_mlp`).

  Sows into the 'moe' collection (when the caller makes it mutable): aux_loss, z_loss, dropped_fraction, load.
  """
  mlp_dim: int
  num_experts: int
  k: int = 2
  capacity_factor: float = 2.0
  gating: str = 'softmax_topk'
  renormalize: bool = True
  groups: int = 0
  impl: str = 'auto'
  dispatch: str = 'capacity'
  activation: str = 'gelu_tanh'
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: [batch, tokens, width]
    width, e = x.shape[-1], self.num_experts
    xavier = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    param = lambda name, init, names, shape: self.param(name, layers.partitioned(init, names), shape,  # noqa
                                                        self.param_dtype).astype(self.dtype)
    router = self.param('router', layers.partitioned(layers.xavier, ('embed', None)), (width, e), self.param_dtype)
    w_in = param('fc_in_kernel', xavier, ('expert', 'embed', 'mlp'), (e, width, self.mlp_dim))
    b_in = param('fc_in_bias', layers.zeros, ('expert', 'mlp'), (e, self.mlp_dim))
    w_out = param('fc_out_kernel', xavier, ('expert', 'mlp', 'embed'), (e, self.mlp_dim, width))
    b_out = param('fc_out_bias', layers.zeros, ('expert', 'embed'), (e, width))
    logits = jnp.einsum('bld,de->ble', x.astype(jnp.float32), router.astype(jnp.float32))  # [B, L, E]
    out, stats = moe_mlp(x, logits, (w_in, b_in, w_out, b_out), k=self.k, capacity_factor=self.capacity_factor,
                         gating=self.gating, renormalize=self.renormalize, groups=self.groups,
                         activation=self.activation, impl=self.impl, dispatch=self.dispatch)
    for name, value in stats.items():
      self.sow('moe', name, value)
    return out.astype(self.dtype)


# ---------------------------------------------------------------------------------------------------------
# Which blocks, config validation.
# ---------------------------------------------------------------------------------------------------------
def moe_layer_indices(pattern, depth: int) -> tuple[int, ...]:
  """Blocks (0-based) of a `depth`-block tower whose MLP is a mixture of experts.

  'every_other': blocks 1, 3, 5, ... (V-MoE's and CLIP-UP's every-other-layer placement, dense block first);
  'all'; 'last_n:N': the last N blocks; 'none'; or explicit indices, a list or a string '0,2' (negative ones count
  from the end). ValueError for anything else or an index outside the tower.
  """
  if isinstance(pattern, str):
    pattern = pattern.strip()
    if pattern == 'every_other':
      return tuple(range(1, depth, 2))
    if pattern == 'all':
      return tuple(range(depth))
    if pattern in ('none', ''):
      return ()
    m = re.fullmatch(r'last_n:(\d+)', pattern)
    if m:
      n = int(m.group(1))
      if not 0 < n <= depth:
        raise ValueError(f'layers={pattern!r}: N must be in 1..{depth} (the tower has {depth} blocks)')
      return tuple(range(depth - n, depth))
    if not re.fullmatch(r'-?\d+(\s*,\s*-?\d+)*', pattern):
      raise ValueError(f"layers={pattern!r}: expected 'every_other', 'all', 'last_n:N' or block indices like '1,3'")
    pattern = [int(p) for p in pattern.split(',')]
  try:
    indices = [int(i) for i in pattern]
  except (TypeError, ValueError):
    raise ValueError(f'layers={pattern!r}: expected a pattern name or a list of block indices') from None
  out = []
  for i in indices:
    if not -depth <= i < depth:
      raise ValueError(f'layers={pattern!r}: block {i} is outside a tower of {depth} blocks')
    out.append(i % depth)
  return tuple(sorted(set(out)))


def block_configs(moe, depth: int) -> dict[int, dict]:
  """{block index: MoeMlp fields} for an encoder of `depth` blocks, from the `config.model.moe` fields."""
  moe = dict(moe)
  if not moe.get('num_experts'):
    return {}
  fields = {k: moe[k] for k in MODULE_FIELDS if k in moe}
  return {i: fields for i in moe_layer_indices(moe.get('layers', 'every_other'), depth)}


def tower_names(moe) -> tuple[str, ...]:
  """The towers with MoE layers: 'image,text' -> ('image', 'text'); a list or tuple works too."""
  towers = moe.get('towers', 'image,text')
  if isinstance(towers, str):
    towers = [t.strip() for t in towers.split(',') if t.strip()]
  return tuple(towers)


def _as_dict(node) -> dict:
  if not node:
    return {}
  return node.to_dict() if hasattr(node, 'to_dict') else dict(node)


def validate(config) -> None:
  """Checks `config.model.moe` (absent or num_experts=0: nothing to check); ConfigError naming the bad field."""
  from jmm.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from jmm.models import vit  # pylint: disable=g-import-not-at-top
  moe = _as_dict(config.model.get('moe'))
  if not moe:
    return
  unknown = sorted(set(moe) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f'config.model.moe has no field(s) {unknown}; known: {sorted(DEFAULTS)}')
  moe = {**DEFAULTS, **moe}
  e = moe['num_experts']
  if not isinstance(e, int) or isinstance(e, bool) or e < 0:
    raise ConfigError(f'config.model.moe.num_experts must be an integer >= 0 (0 = dense), got {e!r}')
  if not e:
    return
  checks = [
      ('k', isinstance(moe['k'], int) and 1 <= moe['k'] <= e, f'an integer in 1..num_experts={e}'),
      ('capacity_factor', isinstance(moe['capacity_factor'], (int, float)) and moe['capacity_factor'] >= 0,
       'a number >= 0 (0 = dropless)'),
      ('gating', moe['gating'] in GATINGS, f'one of {list(GATINGS)}'),
      ('aux_loss_weight', isinstance(moe['aux_loss_weight'], (int, float)) and moe['aux_loss_weight'] >= 0,
       'a number >= 0'),
      ('z_loss_weight', isinstance(moe['z_loss_weight'], (int, float)) and moe['z_loss_weight'] >= 0,
       'a number >= 0'),
      ('groups', isinstance(moe['groups'], int) and moe['groups'] >= 0, 'an integer >= 0 (0 = one per batch shard)'),
      ('impl', moe['impl'] in IMPLS, f'one of {list(IMPLS)}'),
      ('dispatch', moe['dispatch'] in DISPATCHES, f'one of {list(DISPATCHES)}'),
  ]
  for field, ok, expected in checks:
    if not ok:
      raise ConfigError(f'config.model.moe.{field}={moe[field]!r}: expected {expected}')
  if moe['dispatch'] == 'ragged' and moe['capacity_factor'] > 0:
    raise ConfigError(f"config.model.moe.dispatch='ragged' exchanges exactly the routed rows and drops nothing: it "
                      f"needs capacity_factor=0 (dropless), got {moe['capacity_factor']}; or use dispatch='capacity'")
  towers = tower_names(moe)
  bad = [t for t in towers if t not in TOWERS]
  if bad or not towers:
    raise ConfigError(f'config.model.moe.towers={moe["towers"]!r}: expected a comma-separated subset of '
                      f'{list(TOWERS)}')
  for tower in towers:
    t = config.model[tower]
    depth = t.get('depth') or (vit.decode_variant(t.variant)['depth'] if t.get('variant') else 0)
    try:
      moe_layer_indices(moe['layers'], depth)
    except ValueError as err:
      raise ConfigError(f'config.model.moe.{err} (model.{tower})') from None
    if t.get('scan'):
      raise ConfigError(f'config.model.{tower}.scan=True cannot hold MoE blocks (config.model.moe): the scanned '
                        f'blocks must be identical; set scan=False')


def check_mesh(config, mesh) -> None:
  """ConfigError unless the mesh's 'expert' axis divides config.model.moe.num_experts."""
  from jmm.errors import ConfigError  # pylint: disable=g-import-not-at-top
  moe = config.model.get('moe') or {}
  e, size = moe.get('num_experts', 0), mesh.shape.get('expert', 1)
  if e and size > 1 and e % size:
    raise ConfigError(f'config.model.moe.num_experts={e} is not divisible by the mesh\'s expert axis ({size}, '
                      f'config.mesh={config.get("mesh")!r})')


def tower_moe(config, tower: str) -> dict | None:
  """The `moe` field for `tower` ('image' / 'text') of the model: the config's MoE fields, or None (dense)."""
  moe = {**DEFAULTS, **_as_dict(config.model.get('moe'))}
  if not moe['num_experts'] or tower not in tower_names(moe):
    return None
  return {k: moe[k] for k in MODULE_FIELDS + ('layers',)}


# ---------------------------------------------------------------------------------------------------------
# Auxiliary losses in training.
# ---------------------------------------------------------------------------------------------------------
TOWER_KEYS = {'img': 'image', 'txt': 'text'}


def aux_losses(sown, moe_config) -> tuple[Any, dict]:
  """The sown 'moe' collection -> (weighted aux + z loss to add to the objective, metrics).

  Each MoE layer contributes aux_loss_weight * aux_loss + z_loss_weight * z_loss (summed over layers and towers,
  as Switch / ST-MoE add them per layer). Metrics per tower ('moe/img/...', 'moe/txt/...'), averaged over its
  layers: aux_loss, z_loss, dropped_fraction, load_max_over_mean, load_min_over_mean and load/eN per expert.
  """
  moe_config = {**DEFAULTS, **_as_dict(moe_config)}
  flat = jax.tree_util.tree_flatten_with_path(sown)[0]
  per_tower: dict[str, dict[str, list]] = {}
  for path, value in flat:
    keys = [str(getattr(p, 'key', getattr(p, 'idx', ''))) for p in path]
    name = next(k for k in reversed(keys) if k in ('aux_loss', 'z_loss', 'dropped_fraction', 'load'))
    per_tower.setdefault(keys[0], {}).setdefault(name, []).append(value)
  total = 0.0
  metrics = {}
  for tower, stats in sorted(per_tower.items()):
    aux, z = jnp.stack(stats['aux_loss']), jnp.stack(stats['z_loss'])
    total = total + moe_config['aux_loss_weight'] * jnp.sum(aux) + moe_config['z_loss_weight'] * jnp.sum(z)
    load = jnp.mean(jnp.stack(stats['load']), axis=0)  # [E]
    prefix = f'moe/{tower}/'
    metrics.update({prefix + 'aux_loss': jnp.mean(aux), prefix + 'z_loss': jnp.mean(z),
                    prefix + 'dropped_fraction': jnp.mean(jnp.stack(stats['dropped_fraction'])),
                    prefix + 'load_max_over_mean': jnp.max(load) / jnp.mean(load),
                    prefix + 'load_min_over_mean': jnp.min(load) / jnp.mean(load)})
    metrics.update({f'{prefix}load/e{i}': load[i] for i in range(load.shape[0])})
  metrics['moe/aux_total'] = total
  return total, metrics


# ---------------------------------------------------------------------------------------------------------
# Upcycling (Komatsuzaki et al. 2023; CLIP-UP): every expert starts as a copy of the dense MLP.
# ---------------------------------------------------------------------------------------------------------
_FROM_DENSE = {'fc_in_kernel': ('fc_in', 'kernel'), 'fc_in_bias': ('fc_in', 'bias'),
               'fc_out_kernel': ('fc_out', 'kernel'), 'fc_out_bias': ('fc_out', 'bias')}


def _is_moe(node) -> bool:
  return hasattr(node, 'keys') and 'router' in node and 'fc_in_kernel' in node


def dense_template(moe_params):
  """The dense parent's parameter tree for a MoE tree: each 'moe' {router, fc_*} becomes 'mlp' {fc_in, fc_out}.

  Leaves are zero-stride views (no memory), enough for `jmm.convert.match_params` to check names and shapes.
  """
  def walk(node):
    out = {}
    for key, value in node.items():
      if key == 'moe' and _is_moe(value):
        mlp = {}
        for name, (layer, leaf) in _FROM_DENSE.items():
          shape, dtype = np.shape(value[name])[1:], getattr(value[name], 'dtype', np.float32)
          mlp.setdefault(layer, {})[leaf] = np.broadcast_to(np.zeros((), dtype), shape)
        out['mlp'] = mlp
      elif hasattr(value, 'items'):
        out[key] = walk(value)
      else:
        out[key] = value
    return out
  return walk(moe_params)


def upcycle(dense_params, moe_params):
  """MoE parameters from a dense parent: every expert a copy of the block's dense MLP, everything else copied.

  dense_params: the parent's tree (`dense_template(moe_params)`'s names and shapes); moe_params: a freshly
  initialised MoE tree, whose routers are kept (CLIP-UP trains a new router). Returns a new tree.
  """
  def walk(dense, moe):
    out = {}
    for key, value in moe.items():
      if key == 'moe' and _is_moe(value):
        mlp = dense['mlp']
        e = np.shape(value['router'])[-1]
        out[key] = {'router': value['router']}
        for name, (layer, leaf) in _FROM_DENSE.items():
          src = np.asarray(mlp[layer][leaf])
          out[key][name] = np.broadcast_to(src[None], (e,) + src.shape).astype(src.dtype)
      elif hasattr(value, 'items'):
        out[key] = walk(dense[key], value)
      else:
        out[key] = dense[key]
    return out
  return walk(dense_params, moe_params)
