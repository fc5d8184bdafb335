"""jmm.hostmem: glibc allocator settings that stop XLA:CPU from page-faulting its temporaries in every step."""
import os
import subprocess
import sys
import textwrap

import pytest

from jmm import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted function whose temporaries (two 64 MB intermediates, ~4 GFLOP) XLA allocates per call, as a step's.
_PROBE = textwrap.dedent('''
    import resource, sys
    from jmm import hostmem
    tuned = hostmem.tune_malloc(sys.argv[1])
    import jax, jax.numpy as jnp
    def f(x, y):
      a = jnp.tanh(x @ y) @ y.T  # [4096, 4096] intermediates, [4096, 64] results
      b = jnp.exp(-(x @ (2 * y))) @ y.T
      return (a * b).sum()
    x = jnp.ones((4096, 64), jnp.float32) * 0.01
    y = jnp.ones((64, 4096), jnp.float32) * 0.01
    f = jax.jit(f).lower(x, y).compile()
    for _ in range(3):
      f(x, y).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
      f(x, y).block_until_ready()
    print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
''')


def _page_faults(mode: str) -> tuple[bool, int]:
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES' and not k.startswith('MALLOC_')}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-c', _PROBE, mode], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  tuned, faults = out.stdout.split()[-2:]
  return tuned == 'True', int(faults)


@pytest.mark.skipif(not hostmem._is_glibc(), reason='glibc-only setting')
def test_tuned_allocator_stops_per_call_page_faults():
  """Untuned, every call maps its temporaries afresh (tens of thousands of minor faults over 3 calls); tuned,
  the heap keeps them and steady-state calls fault (almost) never."""
  tuned, faults_tuned = _page_faults('tuned')
  untuned, faults_default = _page_faults('default')
  assert tuned and not untuned
  assert faults_default > 20_000, faults_default
  assert faults_tuned < faults_default / 20, (faults_tuned, faults_default)


def test_modes_and_errors(monkeypatch):
  with pytest.raises(ValueError, match='host_malloc'):
    hostmem.tune_malloc('fast')
  monkeypatch.setattr(hostmem, '_applied', False)
  assert hostmem.tune_malloc('default') is False
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert hostmem.accelerator_visible()
  assert hostmem.tune_malloc('auto') is False  # Not on an accelerator host.
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert not hostmem.accelerator_visible()
