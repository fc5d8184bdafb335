"""EViT (jmm/models/evit.py): a reorganisation block against a per-example loop written by hand (values and
gradients), EViT off as the plain ViT bit for bit, token counts per block, FLOPs, and config errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import evit as evit_config
from jmm import errors
from jmm import flops
from jmm import validation
from jmm.models import encoder
from jmm.models import evit
from jmm.models import vit

WIDTH, HEADS, MLP, TOKENS, BATCH = 8, 2, 16, 9, 2
X = np.random.default_rng(0).standard_normal((BATCH, TOKENS, WIDTH)).astype(np.float32)


def _random_params(module, *args, scale=0.5):
  """Random values in `module`'s param tree, so biases and norm scales matter and attention is far from uniform."""
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)['params'])
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), shapes)


def _run(fn, *args):
  """fn(*args) compiled without XLA's backend optimisations: these programs are tiny, their compile time is not."""
  return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})(*args)


def _ln(x, p, xp, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / xp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * p['scale'] + p['bias']


def _ref_attention(p, x, xp=jnp):
  """One example's pre-LN self-attention by hand: (x + attention output [T, W], probabilities [H, T, T]); in
  numpy (xp=np) or jax.numpy."""
  y = _ln(x, p['ln_attn'], xp)
  q, k, v = (xp.einsum('tw,whd->thd', y, p['attn'][n]['kernel']) + p['attn'][n]['bias']
             for n in ('query', 'key', 'value'))
  logits = xp.einsum('qhd,khd->hqk', q, k) / np.sqrt(q.shape[-1])
  probs = xp.exp(logits - logits.max(-1, keepdims=True))
  probs = probs / probs.sum(-1, keepdims=True)
  out = xp.einsum('hqk,khd->qhd', probs, v)
  return x + xp.einsum('qhd,hdw->qw', out, p['attn']['out']['kernel']) + p['attn']['out']['bias'], probs


def _ref_attentiveness(probs, cls_token):
  return probs[:, 0].mean(0) if cls_token else probs.mean((0, 1))  # [T]: the class token's row, or every query's.


def ref_block(p, x, ranking, keep, cls_token):
  """The block per example with a given ranking of the candidates (the most attentive first): the class token, the
  first `keep` ranked tokens in that order, their complement summed with its attentiveness as weights (constants
  in the backward pass, as the ranking), then the MLP on those tokens."""
  out = []
  for b in range(x.shape[0]):
    xb, probs = _ref_attention(p, x[b])
    a = jax.lax.stop_gradient(_ref_attentiveness(probs, cls_token))
    ranked = int(cls_token) + np.asarray(ranking[b])  # Positions in xb, most attentive first.
    fused = jnp.sum(a[ranked[keep:], None] * xb[ranked[keep:]], axis=0)
    xb = jnp.concatenate([xb[:int(cls_token)], xb[ranked[:keep]], fused[None]])
    mlp = p['mlp']
    h = jax.nn.gelu(_ln(xb, p['ln_mlp'], jnp) @ mlp['fc_in']['kernel'] + mlp['fc_in']['bias'], approximate=True)
    out.append(xb + h @ mlp['fc_out']['kernel'] + mlp['fc_out']['bias'])
  return jnp.stack(out)


@pytest.mark.parametrize('cls_token', [True, False])  # 'tok' pooling's class-token row; 'gap' / 'map': every query.
def test_reorganisation_block_matches_a_loop_reference(cls_token):
  keep = 5  # Of 8 candidates with a class token, of 9 without.
  block = encoder.Encoder1DBlock(MLP, HEADS, evit_keep=keep, evit_cls_token=cls_token)
  p = _random_params(block, X)

  # The reference's attentiveness per example (in numpy: quicker than compiling), ranked by hand.
  p_np = jax.tree.map(np.asarray, p)
  a = np.stack([_ref_attentiveness(_ref_attention(p_np, X[b], np)[1], cls_token) for b in range(BATCH)])
  a = a[:, int(cls_token):]
  ranking = [list(np.argsort(-row, kind='stable')) for row in a]  # Descending; ties to the lower position.
  assert any(sorted(r[:keep]) != r[:keep] for r in ranking)  # Ranked order, not positional, is what is compared.

  def loss(fn, p, x):
    y = fn(p, x)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y  # Weights every output element apart.

  def both(p, x):
    mine = jax.value_and_grad(lambda p, x: loss(lambda p, x: block.apply({'params': p}, x), p, x), (0, 1),
                              has_aux=True)(p, x)
    ref = jax.value_and_grad(lambda p, x: loss(lambda p, x: ref_block(p, x, ranking, keep, cls_token), p, x),
                             (0, 1), has_aux=True)(p, x)
    return mine, ref

  ((_, y), grads), ((_, want), want_grads) = _run(both, p, jnp.asarray(X))
  assert y.shape == (BATCH, int(cls_token) + keep + 1, WIDTH)
  np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=5e-5, rtol=1e-4), grads, want_grads)


IMAGE = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)  # 16 patches of 4x4.
VIT = dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(4, 4), out_dim=8)


def test_evit_off_is_the_plain_vit_bit_for_bit():
  """Off in every spelling: the same init and forward programs (jaxprs, so the same parameters and outputs bit
  for bit, whatever the values), and one forward run to show it; EViT on adds no parameters."""
  plain = vit.ViT(**VIT, pool_type='tok')
  key = jax.random.key(0)
  params = jax.eval_shape(plain.init, key, IMAGE)
  want = [str(jax.make_jaxpr(plain.init)(key, IMAGE)), str(jax.make_jaxpr(plain.apply)(params, IMAGE))]
  for off in [None, {}, dict(layers='', keep_rate=0.5), dict(layers=(0, 1), keep_rate=1.0)]:
    model = vit.ViT(**VIT, pool_type='tok', evit=off)
    assert [str(jax.make_jaxpr(model.init)(key, IMAGE)), str(jax.make_jaxpr(model.apply)(params, IMAGE))] == want
  params = _random_params(plain, IMAGE)
  got, want = (_run(lambda p, m=m: m.apply({'params': p}, IMAGE), params) for m in (plain, model))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  on = vit.ViT(**VIT, pool_type='tok', evit=dict(layers=(1,), keep_rate=0.5))
  assert jax.tree.structure(jax.eval_shape(on.init, key, IMAGE)) == jax.tree.structure(
      jax.eval_shape(plain.init, key, IMAGE))


@pytest.mark.parametrize('pool_type', ['gap', 'tok'])
def test_token_counts_per_block(pool_type):
  cls = pool_type == 'tok'
  model = vit.ViT(**VIT, pool_type=pool_type, evit=dict(layers='0,1', keep_rate=0.6))
  variables = jax.eval_shape(model.init, jax.random.key(0), IMAGE)
  _, state = jax.eval_shape(lambda v: model.apply(v, IMAGE, capture_intermediates=True), variables)
  blocks = state['intermediates']['encoder']
  got = [blocks[f'encoderblock_{i}']['__call__'][0].shape[1] for i in range(2)]
  # Block 0: ceil(0.6 * 16) = 10 kept + 1 fused; block 1: ceil(0.6 * 11) = 7 (the fused token is a candidate) + 1.
  assert got == [11 + cls, 8 + cls]
  assert [s[2] for s in evit.schedule(16 + cls, 2, '0,1', 0.6, cls)] == got
  # The tiny tower (36 patches) with the default layers ('quarters': blocks 1, 2, 3) and keep 0.7; S/16 at 224 px.
  assert [s[2] for s in evit.schedule(36, 4, 'quarters', 0.7, False)] == [36, 27, 20, 15]
  assert [s[2] for s in evit.schedule(197, 12, 'quarters', 0.7, True)][2::3] == [197, 140, 100, 72]
  assert evit.num_kept(10, 0.7) == 7 and evit.num_kept(36, 0.7) == 26 and evit.block_keep(3, 0.9, True) == 0
  assert evit.layer_indices('quarters', 12) == (3, 6, 9) and evit.layer_indices('-1', 4) == (3,)


def test_flops_follow_the_token_counts():
  """Analytic image-encoder FLOPs against XLA's count of the tower's lowered forward (matmuls plus element-wise
  work, hence a little above); EViT's below the plain tower's."""
  sizes = dict(VIT, pool_type='gap', evit=dict(layers='0,1', keep_rate=0.5))
  plain = flops.tower_flops({**sizes, 'evit': None}, 16, 4 * 4 * 3)
  fewer = flops.tower_flops(sizes, 16, 4 * 4 * 3)
  assert fewer['embed'] == plain['embed'] and fewer['encoder'] < plain['encoder']
  model = vit.ViT(**{k: v for k, v in sizes.items() if k != 'out_dim'}, out_dim=8)
  variables = jax.eval_shape(model.init, jax.random.key(0), IMAGE)
  xla = flops.xla_flops(jax.jit(model.apply).lower(variables, IMAGE))
  analytic = IMAGE.shape[0] * sum(fewer.values())
  assert 1.0 <= xla / analytic < 1.25, (xla, analytic)


def test_config_and_its_errors_name_the_field():
  validation.validate(evit_config.get_config('steps=10'))
  big = evit_config.get_config('img=B/16,txt=B,res=224,keep=0.5,layers=2+5+8')
  validation.validate(big)
  assert dict(big.model.image.evit) == dict(layers='2,5,8', keep_rate=0.5)
  for arg, edit, pattern in [
      ('keep=0', None, r'config.model.image.evit.keep_rate=0'),
      ('keep=1.5', None, r'config.model.image.evit.keep_rate=1.5'),
      ('layers=1+7', None, r"config.model.image.evit.layers=.*block 7 is outside"),
      ('', lambda c: c.model.image.evit.update(fuse=True), r'config.model.image.evit.fuse: unknown'),
      ('', lambda c: c.model.image.update(scan=True), r'config.model.image.scan=True cannot run EViT'),
      ('', lambda c: c.model.text.update(evit=dict(keep_rate=0.5)), r'config.model.text.evit'),
      ('', lambda c: c.evals.update(region=dict(type='region', every=0, method='pooled')), r'config.evals.region'),
      ('', lambda c: c.model.update(heads=dict(mae=dict(type='mae_decoder'))), r'config.model.heads.mae'),
  ]:
    config = evit_config.get_config(arg)
    if edit:
      edit(config)
    with pytest.raises(errors.ConfigError, match=pattern):
      validation.validate(config)
