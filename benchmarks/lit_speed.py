"""Step time with and without a locked image tower (LiT, Zhai et al. 2022): what `config.model.locked` saves.

  python benchmarks/lit_speed.py                       # the default recipe's sizes (configs/siglip.py)
  python benchmarks/lit_speed.py --args=';img=S/16,txt=S,res=112,batch=32'   # and a bigger tower (';' separates)
  python benchmarks/lit_speed.py --quick               # tiny sizes: a smoke run

For each size both steps (free: every parameter trained; locked: `config.model.locked=image`) are jmm's real
training step (benchmarks/common.build_train_step: the model, AdamW, objectives and XLA options training uses) on
synthetic batches, compiled first, then timed in interleaved rounds, free, locked, free, locked, ..., so machine
noise hits both alike. Reported per size: median step time and spread of each, the locked / free ratio of medians
and the median of per-round ratios, XLA's FLOPs of both compiled steps and jmm.flops' analytic ratio, and the
optimizer state's bytes. The locked tower's parameters are random here (`locked_random_ok`): only time is measured.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

QUICK_TOWER = dict(width=32, depth=1, mlp_dim=64, num_heads=2)


def make_config(arg: str, locked: str, quick: bool):
  """configs/siglip.py:`arg` with `locked` towers (random: no init_from needed for a timing)."""
  config = common.load_config(f'configs/siglip.py:{arg}' if arg else 'configs/siglip.py')
  if quick:
    config.model.image.update(QUICK_TOWER, patch_size=(8, 8))
    config.model.text.update(QUICK_TOWER)
    config.model.out_dim = 16
    config.data.resolution, config.batch_size = 16, 8
  config.model.locked = locked
  config.model.locked_random_ok = True
  return config


def measure(arg: str, *, rounds: int, steps: int, warmup: int, quick: bool) -> dict:
  """Compiles both steps for one size, then times `rounds` interleaved rounds of `steps` steps each."""
  import jax  # pylint: disable=g-import-not-at-top
  from jmm import flops as flops_lib  # pylint: disable=g-import-not-at-top
  sides = {}
  for name, locked in (('free', ''), ('locked', 'image')):
    config = make_config(arg, locked, quick)
    step, state, batch, _, info = common.build_train_step(config, config.tokenizer.vocab_size, config.batch_size,
                                                          with_info=True)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    sides[name] = dict(config=config, compiled=compiled, holder={'state': state}, batch=batch, times=[],
                       compile_s=time.perf_counter() - start + info['check_compile_s'], matmuls=info['matmuls'],
                       opt_bytes=sum(x.nbytes for x in jax.tree.leaves(state['opt_state'])),
                       xla_flops=flops_lib.xla_flops(compiled),
                       analytic_flops=flops_lib.model_flops(config)['train_step'])

  def runner(side):
    def run_once():
      side['holder']['state'], metrics = side['compiled'](side['holder']['state'], side['batch'])
      jax.block_until_ready(metrics)
    return run_once

  round_ratios = []
  for _ in range(rounds):  # A B A B: each round times both sides back to back.
    medians = {}
    for name, side in sides.items():
      times = common.time_calls(runner(side), warmup, steps)
      side['times'] += times
      medians[name] = statistics.median(times)
    round_ratios.append(medians['locked'] / medians['free'])
  free, locked = sides['free'], sides['locked']
  config = free['config']
  out = {'args': arg, 'quick': quick, 'batch_size': config.batch_size, 'resolution': config.data.resolution,
         'image': config.model.image.to_dict(), 'text': config.model.text.to_dict(),
         'locked_over_free': {'ratio_of_medians': (statistics.median(locked['times']) /
                                                   statistics.median(free['times'])),
                              'median_round_ratio': statistics.median(round_ratios), 'round_ratios': round_ratios}}
  for name, side in sides.items():
    out[name] = {'step': common.summarize(side['times']), 'compile_s': side['compile_s'], 'matmuls': side['matmuls'],
                 'opt_state_bytes': side['opt_bytes'], 'xla_flops': side['xla_flops'],
                 'analytic_flops': side['analytic_flops'], 'images_per_s': side['config'].batch_size /
                 statistics.median(side['times'])}
  out['flops_locked_over_free'] = {
      'xla': locked['xla_flops'] / free['xla_flops'] if locked['xla_flops'] and free['xla_flops'] else None,
      'analytic': locked['analytic_flops'] / free['analytic_flops']}
  return out


def format_table(results: list[dict]) -> str:
  """One line per size and side: step time (median, spread), images/s, FLOPs, optimizer state; then the ratios."""
  head = f'{"size":36} {"side":7} {"median ms":>10} {"spread":>7} {"img/s":>8} {"GFLOP":>8} {"opt MiB":>8}'
  lines = [head, '-' * len(head)]
  for r in results:
    label = ('quick (tiny towers)' if r['quick'] else r['args'] or 'default recipe')[:36]
    for name in ('free', 'locked'):
      s = r[name]
      flop = f'{s["xla_flops"] / 1e9:8.3f}' if s['xla_flops'] else f'{"n/a":>8}'
      lines.append(f'{label:36} {name:7} {s["step"]["median_s"] * 1e3:10.2f} {100 * s["step"]["spread"]:6.0f}% '
                   f'{s["images_per_s"]:8.1f} {flop} {s["opt_state_bytes"] / 2**20:8.2f}')
    ratio, fl = r['locked_over_free'], r['flops_locked_over_free']
    xla = f'{fl["xla"]:.3f}' if fl['xla'] else 'n/a'
    lines.append(f'{"":36} locked / free: time {ratio["ratio_of_medians"]:.3f} (median of rounds '
                 f'{ratio["median_round_ratio"]:.3f}, n={len(ratio["round_ratios"])}); FLOPs XLA {xla}, '
                 f'analytic {fl["analytic"]:.3f}')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--args', default='', help="';'-separated configs/siglip.py argument strings ('' = default)")
  parser.add_argument('--quick', action='store_true', help='tiny towers, batch 8, res 16: a smoke run')
  parser.add_argument('--rounds', type=int, default=None, help='interleaved rounds (default 6; quick 2)')
  parser.add_argument('--steps', type=int, default=None, help='timed steps per side and round (default 10; quick 2)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps per side and round')
  parser.add_argument('--out', default=None, help='JSON file (default benchmarks/results/lit_speed[_quick].json)')
  args = parser.parse_args(argv)
  rounds = args.rounds or (2 if args.quick else 6)
  steps = args.steps or (2 if args.quick else 10)
  results = []
  for arg in args.args.split(';'):
    print(f'size {arg or "default recipe"}: compiling both steps ...', flush=True)
    results.append(measure(arg.strip(), rounds=rounds, steps=steps, warmup=args.warmup, quick=args.quick))
  print(format_table(results), flush=True)
  out = args.out or os.path.join(common.ROOT, 'benchmarks', 'results',
                                 f'lit_speed{"_quick" if args.quick else ""}.json')
  common.write_json(out, {'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
                          'machine': common.machine_info(), 'quick': args.quick, 'rounds': rounds, 'steps': steps,
                          'warmup': args.warmup, 'results': results})
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
