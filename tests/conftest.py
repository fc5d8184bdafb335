"""Test set-up: 8 simulated CPU devices and parsed absl flags, before JAX or Grain start."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# Grain worker processes read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()
