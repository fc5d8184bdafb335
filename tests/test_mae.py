"""MAE (jmm/objectives/mae.py, jmm/models/mae_decoder.py): the masked-patch loss against a loop over examples and
patches (values, gradients), the decoder's placement of visible tokens and mask tokens, the per-step draw, the
image-only model, the configs, and an MAE checkpoint starting SigLIP's image tower."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mae as mae_config
from configs import mae_siglip
from jmm import checkpoint as ckpt_lib
from jmm import convert
from jmm import step as step_lib
from jmm import validation
from jmm.data import build as data_build
from jmm.errors import ConfigError
from jmm.models import build as model_build
from jmm.models import encoder
from jmm.models import mae_decoder
from jmm.objectives import mae

PATCH = (4, 4)  # 8x12 images: a 2x3 grid, N = 6 patches of P = 48 values.
IMAGES = np.random.default_rng(0).uniform(-1, 1, (2, 8, 12, 3)).astype(np.float32)
KEEP = np.array([[4, 1], [0, 5]], np.int32)  # Visible positions; not sorted (any order is valid).


def _section(**kw):
  return {**dict(type='mae', mask_ratio=0.75, norm_pix=True, head='mae', patch_size=PATCH), **kw}


def _loop_loss(pred, images, keep, norm_pix):
  """The loss by explicit loops: cut each masked patch out of its image, normalise, squared error (float64)."""
  total, count = 0.0, 0
  for b in range(images.shape[0]):
    for n in range(pred.shape[1]):
      if n in keep[b]:
        continue
      r, c = divmod(n, images.shape[2] // PATCH[1])  # Row-major over the grid.
      patch = images[b, r * PATCH[0]:(r + 1) * PATCH[0], c * PATCH[1]:(c + 1) * PATCH[1], :].reshape(-1)
      patch = patch.astype(np.float64)
      if norm_pix:
        patch = (patch - patch.mean()) / np.sqrt(patch.var(ddof=1) + 1e-6)
      total += np.mean((pred[b, n].astype(np.float64) - patch) ** 2)
      count += 1
  return total / count


@pytest.mark.parametrize('norm_pix', [True, False])
def test_loss_and_gradient_equal_a_loop_over_masked_patches(norm_pix):
  pred = np.random.default_rng(1).normal(size=(2, 6, 48)).astype(np.float32)
  fn = jax.jit(jax.value_and_grad(
      lambda p: mae.loss({'mae': {'pred': p}}, {'image': IMAGES, 'image_keep': KEEP}, _section(norm_pix=norm_pix)),
      has_aux=True))
  (value, metrics), grad = fn(pred)
  want = _loop_loss(pred, IMAGES, KEEP, norm_pix)
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  assert float(metrics['masked']) == pytest.approx(8 / 12)
  # Central differences of the loop in float64 along a few coordinates, and zero gradient on visible patches.
  for b, n, p in [(0, 0, 0), (0, 2, 17), (1, 3, 47), (1, 1, 5)]:
    step = np.zeros_like(pred, np.float64)
    step[b, n, p] = 1e-4
    numeric = (_loop_loss(pred + step, IMAGES, KEEP, norm_pix) - _loop_loss(pred - step, IMAGES, KEEP, norm_pix)) / 2e-4
    np.testing.assert_allclose(float(grad[b, n, p]), numeric, rtol=1e-3, atol=1e-7)
  for b in range(2):
    assert not np.any(np.asarray(grad)[b, KEEP[b]])


def test_patchify_is_the_vit_patch_order_and_unpatchify_inverts_it():
  patches = np.asarray(mae_decoder.patchify(IMAGES, PATCH))
  assert patches.shape == (2, 6, 48)
  np.testing.assert_array_equal(patches[1, 4].reshape(4, 4, 3), IMAGES[1, 4:8, 4:8])  # Row 1, column 1.
  np.testing.assert_array_equal(mae_decoder.unpatchify(patches, (2, 3), PATCH), IMAGES)


def _decoder_inputs(extra: int, width=8, k=2):
  rng = np.random.default_rng(3)
  tokens = rng.normal(size=(2, extra + k, width)).astype(np.float32)
  return {'img': {'encoded': jnp.asarray(tokens)}}, {'image': IMAGES}


def _decoder_case(extra, posemb):
  """(pred, pred with the visible tokens presented in another order, the hand-built decoder's pred, params)."""
  head = mae_decoder.Head(patch_size=PATCH, width=8, depth=1, num_heads=2, mlp_dim=16, posemb=posemb)
  outputs, batch = _decoder_inputs(extra)
  shapes = nn.unbox(jax.eval_shape(head.init, jax.random.key(0), outputs, {**batch, 'image_keep': KEEP})['params'])
  rng = np.random.default_rng(4)
  p = jax.tree.map(lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype), shapes)
  order = np.array([1, 0])
  encoded = outputs['img']['encoded']
  swapped = {'img': {'encoded': jnp.concatenate([encoded[:, :extra], encoded[:, extra:][:, order]], axis=1)}}

  def reference(p):
    y = encoded @ p['decoder_embed']['kernel'] + p['decoder_embed']['bias']
    grid = jnp.tile(p['mask_token'], (2, 6, 1))
    for b in range(2):
      for j, pos in enumerate(KEEP[b]):
        grid = grid.at[b, pos].set(y[b, extra + j])
    pos = mae_decoder.sincos_2d((2, 3), 8) if posemb == 'sincos2d' else p['pos_embedding']
    x = jnp.concatenate([y[:, :extra], grid + pos], axis=1)
    x = encoder.Encoder(1, 16, 2).apply({'params': p['decoder']}, x)[:, extra:]
    return x @ p['decoder_pred']['kernel'] + p['decoder_pred']['bias']

  apply = lambda p, o, keep: head.apply({'params': p}, o, {**batch, 'image_keep': keep})['pred']  # noqa: E731
  assert head.apply({'params': p}, outputs, batch) == {}  # Evaluation (no 'image_keep'): nothing to decode.
  return apply(p, outputs, KEEP), apply(p, swapped, KEEP[:, order]), reference(p)


def test_decoder_puts_each_visible_token_at_its_position_and_mask_tokens_elsewhere():
  """The decoder against a hand-built one (grid filled by a loop, then the same blocks and projections), with and
  without a leading class token (a 'tok' tower's), fixed and learned positions. Presenting the visible tokens in
  another order, with `keep` permuted alike, gives the same output bit for bit. One program for all of it."""
  results = jax.jit(lambda: [_decoder_case(1, 'learn'), _decoder_case(0, 'sincos2d')])()
  for pred, pred_swapped, want in results:
    assert pred.shape == (2, 6, 48)
    np.testing.assert_allclose(pred, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(pred_swapped, pred)
  table = mae_decoder.sincos_2d((2, 3), 8)  # Row 1, column 2: sin / cos of the row, then of the column.
  np.testing.assert_allclose(table[5], [np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01),
                                        np.sin(2), np.sin(0.02), np.cos(2), np.cos(0.02)], rtol=1e-6)


def test_prepare_draws_distinct_positions_per_example_and_step_and_again_on_resume():
  batch = {'image': jnp.zeros((8, 16, 16, 3))}  # 16 patches, 4 visible.
  rng = step_lib.rng_data(0)
  keys = [step_lib.step_key({'rng': rng, 'step': jnp.int32(s)}) for s in (0, 1)]
  draw = lambda s, k: mae.prepare(s, k, batch, _section())['image_keep']  # noqa: E731
  *draws, again = map(np.asarray, jax.jit(lambda k0, k1: [draw(0, k0), draw(1, k1), draw(0, k0)])(*keys))
  np.testing.assert_array_equal(draws[0], again)  # The same step (a resumed run) draws the same positions.
  for keep in draws:
    assert keep.shape == (8, 4) and keep.dtype == np.int32
    assert all(len(set(row)) == 4 and 0 <= row.min() and row.max() < 16 for row in keep)
    assert len({tuple(row) for row in keep}) > 1
  assert not np.array_equal(draws[0], draws[1])


def test_the_image_only_model_builds_no_text_tower_and_ignores_texts():
  config = mae_config.get_config('res=16,batch=4')
  model = model_build.make_model(config, 128)
  spec = data_build.batch_spec(config)
  params, _ = model_build.abstract_params(model, spec)
  assert sorted(params) == ['head_mae', 'img']  # No 'txt', no temperature / bias.
  assert 'pos_embedding' not in params['head_mae']  # Fixed sin-cos positions.
  with pytest.raises(ValueError, match="builds the towers \\('image',\\)"):
    jax.eval_shape(lambda p: model.apply({'params': p}, {'text': jnp.zeros((2, 12), jnp.int32)}), params)


def test_configs_validate_and_bad_fields_are_named():
  for config in (mae_config.get_config(), mae_config.get_config('img=B/16,res=224'), mae_siglip.get_config()):
    validation.validate(config)
  big = mae_config.get_config('img=B/16,res=224')
  assert big.objectives.mae.patch_size == big.model.heads.mae.patch_size == (16, 16)
  assert mae_siglip.get_config('mae=/x/y').init_from == '/x/y'
  for bad, pattern in [(dict(mask_ratio=0.0), 'mask_ratio'), (dict(mask_ratio=1.0), 'mask_ratio'),
                       (dict(norm_pix='yes'), 'norm_pix'), (dict(head='dec'), "head='dec'"),
                       (dict(patch_size=(4, 4)), 'patch_size')]:
    config = mae_config.get_config()
    config.objectives.mae = {**config.objectives.mae.to_dict(), **bad}
    with pytest.raises(ConfigError, match=f'config.objectives.mae.*{pattern}'):
      validation.validate(config)
  config = mae_config.get_config()
  config.model.heads.mae.patch_size = (4, 4)
  with pytest.raises(ConfigError, match='heads.mae.patch_size'):
    validation.validate(config)
  config = mae_config.get_config()
  config.init_from, config.init_from_towers = '/x', 'text'
  with pytest.raises(ConfigError, match="init_from_towers='text' names a tower that config.model.towers"):
    validation.validate(config)
  with pytest.raises(ConfigError, match='mae= is empty'):
    mae_siglip.get_config('mae=')


def _bits(tree):
  return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


def test_an_mae_checkpoint_starts_siglips_image_tower(tmp_path):
  """The MAE run's 'img' subtree has SigLIP's names and shapes: loaded bit for bit; the decoder is not read and
  the text tower, t and b keep their fresh values."""
  def random_params(config, seed):
    model = model_build.make_model(config, 128)
    shapes, _ = model_build.abstract_params(model, data_build.batch_spec(config))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), shapes)

  parent = random_params(mae_config.get_config('res=16,batch=4'), 1)
  ck = ckpt_lib.Checkpointer(str(tmp_path), use_async=False, every=1)
  ck.save(7, {'params': parent, 'step': np.int32(7)}, {}, force=True)
  ck.close()
  config = mae_siglip.get_config(f'res=16,batch=4,mae={tmp_path}')
  validation.validate(config)
  fresh = random_params(config, 0)
  assert model_build.init_from_params(config) == ('img',)
  init = convert.initial_params(config.init_from, fresh, only=model_build.init_from_params(config))
  assert sorted(init) == ['b', 'img', 't', 'txt']
  for key in init:
    for a, b in zip(_bits(init[key]), _bits((parent if key == 'img' else fresh)[key])):
      np.testing.assert_array_equal(a, b)
