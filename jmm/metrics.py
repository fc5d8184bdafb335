"""Metric sinks: JSON lines in the workdir, TensorBoard where installed, and a one-line terminal progress report."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np


def to_python(value):
  """A JSON-friendly float/int/bool for a numpy or jax scalar."""
  value = np.asarray(value)
  if value.dtype == bool:
    return bool(value)
  if np.issubdtype(value.dtype, np.integer):
    return int(value)
  return float(value)


class MetricWriter:
  """Appends one JSON object per logged step to `workdir/metrics.jsonl` (and TensorBoard if available)."""

  def __init__(self, workdir: str, *, is_main: bool = True):
    self.is_main = is_main
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if is_main:
      try:  # TensorBoard is optional: tensorboardX is small and needs no TensorFlow.
        from tensorboardX import SummaryWriter  # pytype: disable=import-error
        self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
      except ImportError:
        pass

  def write(self, step: int, metrics: dict) -> None:
    if not self.is_main:
      return
    record = {'step': int(step), **{k: to_python(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for k, v in record.items():
        if k != 'step':
          self._tb.add_scalar(k, v, step)
      self._tb.flush()


def format_duration(seconds: float) -> str:
  """'1h02m', '3m20s' or '42s'."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  if seconds >= 60:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds}s'


class Progress:
  """Prints `step 200/2000 | loss 1.234 | 1530 img/s | eta 3m20s` at a steady rhythm."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int, *, stream=sys.stdout):
    self.total, self.batch_size, self.stream = total_steps, batch_size, stream
    self._last_step, self._last_time = start_step, time.perf_counter()
    self.excluded = 0.0  # Seconds spent in evals/checkpoints since the last report (not training speed).

  def report(self, step: int, metrics: dict) -> dict:
    """Prints one line; returns {'images_per_sec', 'steps_per_sec'} measured since the last report."""
    now = time.perf_counter()
    elapsed = max(now - self._last_time - self.excluded, 1e-9)
    steps = step - self._last_step
    sps = steps / elapsed
    eta = (self.total - step) / sps if sps > 0 else float('inf')
    parts = [f'step {step}/{self.total}']
    parts += [f'{k} {to_python(v):.4g}' for k, v in metrics.items() if k in ('loss',)]
    parts += [f'{sps * self.batch_size:.0f} img/s', f'eta {format_duration(eta)}']
    print(' | '.join(parts), file=self.stream, flush=True)
    self._last_step, self._last_time, self.excluded = step, now, 0.0
    return {'images_per_sec': sps * self.batch_size, 'steps_per_sec': sps}


def quiet_library_logs() -> None:
  """Library INFO logging (Orbax, Grain, absl) off unless --verbosity was given, so the terminal shows jmm's
  set-up, progress and evaluation lines; `--verbosity=0` brings INFO back. Call after absl parsed the flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
