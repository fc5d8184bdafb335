#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored), the wheels that the lent GPU machine's image lacks for jmm's benchmarks:
# ml_collections (configs) and grain with its own missing needs (array_record, portpicker). Python 3.12, x86-64,
# as that image's python3 (see ../.library/device/KINDS.md). Then, on the device machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   PYTHONUNBUFFERED=1 python3 benchmarks/device_suite.py --out_dir=$OUT --budget_s=480
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PY=${PYTHON:-python3}
platforms=()
for n in 2_17 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${n}_x86_64"); done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl \
  "ml_collections==$("$PY" -c 'import importlib.metadata as m; print(m.version("ml_collections"))')" \
  "grain==$("$PY" -c 'import importlib.metadata as m; print(m.version("grain"))')" \
  array_record portpicker
ls -la .whl
