"""Every accelerator measurement in one call, within a time budget, ending in one table.

  # On a lent GPU (the device tool: one command, about 15 minutes of device time in all). The image there has
  # jax, flax, optax, orbax and torch + transformers, not ml_collections / grain: carry those as wheels
  # (benchmarks/fetch_device_wheels.sh makes .whl/), then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  PYTHONUNBUFFERED=1 python3 benchmarks/device_suite.py --out_dir=$OUT --budget_s=480

  python benchmarks/device_suite.py --quick      # tiny sizes on the CPU: a smoke run of every section

Sections, most important first (each in its own process, so one that fails or runs out of memory is reported
and the rest still run; those that no longer fit in --budget_s are listed as skipped):
  step_*      benchmarks/train_step.py: the B/16 SigLIP step (both towers B, 224 px, 64 tokens, 32k vocabulary)
              in bfloat16 at --batch, with attention_impl=auto (cuDNN / Pallas flash on GPU). Variants: no remat,
              no remat with attention_impl=cudnn (odd ViT lengths padded: is it faster than auto's Triton
              kernel?), nn.scan over layers, remat 'dots', remat 'full': step time, images/s, MFU against the
              device's peak, XLA / analytic FLOPs, compiled peak memory. The remat / scan trade-off table.
              On an H200 each takes 85-110 s: a 15-minute lease holds about four sections per call.
  attention   benchmarks/attention.py: every attention implementation checked against the plain-JAX reference
              in compiled mode (forward and gradients), then TFLOP/s on the towers' shapes.
  moe         benchmarks/moe.py: Pallas routing and grouped matmul against their XLA counterparts (errors),
              then the MoE layer against a dense MLP of the same FLOPs and the einsum dispatch.
  vs_peers    benchmarks/vs_peers.py --device=gpu: jmm's step against HF transformers' SiglipModel (torch), same
              size and batch, alternating turns (float32 on both sides, as on the CPU).
Each section writes its JSON under --out_dir; the summary goes to --out_dir/device_suite.json as well.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_B16 = 'configs/siglip.py:img=B/16,txt=B,res=224,batch={batch}'
_TINY = 'configs/siglip.py:res=16,batch=4'


def sections(quick: bool, batch: int) -> list[dict]:
  """The sections to run, in order: name, argv after the python executable (run_section adds --out), kind of
  record (for `headline`), and the least budget in seconds worth starting it with."""
  out = []
  if quick:
    step = ['benchmarks/train_step.py', f'--config={_TINY}', '--steps=2', '--warmup=1', '--text_len=8',
            '--config.model.image.depth=2', '--config.model.text.depth=2', '--peak_matmul_size=256', '--results=']
  else:
    step = ['benchmarks/train_step.py', f'--config={_B16.format(batch=batch)}', '--steps=10', '--warmup=3',
            '--text_len=64', '--vocab_size=32000', '--config.dtype=bfloat16', '--results=']
  # (name, flags, attention_impl). 'cudnn' is the A/B against step_none ('auto' leaves ViT's odd lengths to the
  # Triton kernel); it needs an NVIDIA GPU, so --quick leaves it out and keeps the config's default impl.
  variants = [('none', ['--remat_policy=none'], 'auto'), ('cudnn', ['--remat_policy=none'], 'cudnn'),
              ('scan', ['--remat_policy=none', '--scan'], 'auto'), ('dots', ['--remat_policy=dots'], 'auto'),
              ('full', ['--remat_policy=full'], 'auto')]
  for variant, extra, impl in variants:
    if quick and impl == 'cudnn':
      continue
    if not quick:
      extra = [*extra, f'--config.attention_impl={impl}']
    out.append(dict(name=f'step_{variant}', argv=[*step, *extra, f'--label=step_{variant}'], kind='step',
                    min_s=20 if quick else 90))
  if quick:
    out.append(dict(name='attention', argv=['benchmarks/attention.py', '--quick', '--impls=xla,pallas',
                                            '--dtypes=float32'], kind='attention', min_s=20))
    out.append(dict(name='moe', argv=['benchmarks/moe.py', '--quick', '--experts=4', '--topk=1'], kind='moe',
                    min_s=20))
    out.append(dict(name='vs_peers', argv=['benchmarks/vs_peers.py', '--size=tiny', '--rounds=1', '--steps=1',
                                           '--peers=hf', '--results='], kind='vs_peers', min_s=30))
  else:
    # bfloat16 only: float32 attention on a GPU is not the training path, and the Pallas kernel's float32
    # gradients there took minutes of the budget in all (H200: 88-690 ms a call against XLA's 4-9).
    out.append(dict(name='attention', argv=['benchmarks/attention.py', '--steps=10', '--dtypes=bfloat16'],
                    kind='attention', min_s=90))
    out.append(dict(name='moe', argv=['benchmarks/moe.py', '--steps=10'], kind='moe', min_s=60))
    out.append(dict(name='vs_peers', argv=['benchmarks/vs_peers.py', '--device=gpu', '--size=B', '--batch=64',
                                           '--rounds=3', '--steps=3', '--peers=hf', '--results='],
                    kind='vs_peers', min_s=120))
  return out


def headline(kind: str, record: dict) -> str:
  """One line of the summary table for a section's JSON record."""
  if kind == 'step':
    s, mem = record['step'], record['memory']
    return (f'{s["median_s"] * 1e3:.1f} ms/step, {record["images_per_s"]:.0f} img/s, MFU '
            f'{100 * record["mfu"]:.1f}%, peak mem {mem.get("peak_bytes", 0) / 2**30:.2f} GiB, '
            f'XLA/analytic FLOPs {record["flops"]["xla_over_analytic"] or float("nan"):.3f}'
            f'{" (library calls uncounted)" if record["machine"].get("platform") == "gpu" else ""}')
  if kind == 'attention':
    rows = [r for r in record['rows'] if 'error' not in r]
    bad = [f'{r["shape"]} {r["dtype"]} {r["impl"]}' for r in rows if not r.get('ok')]
    best = {}
    for r in rows:
      key = (r['shape'], r['dtype'])
      if key not in best or r['fwd_bwd_s'] < best[key]['fwd_bwd_s']:
        best[key] = r
    fastest = ', '.join(f'{s} {d}: {r["impl"]} {r["fwd_bwd_tflops"]:.1f}' for (s, d), r in list(best.items())[:3])
    not_run = len(record['rows']) - len(rows)
    return (f'{len(rows) - len(bad)}/{len(rows)} checks within tolerance'
            f'{" (" + "; ".join(bad[:3]) + ")" if bad else ""}, {not_run} not run; fastest f+b TFLOP/s: {fastest}')
  if kind == 'moe':
    rows = [r for r in record['rows'] if 'error' not in r]
    errs = [r['max_err'] for r in rows if r.get('max_err') is not None]
    layer = [r for r in rows if r['kind'] == 'layer' and r['impl'].startswith('moe') and 'fwd_bwd_vs_dense' in r]
    vs = ', '.join(f'E={r["experts"]} k={r["topk"]} {r["impl"]}: {r["fwd_bwd_vs_dense"]:.2f}' for r in layer[:4])
    return (f'max Pallas error {max(errs) if errs else float("nan"):.1e}, '
            f'{len(record["rows"]) - len(rows)} not run; layer f+b vs dense: {vs}')
  if kind == 'vs_peers':
    sides = record['sides']
    return ', '.join([f'{n} {v["median_s"] * 1e3:.1f} ms' for n, v in sides.items()] +
                     [f'{k} {v:.3f}' for k, v in record.get('throughput_ratio', {}).items()])
  raise ValueError(f'unknown section kind {kind!r}')


_ERROR_LINE = re.compile(r'^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b')


def _error_line(log: str) -> str:
  """The line of a failed section's log that says what went wrong: the last exception line
  ('NotImplementedError: ...'), not the footers after it (JAX's traceback-filtering note); else the last line."""
  lines = [line.strip() for line in log.splitlines() if line.strip()]
  for line in reversed(lines):
    if _ERROR_LINE.match(line):
      return line
  return lines[-1] if lines else ''


def run_section(section: dict, out_dir: str, timeout_s: float) -> dict:
  """Runs one section in its own process; returns its summary row (status, seconds, headline, JSON path)."""
  path = os.path.join(out_dir, f'{section["name"]}.json')
  log_path = os.path.join(out_dir, f'{section["name"]}.log')
  argv = [sys.executable, *section['argv'], f'--out={path}']
  start = time.perf_counter()
  row = {'name': section['name'], 'json': path, 'log': log_path}
  try:
    with open(log_path, 'w') as log:
      proc = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    row['rc'] = proc.returncode
  except subprocess.TimeoutExpired:
    row['rc'] = None
  row['seconds'] = time.perf_counter() - start
  if row['rc'] is None:
    row['status'], row['headline'] = 'timeout', f'stopped after {timeout_s:.0f} s'
  elif row['rc'] != 0 or not os.path.exists(path):
    with open(log_path) as f:
      row['status'], row['headline'] = 'failed', f'rc {row["rc"]}: {_error_line(f.read())[:200]}'
  else:
    with open(path) as f:
      record = json.load(f)
    try:
      row['status'], row['headline'] = 'ok', headline(section['kind'], record)
    except (KeyError, TypeError, ValueError) as e:
      row['status'], row['headline'] = 'ok', f'(no summary: {type(e).__name__}: {e})'
  return row


def format_summary(rows: list[dict], info: dict) -> str:
  lines = [f'device suite on {info["device"]} (jax {info["jax"]}), {info["elapsed_s"]:.0f} s of a '
           f'{info["budget_s"]:.0f} s budget', '', '| section | status | s | result |', '|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["name"]} | {r["status"]} | {r.get("seconds", 0):.0f} | {r["headline"]} |')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny sizes (CPU smoke run of every section)')
  parser.add_argument('--budget_s', type=float, default=480, help='wall seconds for all sections together')
  parser.add_argument('--batch', type=int, default=256, help='B/16 step batch size')
  parser.add_argument('--only', default='', help='comma-separated section names (default: all)')
  parser.add_argument('--out_dir', default=os.path.join(ROOT, 'benchmarks', 'results', 'device_suite'))
  args = parser.parse_args(argv)

  todo = sections(args.quick, args.batch)
  if args.only:
    wanted = args.only.split(',')
    unknown = sorted(set(wanted) - {s['name'] for s in todo})
    if unknown:
      raise SystemExit(f'--only: unknown sections {unknown}; known: {[s["name"] for s in todo]}')
    todo = [s for s in todo if s['name'] in wanted]
  os.makedirs(args.out_dir, exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top  (after argparse: --help needs no JAX)
  device = jax.devices()[0]
  info = {'device': f'{jax.default_backend()} {device.device_kind}', 'jax': jax.__version__,
          'budget_s': args.budget_s, 'quick': args.quick}
  print(f'device suite: {info["device"]}, jax {info["jax"]}, budget {args.budget_s:.0f} s, '
        f'sections {[s["name"] for s in todo]}', flush=True)
  start, rows = time.perf_counter(), []
  for section in todo:
    left = args.budget_s - (time.perf_counter() - start)
    if left < section['min_s']:
      rows.append({'name': section['name'], 'status': 'skipped',
                   'headline': f'{left:.0f} s of budget left, needs at least {section["min_s"]} s'})
    else:
      print(f'-> {section["name"]} ({left:.0f} s of budget left; log: '
            f'{os.path.join(args.out_dir, section["name"] + ".log")})', flush=True)
      rows.append(run_section(section, args.out_dir, left))
    print(f'  {rows[-1]["name"]}: {rows[-1]["status"]} - {rows[-1]["headline"]}', flush=True)
  info['elapsed_s'] = time.perf_counter() - start
  summary = format_summary(rows, info)
  print('\n' + summary, flush=True)
  with open(os.path.join(args.out_dir, 'device_suite.json'), 'w') as f:
    json.dump({**info, 'sections': rows}, f, indent=2)
  return rows


if __name__ == '__main__':
  main()
