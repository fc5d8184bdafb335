"""The training seam: weighted objectives, an objective and a head defined outside jmm, per-step keys, and the
non-finite guard, each through the real loop (`jmm.train.run`) on a tiny model."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import siglip
from jmm import errors
from jmm import objectives as objectives_lib
from jmm import optim
from jmm import recipes
from jmm import step as step_lib
from jmm import train
from jmm.data import build as data_build
from jmm.models import build as model_build

TINY_TOWER = dict(width=32, depth=1, mlp_dim=64, num_heads=2)


def _config(steps=4, **objectives):
  config = siglip.get_config(f'res=16,steps={steps},batch=8')
  config.model.image.update(TINY_TOWER, patch_size=(8, 8))
  config.model.text.update(TINY_TOWER)
  config.model.out_dim = 16
  config.log_every = 1
  config.mesh = 'data=-1'
  config.tokenizer.train_sentences = 500
  config.checkpoint.every = 2
  config.checkpoint['async'] = False
  config.evals = {}
  # Plain SigLIP: the hand-made batches below carry no hard-negative captions.
  config.data.negative_captions = ''
  config.objectives = objectives or dict(sigmoid=recipes.contrastive('sigmoid'))
  return config


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if '"loss"' in line]


# An objective defined here, in the test module alone: jmm finds it by module name (config type=__name__).
SEEN_KEYS = []


def prepare(step, key, batch, config):
  del config
  return {'probe': jax.random.uniform(key, (batch['image'].shape[0],)) + 0 * step}


def loss(outputs, batch, config):
  """Pulls the image embeddings' first coordinate towards a per-step random target drawn in `prepare`."""
  target = batch['probe'] * config.get('scale', 1.0)
  jax.debug.callback(lambda p: SEEN_KEYS.append(np.asarray(p)), batch['probe'][:2])
  return jnp.mean((outputs['zimg'][:, 0] - target) ** 2), {'target_mean': jnp.mean(target)}


class Head(nn.Module):
  """A head defined here: a dense layer on the pooled image features (config.model.heads)."""
  features: int = 3

  @nn.compact
  def __call__(self, outputs, batch, train=False):
    del batch, train
    return nn.Dense(self.features, name='proj')(outputs['img']['pre_logits'])


def test_two_weighted_objectives_log_their_weighted_sum(tmp_path):
  config = _config(sigmoid=recipes.contrastive('sigmoid'), softmax=recipes.contrastive('softmax', weight=0.5))
  train.run(config, str(tmp_path))
  logged = _metrics(str(tmp_path))
  assert len(logged) == 4
  for m in logged:
    np.testing.assert_allclose(m['loss'], m['sigmoid/loss'] + 0.5 * m['softmax/loss'], rtol=1e-6)
    assert m['sigmoid/loss'] != m['softmax/loss'] and {'sigmoid/t', 'softmax/batch_i2t_acc'} <= set(m)


def test_objective_and_head_from_a_test_module_train_through_the_loop(tmp_path):
  """No edit of jmm: the objective (with a per-step `prepare`) and a head come from this file by name."""
  SEEN_KEYS.clear()
  config = _config(steps=4, sigmoid=recipes.contrastive('sigmoid'),
                   mine=dict(type=__name__, weight=2.0, scale=0.5))
  config.model.heads = dict(extra=dict(type=__name__, features=3))
  train.run(config, str(tmp_path / 'a'))
  logged = _metrics(str(tmp_path / 'a'))
  for m in logged:
    np.testing.assert_allclose(m['loss'], m['sigmoid/loss'] + 2.0 * m['mine/loss'], rtol=1e-6)
    assert 0.0 < m['mine/target_mean'] < 0.5
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(str(tmp_path / 'a'), 'checkpoints', '4', 'state'))['params']
  assert params['head_extra']['proj']['kernel'].shape == (32, 3)
  # Each step draws its own key (fold_in(rng, step)): four different draws, none repeated.
  draws = {tuple(np.round(k, 6)) for k in SEEN_KEYS}
  assert len(draws) >= 4


def test_resume_draws_the_same_per_step_keys(tmp_path):
  """Keys come from the train state and the step, so a run resumed at step 2 draws what a straight run draws."""
  objectives = dict(sigmoid=recipes.contrastive('sigmoid'), mine=dict(type=__name__, weight=1.0))
  SEEN_KEYS.clear()
  train.run(_config(steps=4, **objectives), str(tmp_path / 'straight'))
  straight = [np.asarray(k) for k in SEEN_KEYS]
  SEEN_KEYS.clear()
  train.run(_config(steps=2, **objectives), str(tmp_path / 'resumed'))
  train.run(_config(steps=4, **objectives), str(tmp_path / 'resumed'))
  # Compilation may trace the callback once more; compare the last four draws of each.
  for a, b in zip(straight[-4:], SEEN_KEYS[-4:]):
    np.testing.assert_array_equal(a, b)
  a, b = _metrics(str(tmp_path / 'straight')), _metrics(str(tmp_path / 'resumed'))
  assert [m['loss'] for m in a] == [m['loss'] for m in b]


def test_resume_refuses_a_changed_recipe(tmp_path):
  """A workdir holding another recipe's checkpoint is an error naming the field, not a silent stale resume."""
  workdir = str(tmp_path / 'w')
  train.run(_config(steps=2), workdir)
  changed = _config(steps=4)
  changed.data.seed = 3
  changed.optim.lr = 5e-4
  with pytest.raises(errors.ConfigError, match='resume_check=False') as error:
    train.run(changed, workdir)
  assert 'optim.lr: 0.001 -> 0.0005' in str(error.value) and 'data.seed: 0 -> 3' in str(error.value)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['data']['seed'] == 0  # The record of what wrote the checkpoint is kept.
  assert max(m['step'] for m in _metrics(workdir)) == 2
  # Longer training, other throughput knobs and evaluators are fine; resume_check=False overrides the rest.
  longer = _config(steps=3)
  longer.data.prefetch = 4
  train.run(longer, workdir)
  changed.resume_check = False
  train.run(changed, workdir)
  assert max(m['step'] for m in _metrics(workdir)) == 4


def _tiny_state(config):
  model = model_build.make_model(config, vocab_size=128)
  params, _ = model_build.init_params(model, data_build.batch_spec(config), 0)
  tx, schedule = optim.make_optimizer(config.optim, params, config.total_steps)
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros([], jnp.int32),
           'rng': step_lib.rng_data(0), 'nonfinite': jnp.zeros([3], jnp.int32)}
  return model, tx, schedule, state


def test_a_nan_step_leaves_the_state_unchanged_and_is_counted():
  config = _config()
  model, tx, schedule, state = _tiny_state(config)
  step = step_lib.make_train_step(model, tx, schedule, objectives_lib.load(config), max_nonfinite_steps=2)
  rng = np.random.default_rng(0)
  good = {'image': jnp.asarray(rng.uniform(-1, 1, (8, 16, 16, 3)), jnp.float32),
          'text': jnp.asarray(rng.integers(0, 128, (8, 12)), jnp.int32)}
  bad = dict(good, image=good['image'].at[0, 0, 0, 0].set(jnp.nan))
  before = jax.tree.map(np.asarray, state)
  state, metrics = step(state, bad)
  after = jax.tree.map(np.asarray, state)
  jax.tree.map(np.testing.assert_array_equal, after['params'], before['params'])
  jax.tree.map(np.testing.assert_array_equal, after['opt_state'], before['opt_state'])
  assert int(after['step']) == 1 and list(after['nonfinite']) == [1, 1, 0]
  assert int(metrics['nonfinite_steps']) == 1 and not np.isfinite(float(metrics['loss']))
  assert step_lib.nonfinite_status(state) == (False, 1)

  state, _ = step(state, good)  # Finite steps update (the first at the warmup's lr 0) and end the bad run.
  assert list(np.asarray(state['nonfinite'])) == [1, 0, 0]
  state, _ = step(state, good)
  changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), state['params'], before['params'])
  assert any(jax.tree.leaves(changed))
  state, _ = step(state, bad)
  state, _ = step(state, bad)  # Two in a row: max_nonfinite_steps=2 sets the stop flag, which stays set.
  assert step_lib.nonfinite_status(state) == (True, 2)
  state, _ = step(state, good)
  assert list(np.asarray(state['nonfinite'])) == [3, 0, 1]
  assert int(state['step']) == 6


def test_nonfinite_steps_in_a_row_stop_the_run_with_a_finite_checkpoint(tmp_path, monkeypatch):
  """From step 5 on every batch holds a NaN: the run stops after max_nonfinite_steps, and its newest checkpoint
  is step 4's (none written during the trouble), finite."""
  make = data_build.make_train_iterator

  class NanFrom:
    def __init__(self, it, start):
      self.it, self.start, self.n = it, start, 0

    def __next__(self):
      batch, self.n = next(self.it), self.n + 1
      if self.n >= self.start:
        batch['image'] = np.full_like(batch['image'], np.nan)
      return batch

    def get_state(self):
      return self.it.get_state()

    def set_state(self, state):
      self.it.set_state(state)

  monkeypatch.setattr(data_build, 'make_train_iterator', lambda *a, **k: NanFrom(make(*a, **k), 5))
  config = _config(steps=20)
  config.max_nonfinite_steps = 3
  with pytest.raises(errors.NonFiniteError, match='3 steps in a row.*from step 4'):
    train.run(config, str(tmp_path))
  checkpoints = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert checkpoints[-1] == 4
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(str(tmp_path), 'checkpoints', '4', 'state'))['params']
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  logged = _metrics(str(tmp_path))
  assert [m['nonfinite_steps'] for m in logged] == [0, 0, 0, 0, 1, 2, 3]


def test_a_checkpoint_from_before_the_rng_and_guard_still_resumes(tmp_path):
  """Train states written before 'rng' and 'nonfinite' existed restore; the caller keeps fresh values for them."""
  from jmm import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  params = {'w': np.arange(4, dtype=np.float32)}
  ck = ckpt_lib.Checkpointer(str(tmp_path), use_async=False, every=1)
  ck.save(3, {'params': params, 'step': np.int32(3)}, {'position': 3}, force=True)
  fresh = {'params': {'w': np.zeros(4, np.float32)}, 'step': np.int32(0), 'rng': np.asarray(step_lib.rng_data(0)),
           'nonfinite': np.zeros(3, np.int32)}
  restored, data_state = ck.restore(3, ckpt_lib.abstract_like(fresh))
  ck.close()
  assert set(restored) == {'params', 'step'} and data_state == {'position': 3}
  np.testing.assert_array_equal(restored['params']['w'], params['w'])
