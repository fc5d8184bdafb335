"""Times the training step of two commits A B A B ... in one run on the same machine (benchmarks/train_step.py).

  python benchmarks/ab_commits.py --a=35c50ad --b=HEAD --turns=3 -- \
      --config=configs/siglip.py:img=S/16,txt=S,res=224,batch=16 --steps=5 --warmup=2

Each commit is checked out once into a temporary git worktree; each turn runs `benchmarks/train_step.py` of that
commit in a fresh process (its own compile), alternating A and B so that drift of a shared machine hits both.
Prints every turn's median step time, each commit's median over turns with its min-max spread, and B / A; writes
the records as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
  """`lscpu`'s model name (the machine every CPU figure must name), or the platform string."""
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    return next(line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Model name'))
  except (OSError, subprocess.CalledProcessError, StopIteration):
    return platform.processor() or platform.machine()


def worktree(rev: str, folder: str) -> str:
  path = os.path.join(folder, rev.replace('/', '_'))
  subprocess.run(['git', 'worktree', 'add', '--detach', path, rev], cwd=ROOT, check=True, capture_output=True)
  return path


def one_turn(tree: str, args, out: str) -> dict:
  cmd = [sys.executable, os.path.join(tree, 'benchmarks', 'train_step.py'), *args, f'--out={out}', '--results=']
  proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}')
  with open(out) as f:
    return json.load(f)


def step_seconds(record: dict) -> float:
  """The median step time of a train_step.py record."""
  return float(record['step']['median_s'])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--a', required=True, help='the baseline commit')
  parser.add_argument('--b', required=True, help='the commit compared with it')
  parser.add_argument('--turns', type=int, default=3, help='A B pairs')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'ab_commits_latest.json'))
  parser.add_argument('step_args', nargs='*', help='arguments for benchmarks/train_step.py (after --)')
  args = parser.parse_args(argv)
  folder = tempfile.mkdtemp(prefix='jmm-ab-')
  trees = {}
  try:
    for name, rev in (('A', args.a), ('B', args.b)):
      trees[name] = worktree(rev, folder)
    times = {'A': [], 'B': []}
    for turn in range(args.turns):
      for name in ('A', 'B'):
        record = one_turn(trees[name], args.step_args, os.path.join(folder, f'{name}{turn}.json'))
        times[name].append(step_seconds(record))
        print(f'turn {turn + 1} {name} ({getattr(args, name.lower())}): {times[name][-1]:.3f} s/step', flush=True)
  finally:
    for tree in trees.values():
      subprocess.run(['git', 'worktree', 'remove', '--force', tree], cwd=ROOT, capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f'\nmachine: {cpu_model()}, {os.cpu_count()} cores; train_step.py {" ".join(args.step_args)}')
  print('| commit | median s/step | min | max |\n|---|---|---|---|')
  for name in ('A', 'B'):
    print(f'| {name} {getattr(args, name.lower())} | {med[name]:.3f} | {min(times[name]):.3f} | '
          f'{max(times[name]):.3f} |')
  print(f'B / A: {med["B"] / med["A"]:.3f} (per turn: '
        + ', '.join(f'{b / a:.3f}' for a, b in zip(times['A'], times['B'])) + ')')
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'a': args.a, 'b': args.b, 'times': times, 'machine': cpu_model(), 'step_args': args.step_args},
              f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
