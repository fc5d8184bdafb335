"""Per-device memory of the contrastive losses across devices: dense vs ring vs bidir vs gather.

  python benchmarks/loss_memory.py [--devices=1,2,4,8] [--per_device=256,1024] [--dim=768]
                                   [--out=benchmarks/results/loss_memory.json]

For each device count n and per-device batch b (global batch B = n * b), compiles `jax.value_and_grad` of the
loss w.r.t. zimg, ztxt [B, dim] (split over the mesh's 'data' axis, as in the train step), t and b, and reads
the compiled program's `memory_analysis()`: XLA's buffer assignment for one device. Tabled: temporaries, and
total = temporaries + arguments + outputs. (`peak_memory_in_bytes` goes to the JSON too, but on the CPU backend
it is arguments + outputs only.) Nothing is executed, so the dense loss at B = 8192 costs no memory here.
Runs on CPU with n simulated devices (sub-meshes of --xla_force_host_platform_device_count); the numbers are
XLA's CPU buffer assignment, which follows the same shapes an accelerator would hold. With one device the
sharded forms are the dense loss (their fallback), so the first column is the same for all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jmm.objectives import contrastive  # noqa: E402

IMPLS = (('sigmoid', 'dense'), ('sigmoid', 'ring'), ('sigmoid', 'bidir'), ('sigmoid', 'gather'),
         ('softmax', 'dense'), ('softmax', 'gather'))


def measure(name: str, impl: str, devices: int, per_device: int, dim: int) -> dict:
  """Compiled per-device memory (bytes) of value_and_grad of one loss on a (devices, 1, 1) mesh."""
  mesh = jax.make_mesh((devices, 1, 1), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:devices])
  batch = devices * per_device
  split = NamedSharding(mesh, P(('data', 'fsdp')))
  replicated = NamedSharding(mesh, P())
  args = (jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=split),
          jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=split),
          jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
          jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated))

  def loss(zimg, ztxt, t, b):
    return contrastive.sharded_loss(zimg, ztxt, t, b, name, impl)[0]

  with jax.set_mesh(mesh):
    # Gradients leave sharded like the embeddings came in, so every impl has the same argument and output bytes.
    out_shardings = (replicated, (split, split, replicated, replicated))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), out_shardings=out_shardings).lower(
        *args).compile()
  stats = compiled.memory_analysis()
  return {'loss': name, 'impl': impl, 'devices': devices, 'per_device_batch': per_device, 'global_batch': batch,
          'dim': dim, 'temp_bytes': int(stats.temp_size_in_bytes), 'peak_bytes': int(stats.peak_memory_in_bytes),
          'argument_bytes': int(stats.argument_size_in_bytes), 'output_bytes': int(stats.output_size_in_bytes)}


def table(rows: list[dict], devices: list[int], key: str) -> str:
  """Markdown table: one line per (per-device batch, loss, impl), one column per device count, MiB."""
  head = '| b | loss | impl | ' + ' | '.join(f'{n} dev' for n in devices) + ' |'
  lines = [head, '|' + '---|' * (3 + len(devices))]
  groups: dict = {}
  for r in rows:
    groups.setdefault((r['per_device_batch'], r['loss'], r['impl']), {})[r['devices']] = r[key]
  for (b, name, impl), by_n in groups.items():
    cells = ' | '.join(f'{by_n[n] / 2**20:.1f}' if n in by_n else '-' for n in devices)
    lines.append(f'| {b} | {name} | {impl} | {cells} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', default='1,2,4,8')
  parser.add_argument('--per_device', default='256,1024')
  parser.add_argument('--dim', type=int, default=768)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                                    'loss_memory.json'))
  args = parser.parse_args()
  devices = [int(n) for n in args.devices.split(',')]
  if max(devices) > jax.device_count():
    raise SystemExit(f'--devices asks for {max(devices)} devices; this process has {jax.device_count()}')
  rows = []
  for per_device in (int(b) for b in args.per_device.split(',')):
    for name, impl in IMPLS:
      for n in devices:
        rows.append(measure(name, impl, n, per_device, args.dim))
        print(json.dumps(rows[-1]), flush=True)
  for r in rows:
    r['total_bytes'] = r['temp_bytes'] + r['argument_bytes'] + r['output_bytes']
  for key, what in (('temp_bytes', 'temporaries'), ('total_bytes', 'temporaries + arguments + outputs')):
    print(f'\nPer-device memory of value_and_grad, {what} (MiB), dim {args.dim}:')
    print(table(rows, devices, key))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'rows': rows, 'backend': jax.default_backend(), 'jax': jax.__version__,
               'machine': platform.machine(), 'note': 'compiled memory_analysis() per device; nothing executed'},
              f, indent=1)
  print(f'\nwrote {args.out}')


if __name__ == '__main__':
  main()
