"""Matryoshka representations: the prefix loss against a loop-based reference, across devices, and eval `dims`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jmm.errors import ConfigError
from jmm.evaluators import common, linear_probe, retrieval, run, synthetic_zeroshot, zeroshot
from jmm.objectives import contrastive, matryoshka

T, BIAS = 4.0, -2.0


def _section(**fields):
  return ml_collections.ConfigDict({'type': 'matryoshka', 'loss': 'sigmoid', 'impl': 'dense', **fields})


def _unit(v):
  return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _reference(zimg, ztxt, zneg, t, b, name, dims, weights):
  """Python loops over prefixes and pairs in float64 numpy, on the towers' RAW outputs: each prefix of a raw
  vector is normalised (the objective cuts the normalised vector and normalises again; the two must agree)."""
  n, width = zimg.shape
  total = 0.0
  for d, w in zip(dims, weights):
    d = d or width
    unit = lambda v: v[:d] / np.sqrt(sum(c * c for c in v[:d]))  # noqa: E731
    x, y = [unit(zimg[i]) for i in range(n)], [unit(ztxt[j]) for j in range(n)]
    y_neg = [] if zneg is None else [unit(zneg[j]) for j in range(n)]
    logit = lambda u, v: t * sum(p * q for p, q in zip(u, v))  # noqa: E731
    if name == 'sigmoid':
      term = 0.0
      for i in range(n):
        for j in range(n):
          term -= _log_sigmoid((1.0 if i == j else -1.0) * (logit(x[i], y[j]) + b))
        for v in y_neg:  # A hard negative is a negative of every image.
          term -= _log_sigmoid(-(logit(x[i], v) + b))
      term /= n
    else:
      lse = lambda logits: np.log(sum(np.exp(l) for l in logits))  # noqa: E731
      i2t = sum(lse([logit(x[i], v) for v in y + y_neg]) - logit(x[i], y[i]) for i in range(n)) / n
      t2i = sum(lse([logit(x[i], y[j]) for i in range(n)]) - logit(x[j], y[j]) for j in range(n)) / n
      term = 0.5 * (i2t + t2i)
    total += w * term
  return total / sum(weights)


def _reference_grads(args, name, dims, weights, h=1e-6):
  """Central differences of the float64 loop reference, one input coordinate at a time."""
  args = [None if a is None else np.array(a, np.float64) for a in args]
  grads = []
  for k, a in enumerate(args):
    if a is None:
      continue
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
      shifted = []
      for sign in (1.0, -1.0):
        moved = [x.copy() if x is not None else None for x in args]
        moved[k][idx] += sign * h
        shifted.append(_reference(*moved, name, dims, weights))
      g[idx] = (shifted[0] - shifted[1]) / (2 * h)
    grads.append(g)
  return grads


def _objective(section):
  def fn(zimg, ztxt, zneg, t, b):
    outputs = {'zimg': _unit(zimg), 'ztxt': _unit(ztxt), 't': t, 'b': b}
    if zneg is not None:
      outputs['ztxt_neg'] = _unit(zneg)
    return matryoshka.loss(outputs, {}, section)
  return fn


def _raw(n=3, width=6, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(n, width)), jnp.float32) for _ in range(3)]


def _run(fn, *args):
  """jit-compiles and runs fn; XLA's backend optimisations off: these tiny programs are all compile time."""
  return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})(*args)


def _close(got, want, rtol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize('name,hard', [('sigmoid', False), ('softmax', False), ('sigmoid', True), ('softmax', True)])
def test_loss_and_gradients_equal_a_loop_reference(name, hard):
  dims, weights = (2, 4, 0), (1.0, 0.5, 2.0)
  zimg, ztxt, zneg = _raw()
  zneg = zneg if hard else None
  section = _section(loss=name, hard_negatives=hard, dims=dims, weights=weights)
  matryoshka.validate(section)
  args = (zimg, ztxt, zneg, jnp.float32(T), jnp.float32(BIAS))
  argnums = (0, 1, 2, 3, 4) if hard else (0, 1, 3, 4)  # zneg=None has no gradient.
  (value, metrics), grads = _run(jax.value_and_grad(_objective(section), argnums, has_aux=True), *args)
  numpy_args = [None if a is None else np.asarray(a, np.float64) for a in args]
  _close(value, _reference(*numpy_args, name, dims, weights))
  _close(grads, _reference_grads(args, name, dims, weights), rtol=1e-4)
  for d in dims:  # Each prefix's own term, logged as 'loss@d' (0 -> the width, 6).
    _close(metrics[f'loss@{d or 6}'], _reference(*numpy_args, name, (d,), (1.0,)))
  assert {'batch_i2t_acc@2', 'batch_i2t_acc@4', 'batch_i2t_acc@6', 'sim_pos', 't', 'b'} <= set(metrics)
  assert ('hard_neg_acc' in metrics) == hard


def test_full_width_alone_is_the_contrastive_loss_bit_for_bit():
  zimg, ztxt, _ = _raw()
  outputs = {'zimg': _unit(zimg), 'ztxt': _unit(ztxt), 't': jnp.float32(T), 'b': jnp.float32(BIAS)}
  section = _section(dims=(0,))
  (value, metrics), (want, want_metrics) = _run(
      lambda o: (matryoshka.loss(o, {}, section), contrastive.loss(o, {}, section)), outputs)
  assert float(value) == float(want) and float(metrics['sim_neg']) == float(want_metrics['sim_neg'])


def test_sharded_impls_per_prefix_equal_the_reference(monkeypatch):
  """ring (sigmoid) and gather (softmax) with the batch split over two devices: the loop reference's loss and
  gradients."""
  dims, weights, impls = (2, 0), (2.0, 1.0), (('sigmoid', 'ring'), ('softmax', 'gather'))
  used = []
  sharded_loss = contrastive.sharded_loss
  monkeypatch.setattr(contrastive, 'sharded_loss', lambda *a: used.append(a[4:6]) or sharded_loss(*a))
  zimg, ztxt, _ = _raw(n=4)
  args = (zimg, ztxt, None, jnp.float32(T), jnp.float32(BIAS))

  def losses(zimg, ztxt, t, b):
    terms = [_objective(_section(loss=name, impl=impl, dims=dims, weights=weights)) for name, impl in impls]
    return [jax.value_and_grad(lambda *a, f=f: f(a[0], a[1], None, a[2], a[3])[0], (0, 1, 2, 3))(
        zimg, ztxt, t, b) for f in terms]

  mesh = jax.make_mesh((2,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
  with jax.set_mesh(mesh):
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    got = _run(losses, jax.device_put(zimg, split), jax.device_put(ztxt, split), *args[3:])
  assert used == [impl for impl in impls for _ in dims]  # Each prefix's term went around the devices.
  numpy_args = [None if a is None else np.asarray(a, np.float64) for a in args]
  for (name, _), (value, grads) in zip(impls, got):
    _close(value, _reference(*numpy_args, name, dims, weights))
    _close(grads, _reference_grads(args, name, dims, weights), rtol=1e-4)


@pytest.mark.parametrize('fields,match', [
    (dict(dims=(32, 16, 0)), 'ascending'),
    (dict(dims=(16, 0, 32)), 'only come last'),
    (dict(dims=(16, -1)), 'dims must be'),
    (dict(dims=()), 'dims must be'),
    (dict(dims=(16, 0), weights=(1.0,)), 'weights must be 2'),
    (dict(dims=(16, 0), weights=(1.0, -1.0)), 'weights must be'),
    (dict(dims=(16, 0), weights=(0.0, 0.0)), 'all zero'),
    (dict(impl='ring', hard_negatives=True), 'hard_negatives'),
    (dict(loss='softmax', impl='bidir'), 'impl'),
])
def test_objective_validation_names_the_field(fields, match):
  with pytest.raises(ConfigError, match=match):
    matryoshka.validate(_section(**fields))


def test_prefix_wider_than_the_embedding_is_an_error():
  zimg, ztxt, _ = _raw()
  outputs = {'zimg': _unit(zimg), 'ztxt': _unit(ztxt), 't': jnp.float32(T), 'b': jnp.float32(BIAS)}
  with pytest.raises(ConfigError, match='exceeds the embedding width 6'):
    matryoshka.loss(outputs, {}, _section(dims=(4, 8)))


# ----------------------------------------------------------------------------------------------------------
# Evaluation at prefixes: `dims` on any eval entry.
# ----------------------------------------------------------------------------------------------------------
class HashTokenizer:
  """Word ids by a fixed table built on first sight; pad 0, eos 1."""
  eos_id = 1

  def __init__(self):
    self.ids = {}

  def encode(self, texts, max_len):
    out = np.zeros((len(texts), max_len), np.int32)
    for row, text in enumerate(texts):
      ids = [self.ids.setdefault(w, len(self.ids) + 2) for w in text.split()] + [1]
      out[row, :min(len(ids), max_len)] = ids[:max_len]
    return out


def _towers(width=16, seed=0):
  """Random-feature towers (fixed projections, outputs L2-normalised) that count their calls."""
  rng = np.random.default_rng(seed)
  proj, vocab = rng.normal(size=(9, width)), rng.normal(size=(256, width))
  calls = {'images': 0, 'texts': 0}

  def embed_images(x):  # Each channel's max, min and mean, mixed into every coordinate.
    calls['images'] += 1
    stats = np.concatenate([x.max(axis=(1, 2)), x.min(axis=(1, 2)), x.mean(axis=(1, 2))], axis=1)  # [N, 9]
    return common.l2_normalise(np.tanh(stats @ proj))

  def embed_texts(tokens):
    calls['texts'] += 1
    return common.l2_normalise(np.cumsum(vocab[tokens], axis=1)[:, -1] + vocab[tokens[:, 1]])
  return embed_images, embed_texts, calls


def _cut(fn, d):
  return lambda x: common.l2_normalise(np.asarray(fn(x))[:, :d])


@pytest.mark.parametrize('module', [synthetic_zeroshot, zeroshot, retrieval, linear_probe])
def test_eval_dims_equal_evaluating_truncated_embeddings_by_hand(module, tmp_path):
  data = dict(name='synthetic', split='test', num_examples=40, resolution=8, seed=1)
  config = ml_collections.ConfigDict(dict(batch_size=16, text_len=12, data=data, dims=(2, 4)))
  if module is linear_probe:  # Colour (8 classes): what these towers' features can tell apart.
    config.update(train_data=dict(data, split='train', num_examples=60), label_key='colour', num_classes=8)
  if module is zeroshot:
    config.scores_path = str(tmp_path / 'scores.npz')
  tokenizer = HashTokenizer()
  embed_images, embed_texts, calls = _towers()
  got = common.evaluate_at_dims(module.evaluate, embed_images, embed_texts, tokenizer, config)
  embedded = dict(calls)

  fresh_images, fresh_texts, _ = _towers()
  want = module.evaluate(fresh_images, fresh_texts, tokenizer, config)
  full = dict(want)
  for d in (2, 4):
    want.update({f'{k}@{d}': v for k, v in module.evaluate(_cut(fresh_images, d), _cut(fresh_texts, d), tokenizer,
                                                          config).items()})
  assert got == pytest.approx(want, abs=1e-12)
  # Embedded once: the prefix passes cut the full pass's embeddings.
  fresh = _towers()
  module.evaluate(fresh[0], fresh[1], tokenizer, config)
  assert embedded == fresh[2]
  if module is zeroshot:  # The score file is the full width's.
    scores = np.load(config.scores_path)['scores']
    assert scores.shape[0] == 40 and np.isclose(np.mean(np.argmax(scores, 1) == np.load(config.scores_path)['labels']),
                                                 full['top1'])


def test_eval_dims_hand_each_pass_its_prefix():
  images = np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype(np.float32)
  embed_images, embed_texts, calls = _towers()
  full = embed_images(images)

  def spy(embed_images, embed_texts, tokenizer, config):  # An evaluator of its own: any evaluator gets `dims`.
    z = embed_images(images)
    np.testing.assert_allclose(z, common.l2_normalise(full[:, :z.shape[1]]), rtol=1e-6)
    return {'width': z.shape[1], 'norm': float(np.linalg.norm(z, axis=1).mean())}

  got = common.evaluate_at_dims(spy, embed_images, embed_texts, None, dict(dims=(2, 4)))
  assert got == pytest.approx({'width': 16, 'norm': 1.0, 'width@2': 2, 'norm@2': 1.0, 'width@4': 4, 'norm@4': 1.0})
  assert calls['images'] == 2  # The call above, and the full-width pass; the prefix passes reuse it.


@pytest.mark.parametrize('dims,match', [((0, 16), 'positive'), ((16, 16), 'repeats'), ((16, 256), 'exceeds'),
                                        (16, 'got 16')])
def test_eval_dims_validation_names_the_field(dims, match):
  config = ml_collections.ConfigDict(dict(
      model=dict(out_dim=128),
      evals=dict(zeroshot=dict(type='synthetic_zeroshot', every=0, dims=dims,
                               data=dict(name='synthetic', split='test', num_examples=10)))))
  with pytest.raises(ConfigError, match=rf'config\.evals\.zeroshot\.dims.*{match}'):
    run.validate(config)


def test_eval_dims_wider_than_the_embeddings_is_an_error():
  embed_images, embed_texts, _ = _towers(width=8)
  config = ml_collections.ConfigDict(dict(batch_size=16, text_len=12, dims=(4, 12),
                                          data=dict(name='synthetic', num_examples=20, resolution=8)))
  with pytest.raises(ConfigError, match='dims=.*exceeds the embedding width 8'):
    common.evaluate_at_dims(retrieval.evaluate, embed_images, embed_texts, HashTokenizer(), config)


def test_recipe_validates_with_prefix_losses_and_evals():
  import importlib.util
  import os
  from jmm import validation
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'matryoshka.py')
  spec = importlib.util.spec_from_file_location('matryoshka_recipe', path)
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  config = recipe.get_config()
  (term,) = validation.validate(config)
  assert term.module is matryoshka and tuple(term.config.dims) == (16, 32, 64, 0) and term.config.hard_negatives
  assert all(tuple(ev.dims) == (16, 32, 64) for ev in config.evals.values())
  (term,) = validation.validate(recipe.get_config('mrl=False'))
  assert term.module is contrastive
  validation.validate(recipe.get_config('img=B/16,txt=B,res=224'))
