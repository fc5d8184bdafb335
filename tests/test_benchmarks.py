"""Smoke tests of the benchmark scripts: they run on tiny sizes and write valid, complete JSON."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import plot_results  # noqa: E402


def _run(args, tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}  # One CPU device, not the suite's eight.
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_train_step_writes_json(tmp_path):
  out, results = tmp_path / 'run.json', tmp_path / 'results.jsonl'
  stdout = _run(['benchmarks/train_step.py', '--config=configs/siglip.py:res=16,batch=4', '--steps=2',
                 '--warmup=1', '--text_len=8', '--config.model.image.depth=1', '--config.model.text.depth=1',
                 '--peak_matmul_size=256', f'--out={out}', f'--results={results}', '--label=smoke',
                 # oneDNN refuses a fusion of this tiny step and 'auto' falls back to XLA's matmuls after a
                 # wasted compile (8-10 s); asking for them times the same program.
                 '--config.cpu_matmuls=xla'], tmp_path)
  record = json.loads(out.read_text())
  assert record['label'] == 'smoke' and record['step']['n'] == 2 and record['matmuls'] == 'xla'
  assert record['step']['median_s'] > 0 and record['images_per_s'] > 0
  assert record['config']['batch_size'] == 4 and record['config']['text_len'] == 8
  # The analytic count agrees with XLA's cost analysis of the compiled step within 10%, plus elementwise work:
  # the optimizer's and the non-finite guard's per-parameter ops (0.11 of the ratio), large at this tiny size.
  assert 0.9 < record['flops']['xla_over_analytic'] < 1.4
  assert 0 < record['mfu'] and record['peak_source'].startswith('measured')
  assert record['memory']['peak_bytes'] > 0
  assert [json.loads(line) for line in results.read_text().splitlines()] == [record]
  assert 'images/s' in stdout and 'MFU' in stdout
  from benchmarks import device_suite  # pylint: disable=g-import-not-at-top
  line = device_suite.headline('step', record)  # The device suite's summary of a step section.
  assert 'ms/step' in line and 'MFU' in line and 'peak mem' in line
  # Appending again keeps the first line; the plot script reads both and skips a corrupt line.
  with open(results, 'a') as f:
    f.write('{not json\n')
  records, bad = plot_results.read_results(str(results))
  assert len(records) == 1 and bad == 1
  labels, medians, _, title = plot_results.bars(records)
  assert labels[0].startswith('smoke') and medians == [record['step']['median_s']] and 'jmm' in title
  if importlib.util.find_spec('matplotlib'):
    png = plot_results.plot(records, str(tmp_path / 'chart.png'))
    assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_plot_rejects_results_without_runs(tmp_path):
  path = tmp_path / 'empty.jsonl'
  path.write_text('[1, 2]\n')
  records, bad = plot_results.read_results(str(path))
  assert records == [] and bad == 1
  with pytest.raises(ValueError, match='no plottable records'):
    plot_results.plot(records, str(tmp_path / 'x.png'))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='torch is not installed')
def test_vs_peers_tiny(tmp_path):
  out = tmp_path / 'peers.json'
  peers = 'hf' if importlib.util.find_spec('transformers') else ''
  _run(['benchmarks/vs_peers.py', '--size=tiny', '--rounds=2', '--steps=1', f'--peers={peers}', f'--out={out}',
        '--results='], tmp_path)
  record = json.loads(out.read_text())
  assert record['sides']['jmm']['n'] == 2
  if peers:
    assert record['sides']['hf']['n'] == 2
    # Same sizes on both sides: parameter counts agree to within the heads' biases and the MAP probe.
    assert abs(record['sides']['hf']['params'] - record['sides']['jmm']['params']) < 0.02 * record['sides'][
        'jmm']['params']
    ratio = record['throughput_ratio']['jmm/hf']
    assert ratio == pytest.approx(record['sides']['hf']['median_s'] / record['sides']['jmm']['median_s'])
    turn = record['per_turn_ratio']['jmm/hf']
    assert turn['turns'] == 2 and turn['min'] <= turn['median'] <= turn['max']


def test_per_turn_ratios_pair_each_turn():
  from benchmarks import vs_peers  # pylint: disable=g-import-not-at-top
  # Two steps a turn; the machine slows down 2x between turns, jmm is 10% faster than the peer within each.
  jmm = [1.0, 1.2, 2.0, 2.4, 4.0, 4.0]
  peer = [1.1, 1.32, 2.2, 2.64, 4.4, 4.4]
  r = vs_peers.per_turn_ratios(jmm, peer, steps=2)
  assert r['turns'] == 3
  assert r['median'] == pytest.approx(1.1) and r['min'] == pytest.approx(1.1) and r['max'] == pytest.approx(1.1)
  assert vs_peers.per_turn_ratios([], [], steps=2)['turns'] == 0


def test_pool_runs_pools_turns_of_chosen_commits(tmp_path):
  from benchmarks import vs_peers  # pylint: disable=g-import-not-at-top

  def record(git, jmm, peer, size='S'):
    return {'machine': {'git': git}, 'size': size, 'batch': 16, 'device': 'cpu', 'steps_per_turn': 1,
            'sides': {'jmm': {'all_s': jmm}, 'hf': {'all_s': peer}}}
  # Commit abc: 3 + 2 turns, jmm faster in 3 of the 5 (ratios 1.2, 1.1, 0.9 and 1.05, 0.8); def is excluded.
  records = [record('abc1234', [1.0, 1.0, 1.0], [1.2, 1.1, 0.9]), record('abc1234+dirty', [2.0, 2.0], [2.1, 1.6]),
             record('def5678', [1.0], [5.0])]
  path = tmp_path / 'results.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in records) + '\n{broken\n')
  pooled = vs_peers.pool_runs(plot_results.read_results(str(path))[0], ['abc'])
  hf = pooled['jmm/hf']
  assert pooled['runs'] == 2 and hf['turns'] == 5
  assert hf['median'] == pytest.approx(1.05) and hf['faster_share'] == pytest.approx(0.6)
  assert 0.8 <= hf['ci90'][0] <= hf['median'] <= hf['ci90'][1] <= 1.2
  assert 'per-turn median 1.050' in vs_peers.format_pool(pooled)
  with pytest.raises(ValueError, match='no recorded run'):
    vs_peers.pool_runs(records, ['fff'])
  with pytest.raises(ValueError, match='different set-ups'):
    vs_peers.pool_runs(records + [record('abc9', [1.0], [1.0], size='B')], ['abc'])


def test_profile_step_attributes_the_step_to_ops(tmp_path):
  out = tmp_path / 'profile.json'
  stdout = _run(['benchmarks/profile_step.py', '--size=tiny', '--batch=4', '--steps=1', '--top=5',
                 f'--profile_out={out}', '--onednn_verbose'], tmp_path)
  record = json.loads(out.read_text())
  if record['matmuls'] == 'onednn':  # oneDNN's own lines were captured (and kept out of the printed tables).
    assert record['onednn']['ms_by_kind'].get('matmul', 0) > 0, record['onednn']
    assert '| reordered operand |' in stdout and 'onednn_verbose,' not in stdout
  # Every op of the step is found in the trace and in the optimised HLO: matmuls and fusions, forward and
  # backward of both towers, with shares that add up to the op time.
  assert record['op_seconds'] > 0 and 0 < record['covered_s'] <= record['wall_s'] * 1.05
  assert sum(record['by_category'].values()) == pytest.approx(record['op_seconds'], rel=1e-6)
  assert any('dot' in c for c in record['by_category']), record['by_category']
  parts = set(record['by_part'])
  assert {'fwd mlp', 'bwd mlp', 'fwd attention', 'bwd attention', 'optimizer'} <= parts, parts
  assert len(record['top_ops']) == 5 and all(op['seconds'] > 0 and op['shape'] for op in record['top_ops'])
  assert '| op kind |' in stdout and 'busy threads' in stdout


def test_onednn_summary_sums_matmuls_and_reorders():
  from benchmarks import profile_step  # pylint: disable=g-import-not-at-top
  lines = [
      'onednn_verbose,v1,info,oneDNN v3.7.3 (commit N/A)',
      'onednn_verbose,v1,primitive,exec,cpu,reorder,brgemm_matmul_copy_reorder_t,undef,src:f32::blocked:ba::f0 '
      'dst:f32::blocked:ab::f0,attr-scratchpad:user,,1536x3136,9.0',
      'onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core,undef,src:f32:a:blocked:ab::f0,'
      'attr-scratchpad:user,,1536x3136:3136x384,20.5',
      'onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src dst,,384x1536,0.5',
      'onednn_verbose,v1,primitive,exec,cpu,reorder,brgemm_matmul_copy_reorder_t,undef,src dst,,1536x3136,8.0',
      'onednn_verbose,v1,graph,exec,cpu,100002,matmul_post_ops,MatMul_0,,in0 out0,fpm:strict,matmul_t,dnnl,30.0',
      'some other line, 12',
  ]
  summary = profile_step.onednn_summary(lines, top=5)
  assert summary['ms_by_kind'] == pytest.approx({'reorder': 17.5, 'matmul': 20.5})
  assert summary['top_reorders'][0] == {'shape': '1536x3136', 'impl': 'brgemm_matmul_copy_reorder_t', 'calls': 2,
                                        'ms': pytest.approx(17.0)}
  assert [r['shape'] for r in summary['top_reorders']] == ['1536x3136', '384x1536']


def test_profile_step_parses_hlo_categories():
  from benchmarks import profile_step  # pylint: disable=g-import-not-at-top
  hlo = '''HloModule m

%fused_dot (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_copy (p0: f32[4,8]) -> f32[8,4] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %transpose.1 = f32[8,4]{1,0} transpose(%p0), dimensions={1,0}
}

ENTRY %main (a: f32[4,8], b: f32[8,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %copy_fusion = f32[8,4]{1,0} fusion(%a), kind=kLoop, calls=%fused_copy, metadata={op_name="jit(f)/transpose(jvp(TwoTower))/img/mlp/x"}
  ROOT %onednn_fusion = f32[4,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(f)/jvp(TwoTower)/img/attn/dot_general"}, backend_config={"fusion_config":{"kind":"__onednn_fusion"}}
}
'''
  table = profile_step.parse_hlo(hlo)
  assert table['onednn_fusion']['category'] == 'fusion:__onednn_fusion:dot'
  assert table['copy_fusion']['category'] == 'fusion:kLoop:layout'
  assert profile_step.model_part(table['onednn_fusion']['source']) == 'fwd attention'
  assert profile_step.model_part(table['copy_fusion']['source']) == 'bwd mlp'
  assert profile_step.model_part('jit(f)/sqrt') == 'optimizer'
  assert profile_step.union_length([(0, 10), (5, 20), (30, 40)]) == 30


def test_device_suite_runs_sections_and_summarises(tmp_path):
  out_dir = tmp_path / 'suite'
  stdout = _run(['benchmarks/device_suite.py', '--quick', '--only=attention', f'--out_dir={out_dir}'], tmp_path)
  summary = json.loads((out_dir / 'device_suite.json').read_text())
  rows = {r['name']: r for r in summary['sections']}
  assert set(rows) == {'attention'} and rows['attention']['status'] == 'ok', rows
  # The attention section checked its implementations against the reference before timing them.
  attention = json.loads((out_dir / 'attention.json').read_text())
  assert attention['rows'] and all(r['ok'] for r in attention['rows'] if 'error' not in r)
  assert 'checks within tolerance' in rows['attention']['headline']
  assert '| section | status | s | result |' in stdout and '-> attention' in stdout


def test_device_suite_budget_and_failures(tmp_path):
  from benchmarks import device_suite  # pylint: disable=g-import-not-at-top
  # Out of budget: every section is reported as skipped, none is started.
  rows = device_suite.main(['--quick', '--budget_s=1', f'--out_dir={tmp_path}'])
  assert rows and all(r['status'] == 'skipped' for r in rows)
  # A section that fails is reported with its last log line; the suite goes on.
  bad = {'name': 'bad', 'argv': ['-c', 'raise SystemExit("no such config")'], 'kind': 'step', 'min_s': 0}
  row = device_suite.run_section(bad, str(tmp_path), timeout_s=60)
  assert row['status'] == 'failed' and 'no such config' in row['headline']
  # The exception line is reported, not a footer printed after it (JAX's traceback-filtering note).
  footer = 'print("NotImplementedError: Unsupported sequence length Q 1"); print("-" * 20); print("For simplicity")'
  bad = {'name': 'bad', 'argv': ['-c', f'{footer}; raise SystemExit(1)'], 'kind': 'step', 'min_s': 0}
  row = device_suite.run_section(bad, str(tmp_path), timeout_s=60)
  assert row['headline'] == 'rc 1: NotImplementedError: Unsupported sequence length Q 1'
  # The GPU step variants: one attention_impl each, 'auto' except the cuDNN A/B; no cuDNN section on the CPU.
  full = {sec['name']: sec['argv'] for sec in device_suite.sections(False, 256) if sec['kind'] == 'step'}
  impls = {name: [a for a in argv if a.startswith('--config.attention_impl=')] for name, argv in full.items()}
  assert impls.pop('step_cudnn') == ['--config.attention_impl=cudnn']
  assert set(impls) == {'step_none', 'step_scan', 'step_dots', 'step_full'}
  assert all(v == ['--config.attention_impl=auto'] for v in impls.values())
  assert 'step_cudnn' not in {sec['name'] for sec in device_suite.sections(True, 4)}
  with pytest.raises(SystemExit, match='unknown sections'):
    device_suite.main(['--quick', '--only=nope', f'--out_dir={tmp_path}'])


def test_ab_commits_alternates_the_commits_and_summarises(tmp_path, monkeypatch, capsys):
  """main() with git, the step runs and lscpu faked: A B A B A B order, the step arguments passed through, the
  median / min / max table and B / A per turn, and both worktrees removed."""
  from benchmarks import ab_commits  # pylint: disable=g-import-not-at-top
  commands, turns = [], []
  seconds = iter([1.0, 0.9, 1.4, 1.3, 1.2, 1.0])  # A0 B0 A1 B1 A2 B2: B / A per turn 0.900, 0.929, 0.833.

  def fake_run(cmd, **kw):
    commands.append((cmd, kw.get('cwd')))
    return subprocess.CompletedProcess(cmd, 0, stdout='Architecture: x86_64\nModel name:   Fake CPU 9000\n')

  def fake_one_turn(tree, args, out):
    turns.append((tree, list(args), os.path.basename(out)))
    return {'step': {'median_s': next(seconds)}}

  monkeypatch.setattr(ab_commits.subprocess, 'run', fake_run)
  monkeypatch.setattr(ab_commits, 'one_turn', fake_one_turn)
  out = tmp_path / 'ab.json'
  step_args = ['--config=configs/siglip.py:res=16', '--steps=5']
  assert ab_commits.main(['--a=abc1234', '--b=origin/main', '--turns=3', f'--out={out}', '--', *step_args]) == 0

  adds = [cmd for cmd, _ in commands if cmd[:3] == ['git', 'worktree', 'add']]
  assert [cmd[-1] for cmd in adds] == ['abc1234', 'origin/main']
  tree_a, tree_b = adds[0][-2], adds[1][-2]
  assert os.path.basename(tree_b) == 'origin_main'  # A '/' in a rev does not nest folders.
  assert [t for t, _, _ in turns] == [tree_a, tree_b] * 3
  assert all(args == step_args for _, args, _ in turns)
  assert [name for _, _, name in turns] == ['A0.json', 'B0.json', 'A1.json', 'B1.json', 'A2.json', 'B2.json']
  removed = [cmd[-1] for cmd, _ in commands if cmd[:3] == ['git', 'worktree', 'remove']]
  assert removed == [tree_a, tree_b]

  printed = capsys.readouterr().out
  assert '| A abc1234 | 1.200 | 1.000 | 1.400 |' in printed
  assert '| B origin/main | 1.000 | 0.900 | 1.300 |' in printed
  assert 'B / A: 0.833 (per turn: 0.900, 0.929, 0.833)' in printed
  assert 'machine: Fake CPU 9000' in printed
  record = json.loads(out.read_text())
  assert record == {'a': 'abc1234', 'b': 'origin/main', 'times': {'A': [1.0, 1.4, 1.2], 'B': [0.9, 1.3, 1.0]},
                    'machine': 'Fake CPU 9000', 'step_args': step_args}


def test_ab_commits_removes_its_worktrees_when_a_turn_fails(monkeypatch):
  from benchmarks import ab_commits  # pylint: disable=g-import-not-at-top
  commands = []
  monkeypatch.setattr(ab_commits.subprocess, 'run',
                      lambda cmd, **kw: commands.append(cmd) or subprocess.CompletedProcess(cmd, 0, stdout=''))

  def failing_turn(tree, args, out):
    raise RuntimeError('train_step.py failed')

  monkeypatch.setattr(ab_commits, 'one_turn', failing_turn)
  with pytest.raises(RuntimeError, match='train_step.py failed'):
    ab_commits.main(['--a=abc', '--b=def'])
  assert [cmd[:3] for cmd in commands] == [['git', 'worktree', 'add']] * 2 + [['git', 'worktree', 'remove']] * 2
  with pytest.raises(SystemExit):  # --b is required.
    ab_commits.main(['--a=abc'])


def test_ab_commits_one_turn_runs_that_commits_train_step(tmp_path, monkeypatch):
  """The command line of a turn: the worktree's own benchmarks/train_step.py, run there, writing --out only."""
  from benchmarks import ab_commits  # pylint: disable=g-import-not-at-top
  seen = []

  def fake_run(cmd, **kw):
    seen.append((cmd, kw['cwd']))
    out = next(a.split('=', 1)[1] for a in cmd if a.startswith('--out='))
    with open(out, 'w') as f:
      json.dump({'step': {'median_s': 0.25}}, f)
    return subprocess.CompletedProcess(cmd, 0 if len(seen) == 1 else 1, stdout='', stderr='boom: no such flag')

  monkeypatch.setattr(ab_commits.subprocess, 'run', fake_run)
  tree, out = str(tmp_path / 'tree'), str(tmp_path / 'A0.json')
  record = ab_commits.one_turn(tree, ['--steps=5'], out)
  assert ab_commits.step_seconds(record) == 0.25
  assert seen == [([sys.executable, os.path.join(tree, 'benchmarks', 'train_step.py'), '--steps=5', f'--out={out}',
                    '--results='], tree)]
  with pytest.raises(RuntimeError, match='boom: no such flag'):  # A failed run names its stderr.
    ab_commits.one_turn(tree, ['--steps=5'], out)
