"""Mixture of experts (jmm.models.moe): routing, capacity, losses, upcycling, expert parallelism, configs/clip_up.py."""
import functools
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jmm import objectives
from jmm import step as step_lib
from jmm import validation as config_lib  # validate(config)
from jmm.data import build as data_build
from jmm.models import build as model_build
from jmm import parallel
from jmm import train
from jmm.config import ConfigError
from jmm.models import layers
from jmm.models import moe
from jmm.models import moe_parallel
from jmm.models import moe_routing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import clip_up  # noqa: E402
from configs import siglip  # noqa: E402

VOCAB = 64


def _weights(rng, e, d, h):
  return (jnp.asarray(rng.normal(size=(e, d, h)) * 0.3, jnp.float32), jnp.asarray(rng.normal(size=(e, h)) * 0.1,
                                                                                   jnp.float32),
          jnp.asarray(rng.normal(size=(e, h, d)) * 0.3, jnp.float32), jnp.asarray(rng.normal(size=(e, d)) * 0.1,
                                                                                   jnp.float32))


def _naive(x, logits, w, *, k, capacity_factor, groups, gating='softmax_topk', renormalize=True):
  """Per-token loop: each group's tokens claim expert slots first choices first, in token order."""
  w_in, b_in, w_out, b_out = (np.asarray(a, np.float64) for a in w)
  x, logits = np.asarray(x, np.float64), np.asarray(logits, np.float64)
  batch, length, width = x.shape
  e = logits.shape[-1]
  xs, ls = x.reshape(groups, -1, width), logits.reshape(groups, -1, e)
  out, dropped = np.zeros_like(xs), 0
  for g in range(groups):
    tokens = xs.shape[1]
    cap = tokens if capacity_factor == 0 else min(tokens, int(np.ceil(capacity_factor * tokens * k / e)))
    probs = np.exp(ls[g] - ls[g].max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    choice = np.argsort(-ls[g], axis=-1, kind='stable')[:, :k]  # [T, k]
    if gating == 'softmax_topk':
      gate = np.take_along_axis(probs, choice, -1)
      if renormalize:
        gate /= gate.sum(-1, keepdims=True)
    else:
      top = np.take_along_axis(ls[g], choice, -1)
      gate = np.exp(top - top.max(-1, keepdims=True))
      gate /= gate.sum(-1, keepdims=True)
    count = np.zeros(e, int)
    for j in range(k):
      for t in range(tokens):
        ex = choice[t, j]
        if count[ex] >= cap:
          dropped += 1
          continue
        count[ex] += 1
        h = xs[g, t] @ w_in[ex] + b_in[ex]
        h = np.asarray(layers.activation_fn('gelu_tanh')(jnp.asarray(h)), np.float64)
        out[g, t] += gate[t, j] * (h @ w_out[ex] + b_out[ex])
  return out.reshape(batch, length, width), dropped / (batch * length * k)


@pytest.mark.parametrize('capacity_factor, gating, renormalize', [
    (0.0, 'softmax_topk', True), (1.0, 'softmax_topk', True), (0.5, 'topk_softmax', True),
    (1.25, 'softmax_topk', False)])
def test_block_matches_a_per_token_loop(capacity_factor, gating, renormalize):
  rng = np.random.default_rng(0)
  b, l, d, h, e, k, groups = 4, 6, 8, 16, 4, 2, 2
  x = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)
  logits = jnp.asarray(rng.normal(size=(b, l, e)), jnp.float32)
  w = _weights(rng, e, d, h)
  out, stats = jax.jit(lambda x, lg, w: moe.moe_mlp(x, lg, w, k=k, capacity_factor=capacity_factor, gating=gating,
                                                     renormalize=renormalize, groups=groups))(x, logits, w)
  want, dropped = _naive(x, logits, w, k=k, capacity_factor=capacity_factor, groups=groups, gating=gating,
                         renormalize=renormalize)
  np.testing.assert_allclose(out, want, atol=2e-5)
  np.testing.assert_allclose(stats['dropped_fraction'], dropped, atol=1e-6)
  if capacity_factor in (0.5, 1.0):
    assert dropped > 0  # The case exercises dropping.


def test_capacity_drops_the_overflow_of_a_popular_expert():
  # 8 tokens all prefer expert 0, then expert 1; 4 experts, k=1, capacity factor 1 -> 2 slots per expert.
  logits = jnp.tile(jnp.array([3.0, 2.0, 0.0, -1.0]), (1, 8, 1))  # [1, 8, 4]
  assert moe_routing.expert_capacity(8, 4, 1, 1.0) == 2 and moe_routing.expert_capacity(8, 4, 2, 0.0) == 8
  w = _weights(np.random.default_rng(1), 4, 4, 8)
  x = jnp.ones((1, 8, 4))
  _, stats = moe.moe_mlp(x, logits, w, k=1, capacity_factor=1.0, groups=1)
  np.testing.assert_allclose(stats['dropped_fraction'], 6 / 8)
  np.testing.assert_allclose(stats['load'], [1, 0, 0, 0])
  _, stats = moe.moe_mlp(x, logits, w, k=2, capacity_factor=1.0, groups=1)  # 4 slots each: 4 + 4 of 16 kept.
  np.testing.assert_allclose(stats['dropped_fraction'], 8 / 16)
  _, stats = moe.moe_mlp(x, logits, w, k=2, capacity_factor=0.0, groups=1)  # Dropless.
  np.testing.assert_allclose(stats['dropped_fraction'], 0.0)


def test_routing_and_losses_match_hand_formulas():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(10, 5)).astype(np.float32)
  weights, experts, probs = moe_routing.route(jnp.asarray(logits), 2, 'softmax_topk', renormalize=True)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top = np.argsort(-logits, -1)[:, :2]
  np.testing.assert_array_equal(experts, top)
  picked = np.take_along_axis(p, top, -1)
  np.testing.assert_allclose(weights, picked / picked.sum(-1, keepdims=True), rtol=1e-5)
  soft, _, _ = moe_routing.route(jnp.asarray(logits), 2, 'topk_softmax')
  top_logits = np.take_along_axis(logits, top, -1)
  np.testing.assert_allclose(soft, np.exp(top_logits) / np.exp(top_logits).sum(-1, keepdims=True), rtol=1e-5)
  aux, load = moe_routing.load_balance_loss(probs, experts, 5)
  f = np.array([(top == i).sum() for i in range(5)]) / top.size
  np.testing.assert_allclose(load, f, rtol=1e-6)
  np.testing.assert_allclose(aux, 5 * np.sum(f * p.mean(0)), rtol=1e-5)
  np.testing.assert_allclose(moe_routing.router_z_loss(jnp.asarray(logits)),
                             np.mean(np.log(np.exp(logits).sum(-1)) ** 2), rtol=1e-5)
  uniform = jnp.zeros((8, 4))
  aux, _ = moe_routing.load_balance_loss(jax.nn.softmax(uniform), jnp.arange(8)[:, None] % 4, 4)
  np.testing.assert_allclose(aux, 1.0)


def test_layer_patterns():
  assert moe.moe_layer_indices('every_other', 4) == (1, 3)
  assert moe.moe_layer_indices('every_other', 1) == ()
  assert moe.moe_layer_indices('all', 3) == (0, 1, 2)
  assert moe.moe_layer_indices('last_n:2', 5) == (3, 4)
  assert moe.moe_layer_indices('0,-1', 4) == (0, 3)
  assert moe.moe_layer_indices([2], 4) == (2,)
  for bad in ('every_third', 'last_n:9', '7'):
    with pytest.raises(ValueError, match='layers='):
      moe.moe_layer_indices(bad, 4)


def _tiny(config, width=32, depth=2):
  tiny = dict(width=width, depth=depth, mlp_dim=64, num_heads=2, out_dim=None)
  config.model.image.update(tiny, patch_size=(8, 8))
  config.model.text.update(tiny)
  config.model.out_dim = 32
  config.data.text_len = 8
  return config


@pytest.mark.parametrize('field, value, message', [
    ('num_experts', -1, 'num_experts'), ('k', 5, r'moe.k=5'), ('gating', 'top1', 'moe.gating'),
    ('capacity_factor', -1.0, 'capacity_factor'), ('layers', 'last_n:7', 'moe.layers'),
    ('towers', 'image,audio', 'moe.towers'), ('impl', 'cuda', 'moe.impl'), ('aux_loss_weight', -0.1, 'aux_loss'),
    ('dispatch', 'ragged', 'needs capacity_factor=0'), ('dispatch', 'alltoall', 'moe.dispatch'),
    ('colour', 1, 'no field')])
def test_config_errors_name_the_field(field, value, message):
  c = _tiny(clip_up.get_config('res=16,batch=16,steps=4,experts=4'))
  c.model.moe[field] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(c)


def test_ragged_dispatch_config_is_dropless():
  c = _tiny(clip_up.get_config('res=16,batch=16,steps=4,experts=4'))
  c.model.moe.update(dispatch='ragged', capacity_factor=0.0)
  config_lib.validate(c)
  assert moe.tower_moe(c, 'image')['dispatch'] == 'ragged'
  with pytest.raises(ValueError, match='needs capacity_factor=0'):
    moe.moe_mlp(*_ragged_case()[:3], k=2, capacity_factor=1.0, dispatch='ragged')


def test_scan_and_mesh_errors():
  c = _tiny(clip_up.get_config('res=16,batch=16,steps=4,experts=4'))
  c.model.image.scan = True
  with pytest.raises(ConfigError, match='model.image.scan'):
    config_lib.validate(c)
  c = _tiny(clip_up.get_config('res=16,batch=16,steps=4,experts=6'))
  with pytest.raises(ConfigError, match='num_experts=6 is not divisible'):
    moe.check_mesh(c, parallel.make_mesh('data=2,expert=4'))


def test_dense_config_keeps_the_dense_parameter_tree():
  c = _tiny(siglip.get_config('res=16,batch=16,steps=4'))
  assert c.model.moe.num_experts == 0
  image, text = _inputs(1)
  params = jax.eval_shape(model_build.make_model(c, VOCAB).init, jax.random.key(0), {'image': image, 'text': text})['params']
  block = params['img']['encoder']['encoderblock_1']
  assert 'mlp' in block and 'moe' not in block


def _inputs(batch=4, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.uniform(-1, 1, (batch, 16, 16, 3)), jnp.float32),
          jnp.asarray(rng.integers(3, VOCAB, (batch, 8)), jnp.int32))


def _upcycle_config(**moe_fields):
  config = _tiny(clip_up.get_config('res=16,batch=16,steps=4,experts=4,k=2'))
  config.model.moe.update(layers='all', **moe_fields)
  return config


@pytest.fixture(scope='module')
def dense_parent_and_fresh_moe():
  """A dense model, its parameters and its outputs on `_inputs(4)`, and a fresh initialisation of the MoE model
  upcycled from it. Gating and capacity add no parameters: one initialisation serves every case (the MoE init
  compiles for 10 s)."""
  dense_config = _tiny(siglip.get_config('res=16,batch=16,steps=4'))
  dense_model = model_build.make_model(dense_config, VOCAB)
  dense_params, _ = model_build.init_params(dense_model, data_build.batch_spec(dense_config), 0)
  image, text = _inputs(4)
  out_d = jax.jit(dense_model.apply)({'params': dense_params}, {'image': image, 'text': text})
  config = _upcycle_config()
  fresh, _ = model_build.init_params(model_build.make_model(config, VOCAB), data_build.batch_spec(config), 1)
  return dense_params, out_d, fresh


@pytest.mark.parametrize('capacity_factor, gating', [(0.0, 'softmax_topk'), (2.0, 'topk_softmax')])
def test_upcycled_model_equals_its_dense_parent(capacity_factor, gating, dense_parent_and_fresh_moe):
  dense_params, out_d, fresh = dense_parent_and_fresh_moe
  config = _upcycle_config(capacity_factor=capacity_factor, gating=gating)
  model = model_build.make_model(config, VOCAB)
  from jmm import convert  # pylint: disable=g-import-not-at-top
  template = moe.dense_template(fresh)
  assert set(convert.flatten(template)) == set(convert.flatten(dense_params))
  params = moe.upcycle(dense_params, fresh)
  block = params['txt']['encoder']['encoderblock_0']['moe']
  np.testing.assert_array_equal(block['fc_in_kernel'][3], dense_params['txt']['encoder']['encoderblock_0']['mlp'][
      'fc_in']['kernel'])
  np.testing.assert_array_equal(block['router'], fresh['txt']['encoder']['encoderblock_0']['moe']['router'])
  image, text = _inputs(4)
  batch = {'image': image, 'text': text}
  out = jax.jit(model.apply)({'params': params}, batch)
  zimg_d, ztxt_d, zimg, ztxt = out_d['zimg'], out_d['ztxt'], out['zimg'], out['ztxt']
  np.testing.assert_allclose(zimg, zimg_d, atol=2e-6)
  np.testing.assert_allclose(ztxt, ztxt_d, atol=2e-6)
  if gating == 'softmax_topk':  # (topk_softmax sums to one by construction: renormalize does not apply.)
    # Without renormalisation the top-2 of a softmax over 4 experts sum to less than one: not the parent.
    config.model.moe.update(renormalize=False)
    zimg_u = jax.jit(model_build.make_model(config, VOCAB).apply)({'params': params}, batch)['zimg']
    assert np.abs(np.asarray(zimg_u) - np.asarray(zimg_d)).max() > 1e-3


def _setup(config, devices=None, params=None):
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  axis_rules = parallel.rules(config, mesh)
  model = model_build.make_model(config, VOCAB)
  with jax.set_mesh(mesh):
    state, shardings, tx, schedule = step_lib.create_state(model, config, data_build.batch_spec(config), mesh,
                                                           axis_rules, params=params)
  step = step_lib.make_train_step(model, tx, schedule, objectives.load(config), state_shardings=shardings,
                                  mesh=mesh, axis_rules=axis_rules)
  return mesh, state, step


def test_expert_parallel_training_equals_one_device():
  """3 steps with expert axis 4 and 8 (batch split 8 ways too) give the single-device losses, metrics and params.

  Capacity factor 1 drops tokens; `groups=8` fixes the routing groups, so capacity means the same on every mesh.
  Every mesh starts from the single-device initial parameters (placed with its own shardings): compiling the
  initialisation per mesh cost 10 s each, and that it is mesh-independent is tests/test_parallel.py's subject.
  """
  rng = np.random.default_rng(0)
  batches = [{'image': rng.uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32),
              'text': rng.integers(3, VOCAB, (16, 8)).astype(np.int32)} for _ in range(3)]
  results, init = {}, None
  for spec, devices in [('data=1', jax.devices()[:1]), ('data=2,expert=4', None), ('expert=8', None)]:
    config = _tiny(clip_up.get_config('res=16,batch=16,steps=20,experts=8,k=2'))
    config.model.moe.update(capacity_factor=1.0, groups=8)
    config.optim.warmup_steps = 1
    config.mesh = spec
    mesh, state, step = _setup(config, devices, params=init)
    if init is None:
      init = jax.tree.map(np.array, state['params'])  # A host copy: the step donates its state.
    curve = []
    with jax.set_mesh(mesh):
      for b in batches:
        state, metrics = step(state, parallel.global_batch(b, mesh))
        curve.append(jax.device_get(metrics))
    if spec != 'data=1':
      kernel = state['params']['img']['encoder']['encoderblock_1']['moe']['fc_in_kernel']
      assert kernel.sharding.spec[0] == 'expert'
    results[spec] = curve, jax.tree.map(np.asarray, state['params'])
  ref_curve, ref_params = results['data=1']
  assert ref_curve[0]['moe/img/dropped_fraction'] > 0  # Capacity 1 drops some tokens.
  for spec in ('data=2,expert=4', 'expert=8'):
    curve, params = results[spec]
    for got, want in zip(curve, ref_curve):
      for key in ('loss', 'contrastive/loss', 'moe/img/aux_loss', 'moe/txt/z_loss', 'moe/img/dropped_fraction',
                  'moe/txt/load_max_over_mean', 'grad_norm'):
        np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-6, err_msg=f'{spec} {key}')
    # An attention key bias adds the same q . b to every logit of a query, which softmax ignores: its gradient is
    # rounding noise that Adam scales up to ~1e-5 (mesh-dependent); held to that noise level, the rest to 2e-5.
    close = lambda path, a, b: np.testing.assert_allclose(  # noqa: E731
        a, b, atol=1e-4 if jax.tree_util.keystr(path).endswith("['key']['bias']") else 2e-5,
        err_msg=f'{spec} {jax.tree_util.keystr(path)}')
    jax.tree_util.tree_map_with_path(close, params, ref_params)


def test_step_loss_is_the_weighted_sum_of_contrastive_and_moe_terms():
  """'loss' = w_c * contrastive/loss + w_moe * moe/loss, where moe/loss sums aux_loss_weight * aux + z_loss_weight
  * z over every MoE layer (2 per tower here; the logged per-tower values are layer means). With weights 0.5 and
  3 (neither 1), a weight left out, put on the other term, or folded into the logged moe/loss (which the
  per-layer sum pins) breaks an equality, so one step of one compiled program suffices."""
  batch = {'image': np.random.default_rng(0).uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32),
           'text': np.random.default_rng(1).integers(3, VOCAB, (16, 8)).astype(np.int32)}
  config = _tiny(clip_up.get_config('res=16,batch=16,steps=4,experts=4,k=2'))
  config.model.moe.layers = 'all'
  config.objectives.contrastive.weight = 0.5
  config.objectives.moe.update(weight=3.0, aux_loss_weight=0.05, z_loss_weight=0.002)
  config.mesh = 'data=1'
  mesh, state, step = _setup(config, jax.devices()[:1])
  with jax.set_mesh(mesh):
    m = jax.device_get(step(state, parallel.global_batch(batch, mesh))[1])
  per_layer = sum(0.05 * m[f'moe/{t}/aux_loss'] + 0.002 * m[f'moe/{t}/z_loss'] for t in ('img', 'txt'))
  np.testing.assert_allclose(m['moe/loss'], 2 * per_layer, rtol=1e-5)
  assert m['moe/loss'] > 0.01 * m['loss']  # Big enough that a wrong weight on it shows.
  np.testing.assert_allclose(m['loss'], 0.5 * m['contrastive/loss'] + 3.0 * m['moe/loss'], rtol=1e-6)


def test_clip_up_upcycles_a_dense_workdir_and_trains(tmp_path, capsys):
  def shrink(c):
    _tiny(c)
    c.batch_size, c.log_every, c.checkpoint.every = 16, 2, 1000
    c.checkpoint['async'] = False
    c.tokenizer.train_sentences = 2000
    # XLA's matmuls: 'auto' compiles each train step twice here (oneDNN refuses a fusion of this tiny model),
    # 15 s a step; tests/test_cpu_matmuls.py tests that check and fallback.
    c.cpu_matmuls = 'xla'
    c.evals = {'retrieval': dict(type='retrieval', every=0, text_len=8, batch_size=48,
                                 data=dict(name='synthetic', split='test', resolution=16, seed=1, num_examples=48))}
    return c
  dense_dir, moe_dir = str(tmp_path / 'dense'), str(tmp_path / 'moe')
  dense = shrink(siglip.get_config('res=16,steps=1'))
  dense.evals = {}  # The parent only has to leave a checkpoint and a tokenizer.
  train.run(dense, dense_dir)
  config = shrink(clip_up.get_config('res=16,steps=1,experts=4'))  # One step: one checkpoint save, not two.
  config.init_from = dense_dir
  config.tokenizer.path = os.path.join(dense_dir, 'tokenizer.model')
  final = train.run(config, moe_dir)
  assert 'upcycled the dense parameters' in capsys.readouterr().out
  assert 'retrieval/i2t_r1' in final or any(k.startswith('retrieval/') for k in final)
  with open(os.path.join(moe_dir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  first = next(m for m in logged if 'moe/img/aux_loss' in m)
  assert {'moe/txt/z_loss', 'moe/img/dropped_fraction', 'moe/img/load_max_over_mean', 'contrastive/loss'} <= set(first)


# ---------------------------------------------------------------------------------------------------------------
# dispatch='ragged': ragged_all_to_all expert parallelism (emulated on CPU, lowered for GPU / TPU).

def test_ragged_exchange_emulation_follows_the_collective_semantics():
  """The CPU emulation of ragged_all_to_all against the pseudocode of JAX's docstring, on 4 devices with random
  ragged slices (some empty), receiver offsets leaving gaps, and a pre-filled output buffer."""
  n, rows, out_rows = 4, 16, 20
  rng = np.random.default_rng(4)
  sizes = rng.integers(0, 4, (n, n)).astype(np.int32)  # [sender, receiver]
  sizes[1, 2] = 0
  in_off = np.cumsum(sizes, 1) - sizes + rng.integers(0, 2, (n, 1))  # gaps in the operand too
  out_off = (np.cumsum(sizes, 0) - sizes + np.arange(n)[:, None]).astype(np.int32)  # a gap after every slice
  operand = rng.normal(size=(n, rows, 3)).astype(np.float32)
  output = rng.normal(size=(n, out_rows, 3)).astype(np.float32)
  want = output.copy()
  for s in range(n):
    for r in range(n):
      want[r, out_off[s, r]:out_off[s, r] + sizes[s, r]] = operand[s, in_off[s, r]:in_off[s, r] + sizes[s, r]]
  mesh = parallel.make_mesh('expert=4', devices=jax.devices()[:n])
  fn = jax.shard_map(lambda o, out, io, ss, oo, rs: moe_parallel.ragged_exchange(
      o[0], out[0], io[0], ss[0], oo[0], rs[0], axis_name='expert', max_slice=4, exchange='emulated')[None],
                     mesh=mesh, in_specs=(P('expert'),) * 6, out_specs=P('expert'))
  got = jax.jit(fn)(operand, output, in_off.astype(np.int32), sizes, out_off, np.ascontiguousarray(sizes.T))
  np.testing.assert_array_equal(got, want)


def _ragged_case(e=8, seed=5):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(16, 4, 8)), jnp.float32)
  logits = jnp.asarray(rng.normal(size=(16, 4, e)) + np.linspace(1.5, 0, e), jnp.float32)  # Skewed: ragged loads.
  return x, logits, _weights(rng, e, 8, 16)


def _ragged_loss(dispatch, x, logits, w):
  cot = jnp.asarray(np.random.default_rng(6).normal(size=x.shape), jnp.float32)
  out, stats = moe.moe_mlp(x, logits, w, k=2, capacity_factor=0.0, groups=8, dispatch=dispatch)
  return jnp.sum(out * cot) + stats['aux_loss'], (out, stats)


_ragged_grads = lambda dispatch: jax.grad(functools.partial(_ragged_loss, dispatch), argnums=(0, 1, 2),  # noqa
                                          has_aux=True)


@pytest.fixture(scope='module')
def ragged_reference():
  """The single-device dropless layer's (grads, (out, stats)) on `_ragged_case()`."""
  return jax.jit(_ragged_grads('capacity'))(*_ragged_case())


@pytest.mark.parametrize('spec', ['data=2,expert=4', 'expert=8'])
def test_ragged_expert_parallel_equals_one_device(spec, ragged_reference):
  """dispatch='ragged' on 8 CPU devices (the exchange emulated) = the single-device dropless layer: outputs, stats
  and the gradients w.r.t. tokens, router logits and every expert weight; 2 experts per device (expert=4) or 1."""
  args = _ragged_case()
  want_grads, (want, want_stats) = ragged_reference
  with jax.set_mesh(parallel.make_mesh(spec)):
    lowered = jax.jit(_ragged_grads('ragged')).trace(*args).lower()
    got_grads, (got, got_stats) = lowered.compile()(*args)
  text = lowered.as_text()
  assert 'all_to_all' in text and 'ragged_all_to_all' not in text  # CPU: the emulation, through shard_map.
  np.testing.assert_allclose(got, want, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got_stats, want_stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got_grads, want_grads)
  assert np.asarray(want_stats['load']).max() > 1.5 / 8  # The skew makes the exchanged slices uneven.


@pytest.fixture
def ragged_primitive_on_cpu():
  """JAX's ragged_all_to_all primitive made runnable on CPU: its CPU lowering (XLA has none) becomes the emulation,
  for this test only. The primitive's own JVP and transpose rules stay JAX's."""
  from jax.extend.core import primitives  # pylint: disable=g-import-not-at-top
  from jax.interpreters import mlir  # pylint: disable=g-import-not-at-top

  def rule(ctx, *args, axis_name, axis_index_groups):
    assert axis_index_groups is None
    fn = functools.partial(moe_parallel._ragged_all_to_all_emulated, axis_name=axis_name,
                           max_slice=ctx.avals_in[0].shape[0])
    return mlir.lower_fun(fn, multiple_results=False)(ctx, *args)

  cpu_rules = mlir._platform_specific_lowerings['cpu']  # pylint: disable=protected-access
  prim = primitives.ragged_all_to_all_p
  saved = cpu_rules.get(prim)
  mlir.register_lowering(prim, rule, platform='cpu')
  yield
  if saved is None:
    del cpu_rules[prim]
  else:
    cpu_rules[prim] = saved


def test_ragged_collective_path_equals_one_device(ragged_primitive_on_cpu, ragged_reference):
  """exchange='collective' (the path GPU and TPU take: jax.lax.ragged_all_to_all, and in the backward pass JAX's
  transpose of it) runs on 8 CPU devices with the primitive lowered to the emulation, and equals the single-device
  layer: the sizes and offsets given to the real collective, and its gradient rule, are right."""
  del ragged_primitive_on_cpu
  args = _ragged_case()
  want_grads, (want, _) = ragged_reference

  def loss(x, logits, w):
    cot = jnp.asarray(np.random.default_rng(6).normal(size=x.shape), jnp.float32)
    out, stats = moe.moe_mlp(x, logits, w, k=2, capacity_factor=0.0, groups=8, dispatch='ragged',
                             exchange='collective')
    return jnp.sum(out * cot) + stats['aux_loss'], (out, stats)

  with jax.set_mesh(parallel.make_mesh('data=2,expert=4')):
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*args))
    got_grads, (got, _) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
  assert jaxpr.count('ragged_all_to_all[') == 4  # The primitive, there and back, and its two transposes.
  np.testing.assert_allclose(got, want, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got_grads, want_grads)


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_ragged_expert_parallel_lowers_to_the_collective(platform):
  """A MoeMlp with dispatch='ragged' under an 8-device 'data=2,expert=4' mesh, forward and backward, lowered for
  GPU / TPU from CPU: the exchange is XLA's ragged_all_to_all (4 of them: there and back, each transposed), with no
  trace of the CPU emulation. Lowering only: executing it needs the hardware."""
  layer = moe.MoeMlp(mlp_dim=16, num_experts=8, k=2, capacity_factor=0.0, dispatch='ragged', impl='ragged_dot')
  x, _, _ = _ragged_case()
  mesh = parallel.make_mesh('data=2,expert=4')
  with jax.set_mesh(mesh):
    params = jax.eval_shape(layer.init, jax.random.key(0), x)
    fwd_bwd = jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) ** 2), argnums=(0, 1))
    text = jax.jit(fwd_bwd).trace(params, x).lower(lowering_platforms=(platform,)).as_text()
  assert text.count('@ragged_all_to_all') == 4, text.count('@ragged_all_to_all')
  # The other all_to_alls move [4] int32 offsets (in the collective's transpose), never the emulation's rows.
  plain = re.findall(r'"stablehlo.all_to_all"\(%\w+\) <\{.*?\}> : \(([^)]*)\)', text, re.S)
  assert plain and set(plain) == {'tensor<4xi32>'}, plain
