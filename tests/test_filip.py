"""FILIP: the token-wise loss against python loops (values, gradients), across 8 devices, the head, and the
token-wise evaluators."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import filip as filip_config
from jmm import validation
from jmm.errors import ConfigError
from jmm.evaluators import retrieval, run, zeroshot
from jmm.models import filip_head
from jmm.models import two_tower
from jmm.objectives import filip

T, BIAS = 3.0, -1.5


def _section(**fields):
  return ml_collections.ConfigDict({'type': 'filip', 'loss': 'softmax', 'impl': 'dense', **fields})


def _unit(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _tokens(n=3, img_tokens=2, txt_len=3, dim=4, seed=0):
  """Unit image / text token embeddings and a text mask with padding (each text keeps >= 1 real token)."""
  rng = np.random.default_rng(seed)
  x = _unit(rng.normal(size=(n, img_tokens, dim)))
  y = _unit(rng.normal(size=(n, txt_len, dim)))
  lengths = 1 + np.arange(n) % txt_len  # 1, 2, 3, 1, ... real tokens, then padding.
  mask = np.arange(txt_len)[None, :] < lengths[:, None]
  return x.astype(np.float32), y.astype(np.float32), mask


def _loop_sims(x, y, mask):
  """i2t[i][j], t2i[i][j] by explicit loops over images, texts and their tokens (float64)."""
  n_img, n_txt = len(x), len(y)
  i2t = np.zeros((n_img, n_txt))
  t2i = np.zeros((n_img, n_txt))
  for i in range(n_img):
    for j in range(n_txt):
      real = [l for l in range(len(y[j])) if mask[j][l]]
      dot = lambda t, l: sum(float(a) * float(b) for a, b in zip(x[i][t], y[j][l]))  # noqa: E731
      i2t[i, j] = sum(max(dot(t, l) for l in real) for t in range(len(x[i]))) / len(x[i])
      t2i[i, j] = sum(max(dot(t, l) for t in range(len(x[i]))) for l in real) / len(real)
  return i2t, t2i


def _reference(x, y, mask, t, b, name):
  i2t, t2i = _loop_sims(x, y, mask)
  n = len(x)
  log_sigmoid = lambda v: -np.logaddexp(0.0, -v)  # noqa: E731
  lse = lambda vs: np.log(sum(np.exp(v) for v in vs))  # noqa: E731
  if name == 'sigmoid':
    total = 0.0
    for s in (i2t, t2i):
      for i in range(n):
        for j in range(n):
          total -= 0.5 * log_sigmoid((1.0 if i == j else -1.0) * (t * s[i, j] + b))
    return total / n
  rows = sum(lse([t * i2t[i, j] for j in range(n)]) - t * i2t[i, i] for i in range(n)) / n
  cols = sum(lse([t * t2i[i, j] for i in range(n)]) - t * t2i[j, j] for j in range(n)) / n
  return 0.5 * (rows + cols)


def _reference_grads(x, y, mask, t, b, name, h=1e-6):
  """Central differences of the loop reference, one coordinate at a time (x, y, t, b)."""
  args = [np.array(x, np.float64), np.array(y, np.float64), np.array(t, np.float64), np.array(b, np.float64)]
  grads = []
  for k, a in enumerate(args):
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
      values = []
      for sign in (1.0, -1.0):
        moved = [v.copy() for v in args]
        moved[k][idx] += sign * h
        values.append(_reference(moved[0], moved[1], mask, moved[2], moved[3], name))
      g[idx] = (values[0] - values[1]) / (2 * h)
    grads.append(g)
  return grads


def _objective(section):
  def fn(x, y, mask, t, b):
    outputs = {'filip': {'zimg_tokens': x, 'ztxt_tokens': y, 'txt_mask': mask}, 't': t, 'b': b}
    return filip.loss(outputs, {}, section)
  return fn


def _grad_fn(section):
  return jax.value_and_grad(_objective(section), (0, 1, 3, 4), has_aux=True)


def _run(fn, *args):
  """jit-compiled with XLA's backend optimisations off: these tiny programs are all compile time."""
  return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})(*args)


def _close(got, want, rtol=1e-5, atol=1e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


@pytest.mark.parametrize('name,chunk', [('softmax', 0), ('sigmoid', 0), ('softmax', 2)])
def test_loss_and_gradients_equal_a_loop_reference(name, chunk):
  x, y, mask = _tokens()
  section = _section(loss=name, text_chunk=chunk)
  filip.validate(section)
  (value, metrics), grads = _run(_grad_fn(section), x, y, mask, jnp.float32(T), jnp.float32(BIAS))
  _close(value, _reference(x, y, mask, T, BIAS, name))
  _close(grads, _reference_grads(x, y, mask, T, BIAS, name), rtol=1e-4, atol=1e-5)
  i2t, t2i = _loop_sims(x, y, mask)
  both, n = 0.5 * (i2t + t2i), len(x)
  _close(metrics['sim_pos'], np.trace(both) / n)
  _close(metrics['sim_neg'], (both.sum() - np.trace(both)) / (n * (n - 1)))
  _close(metrics['batch_i2t_acc'], np.mean([i2t[i, i] >= np.delete(i2t[i], i).max() for i in range(n)]))
  _close(metrics['batch_t2i_acc'], np.mean([t2i[j, j] >= np.delete(t2i[:, j], j).max() for j in range(n)]))


@pytest.mark.parametrize('name', ['softmax', 'sigmoid'])
def test_gather_over_8_devices_equals_one_device(name):
  """impl='gather' with 16 pairs over 8 devices (2 per device): the dense loss, metrics and gradients."""
  x, y, mask = _tokens(n=16, img_tokens=3, txt_len=4, dim=4, seed=1)
  args = (x, y, mask, jnp.float32(T), jnp.float32(BIAS))
  want = _run(_grad_fn(_section(loss=name, impl='dense')), *args)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    sharded = [jax.device_put(a, split) for a in args[:3]]
    lowered = jax.jit(_grad_fn(_section(loss=name, impl='gather', text_chunk=3))).lower(*sharded, *args[3:])
    assert 'all-gather' in lowered.as_text(dialect='hlo')  # It did go across devices.
    got = lowered.compile({'xla_backend_optimization_level': 0})(*sharded, *args[3:])
  _close(got, want, rtol=2e-5, atol=2e-6)


def test_late_interaction_chunks_and_padding_texts():
  """Chunked (3 texts a time, the last chunk padded) equals one block; a text of padding only stays finite."""
  x, y, mask = _tokens(n=5, seed=2)
  mask[4] = False
  whole = filip_head.late_interaction(x, y, mask)
  _close(filip_head.late_interaction(x, y, mask, chunk=3), whole)
  assert np.all(np.isfinite(np.asarray(whole[0]))) and np.all(np.asarray(whole[1])[:, 4] == 0.0)
  _close([w[:, :4] for w in whole], _loop_sims(x, y[:4], mask[:4]), rtol=1e-5)


def _tiny_model():
  tower = dict(width=16, depth=1, mlp_dim=32, num_heads=2)
  model = two_tower.TwoTower(image=dict(tower, patch_size=(8, 8), pool_type='gap'), text=dict(tower, vocab_size=12),
                             out_dim=8, heads={'filip': {'type': 'filip_head', 'out_dim': 6}})
  batch = {'image': jnp.zeros((2, 16, 16, 3)), 'text': jnp.array([[5, 7, 1, 0, 0], [4, 1, 0, 0, 0]], jnp.int32)}
  return model, _run(lambda key: model.init(key, batch)['params'], jax.random.key(0)), batch


def test_head_gives_unit_token_embeddings_and_the_padding_mask():
  """What an eval with similarity='filip' embeds: unit token embeddings, padding (id 0, not eos 1) as zero rows."""
  model, params, batch = _tiny_model()
  assert set(params['head_filip']) == {'img_proj', 'txt_proj'}
  fns = run.make_embed_fns(model).tokens['filip']
  texts = np.asarray(_run(fns.text, params, batch['text']))  # [2, 5, 6]
  images = np.asarray(_run(fns.image, params, batch['image']))  # [2, 4 patches, 6]
  assert texts.shape == (2, 5, 6) and images.shape == (2, 4, 6)
  real = np.asarray(batch['text']) != 0
  _close(np.linalg.norm(texts, axis=-1), real.astype(np.float32), rtol=1e-5)  # Unit rows; zero at padding.
  _close(np.linalg.norm(images, axis=-1), np.ones((2, 4)), rtol=1e-5)


def test_token_wise_retrieval_and_zeroshot_equal_loop_references():
  """recall_at_k on token embeddings (padding as zero rows) ranks by the loop i2t / t2i; zero-shot averages the
  i2t scores over each class's templates."""
  x, y, mask = _tokens(n=6, img_tokens=3, txt_len=3, dim=4, seed=3)
  texts = y * mask[..., None]
  text_to_image = np.array([0, 1, 2, 3, 4, 5])
  i2t, t2i = _loop_sims(x, y, mask)
  got = retrieval.recall_at_k(x, texts, text_to_image, ks=(1, 2))
  for k in (1, 2):
    want_i2t = np.mean([i in [j for j in np.argsort(-i2t[i], kind='stable')[:k]] for i in range(6)])
    want_t2i = np.mean([j in [i for i in np.argsort(-t2i[:, j], kind='stable')[:k]] for j in range(6)])
    assert got[f'i2t_r{k}'] == pytest.approx(want_i2t) and got[f't2i_r{k}'] == pytest.approx(want_t2i)
  classes = texts.reshape(3, 2, 3, 4)  # 3 classes x 2 templates, class-major as embed_classes makes them.
  want = np.array([[np.mean([i2t[i, 2 * c + k] for k in range(2)]) for c in range(3)] for i in range(6)])
  _close(zeroshot.zeroshot_logits(x, classes), want)


@pytest.mark.parametrize('fields,match', [
    (dict(loss='hinge'), 'loss='),
    (dict(impl='ring'), 'impl='),
    (dict(text_chunk=-1), 'text_chunk'),
    (dict(head=''), 'head'),
    (dict(hard_negatives=True), 'hard_negatives'),
])
def test_objective_validation_names_the_field(fields, match):
  with pytest.raises(ConfigError, match=match):
    filip.validate(_section(**fields))


def test_config_checks_the_head_and_the_evals():
  config = filip_config.get_config()
  validation.validate(config)  # The recipe itself is valid.
  for edit, match in [
      (lambda c: setattr(c.model, 'heads', {}), "head='filip' is not in config.model.heads"),
      (lambda c: setattr(c.evals.retrieval_filip, 'similarity', 'maxsim'), 'similarity='),
      (lambda c: setattr(c.evals.linear_probe, 'similarity', 'filip'), 'global embeddings only'),
      (lambda c: setattr(c.evals.retrieval_filip, 'dims', (4,)), 'dims='),
      (lambda c: setattr(c.evals.retrieval_filip, 'head', 'other'), "FILIP head 'other'"),
  ]:
    broken = filip_config.get_config()
    edit(broken)
    with pytest.raises(ConfigError, match=match):
      validation.validate(broken)
