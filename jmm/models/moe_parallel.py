"""Expert parallelism for the MoE MLP: experts split over the 'expert' mesh axis, tokens sent to their experts.

Two exchanges inside `jax.shard_map`, both called by `moe.moe_mlp` under a mesh whose 'expert' axis is larger than
one: `expert_parallel` sends capacity-padded [experts, capacity, width] buffers with `jax.lax.all_to_all`;
`ragged_expert_parallel` (dropless) sends exactly the routed rows with `jax.lax.ragged_all_to_all`, which
`ragged_exchange` emulates on CPU. Below `moe` (it imports `moe_routing`, never `moe`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jmm.kernels import moe as kernels
from jmm.kernels.mesh_axes import batch_axes
from jmm.models import layers
from jmm.models import moe_routing as routing

EXCHANGES = ('auto', 'collective', 'emulated')  # How dispatch='ragged' moves rows: see `ragged_exchange`.


def expert_parallel(x, logits, w, *, groups, shards, k, capacity_factor, gating, renormalize, activation, axes):
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
    capacity = routing.expert_capacity(tokens, num_experts, k, capacity_factor)
    weights, experts, probs = jax.vmap(lambda l: routing.route(l, k, gating, renormalize))(lg)
    position = jax.vmap(lambda e: routing.capacity_positions(e, num_experts))(experts)
    keep = position < capacity
    buf = jax.vmap(lambda a, e, p: routing.dispatch_buffer(a, e, p, num_experts, capacity))(xg, experts, position)
    buf = jnp.swapaxes(buf, 0, 1)  # [E, Gl, C, D]
    buf = jax.lax.all_to_all(buf, 'expert', 0, 1, tiled=True)  # [E_local, n * Gl, C, D]
    y = routing.experts_padded(buf, (w_in, b_in, w_out, b_out), activation)
    y = jax.lax.all_to_all(y, 'expert', 1, 0, tiled=True)  # [E, Gl, C, D]
    y = jnp.swapaxes(y, 0, 1)  # [Gl, E, C, D]
    out = jax.vmap(routing.combine_buffer)(y, weights, experts, position, keep)  # [Gl, T, D]
    stats = jax.vmap(lambda l, p, g, e, m: routing.group_stats(l, p, g, e, m, num_experts))(
        lg, probs, weights, experts, keep)
    return out.reshape(batch, length, width), stats

  spec = P(axes)
  expert_spec = P('expert')
  stats_spec = {'aux_loss': spec, 'z_loss': spec, 'load': spec, 'dropped_fraction': spec}
  fn = jax.shard_map(per_device, in_specs=(spec, spec) + (expert_spec,) * 4, out_specs=(spec, stats_spec))
  return fn(x, logits, *w)


def _exclusive_cumsum(a, axis):
  """Running sum along `axis` that starts at zero: where each slice begins in a packed buffer."""
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


def ragged_expert_parallel(x, logits, w, *, groups, shards, k, gating, renormalize, activation, axes, impl,
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
    # weights, experts [N, k]; probs [N, E].
    weights, experts, probs = routing.route(logits.reshape(tokens, num_experts), k, gating, renormalize)
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
    stats = jax.vmap(lambda l, p, g, e, m: routing.group_stats(l, p, g, e, m, num_experts))(
        regroup(logits), regroup(probs), regroup(weights), regroup(experts), keep)
    return out, stats

  spec = P(axes)
  stats_spec = {'aux_loss': spec, 'z_loss': spec, 'load': spec, 'dropped_fraction': spec}
  fn = jax.shard_map(per_device, in_specs=(spec, spec) + (P('expert'),) * 4, out_specs=(spec, stats_spec))
  return fn(x, logits, *w)


def batch_mesh_axes():
  """(batch axes of the context mesh, their product, the 'expert' axis size); ((), 1, 1) outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return (), 1, 1
  axes = batch_axes(mesh)
  return axes, math.prod(mesh.shape[a] for a in axes), mesh.shape.get('expert', 1)
