"""Attention implementations on whatever backend is found: errors vs the reference, then TFLOP/s, fwd and fwd+bwd.

  python benchmarks/attention.py                # full shapes (GPU / TPU)
  python benchmarks/attention.py --quick        # tiny shapes; on CPU the Pallas kernels run interpreted (slow)
  python benchmarks/attention.py --impls=xla,pallas --dtypes=bfloat16 --out=benchmarks/results/attention.json

Shapes are the attention of the SigLIP / CLIP towers (batch chosen for ~32k tokens a call):
  image  B/16 @224 (197 tokens, 12 heads x 64), L/14 @224 / @336 (257 / 577, 16 x 64),
         So400m/14 @224 / @384 (256 / 729, 16 x 72)
  text   B and L (64 tokens), So400m (64 tokens, 16 x 72), 16-token texts, and one causal (decoder) case.
Implementations (each where it runs; a failure to run is reported, not fatal):
  xla, cudnn         jax.nn.dot_product_attention's two paths (through jmm's dispatch)
  pallas             jmm's flash kernel for this backend (jmm.kernels.flash_attention_gpu / _tpu)
  jax_pallas_gpu     jax.experimental.pallas.ops.gpu.attention.mha (ships with JAX)
  jax_pallas_tpu     jax.experimental.pallas.ops.tpu.flash_attention (ships with JAX)
  tokamax_*          tokamax.dot_product_attention(implementation=...) where tokamax is installed
Each implementation is first checked against `reference_attention` (computed in float32 from the same inputs)
on a batch-2 slice, forward and gradients; then timed (median of --steps after --warmup calls). FLOPs:
4 B H Tq Tk D for the forward's two matmuls (only the unmasked pairs under causal), 3.5x that for fwd+bwd
(FlashAttention-2's convention: the backward's five matmuls are 2.5x the forward's two). 'vs best' is the best
other implementation's time divided by this one's: > 1 means faster than every other.
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

from jmm.kernels import attention  # noqa: E402

TOKENS_PER_CALL = 32768
# name, q_len (= kv_len), heads, head_dim, causal
FULL_SHAPES = [
    ('B/16 img 224', 197, 12, 64, False),
    ('L/14 img 224', 257, 16, 64, False),
    ('L/14 img 336', 577, 16, 64, False),
    ('So400m/14 img 224', 256, 16, 72, False),
    ('So400m/14 img 384', 729, 16, 72, False),
    ('B text 64', 64, 12, 64, False),
    ('L text 64', 64, 16, 64, False),
    ('So400m text 64', 64, 16, 72, False),
    ('B text 16', 16, 12, 64, False),
    ('B text 64 causal', 64, 12, 64, True),
]
QUICK_SHAPES = [  # CPU: tiny, so interpreted kernels finish in seconds.
    ('tiny img 65', 65, 2, 64, False),
    ('tiny text 16 causal', 16, 2, 64, True),
]
QUICK_TOKENS = 256
TOL = {'float32': 2e-3, 'bfloat16': 6e-2}  # Max abs error vs the float32 reference (unit-variance inputs).


def _jmm(impl):
  return lambda q, k, v, causal: attention.dot_product_attention(q, k, v, causal=causal, impl=impl)


def _jax_pallas_gpu(q, k, v, causal):
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # pylint: disable=g-import-not-at-top
  return gpu_attention.mha(q, k, v, None, sm_scale=float(1 / np.sqrt(q.shape[-1])), causal=causal,
                           interpret=jax.default_backend() == 'cpu')


def _jax_pallas_tpu(q, k, v, causal):
  from jax.experimental.pallas.ops.tpu import flash_attention  # pylint: disable=g-import-not-at-top
  t = lambda x: x.transpose(0, 2, 1, 3)  # [B, H, T, D]
  out = flash_attention.flash_attention(t(q), t(k), t(v), causal=causal, sm_scale=float(1 / np.sqrt(q.shape[-1])))
  return t(out)


def _tokamax(implementation):
  def fn(q, k, v, causal):
    import tokamax  # pylint: disable=g-import-not-at-top
    return tokamax.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  return fn


def implementations(platform_name: str) -> dict:
  """name -> fn(q, k, v, causal) for the implementations worth running on `platform_name`."""
  impls = {'xla': _jmm('xla')}
  if platform_name == 'gpu':
    impls['cudnn'] = _jmm('cudnn')
  impls['pallas'] = _jmm('pallas')
  if platform_name in ('gpu', 'cpu'):
    impls['jax_pallas_gpu'] = _jax_pallas_gpu
  if platform_name == 'tpu':
    impls['jax_pallas_tpu'] = _jax_pallas_tpu
  try:
    from absl import flags  # pylint: disable=g-import-not-at-top
    flags.FLAGS.mark_as_parsed()  # tokamax reads absl flags; this script's own flags are argparse's.
    import tokamax  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    names = {'gpu': ('triton', 'mosaic', 'cudnn'), 'tpu': ('mosaic',), 'cpu': ('xla_chunked',)}[platform_name]
    impls.update({f'tokamax_{n}': _tokamax(n) for n in names})
  except ImportError:
    pass
  return impls


def attention_flops(batch, q_len, kv_len, heads, head_dim, causal) -> float:
  """Forward matmul FLOPs: 2 matmuls x 2 flops/MAC x the attended (q, k) pairs x head_dim, per batch and head."""
  pairs = sum(min(i + 1, kv_len) for i in range(q_len)) if causal else q_len * kv_len
  return 4.0 * batch * heads * pairs * head_dim


def _inputs(batch, length, heads, head_dim, dtype, seed=0):
  rng = np.random.default_rng(seed)
  shape = (batch, length, heads, head_dim)
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4))  # q, k, v, cotangent


def _fwd_bwd(fn, causal):
  """jitted (q, k, v, cot) -> (dq, dk, dv) through fn's VJP."""
  def run(q, k, v, cot):
    _, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, causal), q, k, v)
    return vjp(cot)
  return jax.jit(run)


def check(fn, length, heads, head_dim, causal, dtype) -> dict:
  """Max abs errors of output and gradients vs `reference_attention` in float32, on a batch-2 input."""
  q, k, v, cot = _inputs(2, length, heads, head_dim, dtype, seed=1)
  out = jax.jit(lambda q, k, v: fn(q, k, v, causal))(q, k, v)
  grads = _fwd_bwd(fn, causal)(q, k, v, cot)
  f32 = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v: attention.reference_attention(q, k, v, causal=causal)
  want, ref_vjp = jax.vjp(ref, f32(q), f32(k), f32(v))
  want_grads = ref_vjp(f32(cot))
  # numpy, not jnp: XLA's CPU max reduction drops NaNs (JAX's own mha backward gives NaN at ragged lengths).
  err = lambda a, b: float(np.max(np.abs(np.asarray(f32(a)) - np.asarray(b))))
  return {'out_err': err(out, want), 'grad_err': float(np.max([err(g, w) for g, w in zip(grads, want_grads)]))}


def _median_time(fn, args, warmup, steps) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(fn, batch, length, heads, head_dim, causal, dtype, warmup, steps) -> dict:
  """Median seconds and TFLOP/s of the forward and of forward+backward."""
  q, k, v, cot = _inputs(batch, length, heads, head_dim, dtype)
  flops = attention_flops(batch, length, length, heads, head_dim, causal)
  fwd = jax.jit(lambda q, k, v: fn(q, k, v, causal))
  t_fwd = _median_time(fwd, (q, k, v), warmup, steps)
  t_bwd = _median_time(_fwd_bwd(fn, causal), (q, k, v, cot), warmup, steps)
  return {'fwd_s': t_fwd, 'fwd_tflops': flops / t_fwd / 1e12,
          'fwd_bwd_s': t_bwd, 'fwd_bwd_tflops': 3.5 * flops / t_bwd / 1e12}


def add_ratios(rows: list[dict]) -> None:
  """Adds 'fwd_vs_best' / 'fwd_bwd_vs_best': best other implementation's time / this one's (same shape, dtype)."""
  for mode in ('fwd', 'fwd_bwd'):
    for row in rows:
      if f'{mode}_s' not in row:
        continue
      others = [r[f'{mode}_s'] for r in rows if r is not row and f'{mode}_s' in r
                and (r['shape'], r['dtype']) == (row['shape'], row['dtype'])]
      row[f'{mode}_vs_best'] = min(others) / row[f'{mode}_s'] if others else None


def format_table(rows: list[dict]) -> str:
  """A fixed-width text table of the rows (errors, ms, TFLOP/s, ratio to the best other implementation)."""
  head = (f'{"shape":20} {"dtype":8} {"impl":20} {"out err":>8} {"grad err":>8} {"ok":>4} '
          f'{"fwd ms":>9} {"TFLOP/s":>8} {"vs best":>7} {"f+b ms":>9} {"TFLOP/s":>8} {"vs best":>7}')
  lines = [head, '-' * len(head)]
  num = lambda x, f: format(x, f) if isinstance(x, (int, float)) else '-'
  for r in rows:
    if 'error' in r:
      lines.append(f'{r["shape"]:20} {r["dtype"]:8} {r["impl"]:20} not run: {r["error"][:70]}')
      continue
    lines.append(
        f'{r["shape"]:20} {r["dtype"]:8} {r["impl"]:20} {num(r.get("out_err"), ".1e"):>8} '
        f'{num(r.get("grad_err"), ".1e"):>8} {"yes" if r.get("ok") else "NO":>4} '
        f'{num(r.get("fwd_s", 0) * 1e3, "9.3f"):>9} {num(r.get("fwd_tflops"), "8.2f"):>8} '
        f'{num(r.get("fwd_vs_best"), "7.2f"):>7} {num(r.get("fwd_bwd_s", 0) * 1e3, "9.3f"):>9} '
        f'{num(r.get("fwd_bwd_tflops"), "8.2f"):>8} {num(r.get("fwd_bwd_vs_best"), "7.2f"):>7}')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny shapes (CPU; kernels run interpreted)')
  parser.add_argument('--impls', default='', help='comma-separated subset of the implementations')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--warmup', type=int, default=None)
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--out', default=None, help='JSON results file (default benchmarks/results/attention_*.json)')
  args = parser.parse_args(argv)

  backend = jax.default_backend()
  impls = implementations(backend)
  if args.impls:
    wanted = args.impls.split(',')
    unknown = [w for w in wanted if w not in impls]
    if unknown:
      raise SystemExit(f'--impls: unknown or unavailable on {backend}: {unknown}; available: {sorted(impls)}')
    impls = {w: impls[w] for w in wanted}
  shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
  tokens = QUICK_TOKENS if args.quick else TOKENS_PER_CALL
  warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
  steps = args.steps if args.steps is not None else (3 if args.quick else 20)
  device = jax.devices()[0]
  print(f'backend {backend}, device {device.device_kind}, jax {jax.__version__}, implementations: {sorted(impls)}',
        flush=True)

  rows = []
  for name, length, heads, head_dim, causal in shapes:
    batch = max(1, tokens // length)
    for dtype_name in args.dtypes.split(','):
      dtype = jnp.dtype(dtype_name)
      for impl, fn in impls.items():
        row = {'shape': name, 'batch': batch, 'length': length, 'heads': heads, 'head_dim': head_dim,
               'causal': causal, 'dtype': dtype_name, 'impl': impl}
        try:
          row.update(check(fn, length, heads, head_dim, causal, dtype))
          errs = np.array([row['out_err'], row['grad_err']])
          row['ok'] = bool(np.all(np.isfinite(errs)) and np.all(errs < TOL[dtype_name]))
          row.update(measure(fn, batch, length, heads, head_dim, causal, dtype, warmup, steps))
        except Exception as e:  # pylint: disable=broad-except
          row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        rows.append(row)
        print(f'  {name} {dtype_name} {impl}: ' + (row.get('error') or
              f'err {row["out_err"]:.1e}/{row["grad_err"]:.1e}, fwd {row["fwd_s"] * 1e3:.3f} ms, '
              f'fwd+bwd {row["fwd_bwd_s"] * 1e3:.3f} ms'), flush=True)
  add_ratios(rows)
  print(format_table(rows))

  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                 f'attention_{backend}{"_quick" if args.quick else ""}.json')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  record = {'backend': backend, 'device_kind': device.device_kind, 'jax': jax.__version__,
            'python': platform.python_version(), 'quick': args.quick, 'warmup': warmup, 'steps': steps,
            'rows': rows}
  with open(out, 'w') as f:
    json.dump(record, f, indent=2)
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
