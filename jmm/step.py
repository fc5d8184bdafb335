"""The train state and the jitted training step: model outputs -> weighted objectives -> guarded update.

The state is a dict: 'params', 'opt_state', 'step' (int32), 'rng' (the run's PRNG key data, uint32 [2]) and
'nonfinite' (int32 [3]: steps skipped in all, skipped in a row now, and a sticky flag set once a run of
`max_nonfinite_steps` in a row happened). Each step draws its randomness from fold_in(rng, step), so a resumed
run draws exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jmm import objectives as objectives_lib
from jmm import optim
from jmm import parallel
from jmm.models import build as model_build

# 'nonfinite' entries.
SKIPPED, IN_A_ROW, STOP = 0, 1, 2
_RNG_SALT = 0x5EED  # The step keys' stream differs from the parameter initialisation's, drawn from the same seed.


def rng_data(seed: int):
  """The run's PRNG key as raw uint32 key data (checkpointed as a plain array)."""
  return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), _RNG_SALT))


def step_key(state):
  """The typed PRNG key of the step about to run: the run's key folded with the step number."""
  return jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])


def create_state(model, config, spec, mesh, axis_rules=parallel.LOGICAL_RULES, params=None):
  """The train state, created already sharded on `mesh`, for batches like `spec` (`jmm.data.build.batch_spec`).

  Shapes and logical names come from `jax.eval_shape` (nothing allocated), shardings from `jmm.parallel`, and
  one `jax.jit(init, out_shardings=...)` then materialises each shard on its own device: a model too big for
  one device never exists whole. `params` (e.g. converted weights) replace the random initialisation.
  Returns (state, state_shardings, tx, schedule).
  """
  key = jax.random.key(config.seed)
  abstract_params, logical_specs = model_build.abstract_params(model, spec, config.seed, axis_rules)
  tx, schedule = optim.make_optimizer(config.optim, abstract_params, config.total_steps,
                                      locked=model_build.locked_params(config))
  param_shardings = parallel.logical_shardings(abstract_params, logical_specs, mesh, axis_rules)
  dummy = model_build.dummy_batch

  def init_fn(key, params):
    if params is None:
      params = nn.unbox(model.init(key, dummy(spec))['params'])
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros([], jnp.int32),
            'rng': rng_data(config.seed), 'nonfinite': jnp.zeros([3], jnp.int32)}

  abstract_state = jax.eval_shape(init_fn, key, abstract_params)
  replicated = parallel.replicated(mesh)
  shardings = {'params': param_shardings,
               'opt_state': parallel.opt_state_shardings(abstract_state['opt_state'], abstract_params,
                                                         param_shardings, mesh),
               'step': replicated, 'rng': replicated, 'nonfinite': replicated}
  if params is not None:
    params = jax.device_put(params, param_shardings)
  with nn.logical_axis_rules(axis_rules):
    state = jax.jit(init_fn, out_shardings=shardings)(key, params)
  return state, shardings, tx, schedule


def make_train_step(model, tx, schedule, terms, *, max_nonfinite_steps: int = 10, state_shardings=None,
                    mesh=None, axis_rules=parallel.LOGICAL_RULES, compiler_options=None, phase=None):
  """The jitted step (state, batch) -> (state, metrics); `state` is donated.

  terms: `jmm.objectives.load(config)`; the loss minimised is their weighted sum (metrics: 'loss', each term's
  under its name, 'lr', 'grad_norm', 'nonfinite_steps'). A step whose loss or gradient norm is not finite
  leaves params and optimizer state as they were and is counted; `max_nonfinite_steps` of them in a row set
  the state's stop flag, which the loop reads (`nonfinite_status`).
  With `state_shardings` and `mesh` the step is compiled for them (batch split over the mesh's batch axes,
  metrics replicated) and the activations follow the logical-axis rules; without, it is a plain jit.
  compiler_options: XLA options the step is compiled with (`jmm.cpu_matmuls`: oneDNN matmuls on CPU).
  phase: the objectives' phase this program runs (`jmm.objectives.phase_at`; None: the first), e.g. FLIP's
  unmasked last steps, whose inputs have other shapes: one program per phase.
  """
  def train_step(state, batch):
    with nn.logical_axis_rules(axis_rules):
      return _train_step(state, batch)

  def _train_step(state, batch):
    batch = objectives_lib.prepare(terms, state['step'], step_key(state), batch, phase)

    def loss_fn(params):
      outputs = model_build.apply(model, params, batch, train=True)
      return objectives_lib.total_loss(terms, outputs, batch)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(_):
      updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
      return optax.apply_updates(state['params'], updates), opt_state

    # The guard: a non-finite step keeps the old params and moments. A branch, not a per-leaf select: selects
    # keep the old and new state alive together and cost the CPU S/16 step about 10% (benchmarks/NOTES.md).
    params, opt_state = jax.lax.cond(finite, apply, lambda _: (state['params'], state['opt_state']), None)
    bad = 1 - finite.astype(jnp.int32)
    skipped, in_a_row, stop = state['nonfinite'][SKIPPED], state['nonfinite'][IN_A_ROW], state['nonfinite'][STOP]
    in_a_row = (in_a_row + 1) * bad
    nonfinite = jnp.stack([skipped + bad, in_a_row, jnp.maximum(stop, (in_a_row >= max_nonfinite_steps).astype(
        jnp.int32))])
    metrics = {**metrics, 'lr': schedule(state['step']), 'grad_norm': grad_norm, 'nonfinite_steps': nonfinite[0]}
    return {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1, 'rng': state['rng'],
            'nonfinite': nonfinite}, metrics

  jit = functools.partial(jax.jit, donate_argnums=0, compiler_options=compiler_options or None)
  if state_shardings is None or mesh is None:
    return jit(train_step)
  return jit(train_step, in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
             out_shardings=(state_shardings, parallel.replicated(mesh)))


def nonfinite_status(state) -> tuple[bool, int]:
  """(whether `max_nonfinite_steps` non-finite steps in a row have happened, non-finite steps in a row now).

  Reads three int32 from the device: call it where the loop syncs anyway (log steps, checkpoint steps).
  """
  nonfinite = jax.device_get(state['nonfinite'])
  return bool(nonfinite[STOP]), int(nonfinite[IN_A_ROW])
