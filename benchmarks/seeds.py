"""The default recipe over several seeds: zero-shot and retrieval on the held-out split, one run after another.

  python benchmarks/seeds.py --workdir_root=/tmp/seeds --out=benchmarks/results/seeds.json
  python benchmarks/seeds.py --seeds=0:0,1:3 --config.total_steps=1000   # extra --config.x=y pass through

Each seed pair S:D runs `python -m jmm.main --config=configs/siglip.py --workdir=ROOT/sS_dD --config.seed=S
--config.data.seed=D` plus the passthrough overrides (config.seed: model init; config.data.seed: the training
data stream; the held-out split is the same for all), then reads ROOT/sS_dD/final_metrics.json. Prints a
markdown table with the median and minimum of each column and writes the rows to --out as JSON. Runs are
sequential: two trainings at once on a small CPU would slow each other and skew the wall times. A workdir that
already holds a final_metrics.json is reused, not retrained (--rerun to train again from scratch).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (column header, final_metrics.json key, scale): accuracies and recalls in percent.
COLUMNS = (
    ('zero-shot top-1', 'zeroshot/top1', 100.0),
    ('seen', 'zeroshot/top1_seen', 100.0),
    ('unseen', 'zeroshot/top1_unseen', 100.0),
    ('i2t R@1', 'retrieval/i2t_r1', 100.0),
    ('t2i R@1', 'retrieval/t2i_r1', 100.0),
    ('train min', 'train_seconds', 1 / 60),
)


def parse_seeds(text: str) -> list[tuple[int, int]]:
  """'0:0,1:3,2:2' -> [(0, 0), (1, 3), (2, 2)]: (config.seed, config.data.seed) pairs."""
  pairs = []
  for item in text.split(','):
    seed, sep, data_seed = item.strip().partition(':')
    if not sep:
      raise ValueError(f'--seeds item {item!r}: expected SEED:DATA_SEED')
    pairs.append((int(seed), int(data_seed)))
  return pairs


def run_one(args, seed: int, data_seed: int, overrides: list[str]) -> dict:
  """Trains one seed pair (unless its final_metrics.json exists) and returns its table row."""
  workdir = os.path.join(args.workdir_root, f's{seed}_d{data_seed}')
  metrics_path = os.path.join(workdir, 'final_metrics.json')
  if args.rerun and os.path.exists(workdir):
    shutil.rmtree(workdir)
  wall = None
  if not os.path.exists(metrics_path):
    cmd = [args.python, '-m', 'jmm.main', f'--config={args.config}', f'--workdir={workdir}',
           f'--config.seed={seed}', f'--config.data.seed={data_seed}', *overrides]
    print('$', ' '.join(cmd), flush=True)
    start = time.perf_counter()
    log_path = os.path.join(args.workdir_root, f's{seed}_d{data_seed}.log')
    with open(log_path, 'w') as log:
      proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
      raise SystemExit(f'seed {seed}:{data_seed} failed (exit {proc.returncode}); log: {log_path}')
  with open(metrics_path) as f:
    metrics = json.load(f)
  row = {'seed': seed, 'data_seed': data_seed, 'workdir': workdir,
         'wall_minutes': None if wall is None else wall / 60}
  for _, key, scale in COLUMNS:
    row[key] = metrics[key] * scale if key in metrics else None
  return row


def _fmt(value) -> str:
  return '-' if value is None else f'{value:.1f}'


def table(rows: list[dict]) -> tuple[str, dict]:
  """The markdown table of `rows` plus median and min rows, and the summary {column: {median, min}}."""
  keys = [key for _, key, _ in COLUMNS] + ['wall_minutes']
  headers = ['seed', 'data seed'] + [name for name, _, _ in COLUMNS] + ['wall min']
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + ' --- |' * len(headers)]
  for row in rows:
    lines.append('| ' + ' | '.join([str(row['seed']), str(row['data_seed'])] + [_fmt(row[k]) for k in keys]) + ' |')
  summary = {}
  for key in keys:
    values = [row[key] for row in rows if row[key] is not None]
    summary[key] = {'median': statistics.median(values) if values else None,
                    'min': min(values) if values else None}
  for stat in ('median', 'min'):
    lines.append('| ' + ' | '.join([f'**{stat}**', ''] + [_fmt(summary[k][stat]) for k in keys]) + ' |')
  return '\n'.join(lines), summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog='Unknown --config.x=y flags are passed through to jmm.main.')
  parser.add_argument('--workdir_root', default='/tmp/jmm_seeds', help='one workdir per seed pair under it')
  parser.add_argument('--seeds', default='0:0,1:3,2:2', help='SEED:DATA_SEED pairs, comma-separated')
  parser.add_argument('--python', default=sys.executable, help='the interpreter that runs jmm.main')
  parser.add_argument('--config', default='configs/siglip.py', help='config file (relative to the repo root)')
  parser.add_argument('--out', default='', help='write the rows and the summary here as JSON')
  parser.add_argument('--rerun', action='store_true', help='delete and retrain existing workdirs')
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith('--config.')]
  if bad:
    parser.error(f'unrecognised arguments (only --config.x=y passes through): {" ".join(bad)}')
  os.makedirs(args.workdir_root, exist_ok=True)
  rows = [run_one(args, seed, data_seed, overrides) for seed, data_seed in parse_seeds(args.seeds)]
  text, summary = table(rows)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump({'config': args.config, 'overrides': overrides, 'rows': rows, 'summary': summary}, f, indent=2)
      f.write('\n')


if __name__ == '__main__':
  main()
