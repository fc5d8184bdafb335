"""CLOC: the region-text and grounding losses against python loops (values, gradients), across 8 devices, the
Prompter against a transformer layer over the prepended sequence, the region pipeline, the pooled baseline and
the region evaluator, and a short training run of the recipe."""
from __future__ import annotations

import math

import jax
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import cloc as cloc_config
from jmm import objectives as objectives_lib
from jmm import parallel
from jmm import step as step_lib
from jmm import validation
from jmm.data import build as data_build
from jmm.data import pipeline
from jmm.data import synthetic
from jmm.errors import ConfigError
from jmm.evaluators import region_embeddings, run
from jmm.models import build as model_build
from jmm.models import cloc_head, encoder, two_tower
from jmm.objectives import cloc

T, BIAS = 2.5, -1.0


def _section(**fields):
  return ml_collections.ConfigDict({'type': 'cloc', 'head': 'cloc', 'region_weight': 1.0, 'grounding_weight': 0.7,
                                    'l1_weight': 1.0, 'giou_weight': 0.5, 'same_text_positive': True, **fields})


def _unit(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _inputs(n=2, r=3, dim=4, seed=0):
  """Region / phrase embeddings [n, r, dim], predicted and true boxes, tokens with a repeated phrase, a mask."""
  rng = np.random.default_rng(seed)
  zr = _unit(rng.normal(size=(n, r, dim))).astype(np.float32)
  zt = _unit(rng.normal(size=(n, r, dim))).astype(np.float32)
  lo = rng.uniform(0.0, 0.5, (n, r, 2))
  true = np.concatenate([lo, lo + rng.uniform(0.1, 0.4, (n, r, 2))], -1).astype(np.float32)
  lo = rng.uniform(0.0, 0.5, (n, r, 2))
  pred = np.concatenate([lo, lo + rng.uniform(0.1, 0.4, (n, r, 2))], -1).astype(np.float32)
  tokens = rng.integers(2, 9, (n, r, 3)).astype(np.int32)
  tokens[-1, 0] = tokens[0, 0]  # Two regions of the batch with the same phrase.
  valid = np.ones((n, r), bool)
  valid[0, -1] = False  # A padding region.
  return zr, zt, pred, true, tokens, valid


def _loop_loss(zr, zt, pred, true, tokens, valid, t, b, section):
  """The objective's loss by explicit loops over the flattened regions (float64)."""
  flat = lambda x: [x[i][k] for i in range(len(x)) for k in range(len(x[0]))]  # noqa: E731
  zr, zt, pred, true, tokens, valid = map(flat, (zr, zt, pred, true, tokens, valid))
  idx = [i for i in range(len(valid)) if valid[i]]
  region = 0.0
  for i in idx:
    for j in idx:
      same = i == j or list(tokens[i]) == list(tokens[j])
      z = 1.0 if same else -1.0
      logit = t * sum(float(a) * float(c) for a, c in zip(zr[i], zt[j])) + b
      region += math.log1p(math.exp(-z * logit))
  region /= len(idx)
  l1 = giou_loss = 0.0
  for i in idx:
    p, q = [float(v) for v in pred[i]], [float(v) for v in true[i]]
    l1 += sum(abs(a - c) for a, c in zip(p, q)) / 4
    inter = max(min(p[2], q[2]) - max(p[0], q[0]), 0) * max(min(p[3], q[3]) - max(p[1], q[1]), 0)
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    hull = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
    giou_loss += 1 - (inter / union - (hull - union) / hull)
  ground = (section.l1_weight * l1 + section.giou_weight * giou_loss) / len(idx)
  return section.region_weight * region + section.grounding_weight * ground


def _objective(section):
  def fn(zr, zt, pred, true, tokens, valid, t, b):
    outputs = {'cloc': {'zregion': zr, 'box_pred': pred, 't': t, 'b': b}, 'ztxt_regions': zt}
    batch = {'boxes': true, 'text_regions': tokens, 'region_valid': valid}
    return cloc.loss(outputs, batch, section)
  return jax.value_and_grad(fn, (0, 1, 2, 6, 7), has_aux=True)


def _run(fn, *args):
  return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})(*args)


def _close(got, want, rtol=1e-5, atol=1e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


def test_losses_and_gradients_equal_a_loop_reference():
  zr, zt, pred, true, tokens, valid = _inputs()
  section = _section()
  cloc.validate(section)
  (value, metrics), grads = _run(_objective(section), zr, zt, pred, true, tokens, valid, jnp.float32(T),
                                 jnp.float32(BIAS))
  args = [np.array(a, np.float64) for a in (zr, zt, pred)] + [np.float64(T), np.float64(BIAS)]
  ref = lambda a: _loop_loss(a[0], a[1], a[2], true, tokens, valid, a[3], a[4], section)  # noqa: E731
  _close(value, ref(args))
  h, want = 1e-6, []
  for k, a in enumerate(args):
    g = np.zeros_like(a)
    for idx in np.ndindex(np.shape(a)):
      values = []
      for sign in (1.0, -1.0):
        moved = [np.array(v, np.float64) for v in args]
        moved[k][idx] += sign * h
        values.append(ref(moved))
      g[idx] = (values[0] - values[1]) / (2 * h)
    want.append(g)
  _close(grads, want, rtol=1e-4, atol=2e-5)
  assert not np.any(np.asarray(grads[0])[0, -1]) and not np.any(np.asarray(grads[2])[0, -1])  # Padding: no grad.
  assert 0.0 <= float(metrics['region_acc']) <= 1.0 and 0.0 < float(metrics['box_iou']) < 1.0


def test_same_text_positive_off_makes_only_the_diagonal_positive():
  zr, zt, pred, true, tokens, valid = _inputs(seed=1)
  section = _section(same_text_positive=False)
  (value, _), _ = _run(_objective(section), zr, zt, pred, true, tokens, valid, jnp.float32(T), jnp.float32(BIAS))
  distinct = tokens.copy()
  distinct[-1, 0] = 99  # With distinct phrases both settings are the same loss.
  (want, _), _ = _run(_objective(_section()), zr, zt, pred, true, distinct, valid, jnp.float32(T),
                      jnp.float32(BIAS))
  _close(value, want)


def test_sharded_over_8_devices_equals_one_device():
  args = _inputs(n=8, r=2, dim=4, seed=2) + (jnp.float32(T), jnp.float32(BIAS))
  fn = _objective(_section())
  want = _run(fn, *args)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    sharded = [jax.device_put(a, split) for a in args[:6]]
    got = _run(fn, *sharded, *args[6:])
    assert len(sharded[0].sharding.device_set) == 8
  _close(got, want, rtol=2e-5, atol=2e-6)


def test_prompt_block_is_a_transformer_layer_over_the_prepended_sequence():
  """Each prompt's output equals a standard pre-LN block run on [that prompt; image tokens], at position 0."""
  rng = np.random.default_rng(3)
  prompts = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)
  tokens = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  block = cloc_head.PromptBlock(num_heads=2, mlp_dim=32)
  params = _run(lambda key: block.init(key, prompts, tokens), jax.random.key(0))
  layer = encoder.Encoder1DBlock(mlp_dim=32, num_heads=2)  # Same parameter names: ln_attn, attn, ln_mlp, mlp.

  def both(params, prompts, tokens):
    seqs = [jnp.concatenate([prompts[:, r:r + 1], tokens], axis=1) for r in range(3)]
    return block.apply(params, prompts, tokens), jnp.stack([layer.apply(params, s)[:, 0] for s in seqs], axis=1)
  got, want = _run(both, params, prompts, tokens)
  _close(got, want, rtol=1e-5, atol=1e-5)


def _tiny_model():
  tower = dict(width=16, depth=1, mlp_dim=32, num_heads=2)
  return two_tower.TwoTower(image=dict(tower, patch_size=(8, 8), pool_type='gap'),
                            text=dict(tower, vocab_size=12, pool_type='last'), out_dim=8,
                            heads={'cloc': {'type': 'cloc_head', 'num_heads': 2, 'num_freqs': 2}})


def test_head_embeds_regions_and_phrases_and_predicts_boxes():
  model = _tiny_model()
  rng = np.random.default_rng(4)
  batch = {'image': jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32),
           'text': jnp.asarray(rng.integers(0, 12, (2, 5)), jnp.int32)}
  params = _run(lambda key: nn.unbox(model.init(key, batch)['params']), jax.random.key(0))  # No boxes at init.
  boxes = jnp.asarray([[[0.1, 0.1, 0.5, 0.4], [0.5, 0.5, 0.9, 0.9]]] * 2, jnp.float32)
  full = dict(batch, boxes=boxes, text_regions=jnp.asarray(rng.integers(0, 12, (2, 2, 5)), jnp.int32))
  apply = lambda b: _run(lambda p, b: model.apply({'params': p}, b), params, b)  # noqa: E731
  out = apply(full)
  assert out['ztxt_regions'].shape == (2, 2, 8) and out['ztxt'].shape == (2, 8)
  _close(np.linalg.norm(out['cloc']['zregion'], axis=-1), np.ones((2, 2)))
  pred = np.asarray(out['cloc']['box_pred'])
  assert pred.shape == (2, 2, 4) and np.all(pred[..., 2:] >= pred[..., :2])
  # The phrases ride the captions' tower call: the captions' own embeddings are unchanged by them.
  _close(out['ztxt'], apply(batch)['ztxt'], rtol=1e-5, atol=1e-6)
  moved = apply(dict(full, boxes=boxes[:, ::-1]))['cloc']['zregion']
  _close(moved, out['cloc']['zregion'][:, ::-1], rtol=1e-5, atol=1e-6)  # Region r depends on box r only.


def test_pipeline_gives_region_tokens_and_validity():
  source = synthetic.SyntheticCaptions('train', resolution=16, num_examples=16, max_objects=3)

  class Tok:
    def encode(self, texts, length):
      return np.array([[len(t), 1] + [0] * (length - 2) for t in texts], np.int32)
  batch = next(iter(pipeline.make_dataset(source, Tok(), batch_size=8, text_len=4, seed=0, shuffle=False)))
  assert batch['text_regions'].shape == (8, 3, 4) and batch['region_valid'].shape == (8, 3)
  want = np.arange(3)[None, :] < batch['num_objects'][:, None]
  np.testing.assert_array_equal(batch['region_valid'], want)
  lengths = [[len(p) for p in source[i]['phrases']] for i in range(8)]
  np.testing.assert_array_equal(batch['text_regions'][..., 0], lengths)


def test_pooled_regions_weight_patches_by_covered_area():
  boxes = np.array([[0.0, 0.0, 0.5, 0.5], [0.25, 0.1, 0.8, 0.6]], np.float32)
  got = np.asarray(region_embeddings.box_patch_weights(jnp.asarray(boxes), 4))  # [2, 16]
  for k, (y0, x0, y1, x1) in enumerate(boxes):
    for r in range(4):
      for c in range(4):
        cover = max(0, min(y1, (r + 1) / 4) - max(y0, r / 4)) * max(0, min(x1, (c + 1) / 4) - max(x0, c / 4))
        assert got[k, 4 * r + c] == pytest.approx(cover * 16, abs=1e-5)
  tokens = np.random.default_rng(5).normal(size=(1, 16, 3)).astype(np.float32)
  pooled = np.asarray(region_embeddings.pool_in_boxes(jnp.asarray(tokens), jnp.asarray(boxes[None])))
  _close(pooled[0], (got / got.sum(1, keepdims=True)) @ tokens[0], rtol=1e-5)


def test_region_evaluator_scores_every_box_by_both_methods():
  model = _tiny_model()
  batch = {'image': jnp.zeros((2, 16, 16, 3)), 'text': jnp.zeros((2, 6), jnp.int32)}
  params = _run(lambda key: nn.unbox(model.init(key, batch)['params']), jax.random.key(0))

  class Tok:
    eos_id = 1

    def encode(self, texts, length):
      return np.array([[2 + len(t) % 9, 3 + t.count('a') % 8, 1] + [0] * (length - 3) for t in texts], np.int32)
  data = dict(name='synthetic', split='test', resolution=16, seed=1, max_objects=3, num_examples=6)
  config = ml_collections.ConfigDict({'evals': {
      name: dict(type='region', every=0, batch_size=4, text_len=6, data=data, method=method)
      for name, method in (('region', ''), ('region_pooled', 'pooled'))}})
  results = run.run_evaluators(config, run.make_embed_fns(model), params, Tok())
  source = synthetic.SyntheticCaptions('test', resolution=16, seed=1, max_objects=3, num_examples=6)
  boxes = sum(source[i]['num_objects'] for i in range(6))
  for name in ('region', 'region_pooled'):
    assert results[f'{name}/regions'] == boxes
    assert all(0.0 <= results[f'{name}/{k}'] <= 1.0 for k in ('top1', 'object_top1', 'colour_top1'))


def test_config_and_objective_errors_name_the_field():
  config = cloc_config.get_config()
  validation.validate(config)
  broken = cloc_config.get_config()
  broken.model.heads = {}
  with pytest.raises(ConfigError, match="head='cloc' is not in config.model.heads"):
    validation.validate(broken)
  for fields, match in ((dict(region_weight=-1), 'region_weight'), (dict(head=''), 'head'),
                        (dict(same_text_positive=1), 'same_text_positive')):
    with pytest.raises(ConfigError, match=match):
      cloc.validate(_section(**fields))
  linear = cloc_config.get_config()
  linear.evals.region.data.name = 'folder'
  with pytest.raises(ConfigError, match='region recognition runs on the synthetic data'):
    validation.validate(linear)


def test_recipe_step_trains_on_pipeline_batches():
  """The recipe's objectives and head on real pipeline batches (multi-object synthetic data) through the
  training step: the batch fields reach the model and both CLOC terms fall."""
  config = cloc_config.get_config('res=16,steps=8,batch=8,objects=2')
  config.model.image.update(width=16, depth=1, mlp_dim=32, num_heads=2)
  config.model.text.update(width=16, depth=1, mlp_dim=32, num_heads=2)
  config.model.out_dim = 8
  config.optim.update(warmup_steps=0, lr=3e-3)
  validation.validate(config)
  terms = objectives_lib.validate(config)
  objectives_lib.check_batch_fields(terms, data_build.batch_fields(config))

  class Tok:
    def encode(self, texts, length):  # One id per word (a hash), eos 1, padding 0.
      rows = [([2 + sum(map(ord, w)) % 20 for w in t.split()][:length - 1] + [1] + [0] * length)[:length]
              for t in texts]
      return np.array(rows, np.int32).reshape(len(texts), length)
  source = data_build.make_source(config)
  batches = iter(pipeline.make_dataset(source, Tok(), batch_size=8, text_len=config.data.text_len, seed=0))
  model = model_build.make_model(config, 24)
  spec = data_build.batch_spec(config)
  mesh = parallel.make_mesh('data=1', devices=jax.devices()[:1])
  axis_rules = parallel.rules(config, mesh)
  with jax.set_mesh(mesh):
    state, shardings, tx, schedule = step_lib.create_state(model, config, spec, mesh, axis_rules)
    step = step_lib.make_train_step(model, tx, schedule, terms, state_shardings=shardings, mesh=mesh,
                                    axis_rules=axis_rules)
    batch = parallel.global_batch({k: v for k, v in next(batches).items()}, mesh)
    history = []
    for _ in range(8):  # One batch, many steps: the losses must fall.
      state, metrics = step(state, batch)
      history.append({k: float(v) for k, v in metrics.items() if k.startswith('cloc/')})
  assert history[-1]['cloc/region_loss'] < history[0]['cloc/region_loss']
  assert history[-1]['cloc/grounding_loss'] < history[0]['cloc/grounding_loss']
