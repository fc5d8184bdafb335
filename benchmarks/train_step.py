"""Times jmm's real training step for a config on synthetic batches (no input pipeline).

  python benchmarks/train_step.py --config=configs/siglip.py:img=B/16,txt=B,res=224,batch=32 \
      [--steps=5 --warmup=2 --vocab_size=32000 --remat_policy=dots --scan --config.dtype=bfloat16]

Prints and writes (JSON to --out, one line appended to --results): step time (median and spread), images/s,
model FLOPs per step (analytic, jmm.flops) and XLA's cost-analysis FLOPs of the compiled step, achieved FLOP/s,
MFU against the device's peak (DEVICE_PEAKS in benchmarks/common.py; on CPU against a matmul peak measured in
the same run), and the compiled step's peak memory. `benchmarks/plot_results.py` charts the results file.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import common  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file with an optional :argument.',
                                          lock_config=False)
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_BATCH = flags.DEFINE_integer('batch', None, 'Batch size (default: config.batch_size).')
_VOCAB = flags.DEFINE_integer('vocab_size', None, 'Text vocabulary (default: config.tokenizer.vocab_size).')
_TEXT_LEN = flags.DEFINE_integer('text_len', None, 'Text tokens per example (default: config.data.text_len).')
_REMAT = flags.DEFINE_string('remat_policy', None, 'Both towers\' remat_policy (none, full, dots, dots_no_batch).')
_SCAN = flags.DEFINE_bool('scan', None, 'Both towers: nn.scan over layers.')
_PEAK_N = flags.DEFINE_integer('peak_matmul_size', 2048, 'CPU only: n of the n x n matmul that measures the peak.')
_LABEL = flags.DEFINE_string('label', '', 'A name for this run in the results file and chart.')
_OUT = flags.DEFINE_string('out', os.path.join(common.ROOT, 'benchmarks', 'results', 'train_step_latest.json'),
                           'JSON file for this run.')
_RESULTS = flags.DEFINE_string('results', os.path.join(common.ROOT, 'benchmarks', 'results', 'train_step.jsonl'),
                               'Results file: one JSON line appended per run ("" = none).')


def apply_overrides(config, batch=None, text_len=None, remat_policy=None, scan=None):
  """The command-line shortcuts: batch, text length, and remat / scan on both towers."""
  if batch:
    config.batch_size = batch
  if text_len:
    config.data.text_len = text_len
  for tower in (config.model.image, config.model.text):
    if remat_policy is not None:
      tower['remat_policy'] = remat_policy
    if scan is not None:
      tower['scan'] = scan
  return config


def benchmark(config, *, steps: int, warmup: int, vocab_size: int, label: str = '', peak_matmul_size: int = 2048
              ) -> dict:
  """Compiles and times `config`'s training step; returns the result record (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jmm import flops as flops_lib  # pylint: disable=g-import-not-at-top
  batch_size = config.batch_size
  step, state, batch, _, info = common.build_train_step(config, vocab_size, batch_size, with_info=True)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start + info['check_compile_s']
  holder = {'state': state}

  def run_once():
    holder['state'], metrics = compiled(holder['state'], batch)
    jax.block_until_ready(metrics)

  times = common.time_calls(run_once, warmup, steps)
  timing = common.summarize(times)
  analytic = flops_lib.model_flops(config, batch_size)
  xla = flops_lib.xla_flops(compiled)
  dtype = config.get('dtype', 'float32')
  device = jax.devices()[0]
  peak, peak_source = common.device_peak(device, dtype)
  if peak is None:  # CPU (or an unknown chip): the best matmul FLOP/s measured now, on the same machine.
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    peak = common.measure_matmul_peak(jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32, peak_matmul_size)
    peak_source = f'measured matmul {peak_matmul_size}^3 (same run)'
  achieved = analytic['train_step'] / timing['median_s']
  m = config.model
  return {
      'label': label, 'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
      'machine': common.machine_info(),
      'config': {'image': m.image.to_dict(), 'text': m.text.to_dict(), 'out_dim': m.out_dim,
                 'resolution': config.data.resolution, 'text_len': config.data.text_len, 'dtype': dtype,
                 'batch_size': batch_size, 'vocab_size': vocab_size, 'loss': ','.join(sorted(config.objectives)),
                 'attention_impl': config.get('attention_impl', 'xla'), 'optim': config.optim.name},
      'compile_s': compile_s, 'matmuls': info['matmuls'], 'step': timing,
      'images_per_s': batch_size / timing['median_s'],
      'flops': {'analytic_train_step': analytic['train_step'], 'analytic_forward': analytic['forward'],
                'xla_train_step': xla, 'xla_over_analytic': xla / analytic['train_step'] if xla else None,
                'image_forward': analytic['image_forward'], 'text_forward': analytic['text_forward'],
                'loss_forward': analytic['loss_forward']},
      'achieved_flops_per_s': achieved, 'peak_flops_per_s': peak, 'peak_source': peak_source,
      'mfu': achieved / peak, 'memory': common.compiled_memory(compiled),
  }


def format_record(r: dict) -> str:
  """A short human-readable summary of one result record."""
  s, f, mem = r['step'], r['flops'], r['memory']
  ratio = f'{f["xla_over_analytic"]:.3f}' if f['xla_over_analytic'] else 'n/a'
  if any(r['config'][t].get('scan') for t in ('image', 'text')):
    ratio += ' (scan: XLA counts the scanned layer body once, not once per layer)'
  if r['machine'].get('platform') == 'gpu':
    # Seen on an H200 (jax 0.11.2): 0.004 at B/16, since XLA:GPU's cost analysis leaves out its library calls.
    ratio += ' (GPU: the GEMMs and attention are cuBLAS / cuDNN / Triton custom calls, which XLA does not count)'
  return '\n'.join([
      f'{r["label"] or "train_step"} on {r["machine"]["device_kind"]} (load {r["machine"]["load_average"]})',
      f'  step {s["median_s"] * 1e3:.1f} ms median (min {s["min_s"] * 1e3:.1f}, max {s["max_s"] * 1e3:.1f}, '
      f'spread {100 * s["spread"]:.0f}%, n={s["n"]}), compile {r["compile_s"]:.1f} s',
      f'  {r["images_per_s"]:.1f} images/s; model FLOPs/step {f["analytic_train_step"] / 1e9:.1f} G analytic, '
      f'XLA/analytic {ratio}',
      f'  {r["achieved_flops_per_s"] / 1e9:.1f} GFLOP/s achieved; peak {r["peak_flops_per_s"] / 1e9:.1f} GFLOP/s '
      f'({r["peak_source"]}); MFU {100 * r["mfu"]:.1f}%',
      f'  compiled peak memory {mem.get("peak_bytes", 0) / 2**20:.0f} MiB '
      f'(temporaries {mem.get("temp_size_in_bytes", 0) / 2**20:.0f} MiB)',
  ])


def main(argv) -> None:
  del argv
  config = apply_overrides(_CONFIG.value, _BATCH.value, _TEXT_LEN.value, _REMAT.value, _SCAN.value)
  vocab = _VOCAB.value or config.tokenizer.vocab_size
  record = benchmark(config, steps=_STEPS.value, warmup=_WARMUP.value, vocab_size=vocab, label=_LABEL.value,
                     peak_matmul_size=_PEAK_N.value)
  print(format_record(record), flush=True)
  if _OUT.value:
    common.write_json(_OUT.value, record)
  if _RESULTS.value:
    common.append_result(_RESULTS.value, record)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
