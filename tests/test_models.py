"""Models against hand-written jnp forwards that read the flax param dicts, plus shapes, axes and dtypes."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmm.kernels import attention as attention_lib
from jmm.models import layers
from jmm.models import text as text_lib
from jmm.models import two_tower
from jmm.models import vit

# Tiny towers: 16x16 images in 4x4 patches (16 tokens), 7-token texts.
VIT = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=(4, 4))
TXT = dict(vocab_size=50, width=32, depth=2, mlp_dim=64, num_heads=2)
IMAGE = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
TEXT = np.random.default_rng(1).integers(0, 50, (3, 7)).astype(np.int32)
BATCH = {'image': IMAGE, 'text': TEXT}


# ---------------------------------------------------------------------------------------------------------
# The hand-written reference: plain jnp on the unboxed param dict, no flax.

def ref_layer_norm(p, x):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6) * p['scale'] + p['bias']


def ref_gelu(x):
  return 0.5 * x * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_mha(p, xq, xkv, mask=None):
  q = jnp.einsum('btd,dhk->bthk', xq, p['query']['kernel']) + p['query']['bias']
  k = jnp.einsum('btd,dhk->bthk', xkv, p['key']['kernel']) + p['key']['bias']
  v = jnp.einsum('btd,dhk->bthk', xkv, p['value']['kernel']) + p['value']['bias']
  logits = jnp.einsum('bqhk,bshk->bhqs', q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask, logits, -1e30)
  w = jnp.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  o = jnp.einsum('bhqs,bshk->bqhk', w, v)
  return jnp.einsum('bqhk,hkd->bqd', o, p['out']['kernel']) + p['out']['bias']


def ref_mlp(p, x):
  h = ref_gelu(x @ p['fc_in']['kernel'] + p['fc_in']['bias'])
  return h @ p['fc_out']['kernel'] + p['fc_out']['bias']


def ref_encoder(p, x, depth, mask=None):
  for i in range(depth):
    b = p[f'encoderblock_{i}']
    y = ref_layer_norm(b['ln_attn'], x)
    x = x + ref_mha(b['attn'], y, y, mask)
    x = x + ref_mlp(b['mlp'], ref_layer_norm(b['ln_mlp'], x))
  return ref_layer_norm(p['encoder_norm'], x)


def ref_pool(p, x, pool_type):
  if pool_type == 'map':
    probe = jnp.broadcast_to(p['MAPHead']['probe'][None], (x.shape[0], 1, x.shape[-1]))
    y = ref_mha(p['MAPHead']['attn'], probe, x)
    y = y + ref_mlp(p['MAPHead']['mlp'], ref_layer_norm(p['MAPHead']['ln'], y))
    return y[:, 0]
  return {'gap': lambda: x.mean(1), 'tok': lambda: x[:, 0], 'first': lambda: x[:, 0],
          'last': lambda: x[:, -1]}[pool_type]()


def ref_head(p, x):
  return x @ p['head']['kernel'] + p['head']['bias'] if 'head' in p else x


def ref_vit(p, image, depth, patch, pool_type):
  x = jax.lax.conv_general_dilated(image, p['embedding']['kernel'], patch, 'VALID',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + p['embedding']['bias']
  x = x.reshape(x.shape[0], -1, x.shape[-1]) + p['pos_embedding'][None]
  if pool_type == 'tok':
    x = jnp.concatenate([jnp.broadcast_to(p['cls'], (x.shape[0], 1, x.shape[-1])), x], 1)
  x = ref_encoder(p['encoder'], x, depth)
  return ref_head(p, ref_pool(p, x, pool_type))


def ref_text(p, tokens, depth, pool_type, causal):
  x = p['token_embedding'][tokens] + p['pos_embedding'][None]
  length = tokens.shape[1]
  mask = np.tril(np.ones((length, length), bool)) if causal else None
  x = ref_encoder(p['encoder'], x, depth, mask)
  return ref_head(p, ref_pool(p, x, pool_type))


def _two_tower(**kw):
  """MAP pooling in both towers (so every pool type's params exist), out_dim 24."""
  return two_tower.TwoTower(image={**VIT, 'pool_type': 'map'}, text={**TXT, 'pool_type': 'map'}, out_dim=24,
                            **kw)


def _small_two_tower():
  """One-layer towers without MAP heads: the cheapest model to compile an init and a backward pass for."""
  return two_tower.TwoTower(image={**VIT, 'depth': 1, 'pool_type': 'gap'},
                            text={**TXT, 'depth': 1, 'pool_type': 'last'}, out_dim=24)


@pytest.fixture(scope='module')
def params():
  """Random values in the param tree of `_two_tower()` plus a class token for 'tok' pooling.

  Random (not initialiser) values make the reference comparison check every bias and LayerNorm scale, and
  need no compiled init; `small_init` checks the initialisers.
  """
  shapes = nn.unbox(jax.eval_shape(_two_tower().init, jax.random.key(0), BATCH)['params'])
  shapes['img']['cls'] = jax.ShapeDtypeStruct((VIT['width'],), jnp.float32)
  rng = np.random.default_rng(2)
  return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), shapes)


@pytest.fixture(scope='module')
def small_init():
  return nn.unbox(jax.jit(_small_two_tower().init)(jax.random.key(0), BATCH)['params'])


# ---------------------------------------------------------------------------------------------------------
# Towers against the reference. Applied eagerly: op-by-op dispatch is cached across tests, unlike jit.

@pytest.mark.parametrize('pool_type', ['map', 'gap', 'tok'])
def test_vit_matches_reference(params, pool_type):
  p = params['img']
  emb, extras = vit.ViT(**VIT, pool_type=pool_type, out_dim=24).apply({'params': p}, IMAGE)
  assert emb.shape == (3, 24) and extras['pre_logits'].shape == (3, VIT['width'])
  assert extras['encoded'].shape == (3, 16 + (pool_type == 'tok'), VIT['width'])
  want = ref_vit(p, IMAGE, VIT['depth'], VIT['patch_size'], pool_type)
  np.testing.assert_allclose(emb, want, atol=1e-5, rtol=1e-5)


def test_vit_without_head(params):
  p = {k: v for k, v in params['img'].items() if k != 'head'}
  emb, _ = vit.ViT(**VIT, pool_type='gap').apply({'params': p}, IMAGE)
  np.testing.assert_allclose(emb, ref_vit(p, IMAGE, VIT['depth'], VIT['patch_size'], 'gap'), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('pool_type,causal', [('last', False), ('first', True), ('gap', False), ('map', True)])
def test_text_matches_reference(params, pool_type, causal):
  p = params['txt']
  model = text_lib.TextTransformer(**TXT, pool_type=pool_type, causal=causal, out_dim=24)
  emb, extras = model.apply({'params': p}, TEXT)
  assert emb.shape == (3, 24) and extras['encoded'].shape == (3, 7, TXT['width'])
  want = ref_text(p, TEXT, TXT['depth'], pool_type, causal)
  np.testing.assert_allclose(emb, want, atol=1e-5, rtol=1e-5)


def test_causal_text_ignores_later_tokens(params):
  model = text_lib.TextTransformer(**TXT, pool_type='first', causal=True, out_dim=24)
  changed = TEXT.copy()
  changed[:, 1:] = (changed[:, 1:] + 1) % TXT['vocab_size']
  a, b = (model.apply({'params': params['txt']}, t)[0] for t in (TEXT, changed))
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_unknown_pool_type_is_named():
  with pytest.raises(ValueError, match="'cls'.*map"):
    jax.eval_shape(vit.ViT(**VIT, pool_type='cls').init, jax.random.key(0), IMAGE)
  with pytest.raises(ValueError, match="'tok'.*last"):
    jax.eval_shape(text_lib.TextTransformer(**TXT, pool_type='tok').init, jax.random.key(0), TEXT)


def test_scan_and_remat_match_plain_loop(params):
  """scan stacks the per-layer params on a leading axis; with the same numbers the forwards agree."""
  p = params['img']
  want = vit.ViT(**VIT, pool_type='gap', out_dim=24).apply({'params': p}, IMAGE)[0]
  enc = dict(p['encoder'])
  blocks = [enc.pop(f'encoderblock_{i}') for i in range(VIT['depth'])]
  scanned = {**p, 'encoder': {**enc, 'encoderblock': jax.tree.map(lambda *x: jnp.stack(x), *blocks)}}
  for kw, q in (({'remat': True}, p), ({'scan': True, 'remat': True}, scanned)):
    got = vit.ViT(**VIT, pool_type='gap', out_dim=24, **kw).apply({'params': q}, IMAGE)[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Logical axes.

@pytest.mark.parametrize('scan', [False, True])
def test_every_param_has_logical_axes(scan):
  model = two_tower.TwoTower(image={**VIT, 'pool_type': 'map', 'scan': scan},
                             text={**TXT, 'pool_type': 'map', 'scan': scan}, out_dim=16)
  variables = jax.eval_shape(model.init, jax.random.key(0), BATCH)
  leaves = jax.tree.leaves(variables['params'], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for box in leaves:
    assert len(box.names) == box.value.ndim and set(box.names) <= set(layers.AXIS_NAMES), box
  specs = jax.tree.leaves(nn.get_partition_spec(variables)['params'],
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(specs) == len(leaves)
  if scan:
    assert any(box.names[:1] == ('layers',) for box in leaves)


# ---------------------------------------------------------------------------------------------------------
# Two towers.

def test_two_tower_outputs_and_single_modality(params):
  model = _two_tower()
  extras = model.apply({'params': params}, BATCH)
  zimg, ztxt = extras['zimg'], extras['ztxt']
  assert set(extras) == {'zimg', 'ztxt', 'img', 'txt', 't', 'b'}
  assert extras['img']['encoded'].shape == (3, 16, VIT['width']) and extras['txt']['pre_logits'].shape == (3, 32)
  assert zimg.shape == ztxt.shape == (3, 24) and zimg.dtype == ztxt.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(ztxt, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(extras['t'], np.exp(params['t']), rtol=1e-6)  # The param holds log t.
  np.testing.assert_allclose(extras['b'], params['b'])
  # Outputs are the normalised tower embeddings.
  img_emb = ref_vit(params['img'], IMAGE, VIT['depth'], VIT['patch_size'], 'map')
  np.testing.assert_allclose(zimg, img_emb / jnp.linalg.norm(img_emb, axis=-1, keepdims=True), atol=1e-5)

  image_only = model.apply({'params': params}, {'image': IMAGE})
  text_only = model.apply({'params': params}, {'text': TEXT})
  assert 'ztxt' not in image_only and 'txt' not in image_only and 'zimg' not in text_only
  zimg_only, ztxt_only = image_only['zimg'], text_only['ztxt']
  np.testing.assert_allclose(zimg_only, zimg, atol=1e-6)
  np.testing.assert_allclose(ztxt_only, ztxt, atol=1e-6)
  # A one-tower init creates only that tower (plus the scalars).
  shapes = jax.eval_shape(model.init, jax.random.key(0), {'text': TEXT})['params']
  assert set(shapes) == {'txt', 't', 'b'}


def test_two_tower_embeds_hard_negative_texts_beside_the_captions(params):
  """A batch with 'text_neg' gets 'ztxt_neg': the text tower's embedding of those texts, while 'ztxt' and 'txt'
  stay those of the captions alone (one tower call for both)."""
  model = _two_tower()
  negatives = TEXT[::-1]
  out = model.apply({'params': params}, {**BATCH, 'text_neg': negatives})
  plain = model.apply({'params': params}, BATCH)
  np.testing.assert_allclose(out['ztxt'], plain['ztxt'], atol=1e-6)
  np.testing.assert_allclose(out['txt']['encoded'], plain['txt']['encoded'], atol=1e-5)
  np.testing.assert_allclose(out['ztxt_neg'], model.apply({'params': params}, {'text': negatives})['ztxt'], atol=1e-6)
  assert 'ztxt_neg' not in plain


def test_initial_values(small_init):
  p = small_init
  np.testing.assert_allclose(p['t'], math.log(10.0), rtol=1e-6)  # SigLIP: t' = log 10, so exp(t') = 10.
  np.testing.assert_allclose(p['b'], -10.0)
  assert p['t'].shape == p['b'].shape == () and p['t'].dtype == jnp.float32
  extras = _small_two_tower().apply({'params': p}, BATCH)
  zimg, ztxt = extras['zimg'], extras['ztxt']
  np.testing.assert_allclose(extras['t'], 10.0, rtol=1e-6)
  np.testing.assert_allclose(extras['b'], -10.0)
  assert not np.allclose(zimg[0], zimg[1]) and not np.allclose(ztxt[0], ztxt[1])
  block = p['img']['encoder']['encoderblock_0']
  np.testing.assert_array_equal(block['ln_attn']['scale'], 1.0)
  np.testing.assert_array_equal(block['ln_attn']['bias'], 0.0)
  np.testing.assert_array_equal(block['attn']['query']['bias'], 0.0)
  for head in (p['img']['head']['kernel'], p['txt']['head']['kernel']):  # Xavier, not zero.
    assert 0 < np.abs(head).max() <= np.sqrt(6 / (head.shape[0] + head.shape[1]))
  np.testing.assert_allclose(np.std(p['img']['pos_embedding']), 1 / np.sqrt(VIT['width']), rtol=0.2)


def test_gradients_reach_both_towers_and_scalars(small_init):
  model = _small_two_tower()

  def loss(p):
    ex = model.apply({'params': p}, BATCH)
    zi, zt = ex['zimg'], ex['ztxt']
    return jnp.sum(jax.nn.log_sigmoid(ex['t'] * zi @ zt.T + ex['b']))

  grads = jax.jit(jax.grad(loss))(small_init)
  for g in (grads['t'], grads['b'], grads['img']['embedding']['kernel'], grads['txt']['token_embedding']):
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_bfloat16_compute_close_to_float32(params):
  out = _two_tower().apply({'params': params}, BATCH)
  zimg, ztxt = out['zimg'], out['ztxt']
  bf16 = _two_tower(dtype=jnp.bfloat16)
  extras = jax.jit(bf16.apply)({'params': params}, BATCH)
  bzimg, bztxt = extras['zimg'], extras['ztxt']
  assert bzimg.dtype == jnp.float32 and extras['t'].dtype == jnp.float32
  np.testing.assert_allclose(bzimg, zimg, atol=3e-2)
  np.testing.assert_allclose(bztxt, ztxt, atol=3e-2)
  # bf16 compute keeps float32 params.
  shapes = jax.eval_shape(bf16.init, jax.random.key(0), BATCH)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(shapes)))


def test_two_tower_variant_expansion():
  kwargs = two_tower.tower_kwargs({'variant': 'B/16', 'depth': 1, 'pool_type': 'gap'}, vit.ViT, out_dim=8)
  assert kwargs == dict(width=768, depth=1, mlp_dim=3072, num_heads=12, patch_size=(16, 16), pool_type='gap',
                        out_dim=8)
  # The text tower drops a variant's patch size; explicit keys (out_dim too) beat the defaults.
  kwargs = two_tower.tower_kwargs({'variant': 'S/16', 'vocab_size': 9, 'out_dim': 4}, text_lib.TextTransformer,
                                  out_dim=8)
  assert kwargs == dict(width=384, depth=12, mlp_dim=1536, num_heads=6, vocab_size=9, out_dim=4)
  with pytest.raises(ValueError, match='pach_size'):
    two_tower.tower_kwargs({'pach_size': 4}, vit.ViT)
  # A variant with small overrides builds and runs.
  model = two_tower.TwoTower(image={'variant': 'Ti/4', 'width': 16, 'depth': 1, 'mlp_dim': 32, 'num_heads': 2},
                             text={'variant': 'Ti', 'vocab_size': 50, 'width': 16, 'depth': 1, 'mlp_dim': 32,
                                   'num_heads': 2}, out_dim=8)
  variables = jax.eval_shape(model.init, jax.random.key(0), BATCH)
  params = nn.unbox(variables['params'])
  assert params['img']['embedding']['kernel'].shape == (4, 4, 3, 16)
  assert params['txt']['head']['kernel'].shape == (16, 8)


def test_decode_variant():
  assert vit.decode_variant('Ti') == dict(width=192, depth=12, mlp_dim=768, num_heads=3)
  assert vit.decode_variant('S/32') == dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=(32, 32))
  assert vit.decode_variant('M') == dict(width=512, depth=12, mlp_dim=2048, num_heads=8)
  assert vit.decode_variant('B/16') == dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=(16, 16))
  assert vit.decode_variant('L/14') == dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=(14, 14))
  assert vit.decode_variant('So400m/14')['width'] == 1152
  assert vit.decode_variant('So400m') == dict(width=1152, depth=27, mlp_dim=4304, num_heads=16)
  assert vit.decode_variant('g') == dict(width=1408, depth=40, mlp_dim=6144, num_heads=16)
  with pytest.raises(ValueError, match="'X/16'.*Ti.*So400m"):
    vit.decode_variant('X/16')
  with pytest.raises(ValueError, match="'B/x'"):
    vit.decode_variant('B/x')


def test_param_count_matches_formula():
  """The default tiny image tower (width 128, depth 4, MAP, head 128, 48 px / patch 8) has the expected size."""
  d, m, depth, tokens, p, out = 128, 512, 4, 36, 8, 128
  block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)
  want = (p * p * 3 * d + d) + tokens * d + depth * block + 2 * d + (d + 4 * (d * d + d) + 2 * d + (d * m + m)
                                                                      + (m * d + d)) + (d * out + out)
  model = vit.ViT(width=d, depth=depth, mlp_dim=m, num_heads=4, patch_size=(p, p), out_dim=out)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 48, 48, 3)))
  assert sum(x.size for x in jax.tree.leaves(nn.unbox(shapes))) == want == 1_037_312


@pytest.mark.parametrize('shape,dtype', [((4, 7, 32), jnp.float32), ((5, 48), jnp.float32),
                                         ((2, 3, 9, 64), jnp.float32), ((3, 9, 64), jnp.bfloat16)])
def test_layer_norm_matches_flax_forward_and_gradients(shape, dtype):
  """layers.LayerNorm (hand-written VJP) = flax's nn.LayerNorm (autodiff, two-pass variance): output and the
  gradients to x, scale and bias, on random non-trivial scale / bias and an offset, scaled input."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(3 * rng.standard_normal(shape) + 1, dtype)
  scale = jnp.asarray(1 + 0.2 * rng.standard_normal(shape[-1]), jnp.float32)
  bias = jnp.asarray(0.3 * rng.standard_normal(shape[-1]), jnp.float32)
  d_out = jnp.asarray(rng.standard_normal(shape), dtype)
  ref = nn.LayerNorm(epsilon=1e-6, dtype=dtype, use_fast_variance=False)
  new = layers.LayerNorm(epsilon=1e-6, dtype=dtype)
  outs = []
  for module in (ref, new):
    apply = lambda x, s, b, module=module: module.apply({'params': {'scale': s, 'bias': b}}, x)
    out, vjp = jax.vjp(apply, x, scale, bias)
    assert out.dtype == dtype
    outs.append((out,) + vjp(d_out))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for name, a, b in zip(('out', 'dx', 'dscale', 'dbias'), *outs):
    scale_ = max(1.0, float(jnp.abs(a.astype(jnp.float32)).max()))
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), atol=tol * scale_,
                               err_msg=name)


def test_layer_norm_keeps_flax_param_names(small_init):
  """Checkpoints and the converters address LayerNorm parameters as 'scale' and 'bias' (as flax's)."""
  block = small_init['img']['encoder']['encoderblock_0']
  assert set(block['ln_attn']) == {'scale', 'bias'} and set(block['ln_mlp']) == {'scale', 'bias'}


def test_attention_projections_initialise_and_compute_as_dense_layers():
  # MultiHeadAttention makes q/k/v as one stacked matmul, but its params are those of separate DenseGeneral
  # layers: same names, shapes and initial values (flat xavier fans), and the same outputs.
  x = jax.random.normal(jax.random.key(1), (2, 5, 32))
  kv = jax.random.normal(jax.random.key(2), (2, 7, 32))
  mha, ref = layers.MultiHeadAttention(num_heads=4), _DenseProjectionAttention(num_heads=4)
  p = mha.init(jax.random.key(0), x)
  want = ref.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(p), nn.unbox(want))
  for inputs in ((x,), (x, kv)):
    np.testing.assert_allclose(mha.apply(p, *inputs), ref.apply(p, *inputs), rtol=1e-6, atol=1e-6)


class _DenseProjectionAttention(nn.Module):
  """The unfused formulation: q, k and v each a DenseGeneral (`layers.dense`) of its own."""
  num_heads: int

  @nn.compact
  def __call__(self, xq, xkv=None):
    xkv = xq if xkv is None else xkv
    width = xq.shape[-1]
    proj = lambda name, x: layers.dense((self.num_heads, width // self.num_heads), ('embed', 'heads', 'kv'),
                                        ('heads', 'kv'), name=name)(x)
    q, k, v = proj('query', xq), proj('key', xkv), proj('value', xkv)
    out = attention_lib.reference_attention(q, k, v)
    return layers.dense(width, ('heads', 'kv', 'embed'), ('embed',), axis=(-2, -1), name='out')(out)


class _DenseGeneralMlp(nn.Module):
  """The MLP as two flax DenseGeneral layers (`layers.dense`) on [batch, tokens, width]: the reference layout."""
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    h = layers.dense(self.mlp_dim, ('embed', 'mlp'), ('mlp',), name='fc_in')(x)
    return layers.dense(x.shape[-1], ('mlp', 'embed'), ('embed',), name='fc_out')(nn.gelu(h, approximate=True))


def test_mlp_block_has_dense_general_params_outputs_and_gradients():
  # MlpBlock runs its matmuls on [batch * tokens, width] (`layers.token_matmul`) but must stay a pair of
  # DenseGeneral layers to checkpoints and converters: same names, shapes, initial values, outputs and gradients.
  x = jax.random.normal(jax.random.key(1), (3, 5, 16))
  mlp, ref = layers.MlpBlock(mlp_dim=24), _DenseGeneralMlp(mlp_dim=24)
  p = nn.unbox(mlp.init(jax.random.key(0), x))
  jax.tree.map(np.testing.assert_array_equal, p, nn.unbox(ref.init(jax.random.key(0), x)))
  p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape), p)  # Non-zero biases.
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))  # noqa: E731
  got, want = jax.grad(loss(mlp), (0, 1))(p, x), jax.grad(loss(ref), (0, 1))(p, x)
  np.testing.assert_allclose(mlp.apply(p, x), ref.apply(p, x), rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_mlp_weight_gradient_reads_its_operands_in_place_on_cpu():
  # The point of token_matmul: XLA:CPU computes dW = x^T dh without a transposed copy of the [batch * tokens,
  # mlp] gradient (it makes one when batch and tokens are separate contracting axes).
  if jax.default_backend() != 'cpu':
    pytest.skip('XLA:CPU layout behaviour')
  batch, tokens, width, mlp_dim = 4, 6, 8, 40
  x = jnp.ones((batch, tokens, width))
  mlp = layers.MlpBlock(mlp_dim=mlp_dim)
  p = mlp.init(jax.random.key(0), x)
  hlo = jax.jit(jax.grad(lambda p, x: jnp.sum(mlp.apply(p, x) ** 2))).lower(p, x).compile().as_text()
  transposed = f'f32[{mlp_dim},{batch * tokens}]'
  assert transposed not in hlo, f'a transposed copy {transposed} of the MLP gradient is back'


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_add_position_embedding_matches_autodiff(dtype):
  x = jax.random.normal(jax.random.key(0), (5, 7, 6)).astype(dtype)
  pos = jax.random.normal(jax.random.key(1), (7, 6)).astype(dtype)
  dy = jax.random.normal(jax.random.key(2), (5, 7, 6)).astype(dtype)
  got, got_vjp = jax.vjp(layers.add_position_embedding, x, pos)
  want, want_vjp = jax.vjp(lambda x, p: x + p[None], x, pos)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  for a, b in zip(got_vjp(dy), want_vjp(dy)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
