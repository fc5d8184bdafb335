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
exactly the routed rows with `jax.lax.ragged_all_to_all`; XLA's CPU backend lacks that collective, so on CPU
(only) `moe_parallel.ragged_exchange` emulates it with a padded all_to_all of the same result.

Modules: `moe_routing` (routing, capacity, losses, expert buffers on one group) <- `moe_parallel` (the exchanges
under expert parallelism) <- this one (the layer, its config, auxiliary losses, upcycling).

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

from jmm.errors import ConfigError
from jmm.kernels import moe as kernels
from jmm.models import layers
from jmm.models import moe_parallel
from jmm.models import moe_routing as routing
from jmm.models import variants

IMPLS = kernels.GMM_IMPLS  # Grouped matmul of the dropless path: 'auto' = ragged_dot on CPU, Pallas on GPU / TPU.
DISPATCHES = ('capacity', 'ragged')
TOWERS = ('image', 'text')

# Defaults of config.model.moe, the one place they are written (num_experts=0 is the dense model): MoeMlp's
# fields, `moe_mlp`'s arguments, `validate`, `tower_moe` and `aux_losses` read them.
DEFAULTS = dict(num_experts=0, k=2, layers='every_other', towers='image,text', capacity_factor=2.0,
                gating='softmax_topk', renormalize=True, aux_loss_weight=0.01, z_loss_weight=1e-3, groups=0,
                impl='auto', dispatch='capacity')
# Fields the MoeMlp module takes (the rest are read by the encoder, make_model and the training loss).
MODULE_FIELDS = ('num_experts', 'k', 'capacity_factor', 'gating', 'renormalize', 'groups', 'impl', 'dispatch')


def moe_mlp(x, logits, w, *, k, capacity_factor=DEFAULTS['capacity_factor'], gating=DEFAULTS['gating'],
            renormalize=DEFAULTS['renormalize'], groups=DEFAULTS['groups'], activation='gelu_tanh',
            impl=DEFAULTS['impl'], dispatch=DEFAULTS['dispatch'], exchange='auto'):
  """The MoE MLP on a batch: x [B, L, D], router logits [B, L, E], w = (w_in, b_in, w_out, b_out).

  Returns (out [B, L, D], stats) with stats averaged over routing groups: 'aux_loss', 'z_loss',
  'dropped_fraction' (scalars) and 'load' [E] (fraction of assignments per expert, before dropping).
  Expert-parallel under a mesh with an 'expert' axis > 1 (when the batch splits evenly over its shards):
  dispatch 'capacity' exchanges capacity-padded buffers, 'ragged' (dropless only: capacity_factor 0) exactly the
  routed rows (`moe_parallel.ragged_expert_parallel`; `exchange` as in `moe_parallel.ragged_exchange`). Without
  expert parallelism both dispatches are the same computation.
  """
  if dispatch not in DISPATCHES:
    raise ValueError(f'dispatch must be one of {DISPATCHES}, got {dispatch!r}')
  if dispatch == 'ragged' and capacity_factor > 0:
    raise ValueError(f"dispatch='ragged' is dropless: it needs capacity_factor=0, got {capacity_factor}")
  batch, length, width = x.shape
  axes, shards, expert_size = moe_parallel.batch_mesh_axes()
  groups = groups or shards
  num_experts = logits.shape[-1]
  if expert_size > 1 and batch % shards == 0 and groups % shards == 0 and batch % groups == 0:
    if num_experts % expert_size:
      raise ValueError(f'num_experts={num_experts} is not divisible by the mesh\'s expert axis ({expert_size})')
    if dispatch == 'ragged':
      out, stats = moe_parallel.ragged_expert_parallel(
          x, logits, w, groups=groups, shards=shards, k=k, gating=gating, renormalize=renormalize,
          activation=activation, axes=axes, impl=impl, exchange=exchange)
    else:
      out, stats = moe_parallel.expert_parallel(
          x, logits, w, groups=groups, shards=shards, k=k, capacity_factor=capacity_factor, gating=gating,
          renormalize=renormalize, activation=activation, axes=axes)
  else:
    groups = math.gcd(batch, groups)
    lg = logits.reshape(groups, -1, num_experts)  # [G, T, E]
    weights, experts, probs = routing.route(lg.reshape(-1, num_experts), k, gating, renormalize)  # Per token.
    if capacity_factor > 0:
      xg = x.reshape(groups, -1, width)
      split = lambda a: a.reshape(groups, -1, k)  # noqa: E731
      out, keep = jax.vmap(lambda a, g, e: routing.moe_group_capacity(
          a, g, e, w, capacity_factor=capacity_factor, activation=activation))(xg, split(weights), split(experts))
    else:
      out = routing.moe_dropless(x.reshape(-1, width), weights, experts, w, activation=activation, impl=impl)
      keep = jnp.ones((groups, lg.shape[1], k), bool)
    out = out.reshape(batch, length, width)
    regroup = lambda a: a.reshape(groups, lg.shape[1], -1)  # noqa: E731
    stats = jax.vmap(lambda l, p, g, e, m: routing.group_stats(l, p, g, e, m, num_experts))(
        lg, regroup(probs), regroup(weights), regroup(experts), keep)
  return out, jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)


class MoeMlp(nn.Module):
  """Mixture-of-experts MLP: a linear router, `num_experts` MLPs of `mlp_dim`, top-k gating (see `moe_mlp`).

  Sows into the 'moe' collection (when the caller makes it mutable): aux_loss, z_loss, dropped_fraction, load.
  """
  mlp_dim: int
  num_experts: int
  k: int = DEFAULTS['k']
  capacity_factor: float = DEFAULTS['capacity_factor']
  gating: str = DEFAULTS['gating']
  renormalize: bool = DEFAULTS['renormalize']
  groups: int = DEFAULTS['groups']
  impl: str = DEFAULTS['impl']
  dispatch: str = DEFAULTS['dispatch']
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
  return {i: fields for i in moe_layer_indices(moe.get('layers', DEFAULTS['layers']), depth)}


def tower_names(moe) -> tuple[str, ...]:
  """The towers with MoE layers: 'image,text' -> ('image', 'text'); a list or tuple works too."""
  towers = moe.get('towers', DEFAULTS['towers'])
  if isinstance(towers, str):
    towers = [t.strip() for t in towers.split(',') if t.strip()]
  return tuple(towers)


def _as_dict(node) -> dict:
  if not node:
    return {}
  return node.to_dict() if hasattr(node, 'to_dict') else dict(node)


def validate(config) -> None:
  """Checks `config.model.moe` (absent or num_experts=0: nothing to check); ConfigError naming the bad field."""
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
      ('gating', moe['gating'] in routing.GATINGS, f'one of {list(routing.GATINGS)}'),
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
    depth = t.get('depth') or (variants.decode_variant(t.variant)['depth'] if t.get('variant') else 0)
    try:
      moe_layer_indices(moe['layers'], depth)
    except ValueError as err:
      raise ConfigError(f'config.model.moe.{err} (model.{tower})') from None
    if t.get('scan'):
      raise ConfigError(f'config.model.{tower}.scan=True cannot hold MoE blocks (config.model.moe): the scanned '
                        f'blocks must be identical; set scan=False')


def check_mesh(config, mesh) -> None:
  """ConfigError unless the mesh's 'expert' axis divides config.model.moe.num_experts."""
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
