"""MoE MLP: routing and grouped matmul (jmm.kernels.moe) vs the einsum dispatch and a dense MLP of the same FLOPs.

  python benchmarks/moe.py                  # B/16 shapes: 256 x 197 tokens, width 768, MLP 3072; 8 / 32 experts
  python benchmarks/moe.py --quick          # tiny shapes; on CPU the Pallas kernels run interpreted (slow)
  python benchmarks/moe.py --experts=8 --topk=2 --dtype=bfloat16 --out=benchmarks/results/moe_gpu.json

For every (experts E, top-k) case, on T tokens of width D with expert MLPs D -> F -> D:
  routing xla / pallas   topk_route + sort_by_expert (forward only: the routing has no weights of its own)
  gmm ragged_dot / pallas   one grouped matmul [T k, D] @ [E, D, F], the MoE MLP's first layer
  moe ragged_dot / pallas   the whole dropless layer: router, top-k, sort, permute, gmm, gelu, gmm, unpermute
                         (routing 'xla' with ragged_dot, routing 'pallas' with the Pallas grouped matmul)
  einsum dispatch        the GShard / V-MoE layer: tokens in groups of --group_size, capacity
                         k * group / E * --capacity_factor per expert, one-hot dispatch and combine einsums
                         (drops tokens past capacity), batched expert matmuls
  dense                  a dense MLP D -> k F -> D: the same matmul FLOPs as the k active experts
TFLOP/s count the useful matmul FLOPs only: 2 T k D F per grouped matmul, 4 T k D F for a layer (the dense MLP
has exactly those; the einsum dispatch does more, its dispatch / combine einsums and the padding to capacity),
and 3x that for forward+backward. 'vs dense' and 'vs einsum' are that row's time divided into the dense MLP's /
the einsum dispatch's (same case, same mode; layer rows): > 1 means faster. Each Pallas row is first checked against its
XLA counterpart (max abs error of the output, and of the gradients for the layer).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jmm.kernels import moe  # noqa: E402

FULL = dict(batch=256, tokens=197, width=768, mlp=3072, experts=(8, 32), topk=(1, 2), group_size=1024)
QUICK = dict(batch=2, tokens=197, width=64, mlp=128, experts=(4, 8), topk=(1, 2), group_size=128)


def init_params(num_experts, width, mlp, k, dtype, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda shape, fan_in: jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), dtype)
  return {'router': normal((width, num_experts), width), 'w_in': normal((num_experts, width, mlp), width),
          'w_out': normal((num_experts, mlp, width), mlp), 'dense_in': normal((width, k * mlp), width),
          'dense_out': normal((k * mlp, width), k * mlp)}


def routing(params, x, *, k, impl):
  """topk_route + sort_by_expert on the router logits."""
  gates, experts = moe.topk_route((x @ params['router']).astype(jnp.float32), k, impl=impl)
  perm, sizes = moe.sort_by_expert(experts, params['router'].shape[1], impl=impl)
  return gates, perm, sizes


def moe_layer(params, x, *, k, route_impl, gmm_impl):
  """The dropless MoE MLP."""
  gates, perm, sizes = routing(params, x, k=k, impl=route_impl)
  h = jax.nn.gelu(moe.grouped_matmul(moe.permute(x, perm, k), params['w_in'], sizes, impl=gmm_impl))
  ys = moe.grouped_matmul(h, params['w_out'], sizes, impl=gmm_impl)
  return moe.unpermute(ys, perm, jax.nn.softmax(gates, axis=-1).astype(x.dtype)).astype(x.dtype)


def einsum_dispatch_layer(params, x, *, k, group_size, capacity_factor):
  """GShard-style MoE MLP: per group of tokens, one-hot dispatch [G, E, C] and combine tensors, fixed capacity C."""
  tokens, width = x.shape
  num_experts = params['router'].shape[1]
  group = min(group_size, tokens)
  padded = -(-tokens // group) * group
  xg = jnp.pad(x, ((0, padded - tokens), (0, 0))).reshape(-1, group, width)  # [n, G, D]
  capacity = max(1, int(np.ceil(k * group / num_experts * capacity_factor)))
  gates, experts = jax.lax.top_k((xg @ params['router']).astype(jnp.float32), k)  # [n, G, k]
  weights = jax.nn.softmax(gates, axis=-1)
  onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)  # [n, G, k, E]
  # Slot-major priority (every token's first choice before any second choice), as GShard.
  order = onehot.transpose(0, 2, 1, 3).reshape(onehot.shape[0], k * group, num_experts)
  position = (jnp.cumsum(order, axis=1) - 1).reshape(-1, k, group, num_experts).transpose(0, 2, 1, 3)
  keep = onehot * (position < capacity)  # [n, G, k, E]
  slot = jax.nn.one_hot(jnp.sum(position * keep, axis=-1), capacity, dtype=x.dtype)  # [n, G, k, C]
  dispatch = jnp.einsum('ngke,ngkc->ngec', keep.astype(x.dtype), slot)
  combine = jnp.einsum('ngke,ngkc,ngk->ngec', keep.astype(x.dtype), slot, weights.astype(x.dtype))
  xe = jnp.einsum('ngd,ngec->necd', xg, dispatch)
  h = jax.nn.gelu(jnp.einsum('necd,edf->necf', xe, params['w_in']))
  ye = jnp.einsum('necf,efd->necd', h, params['w_out'])
  return jnp.einsum('necd,ngec->ngd', ye, combine).reshape(padded, width)[:tokens]


def dense_layer(params, x):
  """Dense MLP D -> k F -> D: the matmul FLOPs of k active experts."""
  return jax.nn.gelu(x @ params['dense_in']) @ params['dense_out']


def _median_time(fn, args, warmup, steps) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _fwd_bwd(layer):
  """jit of loss -> (value, grads w.r.t. params and x); the loss is a fixed random projection of the output."""
  def run(params, x, cot):
    return jax.value_and_grad(lambda p, x: jnp.sum(layer(p, x).astype(jnp.float32) * cot), argnums=(0, 1))(params, x)
  return jax.jit(run)


def _max_err(a, b) -> float:
  leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return float(max(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))) for x, y in leaves))


def run_case(num_experts, k, cfg, dtype, warmup, steps) -> list[dict]:
  """Rows (one per implementation) for one (experts, top-k) case."""
  tokens, width, mlp = cfg['batch'] * cfg['tokens'], cfg['width'], cfg['mlp']
  params = init_params(num_experts, width, mlp, k, dtype)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((tokens, width)), dtype)
  cot = jnp.asarray(rng.standard_normal((tokens, width)), jnp.float32)
  layer_flops = 4 * tokens * k * width * mlp
  case = {'experts': num_experts, 'topk': k, 'tokens': tokens, 'width': width, 'mlp': mlp, 'dtype': str(dtype)}
  rows = []

  def add(kind, impl, flops, fwd=None, fwd_bwd=None, args=(), err=None):
    row = {**case, 'kind': kind, 'impl': impl}
    try:
      if err is not None:
        row['max_err'] = err()
      if fwd is not None:
        row['fwd_s'] = _median_time(fwd, args, warmup, steps)
        row['fwd_tflops'] = flops / row['fwd_s'] / 1e12 if flops else None
      if fwd_bwd is not None:
        row['fwd_bwd_s'] = _median_time(fwd_bwd, args + (cot,), warmup, steps)
        row['fwd_bwd_tflops'] = 3 * flops / row['fwd_bwd_s'] / 1e12
    except Exception as e:  # pylint: disable=broad-except
      row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    rows.append(row)
    print(f'  E={num_experts} k={k} {kind} {impl}: ' + (row.get('error') or ', '.join(
        f'{m} {row[m + "_s"] * 1e3:.3f} ms' for m in ('fwd', 'fwd_bwd') if m + '_s' in row)), flush=True)

  # Routing alone.
  route = {impl: jax.jit(functools.partial(routing, k=k, impl=impl)) for impl in ('xla', 'pallas')}
  add('routing', 'xla', None, fwd=route['xla'], args=(params, x))
  add('routing', 'pallas', None, fwd=route['pallas'], args=(params, x),
      err=lambda: _max_err(route['pallas'](params, x), route['xla'](params, x)))

  # One grouped matmul, on the real routing's groups.
  _, perm, sizes = route['xla'](params, x)
  xs = moe.permute(x, perm, k)
  gmm_args = (params['w_in'], xs)
  gmm_flops = 2 * tokens * k * width * mlp
  gmm = {}
  cot_gmm = jnp.asarray(rng.standard_normal((tokens * k, mlp)), jnp.float32)
  for impl in ('ragged_dot', 'pallas'):
    layer = lambda w, xs, impl=impl: moe.grouped_matmul(xs, w, sizes, impl=impl)
    gmm[impl] = jax.jit(layer)
    fb = jax.jit(lambda w, xs, layer=layer: jax.grad(
        lambda w, xs: jnp.sum(layer(w, xs).astype(jnp.float32) * cot_gmm), argnums=(0, 1))(w, xs))
    add('gmm', impl, gmm_flops, fwd=gmm[impl], fwd_bwd=lambda w, xs, _, fb=fb: fb(w, xs), args=gmm_args,
        err=None if impl == 'ragged_dot' else lambda: _max_err(gmm['pallas'](*gmm_args), gmm['ragged_dot'](*gmm_args)))

  # Whole layers.
  layers = {
      'moe ragged_dot': functools.partial(moe_layer, k=k, route_impl='xla', gmm_impl='ragged_dot'),
      'moe pallas': functools.partial(moe_layer, k=k, route_impl='pallas', gmm_impl='pallas'),
      'einsum dispatch': functools.partial(einsum_dispatch_layer, k=k, group_size=cfg['group_size'],
                                           capacity_factor=cfg['capacity_factor']),
      'dense': dense_layer,
  }
  fb = {name: _fwd_bwd(layer) for name, layer in layers.items()}
  for name, layer in layers.items():
    err = None
    if name == 'moe pallas':
      err = lambda: _max_err(fb['moe pallas'](params, x, cot), fb['moe ragged_dot'](params, x, cot))
    add('layer', name, layer_flops, fwd=jax.jit(layer), fwd_bwd=fb[name], args=(params, x), err=err)
  return rows


def add_ratios(rows: list[dict]) -> None:
  """'vs dense' / 'vs einsum': the dense MLP's / the einsum dispatch's time over this layer row's (same case and
  mode). Layer rows only: the routing and single-gmm rows do a different amount of work."""
  for row in (r for r in rows if r['kind'] == 'layer'):
    for base, key in (('dense', 'vs_dense'), ('einsum dispatch', 'vs_einsum')):
      for mode in ('fwd', 'fwd_bwd'):
        ref = [r for r in rows if r['impl'] == base and r['kind'] == 'layer' and
               (r['experts'], r['topk']) == (row['experts'], row['topk']) and f'{mode}_s' in r]
        if ref and f'{mode}_s' in row:
          row[f'{mode}_{key}'] = ref[0][f'{mode}_s'] / row[f'{mode}_s']


def format_table(rows: list[dict]) -> str:
  """A fixed-width text table: per case and implementation, ms, TFLOP/s and the two ratios, fwd and fwd+bwd."""
  head = (f'{"E":>3} {"k":>2} {"kind":8} {"impl":16} {"max err":>8} {"fwd ms":>9} {"TFLOP/s":>8} {"vs dense":>8} '
          f'{"vs eins":>7} {"f+b ms":>9} {"TFLOP/s":>8} {"vs dense":>8} {"vs eins":>7}')
  lines = [head, '-' * len(head)]
  num = lambda x, f: format(x, f) if isinstance(x, (int, float)) else '-'
  for r in rows:
    prefix = f'{r["experts"]:>3} {r["topk"]:>2} {r["kind"]:8} {r["impl"]:16}'
    if 'error' in r:
      lines.append(f'{prefix} not run: {r["error"][:70]}')
      continue
    ms = lambda key: r[key] * 1e3 if key in r else None
    lines.append(
        f'{prefix} {num(r.get("max_err"), ".1e"):>8} {num(ms("fwd_s"), "9.3f"):>9} '
        f'{num(r.get("fwd_tflops"), "8.3f"):>8} '
        f'{num(r.get("fwd_vs_dense"), "8.2f"):>8} {num(r.get("fwd_vs_einsum"), "7.2f"):>7} '
        f'{num(ms("fwd_bwd_s"), "9.3f"):>9} {num(r.get("fwd_bwd_tflops"), "8.3f"):>8} '
        f'{num(r.get("fwd_bwd_vs_dense"), "8.2f"):>8} {num(r.get("fwd_bwd_vs_einsum"), "7.2f"):>7}')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny shapes (CPU; the Pallas kernels run interpreted)')
  parser.add_argument('--experts', default='', help='comma-separated expert counts (default 8,32; quick 4,8)')
  parser.add_argument('--topk', default='', help='comma-separated k (default 1,2)')
  parser.add_argument('--dtype', default=None, help='default bfloat16; float32 with --quick')
  parser.add_argument('--capacity_factor', type=float, default=1.0, help='einsum dispatch capacity factor')
  parser.add_argument('--warmup', type=int, default=None)
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--out', default=None, help='JSON results file (default benchmarks/results/moe_<backend>.json)')
  args = parser.parse_args(argv)

  cfg = dict(QUICK if args.quick else FULL, capacity_factor=args.capacity_factor)
  experts = [int(e) for e in args.experts.split(',')] if args.experts else list(cfg['experts'])
  topks = [int(k) for k in args.topk.split(',')] if args.topk else list(cfg['topk'])
  dtype = jnp.dtype(args.dtype or ('float32' if args.quick else 'bfloat16'))
  warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
  steps = args.steps if args.steps is not None else (2 if args.quick else 20)
  backend, device = jax.default_backend(), jax.devices()[0]
  print(f'backend {backend}, device {device.device_kind}, jax {jax.__version__}; {cfg["batch"]} x {cfg["tokens"]} '
        f'tokens, width {cfg["width"]}, MLP {cfg["mlp"]}, {dtype}', flush=True)

  rows = []
  for num_experts in experts:
    for k in topks:
      rows += run_case(num_experts, k, cfg, dtype, warmup, steps)
  add_ratios(rows)
  print(format_table(rows))

  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                 f'moe_{backend}{"_quick" if args.quick else ""}.json')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  record = {'backend': backend, 'device_kind': device.device_kind, 'jax': jax.__version__,
            'python': platform.python_version(), 'quick': args.quick, 'warmup': warmup, 'steps': steps,
            'config': {**cfg, 'experts': experts, 'topk': topks, 'dtype': str(dtype)}, 'rows': rows}
  with open(out, 'w') as f:
    json.dump(record, f, indent=2)
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
