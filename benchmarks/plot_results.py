"""Charts benchmark results files as a PNG: step time per run (train_step.jsonl) or per side (vs_peers.jsonl).

  python benchmarks/plot_results.py benchmarks/results/train_step.jsonl --out=benchmarks/results/train_step.png
  python benchmarks/plot_results.py benchmarks/results/vs_peers.jsonl --out=benchmarks/results/vs_peers.png

Needs matplotlib (not a jmm dependency: `pip install matplotlib`). Bad lines in a results file are skipped and
counted, not fatal.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def read_results(path: str) -> tuple[list[dict], int]:
  """(records, number of lines skipped as unreadable) from a JSON-lines results file."""
  records, bad = [], 0
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        bad += 1
        continue
      if isinstance(record, dict):
        records.append(record)
      else:
        bad += 1
  return records, bad


def bars(records: list[dict]) -> tuple[list[str], list[float], list[float], str]:
  """(labels, median step seconds, relative spread, chart title) for either kind of results file."""
  labels, medians, spreads = [], [], []
  kind = ''
  for i, r in enumerate(records):
    if 'sides' in r:  # vs_peers.py
      kind = 'vs_peers'
      for name, side in r['sides'].items():
        labels.append(f'{r.get("size", "?")} b{r.get("batch", "?")} {name} #{i}')
        medians.append(side['median_s'])
        spreads.append(side.get('spread', 0.0))
    elif 'step' in r:  # train_step.py
      kind = 'train_step'
      c = r.get('config', {})
      mfu = r.get('mfu')
      label = r.get('label') or f'b{c.get("batch_size", "?")} {c.get("dtype", "")}'
      labels.append(f'{label} #{i}' + (f' (MFU {100 * mfu:.0f}%)' if mfu else ''))
      medians.append(r['step']['median_s'])
      spreads.append(r['step'].get('spread', 0.0))
  title = {'vs_peers': 'training step: jmm vs peers', 'train_step': 'jmm training step'}.get(kind, 'results')
  return labels, medians, spreads, title


def plot(records: list[dict], out: str) -> str:
  """Writes a horizontal bar chart of median step time (error bar: min..max spread) to `out`; returns it."""
  labels, medians, spreads, title = bars(records)
  if not labels:
    raise ValueError('no plottable records (expected lines written by train_step.py or vs_peers.py)')
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('plotting needs matplotlib: pip install matplotlib') from e
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 0.4 * len(labels) + 1.5))
  ax.barh(range(len(labels)), medians, xerr=[m * s / 2 for m, s in zip(medians, spreads)], color='tab:blue')
  ax.set_yticks(range(len(labels)), labels, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel('median step time (s)')
  ax.set_title(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('results', help='a .jsonl file written by train_step.py or vs_peers.py')
  parser.add_argument('--out', default=None, help='PNG path (default: the results path with .png)')
  parser.add_argument('--last', type=int, default=20, help='plot only the last N records')
  args = parser.parse_args(argv)
  if not os.path.isfile(args.results):
    sys.exit(f'error: results file {args.results!r} does not exist')
  records, bad = read_results(args.results)
  if bad:
    print(f'skipped {bad} unreadable line(s) in {args.results}', file=sys.stderr)
  out = args.out or os.path.splitext(args.results)[0] + '.png'
  try:
    print(plot(records[-args.last:], out))
  except ValueError as e:
    sys.exit(f'error: {args.results}: {e}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
