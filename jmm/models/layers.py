"""Transformer building blocks shared by the image and text towers.

Logical axis names. Every parameter is created through `nn.with_logical_partitioning`, so `init` returns a tree
of `nn.Partitioned` boxes whose names `jmm.parallel` maps to mesh axes; activations are constrained with
`nn.with_logical_constraint` at block boundaries. The names:

  'batch'         examples in a batch (activations only)
  'length'        tokens / sequence positions (activations; also the position-embedding table)
  'embed'         model width, the residual stream
  'mlp'           MLP hidden units
  'heads'         attention heads
  'kv'            per-head dimension of queries, keys and values
  'vocab'         token vocabulary (text embedding table)
  'patch_height'  patch-embedding kernel rows
  'patch_width'   patch-embedding kernel columns
  'conv_in'       image channels entering the patch embedding
  'probe'         learned query tokens of the MAP head
  'out'           output (joint embedding) dimension of a tower's head
  'layers'        the stacked layer axis of an `nn.scan`-ned encoder

Scalars (the two-tower temperature and bias) have the empty name tuple `()`.

Initialisers follow big_vision / the ViT paper: xavier-uniform kernels, zero biases, LayerNorm scale one and
bias zero. Parameters live in `param_dtype`; compute runs in `dtype` (e.g. bfloat16 with float32 parameters).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmm.kernels import attention as attention_lib
from jmm.kernels import matmul

AXIS_NAMES = ('batch', 'length', 'embed', 'mlp', 'heads', 'kv', 'vocab', 'patch_height', 'patch_width',
              'conv_in', 'probe', 'out', 'layers')
ACTIVATION_AXES = ('batch', 'length', 'embed')  # [batch, tokens, width], the residual stream.

Dtype = Any

xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones


class _LogicallyPartitioned(nn.LogicallyPartitioned):
  """flax's box, minus one trap: DenseGeneral initialises a multi-axis kernel flat ([fan_in, fan_out]) and unboxes
  it before reshaping, which under a mesh would constrain a rank-2 value with rank-3 names. A value whose rank
  differs from its names is not constrained; the reshaped kernel is, when it is unboxed in its real shape."""

  def unbox(self, apply_constraint=True):
    return super().unbox(apply_constraint and len(self.names) == jnp.ndim(self.value))


def partitioned(init, names: Sequence[str | None]):
  """`init` boxed with logical axis `names`; shorthand so every param site states its sharding names."""
  names = tuple(names)

  def wrapper(*args, **kwargs):
    return _LogicallyPartitioned(init(*args, **kwargs), names)
  return wrapper


def constrain(x):
  """Pins a [batch, tokens, width] activation to its logical axes (a no-op outside a mesh / rules context)."""
  return nn.with_logical_constraint(x, ACTIVATION_AXES)


def dense(features, kernel_names, bias_names, *, axis=-1, dtype=jnp.float32, param_dtype=jnp.float32,
          name=None, kernel_init=xavier, use_bias=True):
  """An `nn.DenseGeneral` whose kernel and bias carry logical axis names.

  DenseGeneral flattens multi-axis kernels to (fan_in, fan_out) for the initialiser, so xavier sees the true
  fans of e.g. a [width, heads, head_dim] projection.
  """
  return nn.DenseGeneral(
      features=features, axis=axis, dtype=dtype, param_dtype=param_dtype, name=name, use_bias=use_bias,
      kernel_init=partitioned(kernel_init, kernel_names), bias_init=partitioned(zeros, bias_names))


class DenseParams(nn.Module):
  """The kernel [*in_shape, *features] and bias [*features] of a dense layer, created exactly as `dense` (an
  nn.DenseGeneral) creates them: names 'kernel' and 'bias', xavier on the flat (fan_in, fan_out) shape, zero
  bias, logical axis names. The caller applies them (`token_matmul`), so parameters and checkpoints are those
  of a DenseGeneral while the matmul is written the way XLA compiles best."""
  in_shape: tuple[int, ...]
  features: tuple[int, ...]
  kernel_names: tuple[str, ...]
  bias_names: tuple[str, ...]
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    fans = (math.prod(self.in_shape), math.prod(self.features))

    def flat_xavier(rng, shape, dtype):
      return xavier(rng, fans, dtype).reshape(shape)
    kernel = self.param('kernel', partitioned(flat_xavier, self.kernel_names), (*self.in_shape, *self.features),
                        self.param_dtype)
    bias = self.param('bias', partitioned(zeros, self.bias_names), self.features, self.param_dtype)
    return kernel, bias


def token_matmul(x, kernel, bias, n_in: int = 1, dtype=jnp.float32):
  """x [batch, tokens, *in] (the last `n_in` axes contracted) times kernel [*in, *out], plus bias [*out].

  Why this shape. The matmul runs on 2-D operands, [batch * tokens, prod(in)] x [prod(in), prod(out)]. Its
  weight gradient is then a dot with one contracting axis, which XLA:CPU computes from both operands in place;
  with [batch, tokens] (or [heads, head_dim] outputs) as separate axes it first makes a transposed copy of the
  output gradient (19 MB for a ViT-S/16 block's MLP at batch 16). The bias is added after the matmul's output is
  reshaped, so XLA fuses it into the next element-wise op instead of into the matmul (where oneDNN needs a
  materialised [batch * tokens, out] broadcast of it). Same numbers as a DenseGeneral; the reshapes are free
  (row-major bitcasts) and the batch axis stays the major part of the merged one, sharding included. On a CPU the
  weight gradient transposes the narrower of x and dy (`kernels.matmul.row_contraction`; oneDNN's operand copies).
  """
  lead, in_shape = x.shape[:-n_in], x.shape[x.ndim - n_in:]
  out_shape = kernel.shape[n_in:]
  x2 = x.astype(dtype).reshape(math.prod(lead), math.prod(in_shape))
  w2 = kernel.astype(dtype).reshape(math.prod(in_shape), math.prod(out_shape))
  y = _cpu_matmul(x2, w2) if jax.default_backend() == 'cpu' else x2 @ w2
  return y.reshape(*lead, *out_shape) + bias.astype(dtype)


@jax.custom_vjp
def _cpu_matmul(x, w):
  """x @ w whose weight gradient x^T dy is `kernels.matmul.row_contraction`'s (the narrower operand transposed)."""
  return x @ w


def _cpu_matmul_fwd(x, w):
  return x @ w, (x, w)


def _cpu_matmul_bwd(residuals, dy):
  x, w = residuals
  return dy @ w.T, matmul.row_contraction(x, dy)


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


@jax.custom_vjp
def add_position_embedding(x, posemb):
  """x [batch, tokens, width] + posemb [tokens, width] (the same table for every example).

  The gradient of the table is the output gradient summed over the batch, computed here as a matmul with a ones
  vector instead of a reduction over the leading axis: XLA:CPU reduces over a short major axis with a strided loop,
  12 ms for [16, 196, 384] against 1-2 ms as a dot (27 ms inside a ViT-S/16 step at batch 16). HIGHEST precision
  keeps the sum in float32 on TPU (whose default float32 dot rounds operands to bf16).
  """
  return x + posemb[None]


def _add_position_embedding_fwd(x, posemb):
  return x + posemb[None], None


def _add_position_embedding_bwd(_, dy):
  ones = jnp.ones((dy.shape[0],), dy.dtype)
  return dy, jnp.einsum('b,btd->td', ones, dy, precision=jax.lax.Precision.HIGHEST)


add_position_embedding.defvjp(_add_position_embedding_fwd, _add_position_embedding_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_fn(x, scale, bias, epsilon: float = 1e-6):
  """LayerNorm over the last axis with a hand-written gradient: (x - mean) / sqrt(var + eps) * scale + bias.

  Statistics and arithmetic in float32; the result has x's dtype. The backward pass saves only x and the per-row
  mean and 1/std (not the normalised activations) and computes dx in one fused expression,
  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * scale, instead of differentiating through the
  two reductions: on XLA CPU this is about twice as fast as autodiff of the same formula, and it keeps activation
  memory at one copy of x in its own dtype.
  """
  return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_stats(x, epsilon):
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centred = x - mean
  rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
  return centred, mean, rstd


def _layer_norm_fwd(x, scale, bias, epsilon):
  centred, mean, rstd = _layer_norm_stats(x, epsilon)
  y = centred * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(epsilon, res, dy):
  del epsilon
  x, mean, rstd, scale, bias = res
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dy = dy.astype(jnp.float32)
  g = dy * scale.astype(jnp.float32)
  dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  dscale = jnp.sum(dy * xhat, axis=rows).astype(scale.dtype)
  dbias = jnp.sum(dy, axis=rows).astype(bias.dtype)
  return dx.astype(x.dtype), dscale, dbias


layer_norm_fn.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm over 'embed' (`layer_norm_fn`): parameters 'scale' and 'bias' as flax's nn.LayerNorm, statistics in
  float32 whatever `dtype` is; the output is cast to `dtype`."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    scale = self.param('scale', partitioned(ones, ('embed',)), (width,), self.param_dtype)
    bias = self.param('bias', partitioned(zeros, ('embed',)), (width,), self.param_dtype)
    return layer_norm_fn(x, scale, bias, self.epsilon).astype(self.dtype)


def layer_norm(dtype, param_dtype, name=None, epsilon: float = 1e-6):
  """LayerNorm over 'embed' (statistics in float32 whatever `dtype` is, as flax does).

  epsilon: 1e-6 as big_vision / SigLIP; CLIP and open_clip use torch's default 1e-5.
  """
  return LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)


def quick_gelu(x):
  """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with (Radford et al. 2021)."""
  return x * nn.sigmoid(1.702 * x)


# MLP activations by name. 'gelu_tanh' (the default) is flax's nn.gelu, as big_vision / SigLIP (HF:
# 'gelu_pytorch_tanh'); 'gelu' is the exact erf form, torch's nn.GELU() (open_clip); 'quick_gelu' is OpenAI CLIP's.
ACTIVATIONS = {
    'gelu_tanh': lambda x: nn.gelu(x, approximate=True),
    'gelu': lambda x: nn.gelu(x, approximate=False),
    'quick_gelu': quick_gelu,
}


def activation_fn(name: str):
  """The MLP activation called `name` (a key of ACTIVATIONS); ValueError naming the known ones otherwise."""
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}; known: {", ".join(ACTIVATIONS)}')
  return ACTIVATIONS[name]


class MlpBlock(nn.Module):
  """Transformer MLP: Dense(mlp_dim) -> activation (GELU, tanh form by default) -> Dense(width)."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  activation: str = 'gelu_tanh'

  @nn.compact
  def __call__(self, x):  # x: [batch, tokens, width]
    width = x.shape[-1]
    fc_in = DenseParams((width,), (self.mlp_dim,), ('embed', 'mlp'), ('mlp',), self.param_dtype, name='fc_in')()
    fc_out = DenseParams((self.mlp_dim,), (width,), ('mlp', 'embed'), ('embed',), self.param_dtype, name='fc_out')()
    h = token_matmul(x, *fc_in, dtype=self.dtype)  # [B, T, mlp]; params as nn.DenseGeneral's (`dense`).
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    h = activation_fn(self.activation)(h)  # Default: tanh approximation, as flax / big_vision.
    return token_matmul(h, *fc_out, dtype=self.dtype)  # [B, T, width]


def _project(x, params, dtype):
  """x [B, T, width] times the stacked kernels of `params` ((kernel [width, H, D], bias [H, D]) pairs): one
  `token_matmul` [B*T, width] x [width, n * H * D] whatever n is; returns the n projections, each [B, T, H, D].

  One matmul instead of n: a larger GEMM, and the backward pass computes dx as one matmul rather than a sum of n,
  which XLA would otherwise fuse into one multi-dot kernel. Stacking on a new axis (not concatenating heads) keeps
  each kernel's 'heads' sharding: no resharding under tensor parallelism.
  """
  kernel = jnp.stack([k for k, _ in params], axis=1)  # [width, n, H, D]
  bias = jnp.stack([b for _, b in params], axis=0)    # [n, H, D]
  y = token_matmul(x, kernel, bias, dtype=dtype)      # [B, T, n, H, D]
  return [y[:, :, i] for i in range(len(params))]


class MultiHeadAttention(nn.Module):
  """Multi-head (self or cross) attention: q/k/v projections, `kernels.attention`, output projection.

  q, k and v are projections to [heads, head_dim] (params 'query', 'key', 'value', each a DenseGeneral-style
  kernel and bias), so the kernel receives [batch, length, heads, head_dim] without a transpose. Projections of
  the same input run as one matmul (`_project`): q, k and v together in self-attention, k and v in cross-attention.
  """
  num_heads: int
  qkv_features: int | None = None  # Total q/k/v width; defaults to the input width.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, mask=None, *, causal: bool = False, segment_ids=None,
               return_qk: bool = False):
    """inputs_q [B, Tq, width], inputs_kv [B, Tk, width] (None: self-attention), mask bool ~[B, H, Tq, Tk].

    causal / segment_ids go to the kernel as such (see `kernels.attention`), so flash kernels need no dense mask.
    return_qk: (output, q, k) with q [B, Tq, H, D] and k [B, Tk, H, D], for a caller that needs the attention
    pattern (EViT's attentiveness, `jmm.models.evit`) whichever kernel ran.
    """
    self_attention = inputs_kv is None or inputs_kv is inputs_q
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    width = inputs_q.shape[-1]
    features = self.qkv_features or width
    if features % self.num_heads:
      raise ValueError(f'attention width {features} is not divisible by num_heads={self.num_heads}')
    head_dim = features // self.num_heads

    def proj(name, x):  # A DenseGeneral's kernel [width, H, D] and bias [H, D], applied by `_project`.
      return DenseParams((x.shape[-1],), (self.num_heads, head_dim), ('embed', 'heads', 'kv'), ('heads', 'kv'),
                         self.param_dtype, name=name)()
    pq, pk, pv = proj('query', inputs_q), proj('key', inputs_kv), proj('value', inputs_kv)
    if self_attention:
      q, k, v = _project(inputs_q, [pq, pk, pv], self.dtype)  # each [B, T, H, D]
    else:
      q, = _project(inputs_q, [pq], self.dtype)
      k, v = _project(inputs_kv, [pk, pv], self.dtype)
    out = attention_lib.dot_product_attention(q, k, v, mask=mask, causal=causal, segment_ids=segment_ids,
                                              impl=self.attention_impl)  # [B, Tq, H, D]
    out_params = DenseParams((self.num_heads, head_dim), (width,), ('heads', 'kv', 'embed'), ('embed',),
                             self.param_dtype, name='out')()
    out = token_matmul(out, *out_params, n_in=2, dtype=self.dtype)  # [B, Tq, width]
    return (out, q, k) if return_qk else out


class MAPHead(nn.Module):
  """Multihead attention pooling (Lee et al. 2019; big_vision / SigLIP): a learned probe attends to the tokens.

  probe' = MHA(probe, x); out = probe' + MLP(LN(probe')). Returns [batch, width].
  """
  num_heads: int
  mlp_dim: int | None = None  # Defaults to 4 * width.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'xla'
  activation: str = 'gelu_tanh'
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x):  # x: [batch, tokens, width]
    batch, _, width = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    probe = self.param('probe', partitioned(xavier, ('probe', 'embed')), (1, width), self.param_dtype)
    probe = jnp.broadcast_to(probe.astype(self.dtype)[None], (batch, 1, width))  # [B, 1, width]
    x = MultiHeadAttention(self.num_heads, attention_impl=self.attention_impl, name='attn', **kw)(probe, x)
    y = layer_norm(name='ln', epsilon=self.norm_eps, **kw)(x)
    x = x + MlpBlock(self.mlp_dim or 4 * width, activation=self.activation, name='mlp', **kw)(y)
    return x[:, 0]  # [B, width]


def pool(x, pool_type: str, known: Sequence[str], map_head: nn.Module | None = None):
  """Reduces tokens [batch, tokens, width] to [batch, width] by `pool_type`; shared by both towers."""
  if pool_type == 'map':
    return map_head(x)
  if pool_type == 'gap':
    return jnp.mean(x, axis=1)
  if pool_type in ('tok', 'first'):
    return x[:, 0]
  if pool_type == 'last':
    return x[:, -1]
  raise ValueError(f'unknown pool_type {pool_type!r}; known: {", ".join(known)}')


def pool_and_project(x, pool_type: str, known: Sequence[str], *, num_heads: int, mlp_dim: int,
                     out_dim: int | None, attention_impl: str, dtype=jnp.float32, param_dtype=jnp.float32,
                     activation: str = 'gelu_tanh', norm_eps: float = 1e-6, head_bias: bool = True):
  """A tower's tail, shared by both towers: pool tokens, then the optional linear head to `out_dim`.

  Call it from inside a tower's compact `__call__`: the 'MAPHead' and 'head' submodules it creates attach to
  that tower, so parameter names are the same as if the tower had built them itself.
  out_dim None or 0: no head (0 is how a config says so, since None fields fall back to the model's out_dim;
  HF SigLIP's image tower, for one, uses the MAP head's output as the embedding). head_bias=False: CLIP's
  bias-free projections.
  Returns (emb [batch, out_dim or width], pooled [batch, width]).
  """
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  map_head = None
  if pool_type == 'map':
    map_head = MAPHead(num_heads, mlp_dim, attention_impl=attention_impl, activation=activation,
                       norm_eps=norm_eps, name='MAPHead', **kw)
  pooled = pool(x, pool_type, known, map_head)  # [B, D]
  emb = pooled
  if out_dim:
    emb = dense(out_dim, ('embed', 'out'), ('out',), name='head', use_bias=head_bias, **kw)(pooled)
  return emb, pooled
