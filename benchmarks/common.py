"""Shared helpers of the benchmark scripts: the real jmm training step, timing, peaks, results files.

Nothing here is imported by the library or the test suite's library tests; the scripts in this folder import it
as `benchmarks.common` (run them from the repository root: `python benchmarks/train_step.py ...`).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from jmm import hostmem  # noqa: E402

# What `python -m jmm.main` does first (config.host_malloc='auto'): keep XLA:CPU's per-step temporaries in the
# heap instead of a fresh mmap each step (jmm/hostmem.py). JMM_HOST_MALLOC=default measures without it.
HOST_MALLOC_TUNED = hostmem.tune_malloc(os.environ.get('JMM_HOST_MALLOC', 'auto'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Peak dense matmul throughput per chip, FLOP/s, by compute dtype. Sources: Google Cloud TPU system architecture
# pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e: bf16 peak per chip); NVIDIA A100 and H100 / H200
# datasheets (SXM parts, dense, i.e. without the 2:4 sparsity factor). float32 on NVIDIA is the TF32 tensor-core
# peak (JAX's default matmul precision uses TF32 on these GPUs); on TPU the default float32 matmul runs one
# bf16 pass, so its peak is the bf16 one.
DEVICE_PEAKS = {
    'TPU v4': {'bfloat16': 275e12, 'float32': 275e12},
    'TPU v5 lite': {'bfloat16': 197e12, 'float32': 197e12},   # v5e
    'TPU v5': {'bfloat16': 459e12, 'float32': 459e12},        # v5p
    'TPU v5p': {'bfloat16': 459e12, 'float32': 459e12},
    'TPU v6 lite': {'bfloat16': 918e12, 'float32': 918e12},   # v6e (Trillium)
    'NVIDIA A100': {'bfloat16': 312e12, 'float32': 156e12},
    'NVIDIA H100': {'bfloat16': 989e12, 'float32': 494.5e12},
    'NVIDIA H200': {'bfloat16': 989e12, 'float32': 494.5e12},
}


def device_peak(device, dtype: str) -> tuple[float | None, str]:
  """(peak FLOP/s, table key) for `device` from DEVICE_PEAKS by the longest matching device_kind prefix.

  Returns (None, '') for devices not in the table (CPUs: the benchmark measures a matmul peak instead).
  """
  kind = getattr(device, 'device_kind', '')
  best = ''
  for key in DEVICE_PEAKS:
    if kind.startswith(key) and len(key) > len(best):
      best = key
  if not best:
    return None, ''
  return DEVICE_PEAKS[best].get(dtype, DEVICE_PEAKS[best]['bfloat16']), best


def measure_matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
  """Best FLOP/s of an [n, n] @ [n, n] matmul on the default device: the CPU's achievable peak, same run."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  b = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), dtype)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def time_calls(fn: Callable[[], object], warmup: int, steps: int) -> list[float]:
  """Runs `fn` (which must block until its work is done) `warmup` times untimed, then returns `steps` timings."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def summarize(times: list[float]) -> dict:
  """Median, min, max and the relative spread (max - min) / median of a list of step times in seconds."""
  med = statistics.median(times)
  return {'median_s': med, 'min_s': min(times), 'max_s': max(times),
          'spread': (max(times) - min(times)) / med if med else 0.0, 'n': len(times), 'all_s': list(times)}


def load_average() -> list[float] | None:
  """The 1, 5 and 15 minute load averages (`uptime`), or None where the OS has none."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def machine_info() -> dict:
  """What the numbers were measured on: device kind and count, CPU model and core count, versions."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  dev = jax.devices()[0]
  return {'platform': dev.platform, 'device_kind': dev.device_kind, 'device_count': jax.device_count(),
          'cpu': cpu, 'cpu_count': os.cpu_count(), 'jax': jax.__version__, 'python': platform.python_version(),
          'git': git_revision(), 'load_average': load_average(), 'host_malloc_tuned': HOST_MALLOC_TUNED}


def git_revision() -> str:
  """The repository's short commit hash (with '+dirty' for uncommitted changes), or '' outside git."""
  try:
    rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                         timeout=10).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return rev + ('+dirty' if dirty and rev else '')
  except (OSError, subprocess.SubprocessError):
    return ''


def compiled_memory(compiled) -> dict:
  """Compiled peak memory in bytes (XLA's buffer assignment): the reported peak, else arguments+outputs+temps.

  Some backends under-report peak_memory_in_bytes (the CPU one gives less than the temporaries alone), so the
  larger of it and the sum (aliased, i.e. donated, buffers counted once) is reported.
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  out = {k: int(getattr(m, k, 0) or 0) for k in (
      'argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes', 'temp_size_in_bytes',
      'peak_memory_in_bytes')}
  fallback = (out['argument_size_in_bytes'] + out['output_size_in_bytes'] - out['alias_size_in_bytes']
              + out['temp_size_in_bytes'])
  out['peak_bytes'] = max(out['peak_memory_in_bytes'], fallback)
  return out


def load_config(spec: str):
  """`configs/NAME.py[:args]` -> the ConfigDict its get_config(args) returns (the syntax of --config)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path) and os.path.isfile(os.path.join(ROOT, path)):
    path = os.path.join(ROOT, path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config: no config file {path!r}')
  module_spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _needs_text_neg(config) -> bool:
  """Whether an objective of `config` reads hard-negative captions (the default tiny recipe's hard_negatives)."""
  from jmm import objectives  # pylint: disable=g-import-not-at-top
  return 'text_neg' in objectives.batch_fields(objectives.load(config))


def synthetic_batch(config, batch_size: int, vocab_size: int, seed: int = 0) -> dict:
  """A random batch shaped like the pipeline's: images float32 [B, res, res, 3], tokens int32 [B, text_len]
  (and 'text_neg' like 'text' when an objective reads hard-negative captions)."""
  rng = np.random.default_rng(seed)
  res, text_len = config.data.resolution, config.data.text_len
  batch = {'image': jnp.asarray(rng.uniform(-1, 1, size=(batch_size, res, res, 3)), jnp.float32),
           'text': jnp.asarray(rng.integers(0, vocab_size, size=(batch_size, text_len)), jnp.int32)}
  if _needs_text_neg(config):
    batch['text_neg'] = jnp.asarray(rng.integers(0, vocab_size, size=(batch_size, text_len)), jnp.int32)
  return batch


def _state(config, tx, params):
  """A train state on the default device, shaped as `jmm.step.create_state` makes it (no mesh)."""
  from jmm import step as step_lib  # pylint: disable=g-import-not-at-top
  return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros([], jnp.int32),
          'rng': step_lib.rng_data(config.seed), 'nonfinite': jnp.zeros([3], jnp.int32)}


def build_train_step(config, vocab_size: int, batch_size: int, *, with_info: bool = False):
  """The real jmm training step of `config` (its model, optimizer, objectives), its state and a batch.

  Returns (train_step, state, batch, model). The step is jmm.step.make_train_step's jitted function with the
  XLA options training uses (`config.cpu_matmuls`: oneDNN matmuls on CPU, checked as training checks them), so
  the benchmark times exactly what training runs, minus the input pipeline. with_info: a fifth element,
  {'matmuls': 'onednn' or 'xla', 'check_compile_s': seconds spent compiling here (the oneDNN check compiles the
  step once; a later `.lower(...).compile()` of the same step is then a cache hit)}.
  """
  from jmm import cpu_matmuls  # pylint: disable=g-import-not-at-top
  from jmm import objectives  # pylint: disable=g-import-not-at-top
  from jmm import optim  # pylint: disable=g-import-not-at-top
  from jmm import step as step_lib  # pylint: disable=g-import-not-at-top
  from jmm.data import build as data_build  # pylint: disable=g-import-not-at-top
  from jmm.models import build as model_build  # pylint: disable=g-import-not-at-top
  terms = objectives.load(config)
  model = model_build.make_model(config, vocab_size)
  params, _ = model_build.init_params(model, data_build.batch_spec(config), config.seed)
  tx, schedule = optim.make_optimizer(config.optim, params, config.total_steps,
                                      locked=model_build.locked_params(config))
  state = _state(config, tx, params)
  batch = synthetic_batch(config, batch_size, vocab_size)
  start = time.perf_counter()
  step, onednn = cpu_matmuls.checked_jit(
      lambda options: step_lib.make_train_step(model, tx, schedule, terms, compiler_options=options),
      cpu_matmuls.compiler_options(config.get('cpu_matmuls', 'auto')), state, batch)
  info = {'matmuls': 'onednn' if onednn else 'xla', 'check_compile_s': time.perf_counter() - start}
  return (step, state, batch, model, info) if with_info else (step, state, batch, model)


def lower_train_step(config, vocab_size: int, batch_size: int):
  """The real training step of `config` lowered on abstract state and batch (shapes only, no parameters built).

  Cheap even for big models (tracing only), so XLA's cost analysis of the step (`.cost_analysis()` on the
  result, or on `.compile()` of it) can be checked against jmm.flops without initialising anything.
  """
  from jmm import objectives  # pylint: disable=g-import-not-at-top
  from jmm import optim  # pylint: disable=g-import-not-at-top
  from jmm import step as step_lib  # pylint: disable=g-import-not-at-top
  from jmm.data import build as data_build  # pylint: disable=g-import-not-at-top
  from jmm.models import build as model_build  # pylint: disable=g-import-not-at-top
  model = model_build.make_model(config, vocab_size)
  spec = data_build.batch_spec(config, batch_size)
  params, _ = model_build.abstract_params(model, spec)
  if _needs_text_neg(config):
    spec['text_neg'] = spec['text']
  tx, schedule = optim.make_optimizer(config.optim, params, config.total_steps,
                                      locked=model_build.locked_params(config))
  state = jax.eval_shape(lambda p: _state(config, tx, p), params)
  step = step_lib.make_train_step(model, tx, schedule, objectives.load(config))
  return step.lower(state, spec)


def append_result(path: str, record: dict) -> None:
  """Appends `record` as one JSON line to the results file `path` (created with its folder if missing)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'a') as f:
    f.write(json.dumps(record, sort_keys=True) + '\n')


def write_json(path: str, record: dict) -> None:
  """Writes `record` to `path` as indented JSON, atomically (tmp file + rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
