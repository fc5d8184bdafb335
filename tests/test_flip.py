"""FLIP (jmm/objectives/flip.py): the masked image tower against a hand-built reference, the per-step draw of the
kept patches, the loss and gradients on masked embeddings, and the unmasked last phase's own step program."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import flip as flip_config
from jmm import errors
from jmm import objectives as objectives_lib
from jmm import optim
from jmm import step as step_lib
from jmm import validation
from jmm.models import encoder
from jmm.models import layers
from jmm.models import two_tower
from jmm.models import vit
from jmm.objectives import contrastive
from jmm.objectives import flip

# 16x16 images in 4x4 patches: 16 positions.
VIT = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=(4, 4), out_dim=24)
IMAGE = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
TEXT = np.random.default_rng(1).integers(0, 50, (3, 7)).astype(np.int32)
KEEP = np.array([[0, 3, 5, 6, 9, 15], [1, 2, 3, 4, 5, 6], [15, 14, 13, 12, 0, 8]], np.int32)  # Ragged choice.


def _random_params(module, *args):
  """Random values in `module`'s param tree: every bias, scale and the position table then matters."""
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)['params'])
  rng = np.random.default_rng(2)
  return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), shapes)


def ref_masked_vit(p, image, keep, pool_type, cls_posemb=False):
  """The tower by hand: patches + positions, then each example's kept tokens picked by plain indexing, then the
  encoder, pooling and head with the same params."""
  x = vit.PatchEmbedding(VIT['width'], VIT['patch_size']).apply({'params': p['embedding']}, image)
  x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, 16, D]
  pos = p['pos_embedding']
  x = x + (pos[1:] if cls_posemb else pos)[None]
  x = x[np.arange(x.shape[0])[:, None], np.asarray(keep)]  # [B, K, D]: row b picks tokens keep[b].
  if pool_type == 'tok':
    cls = p['cls'] + (pos[0] if cls_posemb else 0)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
  x = encoder.Encoder(VIT['depth'], VIT['mlp_dim'], VIT['num_heads']).apply({'params': p['encoder']}, x)
  if pool_type == 'map':
    pooled = layers.MAPHead(VIT['num_heads'], VIT['mlp_dim']).apply({'params': p['MAPHead']}, x)
  else:
    pooled = x.mean(1) if pool_type == 'gap' else x[:, 0]
  return pooled @ p['head']['kernel'] + p['head']['bias']


# ---------------------------------------------------------------------------------------------------------------
# (a) The masked tower.

@pytest.mark.parametrize('pool_type,cls_posemb', [('map', False), ('tok', True)])  # 'gap': the loss test.
def test_masked_vit_matches_a_loop_built_reference(pool_type, cls_posemb):
  """Every pooling over the visible tokens; 'tok' with CLIP's position row for the class token (cls_posemb)."""
  model = vit.ViT(**VIT, pool_type=pool_type, cls_posemb=cls_posemb)
  p = _random_params(model, IMAGE)
  every = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (3, 16))
  shuffled = jnp.asarray(np.stack([np.random.default_rng(b).permutation(16) for b in range(3)]), jnp.int32)

  @jax.jit  # One program for every forward: eager dispatch costs seconds.
  def forwards(p):
    apply = lambda keep: model.apply({'params': p}, IMAGE, keep=keep)
    masked, extras = apply(jnp.asarray(KEEP))
    return (masked, extras['encoded'], ref_masked_vit(p, IMAGE, KEEP, pool_type, cls_posemb), apply(None)[0],
            apply(every)[0], apply(shuffled)[0] if pool_type == 'map' else None)

  masked, encoded, want, full, in_order, out_of_order = forwards(p)
  assert encoded.shape == (3, KEEP.shape[1] + (pool_type == 'tok'), VIT['width'])
  np.testing.assert_allclose(masked, want, atol=2e-5, rtol=2e-5)
  assert not np.allclose(masked, full, atol=1e-3)
  # Every position kept: in order, the unmasked tower bit for bit; shuffled, the same up to rounding (the
  # encoder is permutation-equivariant and the pooling invariant, positions travel with the tokens).
  np.testing.assert_array_equal(in_order, full)
  if out_of_order is not None:
    np.testing.assert_allclose(out_of_order, full, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# (b) The draw.

def _section(**kw):
  return {**dict(type='flip', loss='sigmoid', impl='dense', hard_negatives=False, mask_ratio=0.75, unmasked_steps=0,
                 patch_size=(4, 4)), **kw}


def test_prepare_draws_distinct_sorted_positions_per_example_and_step():
  batch = {'image': jnp.zeros((8, 16, 16, 3))}
  rng = step_lib.rng_data(0)
  keys = [step_lib.step_key({'rng': rng, 'step': jnp.int32(s)}) for s in (0, 1)]
  draws = [np.asarray(flip.prepare(s, k, batch, _section())['image_keep']) for s, k in zip((0, 1), keys)]
  again = np.asarray(flip.prepare(0, keys[0], batch, _section())['image_keep'])
  np.testing.assert_array_equal(draws[0], again)  # Deterministic in (key, step).
  for keep in draws:
    assert keep.shape == (8, 4) and keep.dtype == np.int32  # K = round(0.25 * 16).
    assert all(len(set(row)) == 4 and list(row) == sorted(row) and 0 <= row.min() and row.max() < 16
               for row in keep)
    assert len({tuple(row) for row in keep}) > 1  # Examples differ.
  assert not np.array_equal(draws[0], draws[1])  # Steps differ.
  # Phase 1 (the unmasked end) and ratio 0 keep every patch: nothing is added to the batch.
  assert flip.prepare(0, keys[0], batch, _section(), phase=1) == {}
  assert flip.prepare(0, keys[0], batch, _section(mask_ratio=0.0)) == {}
  assert flip.num_kept(16, 0.5) == 8 and flip.num_kept(196, 0.75) == 49 and flip.num_kept(4, 0.99) == 1


def test_bad_fields_are_named():
  for bad, field in [(dict(mask_ratio=1.0), 'mask_ratio'), (dict(mask_ratio=-0.1), 'mask_ratio'),
                     (dict(unmasked_steps=-1), 'unmasked_steps'), (dict(patch_size=(4, 0)), 'patch_size'),
                     (dict(loss='hinge'), 'loss')]:
    config = flip_config.get_config('steps=10')
    config.objectives.flip.update(bad)
    with pytest.raises(errors.ConfigError, match=f'config.objectives.flip.*{field}'):
      validation.validate(config)
  config = flip_config.get_config('steps=10')
  config.model.image.patch_size = (16, 16)  # The tower's grid changed, the objective's did not.
  with pytest.raises(errors.ConfigError, match='patch_size=.*image tower'):
    validation.validate(config)
  assert flip_config.get_config('img=B/16,res=224').objectives.flip.patch_size == (16, 16)


# ---------------------------------------------------------------------------------------------------------------
# (c) Loss and gradients.

def test_loss_and_gradients_equal_the_contrastive_loss_of_the_reference_masked_embeddings():
  """Through TwoTower (which hands 'image_keep' to the image tower) and the objective contract."""
  model = two_tower.TwoTower(image={k: v for k, v in VIT.items() if k != 'out_dim'} | {'pool_type': 'gap'},
                             text=dict(vocab_size=50, width=32, depth=1, mlp_dim=64, num_heads=2), out_dim=24)
  p = _random_params(model, {'image': IMAGE, 'text': TEXT})
  terms = [objectives_lib.Term('flip', flip, 1.0, _section(mask_ratio=0.5))]
  batch = objectives_lib.prepare(terms, jnp.int32(3), jax.random.key(7), {'image': IMAGE, 'text': TEXT})
  keep = np.asarray(batch['image_keep'])
  assert keep.shape == (3, 8)

  # Gradients w.r.t. the image tower and the scalars (masking changes nothing on the text side, whose backward
  # pass would only add compile time).
  mine = {k: p[k] for k in ('img', 't', 'b')}

  def jmm_loss(mine):
    outputs = model.apply({'params': {**p, **mine}}, batch)
    return objectives_lib.total_loss(terms, outputs, batch)

  def ref_loss(mine):
    zimg = two_tower.l2_normalize(ref_masked_vit(mine['img'], IMAGE, keep, 'gap'))
    ztxt = model.apply({'params': p}, {'text': TEXT})['ztxt']
    return contrastive.sigmoid_loss(zimg, ztxt, jnp.exp(mine['t']), mine['b'])

  @jax.jit  # One program: eager dispatch of two forward and backward passes costs seconds.
  def both(mine):
    return jax.value_and_grad(jmm_loss, has_aux=True)(mine), jax.value_and_grad(ref_loss)(mine)

  ((value, metrics), grads), (want, want_grads) = both(mine)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  assert float(metrics['flip/visible']) == 0.5 and 'flip/sim_pos' in metrics
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, want_grads)
  # Dropped patches get no gradient through the patch embedding's input: only the position table rows kept
  # by some example move.
  pos_grad = np.abs(np.asarray(grads['img']['pos_embedding'])).sum(-1)
  assert set(np.nonzero(pos_grad)[0]) == set(keep.ravel())


# ---------------------------------------------------------------------------------------------------------------
# (d) The unmasked phase, (e) resume.

def test_the_unmasked_last_steps_run_their_own_program(monkeypatch):
  """The last `unmasked_steps` steps are phase 1: its step program feeds the model every patch. The loop
  (jmm.train) builds the step for `phase_at(terms, step, total_steps)`, and a new one when that changes; a
  resumed run takes the phase of its step as it takes the step's key (keys across a resume: tests/test_seam.py).
  Traced, not compiled: compiling the two steps (or running the loop) costs more than this whole file."""
  config = flip_config.get_config('res=16,steps=5,batch=4,mask=0.5,unmasked=2')
  terms = objectives_lib.load(config)
  assert [objectives_lib.phase_at(terms, s, 5) for s in range(5)] == [(0,), (0,), (0,), (1,), (1,)]
  assert flip.phases(_section(unmasked_steps=0), 5) == () and flip.phases(_section(unmasked_steps=9), 5) == (0,)
  model = two_tower.TwoTower(image=dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(8, 8),
                                        pool_type='gap'),
                             text=dict(vocab_size=50, width=16, depth=1, mlp_dim=32, num_heads=2), out_dim=8)
  batch = {'image': jnp.asarray(IMAGE[:, :16, :16]), 'text': jnp.asarray(TEXT), 'text_neg': jnp.asarray(TEXT[::-1])}
  params = jax.eval_shape(lambda: _random_params(model, batch))
  tx, schedule = optim.make_optimizer(config.optim, params, 5)
  state = jax.eval_shape(lambda p: {'params': p, 'opt_state': tx.init(p), 'step': jnp.int32(3),
                                    'rng': step_lib.rng_data(0), 'nonfinite': jnp.zeros([3], jnp.int32)}, params)
  seen, loss = [], flip.loss
  monkeypatch.setattr(flip, 'loss', lambda outputs, b, c: (seen.append(outputs['img']['encoded'].shape),
                                                          loss(outputs, b, c))[1])
  for phase in [None, (0,), (1,)]:
    jax.eval_shape(step_lib.make_train_step(model, tx, schedule, terms, phase=phase), state, batch)
  assert seen == [(3, 2, 16), (3, 2, 16), (3, 4, 16)]  # 16 px in 8 px patches: 2 of 4 kept, then all 4.
