"""The shape of the code: layers point down (import-linter contracts in pyproject.toml), no cycles, short files."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = os.path.join(os.path.dirname(sys.executable), 'lint-imports')


@pytest.mark.skipif(not os.path.exists(LINT), reason='import-linter is not installed (pip install -e ".[test]")')
def test_import_contracts_are_kept():
  proc = subprocess.run([LINT, '--config', os.path.join(ROOT, 'pyproject.toml')], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert 'Contracts: 4 kept, 0 broken.' in proc.stdout, proc.stdout[-2000:]


def _sources():
  for folder, _, files in os.walk(os.path.join(ROOT, 'jmm')):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        with open(path) as f:
          yield os.path.relpath(path, ROOT), f.read()


def test_files_stay_short_and_train_is_only_the_loop():
  lengths = {path: text.count('\n') for path, text in _sources()}
  assert lengths['jmm/train.py'] < 250, lengths['jmm/train.py']
  long = {p: n for p, n in lengths.items() if n > 500}
  assert not long, long


def test_each_constant_is_defined_once():
  for name in ('BATCH_AXES', 'DTYPES'):
    where = [p for p, text in _sources() if re.search(rf'^{name} = ', text, re.M)]
    assert len(where) == 1, (name, where)
  # Which axes of a mesh split the batch: one function (jmm/kernels/mesh_axes.py), which every layer imports.
  where = [p for p, text in _sources() if re.search(r'^def batch_axes\(', text, re.M)]
  assert where == ['jmm/kernels/mesh_axes.py'], where
  # The MoE defaults: jmm/models/moe.py's DEFAULTS, which the recipes read.
  where = [p for p, text in _sources() if 'num_experts=0, k=2' in text]
  assert where == ['jmm/models/moe.py'], where
