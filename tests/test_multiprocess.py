"""Two processes x 4 CPU devices on loopback (launch/local_multiprocess.sh) train like one process x 8 devices,
checkpoint collectively, and resume after both die."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
    '--config=configs/siglip.py:batch=16,steps=6,res=16',
    '--config.model.image.width=32', '--config.model.image.depth=1', '--config.model.image.mlp_dim=64',
    '--config.model.image.num_heads=2', '--config.model.image.patch_size=(8,8)',
    '--config.model.text.width=32', '--config.model.text.depth=1', '--config.model.text.mlp_dim=64',
    '--config.model.text.num_heads=2', '--config.model.out_dim=32', '--config.log_every=1',
    '--config.checkpoint.every=2', '--config.tokenizer.train_sentences=2000',
    '--config.mesh=data=-1,fsdp=2,tensor=1',
    '--config.evals.zeroshot.data.num_examples=48', '--config.evals.zeroshot.batch_size=48',
    '--config.evals.retrieval.every=-1', '--config.evals.linear_probe.every=-1',
    # XLA's matmuls: 'auto' compiles each train step twice here (oneDNN refuses a fusion of this tiny model, and
    # oneDNN programs never reach the persistent cache), about 10 s per process and launch. The check and the
    # fallback are tests/test_cpu_matmuls.py's.
    '--config.cpu_matmuls=xla',
]


def _env(**extra):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # The launcher sets the per-process device count itself.
  env.update(JAX_PLATFORMS='cpu', PYTHON=sys.executable, **extra)
  return env


def _launch(n, workdir, *extra):
  cmd = ['bash', os.path.join(ROOT, 'launch', 'local_multiprocess.sh'), str(n), *FLAGS, f'--workdir={workdir}',
         *extra]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=_env(DEVICES_PER_PROCESS='4'))


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


@pytest.mark.parametrize('script, expect', [
    ('local_multiprocess.sh', 'DEVICES_PER_PROCESS'), ('tpu_pod.sh', '--worker=all|--tpu=NAME'),
    ('gke.sh', '--tpu_type'), ('slurm.sbatch', 'sbatch --nodes')])
def test_launch_scripts_document_their_arguments(script, expect):
  path = os.path.join(ROOT, 'launch', script)
  subprocess.run(['bash', '-n', path], check=True)  # Syntax.
  out = subprocess.run(['bash', path, '--help'], capture_output=True, text=True, check=True).stdout
  assert any(e in out for e in expect.split('|')), out


def test_launch_scripts_build_the_right_commands():
  tpu = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'tpu_pod.sh'), '--tpu=t', '--zone=z', '--dry_run',
                        '--', '--config=configs/siglip.py', '--workdir=gs://b/r'],
                       capture_output=True, text=True, check=True).stdout
  assert '--worker=all' in tpu and 'JMM_DISTRIBUTED=auto' in tpu and 'jmm.main' in tpu
  gke = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'gke.sh'), '--tpu_type=v5p-128', '--image=img',
                        '--render', '--', '--config=configs/siglip.py', '--workdir=gs://b/r'],
                       capture_output=True, text=True, check=True).stdout
  assert 'kind: JobSet' in gke and 'parallelism: 16' in gke  # v5p-128 = 64 chips = 16 hosts of 4.
  bad = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'tpu_pod.sh'), '--zone=z', '--', '--x'],
                       capture_output=True, text=True)
  assert bad.returncode == 2 and '--tpu and --zone are required' in bad.stderr


@pytest.mark.slow
def test_two_processes_train_resume_and_match_one_process(tmp_path):
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  # Both processes die hard (SIGKILL) right after the collective checkpoint of step 4 ...
  first = _launch(2, multi, '--config.debug.kill_at_step=4')
  assert first.returncode != 0, first.stdout + first.stderr
  assert os.path.isdir(os.path.join(multi, 'checkpoints', '4')), first.stdout + first.stderr
  # ... and the same command resumes there and finishes.
  second = _launch(2, multi)
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  assert 'resumed from checkpoint at step 4' in second.stdout
  assert '2 processes' in second.stdout
  assert os.path.isfile(os.path.join(multi, 'final_metrics.json'))

  proc = subprocess.run([sys.executable, '-m', 'jmm.main', *FLAGS, f'--workdir={single}'], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  want, got = _losses(single), _losses(multi)
  assert sorted(want) == list(range(1, 7)) and sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5)
  # The final zero-shot evaluation, its embeddings computed across both processes, gives the one-process numbers.
  with open(os.path.join(multi, 'final_metrics.json')) as f, open(os.path.join(single, 'final_metrics.json')) as g:
    got, want = json.load(f), json.load(g)
  for key in ('zeroshot/top1', 'zeroshot/colour_top1', 'zeroshot/shape_top1'):
    assert got[key] == pytest.approx(want[key], abs=1e-6), key


@pytest.mark.slow
def test_a_stop_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path):
  """Saves are collective: when only process 1 gets SIGTERM, both agree to stop and save at the same step."""
  workdir = str(tmp_path / 'run')
  proc = _launch(2, workdir, '--config.debug.sigterm_at_step=3', '--config.debug.sigterm_process=1')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'SIGTERM: saved a checkpoint at step 3' in proc.stdout  # Process 0, which got no signal itself.
  with open(os.path.join(workdir, 'process_1.log')) as f:
    assert 'SIGTERM: saved a checkpoint at step 3' in f.read()
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '3'))
  assert not os.path.exists(os.path.join(workdir, 'final_metrics.json'))
