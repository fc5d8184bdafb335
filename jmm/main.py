"""Entry point: `python -m jmm.main --config=configs/siglip.py[:args] --workdir=DIR [--config.field=value]`."""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from jmm import config as config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, with an optional :argument.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.')
# Multi-process runs. Cloud TPU pods, SLURM and mpirun are detected without these (jmm.parallel).
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index, 0 .. num_processes - 1.')


def main(argv) -> None:
  del argv
  from jmm import hostmem  # pylint: disable=g-import-not-at-top
  try:  # First, before JAX starts its CPU client: see jmm/hostmem.py.
    hostmem.tune_malloc(_CONFIG.value.get('host_malloc', 'auto'))
  except ValueError as e:
    sys.exit(f'error: {e}')
  from jmm import errors  # Imported after flag parsing so --help stays fast.
  from jmm import metrics
  metrics.quiet_library_logs()
  from jmm import parallel
  from jmm import train
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train.run(_CONFIG.value, _WORKDIR.value)
  except errors.USER_ERRORS as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=config_lib.parse_flags)  # Bad flags: one error line, no traceback.
