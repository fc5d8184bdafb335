"""Mesh, shardings and sharded training on 8 simulated CPU devices (jmm.parallel + jmm.train)."""
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import siglip
from jmm import checkpoint as ckpt_lib
from jmm import objectives
from jmm import parallel
from jmm import step as step_lib
from jmm import train
from jmm.data import build as data_build
from jmm.models import build as model_build

VOCAB = 64
MESHES = ['data=8,fsdp=1,tensor=1', 'data=2,fsdp=4,tensor=1', 'data=2,fsdp=2,tensor=2']


def _config(mesh='data=-1,fsdp=1,tensor=1', batch=16) -> ml_collections.ConfigDict:
  c = siglip.get_config('res=16,batch=16,steps=20')
  tiny = dict(width=32, depth=1, mlp_dim=64, num_heads=2, out_dim=None)
  c.model.image.update(tiny, patch_size=(8, 8))
  c.model.text.update(tiny)
  c.model.out_dim = 32
  c.data.text_len = 8
  c.batch_size = batch
  c.mesh = mesh
  c.optim.warmup_steps = 2
  # The hand-made batches carry no hard-negative captions (and ring / bidir score square blocks); the dense hard
  # negatives get their own mesh test below.
  c.objectives.sigmoid.hard_negatives = False
  return c


def _batches(n, batch=16, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.uniform(-1, 1, (batch, 16, 16, 3)).astype(np.float32),
           'text': rng.integers(3, VOCAB, (batch, 8)).astype(np.int32)} for _ in range(n)]


def _setup(config):
  mesh = parallel.make_mesh(config.mesh)
  axis_rules = parallel.rules(config, mesh)
  model = model_build.make_model(config, VOCAB)
  with jax.set_mesh(mesh):
    state, shardings, tx, schedule = step_lib.create_state(model, config, data_build.batch_spec(config), mesh,
                                                           axis_rules)
  step = step_lib.make_train_step(model, tx, schedule, objectives.load(config), state_shardings=shardings,
                                  mesh=mesh, axis_rules=axis_rules)
  return mesh, state, shardings, step


def _train(mesh, state, step, batches):
  losses = []
  with jax.set_mesh(mesh):
    for b in batches:
      state, metrics = step(state, parallel.global_batch(b, mesh))
      losses.append(float(metrics['loss']))
  return state, losses


def test_parse_mesh_forms_and_rest_axis():
  assert parallel.mesh_shape('data=-1,fsdp=2,tensor=2', 8) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert parallel.mesh_shape([('data', -1), ('fsdp', 1), ('tensor', 1)], 8) == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert parallel.mesh_shape(None, 4) == {'data': 4, 'fsdp': 1, 'tensor': 1}


@pytest.mark.parametrize('spec, message', [
    ('data=3,fsdp=1', 'has 3 devices but there are 8'),
    ('data=-1,fsdp=3', 'do not divide|does not divide'),
    ('data=-1,fsdp=-1', 'at most one axis may be -1'),
    ('data=2,model=4', "unknown axis 'model'"),
    ('data=two', "expected an integer"),
    ('data', 'name=size'),
])
def test_bad_mesh_is_a_clear_error(spec, message):
  with pytest.raises(parallel.MeshError, match=message):
    parallel.make_mesh(spec)


def test_batch_not_divisible_by_batch_axes():
  mesh = parallel.make_mesh('data=2,fsdp=2,tensor=2')
  parallel.check_batch(8, mesh)  # 4 batch shards (tensor replicates the batch).
  with pytest.raises(parallel.MeshError, match=r'batch_size=6 is not divisible by the 4 batch shards'):
    parallel.check_batch(6, mesh)


def test_run_rejects_bad_mesh_and_batch_before_any_work(tmp_path):
  for config, message in [(_config(mesh='data=3'), 'config.mesh'), (_config(batch=12), 'config.batch_size=12')]:
    workdir = tmp_path / 'w'
    with pytest.raises(parallel.MeshError, match=message):
      train.run(config, str(workdir))
    assert not workdir.exists()  # Failed before the workdir, the tokenizer or any compilation.


def test_params_and_optimizer_state_are_sharded():
  mesh, state, shardings, _ = _setup(_config('data=2,fsdp=2,tensor=2'))
  params = state['params']
  block = params['img']['encoder']['encoderblock_0']
  fc_in = block['mlp']['fc_in']['kernel']  # [embed, mlp] = [32, 64]
  assert fc_in.sharding.spec == P('fsdp', 'tensor')
  assert fc_in.addressable_shards[0].data.shape == (16, 32)
  assert block['attn']['query']['kernel'].sharding.spec == P('fsdp', 'tensor', None)  # [embed, heads, kv]
  assert block['attn']['out']['kernel'].sharding.spec == P('tensor', None, 'fsdp')    # [heads, kv, embed]
  # Adam's moments follow their parameter.
  mu = state['opt_state']
  found = [x for p, x in jax.tree_util.tree_flatten_with_path(mu)[0]
           if 'fc_in' in jax.tree_util.keystr(p) and 'encoderblock_0' in jax.tree_util.keystr(p)
           and "'img'" in jax.tree_util.keystr(p) and x.ndim == 2]
  assert found and all(x.sharding.spec == P('fsdp', 'tensor') for x in found)
  assert parallel.sharded_fraction(shardings['params']) > 0.5


def test_same_loss_curve_on_every_mesh():
  """Every mesh, each initialising its own parameters, and every sharded loss impl give the data=8 loss curve.
  Each run compiles a train step, so each shows something the others do not: the dense loss on the
  FSDP + tensor mesh, 'ring' there, 'bidir' on the FSDP-only mesh (whose dense-loss run repeated code paths the
  others cover)."""
  batches = _batches(4)
  curves = {}
  runs = [(MESHES[0], 'dense'), (MESHES[2], 'dense'), (MESHES[2], 'ring'), (MESHES[1], 'bidir')]
  for spec, impl in runs:
    config = _config(spec)
    config.objectives.sigmoid.impl = impl
    mesh, state, _, step = _setup(config)
    _, curves[spec, impl] = _train(mesh, state, step, batches)
  reference = curves[runs[0]]
  assert reference[-1] < reference[0]  # It trains.
  for run in runs[1:]:
    np.testing.assert_allclose(curves[run], reference, rtol=2e-5, err_msg=str(run))


def test_hard_negatives_same_loss_curve_on_every_mesh():
  """hard_negatives=True (the default recipe's): batches with 'text_neg' train the same on data=8 as on
  data=2,fsdp=2,tensor=2 (4 batch shards, the batch replicated over the tensor axis, parameters split over FSDP
  and tensor axes). data=2,fsdp=4 would split the batch 8 ways like data=8; its FSDP is covered above."""
  rng = np.random.default_rng(5)
  # One batch four times, so that "it trains" reads a falling loss, not the next batch's difficulty.
  batch = _batches(1)[0]
  batches = [dict(batch, text_neg=rng.integers(3, VOCAB, batch['text'].shape).astype(np.int32))] * 4
  curves = {}
  for spec in (MESHES[0], MESHES[2]):
    config = _config(spec)
    config.objectives.sigmoid.hard_negatives = True
    mesh, state, _, step = _setup(config)
    _, curves[spec] = _train(mesh, state, step, batches)
  reference = curves[MESHES[0]]
  assert reference[-1] < reference[0]
  np.testing.assert_allclose(curves[MESHES[2]], reference, rtol=2e-5)


def test_checkpoint_from_one_mesh_restores_on_another(tmp_path):
  batches = _batches(4)
  config_a, config_b = _config(MESHES[0]), _config(MESHES[2])
  mesh_a, state_a, _, step_a = _setup(config_a)
  state_a, _ = _train(mesh_a, state_a, step_a, batches[:2])
  saved = jax.tree.map(np.asarray, state_a['params'])
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=1, every=1, use_async=False)
  checkpointer.save(2, state_a, {'next_index': 2}, force=True)
  checkpointer.wait()
  _, uninterrupted = _train(mesh_a, state_a, step_a, batches[2:])

  mesh_b, state_b, _, step_b = _setup(config_b)
  state_b, data_state = checkpointer.restore(2, ckpt_lib.abstract_like(state_b))
  checkpointer.close()
  assert data_state == {'next_index': 2}
  fc_in = state_b['params']['img']['encoder']['encoderblock_0']['mlp']['fc_in']['kernel']
  assert fc_in.sharding.mesh.shape == mesh_b.shape and fc_in.sharding.spec == P('fsdp', 'tensor')
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state_b['params']), saved)
  assert int(state_b['step']) == 2
  _, resumed = _train(mesh_b, state_b, step_b, batches[2:])
  np.testing.assert_allclose(resumed, uninterrupted, rtol=2e-5)
