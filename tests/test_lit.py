"""Locked towers (LiT, Zhai et al. 2022): no gradient through the locked tower, no optimizer state for it, its
parameters bit-identical after training; loading one tower from a workdir; the config checks."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lit
from configs import siglip
from jmm import checkpoint as ckpt_lib
from jmm import convert
from jmm import flops
from jmm import objectives as objectives_lib
from jmm import optim
from jmm import parallel
from jmm import step as step_lib
from jmm import validation
from jmm.data import build as data_build
from jmm.errors import ConfigError
from jmm.models import build as model_build

TINY_TOWER = dict(width=32, depth=1, mlp_dim=64, num_heads=2)
VOCAB = 128


def _tiny(config):
  config.model.image.update(TINY_TOWER, patch_size=(8, 8))
  config.model.text.update(TINY_TOWER)
  config.model.out_dim = 16
  config.optim.warmup_steps = 0  # The first steps already move the trained tower.
  config.log_every = 1
  config.mesh = 'data=-1'
  config.tokenizer.train_sentences = 500
  config.checkpoint['async'] = False
  config.evals = {}
  return config


def _siglip(locked=''):
  config = _tiny(siglip.get_config('res=16,steps=3,batch=8'))
  config.model.locked = locked
  config.model.locked_random_ok = True  # Random towers are fine here: what is measured is what moves.
  return config


def _bits(tree):
  return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


def _nbytes(tree):
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def _lowered_flops(config):
  """XLA's FLOP count of the training step as JAX lowers it (abstract shapes: nothing is built or compiled)."""
  model = model_build.make_model(config, VOCAB)
  spec = data_build.batch_spec(config, config.batch_size)
  spec['text_neg'] = spec['text']  # The recipe's hard-negative captions.
  params, _ = model_build.abstract_params(model, spec)
  tx, schedule = optim.make_optimizer(config.optim, params, config.total_steps,
                                      locked=model_build.locked_params(config))
  state = jax.eval_shape(lambda p: {'params': p, 'opt_state': tx.init(p), 'step': jnp.zeros([], jnp.int32),
                                    'rng': step_lib.rng_data(0), 'nonfinite': jnp.zeros([3], jnp.int32)}, params)
  step = step_lib.make_train_step(model, tx, schedule, objectives_lib.load(config))
  return flops.xla_flops(step.lower(state, spec))


def test_a_locked_tower_runs_no_backward_pass():
  """The step JAX hands XLA already lacks the locked tower's backward pass (not left to XLA to prune): its FLOPs
  drop by that tower's backward share, as jmm.flops counts it (forward only for a locked tower)."""
  free = _lowered_flops(_siglip(''))
  analytic_free = flops.model_flops(_siglip(''))['train_step']
  for locked in ('image', 'text'):
    xla_ratio = _lowered_flops(_siglip(locked)) / free
    analytic_ratio = flops.model_flops(_siglip(locked))['train_step'] / analytic_free
    assert analytic_ratio < 0.9 and abs(xla_ratio - analytic_ratio) < 0.05, (locked, xla_ratio, analytic_ratio)


def _random_params(model, spec, seed):
  """Parameters of `model` drawn with numpy from its abstract shapes: nothing compiled. They stand in for a trained
  parent (seed 1) and for a fresh initialisation (seed 0); only names, shapes and values matter here."""
  rng = np.random.default_rng(seed)
  shapes, _ = model_build.abstract_params(model, spec)
  return jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), shapes)


def test_lit_loads_one_tower_keeps_it_bit_identical_and_gives_it_no_moments(tmp_path):
  """LiT as jmm.train runs it: the image tower loaded from a workdir (nothing else), locked through the real
  state and step on a mesh; after three steps it is bit for bit what was loaded while the text tower trained."""
  config = _tiny(lit.get_config('locked=image,res=16,steps=3,batch=8'))
  config.data.negative_captions, config.objectives.sigmoid.hard_negatives = '', False
  config.init_from = str(tmp_path)
  validation.validate(config)
  model = model_build.make_model(config, VOCAB)
  spec = data_build.batch_spec(config)
  parent, fresh = _random_params(model, spec, 1), _random_params(model, spec, 0)
  ck = ckpt_lib.Checkpointer(str(tmp_path), use_async=False, every=1)
  ck.save(5, {'params': parent, 'step': np.int32(5)}, {}, force=True)
  ck.close()

  init = convert.initial_params(config.init_from, fresh, only=model_build.init_from_params(config))
  for key in ('img', 'txt', 't', 'b'):  # The image tower is the parent's; the rest stays at the fresh init.
    for a, b in zip(_bits(init[key]), _bits((parent if key == 'img' else fresh)[key])):
      np.testing.assert_array_equal(a, b)

  mesh = parallel.make_mesh('data=1', devices=jax.devices()[:1])
  axis_rules = parallel.rules(config, mesh)
  with jax.set_mesh(mesh):
    state, shardings, tx, schedule = step_lib.create_state(model, config, spec, mesh, axis_rules, params=init)
    # What is saved: every parameter (the workdir stands alone), Adam moments (mu, nu) for the trained ones only.
    opt_paths = [optim.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(state['opt_state'])[0]]
    assert opt_paths and not any('/img/' in f'/{p}/' for p in opt_paths)
    trained = sum(x.nbytes for k, v in parent.items() if k != 'img' for x in jax.tree.leaves(v))
    assert 0 <= _nbytes(state['opt_state']) - 2 * trained < 64  # Plus a few step counters.
    step = step_lib.make_train_step(model, tx, schedule, objectives_lib.load(config), state_shardings=shardings,
                                    mesh=mesh, axis_rules=axis_rules)
    rng = np.random.default_rng(0)
    batch = {'image': rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
             'text': rng.integers(0, VOCAB, (8, 12)).astype(np.int32)}
    for _ in range(3):
      state, metrics = step(state, parallel.global_batch(batch, mesh))
  assert np.isfinite(float(metrics['loss']))
  after = jax.tree.map(np.asarray, state['params'])
  for a, b in zip(_bits(after['img']), _bits(parent['img'])):  # As bits: even -0.0 -> +0.0 would fail.
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(after['txt']['token_embedding'], fresh['txt']['token_embedding'])


def test_locked_towers_are_checked():
  config = lit.get_config('locked=image')
  with pytest.raises(ConfigError, match=r"config.model.locked='image'.*config.init_from is empty.*locked_random_ok"):
    validation.validate(config)
  config.init_from = '/somewhere'
  validation.validate(config)
  config.init_from_towers = 'text'  # Loads the text tower only: the locked image tower would stay random.
  with pytest.raises(ConfigError, match=r"image tower would stay.*init_from_towers='text'"):
    validation.validate(config)
  config.model.locked_random_ok = True
  validation.validate(config)
  for field, value, pattern in [('model.locked', 'photo', r"config.model.locked='photo' is not a tower"),
                                ('init_from_towers', 'img', r"config.init_from_towers='img' is not a tower"),
                                ('model.locked', 'image,text', 'locks both towers')]:
    bad = lit.get_config('locked=text')
    bad.init_from = '/somewhere'
    if field == 'model.locked':
      bad.model.locked = value
    else:
      bad.init_from_towers = value
    with pytest.raises(ConfigError, match=pattern):
      validation.validate(bad)
  towers_alone = siglip.get_config()
  towers_alone.init_from_towers = 'image'
  with pytest.raises(ConfigError, match='init_from_towers.*needs config.init_from'):
    validation.validate(towers_alone)
  with pytest.raises(ConfigError, match="locked='both' is not one of image, text"):
    lit.get_config('locked=both')
