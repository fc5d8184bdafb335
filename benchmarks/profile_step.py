"""Where the time of jmm's compiled training step goes, per XLA op, on the machine in front of you.

  python benchmarks/profile_step.py                       # the vs_peers S/16 + S/16 step, batch 16, CPU
  python benchmarks/profile_step.py --size=tiny --batch=4 --steps=1 --top=10 --profile_out=   # smoke run
  python benchmarks/profile_step.py --onednn_verbose      # + oneDNN's own account: matmul vs operand-reorder time

Builds the same step `vs_peers.py` times (jmm.train's step with training's XLA options), runs it under
`jax.profiler`, and reads the trace back (`jax.profiler.ProfileData`): every executed HLO instruction is an event
on the thread that ran it. Prints the step's wall time, how busy the worker threads were (sum of op time over
threads / wall), time by op category (matmul library calls, fusions by kind, copies, ...), by model part
(forward / backward, and the layer from the op's source metadata), and the most expensive ops with their HLO.
Writes the whole table as JSON beside the other results.

--onednn_verbose (x86 CPUs, where the step's matmuls run in oneDNN): one more step runs with ONEDNN_VERBOSE=1, its
lines captured from the C-level stdout, and the time oneDNN spends in matmuls is set against the time it spends
reordering operands (copying a transposed left operand to row-major, packing a right operand into blocks), with
the costliest reordered operands by shape. That is how `cpu_matmuls.row_contraction` was found. The verbose mode
slows oneDNN calls slightly; the profiled steps' times include it.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import vs_peers  # noqa: E402
from jmm import cpu_matmuls  # noqa: E402

# --size, --batch and --steps (profiled steps, after two warm-up steps) are vs_peers.py's flags.
_SIZE, _BATCH, _STEPS = vs_peers._SIZE, vs_peers._BATCH, vs_peers._STEPS  # pylint: disable=protected-access
_TOP = flags.DEFINE_integer('top', 30, 'Most expensive ops to list.')
_OUT = flags.DEFINE_string('profile_out', os.path.join(common.ROOT, 'benchmarks', 'results',
                                                       'profile_step_latest.json'), 'JSON file ("" = none).')
_HLO_OUT = flags.DEFINE_string('hlo_out', '', 'Also write the optimised HLO of the step to this file.')

_ONEDNN = flags.DEFINE_bool('onednn_verbose', False, 'Also run one step with ONEDNN_VERBOSE=1 and print the time '
                            'oneDNN spends in matmuls against operand reorders (copies into its blocked layouts).')

_INSTR = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$', re.M)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_KIND = re.compile(r'kind=(\w+)')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_CUSTOM = re.compile(r'"kind":"(__\w+)"|custom_call_target="([^"]+)"')


def parse_hlo(text: str) -> dict[str, dict]:
  """{instruction name: {'shape', 'op', 'category', 'source'}} for the optimised HLO of a compiled step."""
  bodies = cpu_matmuls.computation_bodies(text)
  table = {}
  for m in _INSTR.finditer(text):
    name, shape, op, rest = m.groups()
    category = op
    if op == 'fusion':
      custom = _CUSTOM.search(rest)
      kind = _KIND.search(rest)
      category = f'fusion:{custom.group(1) if custom and custom.group(1) else (kind.group(1) if kind else "?")}'
      called = _CALLS.search(rest)
      body = bodies.get(called.group(1), '') if called else ''
      inner = sorted({o for _, _, o, _ in _INSTR.findall(body)} - {'parameter', 'constant', 'bitcast'})
      if 'dot' in inner or 'convolution' in inner:
        category += ':dot'
      elif 'reduce' in inner:
        category += ':reduce'
      elif inner and set(inner) <= {'copy', 'transpose', 'broadcast', 'reshape', 'slice', 'concatenate'}:
        category += ':layout'
    elif op == 'custom-call':
      custom = _CUSTOM.search(rest)
      category = f'custom-call:{(custom.group(2) or custom.group(1)) if custom else "?"}'
    src = _OP_NAME.search(rest)
    table[name] = {'shape': shape, 'op': op, 'category': category, 'source': src.group(1) if src else ''}
  return table


def model_part(source: str) -> str:
  """A coarse place in the model for an op's jax source name: pass (fwd / bwd) and layer kind."""
  direction = 'bwd' if 'transpose(' in source else 'fwd'
  s = source.lower()
  if 'twotower' not in s:  # Not in the model's forward or backward: optimizer update, gradient norm, metrics.
    return 'optimizer' if source else 'unattributed'
  for key, label in (('attn', 'attention'), ('mlp', 'mlp'), ('ln_', 'layernorm'), ('encoder_norm', 'layernorm'),
                     ('embedding', 'patch/token embedding'), ('conv', 'patch/token embedding'),
                     ('MAPHead'.lower(), 'map head'), ('loss', 'loss'), ('sigmoid', 'loss')):
    if key in s:
      return f'{direction} {label}'
  return f'{direction} other' if source else 'unattributed'


def onednn_summary(lines, top: int = 10) -> dict:
  """Sums ONEDNN_VERBOSE 'primitive,exec' lines: ms in matmuls and in reorders, and the costliest reorders.

  A line reads `onednn_verbose,v1,primitive,exec,cpu,KIND,IMPL,...,PROBLEM,MS`; a reorder's PROBLEM is the shape
  of the operand oneDNN copied (a transposed left operand, or a right operand packed into blocks) before a matmul.
  """
  totals = collections.Counter()
  reorders = collections.defaultdict(lambda: [0, 0.0])
  for line in lines:
    parts = line.strip().split(',')
    if len(parts) < 8 or parts[0] != 'onednn_verbose' or parts[2:4] != ['primitive', 'exec']:
      continue
    try:
      ms = float(parts[-1])
    except ValueError:
      continue
    totals[parts[5]] += ms
    if parts[5] == 'reorder':
      entry = reorders[(parts[-2], parts[6])]
      entry[0] += 1
      entry[1] += ms
  ranked = sorted(reorders.items(), key=lambda kv: -kv[1][1])[:top]
  return {'ms_by_kind': dict(totals),
          'top_reorders': [{'shape': shape, 'impl': impl, 'calls': n, 'ms': ms} for (shape, impl), (n, ms) in ranked]}


def _onednn_step(run) -> list[str]:
  """Runs `run` (one step) with oneDNN's verbose lines (C-level stdout) captured; returns those lines."""
  sys.stdout.flush()
  saved = os.dup(1)
  with tempfile.TemporaryFile(mode='w+') as capture:
    os.dup2(capture.fileno(), 1)
    try:
      run()
    finally:
      sys.stdout.flush()
      os.dup2(saved, 1)
      os.close(saved)
    capture.seek(0)
    return capture.read().splitlines()


def union_length(intervals: list[tuple[int, int]]) -> int:
  """Total length covered by a list of (start, end) intervals, overlaps counted once."""
  total, end = 0, None
  for a, b in sorted(intervals):
    if end is None or a > end:
      total += b - a
      end = b
    elif b > end:
      total += b - end
      end = b
  return total


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  size = dict(vs_peers.SIZES[_SIZE.value])
  config = vs_peers.jmm_config(size, _BATCH.value)
  if _ONEDNN.value:  # Read by oneDNN when it first runs: before the step is compiled and run.
    os.environ['ONEDNN_VERBOSE'] = '1'
  step, state, data, _, info = common.build_train_step(config, size['vocab'], _BATCH.value, with_info=True)
  compiled = step.lower(state, data).compile()
  hlo = parse_hlo(compiled.as_text())
  holder = {'state': state}

  def one_step():
    holder['state'], step_metrics = compiled(holder['state'], data)
    jax.block_until_ready(step_metrics)

  # With --onednn_verbose every oneDNN call prints a line: those of the warm-up and profiled steps are dropped.
  quietly = _onednn_step if _ONEDNN.value else (lambda fn: fn())
  for _ in range(2):
    quietly(one_step)
  onednn = onednn_summary(_onednn_step(one_step), _TOP.value) if _ONEDNN.value else None

  trace_dir = tempfile.mkdtemp(prefix='jmm_profile_')
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    quietly(one_step)
  wall = (time.perf_counter() - start) / _STEPS.value
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))[-1]
  profile = jax.profiler.ProfileData.from_file(path)

  per_op = collections.Counter()
  calls = collections.Counter()
  thread_busy = collections.Counter()
  intervals = []
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in hlo:
          intervals.append((event.start_ns, event.end_ns))
          per_op[event.name] += event.duration_ns / 1e9 / _STEPS.value
          calls[event.name] += 1
          thread_busy[line.name] += event.duration_ns / 1e9 / _STEPS.value
  total = sum(per_op.values())
  covered = union_length(intervals) / 1e9 / _STEPS.value  # Time in which at least one op was running.
  by_category, by_part, by_stem = collections.Counter(), collections.Counter(), collections.Counter()
  for name, t in per_op.items():
    by_category[hlo[name]['category']] += t
    by_stem[re.sub(r'\.\d+$', '', name)] += t  # XLA's op name without its number: what kind of fusion.
    by_part[model_part(hlo[name]['source'])] += t

  print(f'\njmm step, size {_SIZE.value}, batch {_BATCH.value}, matmuls {info["matmuls"]}: wall {wall:.3f} s, '
        f'op time summed over threads {total:.3f} s = {total / wall:.2f} busy threads '
        f'({len(thread_busy)} threads ran ops, {os.cpu_count()} cores); some op running {covered / wall:.1%} of '
        f'the wall time')
  for title, counter in (('category', by_category), ('model part', by_part), ('op kind', by_stem)):
    print(f'\n| {title} | s / step | share |\n|---|---|---|')
    for key, t in counter.most_common(_TOP.value):
      print(f'| {key} | {t:.3f} | {t / total:.1%} |')
  print(f'\n| op | s / step | calls | category | shape | source |\n|---|---|---|---|---|---|')
  top = []
  for name, t in per_op.most_common(_TOP.value):
    h = hlo[name]
    top.append(dict(name=name, seconds=t, calls=calls[name] / _STEPS.value, **h))
    print(f'| {name} | {t:.4f} | {calls[name] / _STEPS.value:g} | {h["category"]} | {h["shape"][:40]} | '
          f'{h["source"][-90:]} |')
  print('\n| top non-matmul op | s / step | category | shape | source |\n|---|---|---|---|---|')
  rest = [(n, t) for n, t in per_op.most_common() if 'dot' not in hlo[n]['category']][:_TOP.value]
  for name, t in rest:
    h = hlo[name]
    print(f'| {name} | {t:.4f} | {h["category"]} | {h["shape"][:40]} | {h["source"][-90:]} |')
  if onednn is not None and not onednn['ms_by_kind']:
    print(f'\n--onednn_verbose: oneDNN ran nothing in this step (its matmuls are {info["matmuls"]!r}; oneDNN runs '
          'them only on an x86 CPU with cpu_matmuls auto / onednn).')
  elif onednn is not None:
    kinds = onednn['ms_by_kind']
    onednn_ms = sum(kinds.values()) or 1.0
    print(f'\noneDNN in one step (ONEDNN_VERBOSE, ms of op time): ' +
          ', '.join(f'{k} {v:.0f} ({v / onednn_ms:.0%})' for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    print('\n| reordered operand | oneDNN impl | calls | ms / step |\n|---|---|---|---|')
    for r in onednn['top_reorders']:
      print(f'| {r["shape"]} | {r["impl"]} | {r["calls"]} | {r["ms"]:.1f} |')
  if _OUT.value:
    common.write_json(_OUT.value, {
        'onednn': onednn,
        'machine': common.machine_info(), 'size': _SIZE.value, 'batch': _BATCH.value, 'wall_s': wall,
        'op_seconds': total, 'covered_s': covered, 'busy_threads': total / wall, 'matmuls': info['matmuls'],
        'by_category': dict(by_category), 'by_part': dict(by_part), 'by_op_kind': dict(by_stem),
        'top_ops': top})
  if _HLO_OUT.value:
    with open(_HLO_OUT.value, 'w') as f:
      f.write(compiled.as_text())


if __name__ == '__main__':
  app.run(main)
