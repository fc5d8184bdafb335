"""Test set-up: 8 simulated CPU devices and parsed absl flags, before JAX or Grain start."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the whole session, this process and the CLI runs it starts: a test that
# trains, is killed and resumes compiles the same programs three times, and many tests build the same tiny
# models. Fresh per session (so nothing stale from an earlier checkout), removed at exit. Executables are keyed
# on the HLO, the compile options and XLA_FLAGS, so a cache hit runs the same program a compile would give.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jmm-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

from absl import flags  # noqa: E402

# Grain worker processes read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()
