"""End to end: the CLI trains, learns, resumes bit-exactly after SIGKILL, saves on SIGTERM, rejects bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A very small model and cheap evaluators, so each run takes seconds.
TINY = [
    '--config.model.image.width=32', '--config.model.image.depth=1', '--config.model.image.mlp_dim=64',
    '--config.model.image.num_heads=2', '--config.model.text.width=32', '--config.model.text.depth=1',
    '--config.model.text.mlp_dim=64', '--config.model.text.num_heads=2', '--config.model.out_dim=16',
    '--config.batch_size=16', '--config.log_every=2', '--config.tokenizer.train_sentences=2000',
    '--config.evals.zeroshot.every=0', '--config.evals.zeroshot.data.num_examples=48',
    '--config.evals.zeroshot.batch_size=48',
    # Off unless a test reads them (EVALS): the final evaluation is most of a tiny run's time.
    '--config.evals.retrieval.every=-1', '--config.evals.linear_probe.every=-1',
    # XLA's matmuls: 'auto' first compiles each train step with oneDNN matmuls, which these tiny models refuse
    # (a fusion oneDNN may not run), then compiles it again: 8-10 s per run, as oneDNN programs never reach the
    # persistent cache. The check and the fallback are tests/test_cpu_matmuls.py's; in-process train.run tests
    # keep the default.
    '--config.cpu_matmuls=xla',
]
EVALS = [
    '--config.evals.retrieval.every=0', '--config.evals.retrieval.data.num_examples=48',
    '--config.evals.retrieval.batch_size=48', '--config.evals.linear_probe.every=0',
    '--config.evals.linear_probe.data.num_examples=48', '--config.evals.linear_probe.train_data.num_examples=96',
    '--config.evals.linear_probe.batch_size=48',
]


# A constant schedule after the default 100 warmup steps: the lr ramps with the step counter (a resumed run
# that restored it wrong diverges) whatever a run's total_steps, so the runs of the SIGKILL, SIGTERM and learning
# tests compile one train step program, read back from the persistent cache after the first (16 s a compile).
SCHEDULE = ['--config.optim.schedule=constant']
NO_EVALS = ['--config.evals.zeroshot.every=-1']  # For runs whose evaluation nothing reads.


def _cli(workdir, *extra, config='configs/siglip.py:res=32', module='jmm.main', check=False, tiny=True, **kw):
  cmd = [sys.executable, '-m', module, f'--config={config}', f'--workdir={workdir}', *(TINY if tiny else ()),
         *extra]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)
  if check and proc.returncode:
    raise AssertionError(f'{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
  return proc


def _params_at(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(path)
  return tree['params']


def _flat(tree, prefix=''):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f'{prefix}/{k}'))
    return out
  return {prefix: np.asarray(tree)}


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
  steps = [*SCHEDULE, *NO_EVALS, '--config.total_steps=8', '--config.checkpoint.every=4']
  straight = str(tmp_path / 'straight')
  _cli(straight, *steps, check=True)

  killed = str(tmp_path / 'killed')
  proc = _cli(killed, *steps, '--config.debug.kill_at_step=4')
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  assert not os.path.exists(os.path.join(killed, 'final_metrics.json'))
  resumed = _cli(killed, *steps, check=True)
  assert 'resumed from checkpoint at step 4' in resumed.stdout

  a, b = _flat(_params_at(straight, 8)), _flat(_params_at(killed, 8))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # The resumed run logged steps 5..8 only, with the same losses as the straight run.
  straight_loss = {m['step']: m['loss'] for m in _metrics(straight) if 'loss' in m}
  killed_loss = {m['step']: m['loss'] for m in _metrics(killed) if 'loss' in m}
  assert straight_loss == killed_loss


@pytest.mark.slow
def test_training_learns_and_writes_final_metrics(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = _cli(workdir, *SCHEDULE, '--config.total_steps=60', '--config.checkpoint.every=1000', *EVALS, check=True)
  assert 'img/s' in proc.stdout and 'eta' in proc.stdout
  # A quiet terminal: set-up lines, progress lines and evaluation lines; no library INFO logging.
  assert 'INFO' not in proc.stderr and 'I1' not in proc.stderr[:2], proc.stderr[-2000:]
  assert len(proc.stdout.splitlines()) < 50, proc.stdout
  losses = [m['loss'] for m in _metrics(workdir) if 'loss' in m]
  assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  for key in ('zeroshot/top1', 'zeroshot/top1_seen', 'zeroshot/top1_unseen', 'retrieval/i2t_r1',
              'retrieval/t2i_r1', 'linear_probe/top1'):
    assert 0.0 <= final[key] <= 1.0, key
  assert os.path.exists(os.path.join(workdir, 'tokenizer.model'))

  # The standalone evaluator restores the same parameters and reproduces the final numbers.
  ev = _cli(workdir, *EVALS, module='jmm.evaluate', check=True)
  with open(os.path.join(workdir, 'eval_60.json')) as f:
    again = json.load(f)
  assert again['zeroshot/top1'] == pytest.approx(final['zeroshot/top1'], abs=1e-6), ev.stdout

  # A restart with another model shape in the same workdir is refused with a clear message: first by the config
  # check, and with that overridden, by the checkpoint's shapes.
  proc = _cli(workdir, '--config.total_steps=80', '--config.model.image.width=48')
  assert proc.returncode != 0
  assert 'model.image.width: 32 -> 48' in proc.stderr and 'Traceback' not in proc.stderr
  proc = _cli(workdir, '--config.total_steps=80', '--config.model.image.width=48', '--config.resume_check=False')
  assert proc.returncode != 0
  assert 'different model shape' in proc.stderr and 'params/img/' in proc.stderr


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes_exactly(tmp_path):
  """SIGTERM saves at the next step boundary and exits 0; resuming from that checkpoint gives the parameters an
  uninterrupted run reaches (a constant schedule, so the first run's total_steps does not shape the lr)."""
  flags = [*SCHEDULE, *NO_EVALS, '--config.checkpoint.every=100000']
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'jmm.main', '--config=configs/siglip.py:res=32', f'--workdir={workdir}',
         *TINY, *flags, '--config.total_steps=100000']
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 300
  while not os.path.exists(metrics) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  assert 'SIGTERM: saved a checkpoint at step' in out
  step = int(out.split('SIGTERM: saved a checkpoint at step ')[1].split(';')[0])
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(step)))

  end = f'--config.total_steps={step + 2}'
  resumed = _cli(workdir, *flags, end, check=True)
  assert f'resumed from checkpoint at step {step}' in resumed.stdout
  straight = str(tmp_path / 'straight')
  _cli(straight, *flags, end, check=True)
  a, b = _flat(_params_at(straight, step + 2)), _flat(_params_at(workdir, step + 2))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize('extra,config,pattern', [
    (['--config.no_such_key=1'], 'configs/siglip.py', "--config.no_such_key: config has no field 'no_such_key'"),
    (['--config.model.imag.width=8'], 'configs/siglip.py',
     "--config.model.imag.width: config.model has no field 'imag'; did you mean image?"),
    (['--config.total_steps=abc'], 'configs/siglip.py', 'flag --config.total_steps=abc: invalid literal for int()'),
    ([], 'configs/siglip.py:img=Q/16', "Q/16"),
    ([], 'configs/siglip.py:imgs=B', "--config=configs/siglip.py:imgs=B: unknown config argument 'imgs'"),
    ([], 'configs/siglip.py:res=abc', "--config=configs/siglip.py:res=abc: config argument res='abc': expected int"),
    ([], 'configs/no_such.py', "--config=configs/no_such.py: no config file 'configs/no_such.py'"),
    (['--config.tokenizer.path=/nonexistent/spm.model'], 'configs/siglip.py', '/nonexistent/spm.model'),
])
def test_bad_input_fails_fast_with_a_clear_message(tmp_path, extra, config, pattern):
  proc = _cli(str(tmp_path / 'w'), *extra, config=config, tiny=False)
  assert proc.returncode != 0
  assert pattern in proc.stderr, proc.stderr[-2000:]
  # One clear line, not a stack, also for errors raised while absl parses the flags (jmm.config.parse_flags).
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]


def test_evaluate_reports_a_bad_flag_in_one_line(tmp_path):
  proc = _cli(str(tmp_path), '--config.evals.zeroshot.evry=1', config='configs/siglip.py', module='jmm.evaluate',
              tiny=False)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines() == [
      "error: --config.evals.zeroshot.evry: config.evals.zeroshot has no field 'evry'; did you mean every?"]


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  proc = _cli(str(blocker / 'sub'))
  assert proc.returncode != 0
  assert 'cannot be written' in proc.stderr and str(blocker) in proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_clip_config_trains_with_the_softmax_loss(tmp_path):
  workdir = str(tmp_path / 'clip')
  _cli(workdir, '--config.total_steps=60', '--config.optim.warmup_steps=5', '--config.checkpoint.every=1000',
       config='configs/clip.py:res=32', check=True)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['objectives']['softmax']['loss'] == 'softmax'
  losses = [m['loss'] for m in _metrics(workdir) if 'loss' in m]
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses
